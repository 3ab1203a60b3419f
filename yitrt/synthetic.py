"""Random Hugging Face Llama-family folders of any shape, written streaming (for tests and benchmarks).

A folder made here is what ``save_pretrained`` would write for a model of that shape: ``config.json``, one or
more ``model*.safetensors`` shards (with ``model.safetensors.index.json`` when sharded) and, on request, the
legacy ``YiForCausalLM`` layout (norms named ``ln1``/``ln2``). Shards are written tensor by tensor, so a
Yi-6B-shaped folder (12 GB) needs only one tensor in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yitrt.checkpoint.safetensors_io import CODES
from yitrt.checkpoint.safetensors_writer import PlannedTensor, StreamingWriter
from yitrt.models.registry import load_registry

#: A tiny Yi-shaped model (GQA 8 heads / 2 KV heads) for tests.
_TINY = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 688, "vocab_size": 512}


def _hf_dims(dims: dict[str, int]) -> dict[str, int]:
    """Registry shape dims (ModelConfig names) → config.json keys."""
    return {
        "hidden_size": dims["hidden_size"], "num_hidden_layers": dims["num_layers"], "num_attention_heads": dims["num_heads"],
        "num_key_value_heads": dims["num_kv_heads"], "intermediate_size": dims["intermediate_size"], "vocab_size": dims["vocab_size"],
    }


#: config.json dims by shape name: "tiny" plus every Yi shape family of the registry (yi_checkpoints.yaml).
SHAPES: dict[str, dict[str, int]] = {"tiny": _TINY, **{name: _hf_dims(d) for name, d in load_registry().shapes.items()}}


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate.

    Attributes:
        shape: a key of SHAPES.
        layers: override the layer count (quicker benchmarks).
        dtype: torch dtype name of the weights.
        shards: number of safetensors shards (>1 writes an index).
        legacy_yi: write the ``YiForCausalLM`` layout.
        tied: tie embeddings (no lm_head tensor written).
        seed: RNG seed.
        overrides: extra config.json keys (e.g. rope settings).
        tokenizer: also write a byte-level BPE tokenizer of the model's vocab size with a ChatML template.
        head_std: std of the lm_head (and embedding) weights. The default 0.02 gives near-uniform next-token
            distributions; a larger one gives clear top-1 tokens, so that top-1 comparisons measure arithmetic
            rather than near-ties.
    """

    shape: str = "tiny"
    layers: int | None = None
    dtype: str = "bfloat16"
    shards: int = 1
    legacy_yi: bool = False
    tied: bool = False
    seed: int = 0
    overrides: tuple[tuple[str, Any], ...] = ()
    tokenizer: bool = False
    head_std: float = 0.02


def hf_config(spec: SyntheticSpec) -> dict[str, Any]:
    """The config.json of a synthetic model."""
    dims = dict(SHAPES[spec.shape])
    if spec.layers:
        dims["num_hidden_layers"] = spec.layers
    cfg = {
        "architectures": ["YiForCausalLM" if spec.legacy_yi else "LlamaForCausalLM"],
        "model_type": "Yi" if spec.legacy_yi else "llama",
        **dims,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 5000000.0,
        "rope_scaling": None,
        "tie_word_embeddings": spec.tied,
        "torch_dtype": spec.dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "attention_bias": False,
        "mlp_bias": False,
    }
    cfg.update(dict(spec.overrides))
    return cfg


def tensor_shapes(cfg: dict[str, Any], legacy_yi: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes in ``save_pretrained`` order for a Llama config dict."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    ln1, ln2 = ("ln1", "ln2") if legacy_yi else ("input_layernorm", "post_attention_layernorm")
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + f"{ln1}.weight", (h,)),
            (p + "self_attn.q_proj.weight", (heads * d, h)),
            (p + "self_attn.k_proj.weight", (kv * d, h)),
            (p + "self_attn.v_proj.weight", (kv * d, h)),
            (p + "self_attn.o_proj.weight", (h, heads * d)),
            (p + f"{ln2}.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (v, h)))
    return out


def write_synthetic_model(folder: Path, spec: SyntheticSpec) -> Path:
    """Write a random HF model folder.

    Norm weights are near 1 and linear weights ~N(0, 0.02) so the model computes finite logits.

    Args:
        folder: destination (created; must not hold another model).
        spec: what to generate.

    Returns:
        The folder.
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(spec)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    dtype = getattr(torch, spec.dtype)
    code = CODES[spec.dtype]
    tensors = tensor_shapes(cfg, spec.legacy_yi)
    # contiguous groups keep layers together, as save_pretrained does
    per = -(-len(tensors) // spec.shards)
    groups = [tensors[k * per : (k + 1) * per] for k in range(spec.shards)]
    gen = torch.Generator().manual_seed(spec.seed)
    weight_map = {}
    for k, group in enumerate(groups):
        fname = "model.safetensors" if spec.shards == 1 else f"model-{k + 1:05d}-of-{spec.shards:05d}.safetensors"
        writer = StreamingWriter(folder / fname, [PlannedTensor(n, code, s) for n, s in group], {"format": "pt"})
        for name, shape in group:
            if len(shape) == 1:
                t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            else:
                head = name.endswith(("lm_head.weight", "embed_tokens.weight"))
                t = (spec.head_std if head else 0.02) * torch.randn(shape, generator=gen)
            writer.write(name, t.to(dtype))
            weight_map[name] = fname
        writer.close()
    if spec.tokenizer:
        write_tokenizer(folder, cfg["vocab_size"])
    if spec.shards > 1:
        total = sum(PlannedTensor(n, code, s).nbytes for n, s in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` ids, trained on the shipped evaluation text, with
    ``<s>``/``</s>`` (ids 1, 2) and ChatML turn markers; saved as tokenizer.json + tokenizer_config.json."""
    from importlib import resources

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # one copy of ChatML: the demo model's template (its default system line is harmless here)
    from yitrt.demo import CHATML_TEMPLATE

    text = resources.files("yitrt").joinpath("data", "eval_text.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([text] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", additional_special_tokens=specials[3:],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(folder))
