"""The TensorRT-LLM checkpoint ``config.json`` for a Llama-family model (reference §1.2).

Only keys TensorRT-LLM reads are written, and inside ``mapping`` and ``quantization`` only the keys that are
needed: unknown keys there make ``Mapping(**d)``/``QuantConfig(**d)`` raise, and keys added over time (e.g.
``clamp_val``) make a file unreadable by older releases.
"""

from __future__ import annotations

from typing import Any

from yitrt import __version__
from yitrt.checkpoint.sharding import Mapping
from yitrt.errors import UsageError
from yitrt.models.config import ModelConfig
from yitrt.quant.data_free import FP8_ROWWISE_CLAMP
from yitrt.quant.schemes import Encoding, KvCacheFormat, Scheme

#: TensorRT-LLM release line whose checkpoint contract this module writes (the last with the engine path).
TARGET_TRTLLM = "1.2"

#: dtypes a checkpoint may declare; "auto" resolves from the source.
DTYPES = ("auto", "bfloat16", "float16", "float32")


def resolve_dtype(requested: str, cfg: ModelConfig, first_tensor_dtype: str | None = None) -> str:
    """Resolve ``auto``: the dtype the weights are stored in (config.json's when unknown), float32 becoming
    float16 as in TensorRT-LLM's converter ("if the source dtype is float32, it is converted to float16",
    convert_checkpoint.py). The stored dtype wins over config.json's, which can be wrong, so that ``auto``
    never rounds weights.

    Raises:
        UsageError: unknown dtype.
    """
    if requested not in DTYPES:
        raise UsageError(f"unknown dtype {requested!r}", "choose one of: " + ", ".join(DTYPES))
    if requested != "auto":
        return requested
    declared = (first_tensor_dtype or cfg.dtype or "float16").removeprefix("torch.")
    return declared if declared in ("bfloat16", "float16") else "float16"


def build_config(
    cfg: ModelConfig,
    mapping: Mapping,
    dtype: str,
    scheme: Scheme,
    kv_cache: KvCacheFormat | None,
    parallel_embedding: bool,
) -> dict[str, Any]:
    """The checkpoint's config.json as a dict.

    Args:
        cfg: source model config.
        mapping: TP × PP layout.
        dtype: resolved model dtype.
        scheme: weight quantization scheme.
        kv_cache: KV-cache format, or None for the model dtype.
        parallel_embedding: whether the embedding is split by vocab rows across TP ranks.
    """
    rotary_scaling = None
    if cfg.rope_scaling:
        # TensorRT-LLM 1.x reads "type" (older) or "rope_type" (newer); both are plain dict keys, so write both.
        rotary_scaling = dict(cfg.rope_scaling)
        rotary_scaling["type"] = rotary_scaling["rope_type"]
    quantization: dict[str, Any] = {"quant_algo": scheme.quant_algo, "kv_cache_quant_algo": kv_cache.kv_cache_quant_algo if kv_cache else None}
    if scheme.group_size:
        quantization["group_size"] = scheme.group_size
    if scheme.encoding is Encoding.FP8_ROWWISE:
        quantization["clamp_val"] = list(FP8_ROWWISE_CLAMP)  # as TensorRT-LLM's --use_fp8_rowwise writes it
    return {
        "producer": {"name": "yitrt", "version": __version__},
        "architecture": "LlamaForCausalLM",  # the MODEL_MAP key; never the legacy YiForCausalLM
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,  # the original count, also when TP repeats KV heads
        "head_size": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "norm_epsilon": cfg.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": cfg.rope_theta,
        "rotary_scaling": rotary_scaling,
        "attn_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_parallel_embedding": parallel_embedding,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": mapping.world_size, "tp_size": mapping.tp, "pp_size": mapping.pp},
        "quantization": quantization,
    }
