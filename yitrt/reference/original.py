"""The Hugging Face original, run with transformers, as the yardstick ``yitrt verify`` compares against.

Loaded without remote code and, unless the user opts in, from safetensors only, after yitrt's own checks of every
shard's header and the index (``SourceCheckpoint``): transformers never sees a file whose header lies. The legacy ``YiForCausalLM``
layout (norms ``ln1``/``ln2``, which needed remote code) is loaded as transformers' Llama with the two norm
names mapped — the same model, computed by transformers' own Llama code.
"""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path

import torch

from yitrt.checkpoint.source import SourceCheckpoint
from yitrt.errors import CheckpointError, require
from yitrt.models.config import ModelConfig, load_config

#: legacy YiForCausalLM norm names → transformers Llama names
LEGACY_RENAMES = (("ln1.weight", "input_layernorm.weight"), ("ln2.weight", "post_attention_layernorm.weight"))


def check_original(model_dir: Path) -> None:
    """Prove every safetensors header of the original and its index (``SourceCheckpoint``; no tensor data is
    read) before transformers or the legacy loader reads them; a folder without safetensors is left to the loader.

    Raises:
        CheckpointError: a damaged or lying shard or index.
    """
    if any(Path(model_dir).glob("*.safetensors")):
        SourceCheckpoint(model_dir).close()


def load_original(model_dir: Path, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False, device_map: str | None = None):
    """The HF model in eval mode on ``device`` with weights cast to ``dtype``; with ``device_map`` (e.g.
    ``"auto"``) transformers spreads the layers over the visible GPUs instead.

    Raises:
        MissingDependencyError: transformers is not installed.
        CheckpointError: no safetensors weights (pickles need ``allow_pickle``), a damaged or lying shard or
            index, or weights that do not load.
    """
    require("transformers", "quant")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # stderr stays one line per event (and clean for --json)
    cfg = load_config(model_dir)
    has_safetensors = any(Path(model_dir).glob("*.safetensors"))
    if not has_safetensors and not allow_pickle:
        raise CheckpointError(f"{model_dir} has no .safetensors weights", "convert the weights to safetensors, or pass --allow-pickle to load .bin files")
    check_original(model_dir)
    if cfg.legacy_yi:
        return _load_legacy_yi(model_dir, cfg, device, dtype)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, trust_remote_code=False, use_safetensors=has_safetensors or None,
            **({"device_map": device_map} if device_map else {}),
        )
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) refused a pickle that would run code
        from yitrt.checkpoint.source import pickle_refusal_reason

        raise CheckpointError(f"{model_dir}: pickle weights cannot be loaded safely ({pickle_refusal_reason(exc)})",
                              "use a safetensors revision (weights_only=True refuses pickles that run code)") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"transformers could not load {model_dir}: {str(exc).splitlines()[0]}", "check the model folder (yitrt inspect)") from None
    return (model if device_map else model.to(device)).eval()


def _load_legacy_yi(model_dir: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias, hidden_act=cfg.hidden_act,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    state = {}
    with SourceCheckpoint(model_dir) as source:
        for name in source.tensors:
            tensor = source.read(name).to(dtype)
            for old, new in LEGACY_RENAMES:
                if name.endswith(old):
                    name = name[: -len(old)] + new
            state[name] = tensor
        source.check_unchanged()
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{model_dir}: legacy Yi weights do not map onto Llama ({len(missing)} missing, {len(unexpected)} unexpected)", "check the model folder (yitrt inspect)")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # buffers were created on meta
    return model.to(device).eval()


@torch.inference_mode()
def score_original(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """float32 logits [len, vocab] for each sequence (one forward pass each, no padding)."""
    device = next(model.parameters()).device
    return [model(torch.tensor([s], device=device)).logits[0].to(torch.float32).cpu() for s in sequences]


@torch.inference_mode()
def greedy_original(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation with transformers' KV cache (never stops early: verify compares whole runs)."""
    device = next(model.parameters()).device
    # transformers 5.x renamed the cache argument (past_key_values is deprecated there)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel forwards the argument
    cache_arg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    out = model(torch.tensor([prompt], device=device), use_cache=True)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        new.append(token)
        if len(new) == max_new_tokens:
            break
        cache = getattr(out, "cache", None) or out.past_key_values
        out = model(torch.tensor([[token]], device=device), use_cache=True, **{cache_arg: cache})
    return new
