"""`CheckpointSpec`: what the reference runtime reads from a TensorRT-LLM checkpoint's ``config.json``.

The runtime computes what TensorRT-LLM's LLaMA model computes, so it reads only the keys that model reads
(reference/trtllm-checkpoint-and-build.md §1.2) with TensorRT-LLM's defaults, and refuses — by name, with the
reason — every setting it cannot reproduce exactly instead of approximating it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yitrt.errors import CheckpointError, UnsupportedModelError

#: quant_algo values the runtime emulates (None = no quantization). Facts per algo: reference §3.1-3.3.
EMULATED_ALGOS = (
    None, "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A8_SQ_PER_CHANNEL", "FP8", "FP8_PER_CHANNEL_PER_TOKEN",
)
EMULATED_KV_ALGOS = (None, "INT8", "FP8")

#: quant_algo values refused, with the reason (reference §3.1-3.4).
REFUSED_ALGOS: dict[str, str] = {
    "W4A16_GPTQ": "GPTQ checkpoints hold the arch-specific preprocessed kernel layout, which cannot be read back exactly",
    "W8A16_GPTQ": "GPTQ checkpoints hold the arch-specific preprocessed kernel layout, which cannot be read back exactly",
    "W8A8_SQ_PER_TENSOR_PLUGIN": "the SmoothQuant plugin variants fuse quantization into RmsNorm kernels whose rounding is not documented",
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": "the SmoothQuant plugin variants fuse quantization into RmsNorm kernels whose rounding is not documented",
    "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN": "the SmoothQuant plugin variants fuse quantization into RmsNorm kernels whose rounding is not documented",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN": "the SmoothQuant plugin variants fuse quantization into RmsNorm kernels whose rounding is not documented",
    "NVFP4": "FP4 block formats (Blackwell) are not emulated",
    "MIXED_PRECISION": "per-layer mixed formats (quant_cfg.json) are not emulated",
    "FP8_BLOCK_SCALES": "FP8 block scales are not a Llama engine-path format",
}

#: TensorRT-LLM's default exclusions when ``exclude_modules`` is null or empty (quantize.py ``quantize_layers``).
DEFAULT_EXCLUDES = ("*lm_head", "*router", "*vocab_embedding", "*position_embedding", "*block_embedding", "*shared_expert_gate", "*fused_a")

#: rotary_scaling types (``type``/``rope_type``) the runtime implements; reference §1.2, yi-models.md.
ROPE_TYPES = ("none", "default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class CheckpointSpec:
    """The parts of a TensorRT-LLM Llama checkpoint config the computation depends on."""

    path: Path
    dtype: str
    logits_dtype: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    max_position_embeddings: int | None
    norm_epsilon: float
    rotary_base: float
    rotary_scaling: dict[str, Any] | None
    tp: int
    pp: int
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    group_size: int
    pre_quant_scale: bool
    exclude_modules: tuple[str, ...]
    clamp_val: tuple[float, float] | None
    parallel_embedding: bool
    embedding_sharding_dim: int
    attn_bias: bool
    mlp_bias: bool

    @property
    def world_size(self) -> int:
        """Number of rank files."""
        return self.tp * self.pp

    @property
    def rope_type(self) -> str:
        """The rotary scaling type ("none" when unscaled)."""
        if not self.rotary_scaling:
            return "none"
        kind = self.rotary_scaling.get("type") or self.rotary_scaling.get("rope_type") or "none"
        return "none" if kind == "default" else kind

    def kv_heads_local(self) -> int:
        """KV heads per TP rank: ceil(n_kv / tp) (1 when heads are repeated)."""
        return -(-self.num_kv_heads // self.tp)

    def stage_layers(self, pp_rank: int) -> range:
        """Global layers of a pipeline stage: contiguous blocks, the first L % pp stages one longer
        (``torch.tensor_split``, TensorRT-LLM 1.x mapping.pp_layers; reference §2.6)."""
        base, extra = divmod(self.num_layers, self.pp)
        start = pp_rank * base + min(pp_rank, extra)
        return range(start, start + base + (1 if pp_rank < extra else 0))


def _get(config: dict[str, Any], key: str, default: Any = ..., kind: type | tuple[type, ...] = int) -> Any:
    if key not in config or config[key] is None:
        if default is ...:
            raise CheckpointError(f"config.json lacks {key!r}", "point at a TensorRT-LLM checkpoint folder (config.json + rank*.safetensors)")
        return default
    value = config[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise CheckpointError(f"config.json {key!r} is {value!r}", "write the value TensorRT-LLM expects (reference §1.2)")
    return value


def load_spec(folder: Path) -> CheckpointSpec:
    """Read and check a checkpoint's ``config.json``.

    Args:
        folder: the checkpoint folder.

    Returns:
        The spec.

    Raises:
        CheckpointError: no config, malformed values.
        UnsupportedModelError: a model type, layout or format the runtime does not reproduce (named, with why).
    """
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json", "point at a TensorRT-LLM checkpoint folder (yitrt convert/quantize output)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})", "re-create the checkpoint") from None
    if not isinstance(config, dict) or "architecture" not in config:
        raise CheckpointError(f"{path} is not a TensorRT-LLM checkpoint config (no 'architecture')", "point at a checkpoint folder, not a Hugging Face model")
    unsupported = []
    if config["architecture"] != "LlamaForCausalLM":
        unsupported.append(f"architecture {config['architecture']!r} (the reference runtime implements TensorRT-LLM's LlamaForCausalLM)")
    if config.get("position_embedding_type", "learned_absolute") != "rope_gpt_neox":
        unsupported.append(f"position_embedding_type {config.get('position_embedding_type')!r} (Llama uses rope_gpt_neox)")
    if config.get("hidden_act", "gelu") != "silu":
        unsupported.append(f"hidden_act {config.get('hidden_act')!r} (Llama uses silu)")
    heads, hidden = _get(config, "num_attention_heads"), _get(config, "hidden_size")
    head_size = _get(config, "head_size", hidden // heads)
    rotary_dim = config.get("rotary_embedding_dim") or int(head_size * float(config.get("rotary_pct", 1.0)))
    if rotary_dim != head_size:
        unsupported.append(f"partial rotary embedding ({rotary_dim} of {head_size} dims)")
    for key in ("residual_mlp", "qk_layernorm", "moe"):
        if config.get(key) and not (key == "moe" and not (config["moe"] or {}).get("num_experts")):
            unsupported.append(f"{key} (not part of the Llama/Yi model)")
    for key in ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "output_multiplier_scale"):
        if config.get(key) not in (None, 1, 1.0):
            unsupported.append(f"{key} {config[key]} (Granite-style multipliers)")
    mapping = config.get("mapping") or {}
    if int(mapping.get("cp_size", 1)) != 1:
        unsupported.append("context parallelism (cp_size > 1)")
    quant = config.get("quantization") or {}
    algo, kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if algo in REFUSED_ALGOS:
        unsupported.append(f"quant_algo {algo}: {REFUSED_ALGOS[algo]}")
    elif algo not in EMULATED_ALGOS:
        unsupported.append(f"quant_algo {algo!r} is not a format the reference runtime knows")
    if kv_algo not in EMULATED_KV_ALGOS:
        unsupported.append(f"kv_cache_quant_algo {kv_algo!r} (emulated: INT8, FP8)")
    if quant.get("has_zero_point"):
        unsupported.append("AWQ with has_zero_point (asymmetric int4; TensorRT-LLM's own AWQ preset has none)")
    scaling = config.get("rotary_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")  # TensorRT-LLM reads "type" first
        if kind not in ROPE_TYPES:
            unsupported.append(f"rotary_scaling type {kind!r} (implemented: {', '.join(ROPE_TYPES[2:])})")
    if unsupported:
        raise UnsupportedModelError(
            f"{folder}: the reference runtime cannot reproduce " + "; ".join(unsupported),
            "verify checkpoints of Llama-family models (Yi) in the formats listed by `yitrt schemes`",
        )
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    world = int(mapping.get("world_size", tp * pp))
    if world != tp * pp:
        raise CheckpointError(f"{path}: mapping.world_size {world} != tp_size {tp} × pp_size {pp}", "fix the mapping in config.json")
    clamp = quant.get("clamp_val")
    excludes = tuple(quant.get("exclude_modules") or ()) or DEFAULT_EXCLUDES
    return CheckpointSpec(
        path=folder,
        dtype=_get(config, "dtype", kind=str),
        logits_dtype=config.get("logits_dtype") or "float32",
        vocab_size=_get(config, "vocab_size"),
        hidden_size=hidden,
        num_layers=_get(config, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_get(config, "num_key_value_heads", heads),
        head_size=head_size,
        intermediate_size=_get(config, "intermediate_size", 4 * hidden),
        max_position_embeddings=config.get("max_position_embeddings"),
        norm_epsilon=float(config.get("norm_epsilon", 1e-5)),
        rotary_base=float(config.get("rotary_base", 10000.0)),
        rotary_scaling=dict(scaling) if scaling else None,
        tp=tp,
        pp=pp,
        quant_algo=algo,
        kv_cache_quant_algo=kv_algo,
        group_size=int(quant.get("group_size") or 128),
        pre_quant_scale=bool(quant.get("pre_quant_scale", False)),  # QuantConfig default
        exclude_modules=excludes,
        clamp_val=(float(clamp[0]), float(clamp[1])) if clamp else None,
        parallel_embedding=bool(config.get("use_parallel_embedding", False)),
        embedding_sharding_dim=int(config.get("embedding_sharding_dim", 0)),
        attn_bias=bool(config.get("attn_bias", config.get("bias", False))),
        mlp_bias=bool(config.get("mlp_bias", config.get("bias", False))),
    )


def emulation_notes(spec: CheckpointSpec) -> list[str]:
    """What the reference runtime computes differently from an engine built from this checkpoint, or what the
    build will object to — reported with every verification, never silently."""
    notes = []
    if spec.kv_cache_quant_algo == "FP8" and spec.quant_algo in ("FP8", "W4A8_AWQ"):
        notes.append("FP8 context FMHA (trtllm-build --use_fp8_context_fmha, on by default, SM >= 89) also runs Q and the "
                     "attention probabilities in FP8 during the context phase; the reference emulates the FP8 K/V cache only")
    if spec.quant_algo == "W4A8_AWQ" and spec.dtype != "float16":
        notes.append("W4A8_AWQ with a bfloat16 model: TensorRT-LLM's groupwise plugin runs FP8 activations with float16 "
                     "scales only, so trtllm-build will refuse this checkpoint; export it in float16")
    if spec.rope_type == "dynamic":
        notes.append("dynamic NTK RoPE: the reference takes the NTK length from the whole KV length (context and XQA "
                     "kernels); the MMHA generation kernel uses one less, and some TensorRT-LLM 1.x builds require "
                     "rotary_scaling.alpha for 'dynamic'")
    return notes
