"""Checks of a quantization request that need only the model's config and the scheme registry (GPU, dtype and
version compatibility are rules in ``yitrt/plan/rules.yaml``).

They run before any weight is read, so a request that cannot work fails in seconds with every reason listed.
"""

from __future__ import annotations

from yitrt.models.config import ModelConfig
from yitrt.quant.schemes import Scheme


def linear_dims(cfg: ModelConfig, tp: int) -> dict[str, int]:
    """Global in/out dims of the decoder linears as TensorRT-LLM declares them (qkv rows after KV-head
    repetition when tp exceeds the KV heads, reference §2.3)."""
    kv_rows = max(cfg.num_kv_heads, tp) * cfg.head_dim
    return {
        "hidden": cfg.hidden_size,
        "qkv out": cfg.q_size + 2 * kv_rows,
        "attention dense in": cfg.q_size,
        "intermediate": cfg.intermediate_size,
    }


def padding_problems(cfg: ModelConfig, scheme: Scheme, tp: int, group_size: int | None = None) -> list[str]:
    """Reasons TensorRT-LLM would pad this scheme's linears at this tp (or split an AWQ group across ranks).

    Weight-only and groupwise layers pad every global in/out dim up to a multiple of
    ``max(pad_base, group_size) * tp`` (quantization/layers.py; reference §2.5). A prebuilt checkpoint would then
    need zero-padded tensors in a layout not confirmed for the checkpoint loader, so such sizes are refused. The
    same multiple guarantees that every rank's slice of a row-parallel input (dense in, intermediate) holds whole
    groups (§3.5), and ModelOpt's exporter checks hidden against the block size only after calibration.
    """
    if scheme.pad_base is None:
        return []
    group = group_size or scheme.group_size or 0
    multiple = max(scheme.pad_base, group) * tp
    bad = [f"{name} {size}" for name, size in linear_dims(cfg, tp).items() if size % multiple]
    if not bad:
        return []
    why = f"max({scheme.pad_base}, group size {group})·tp" if group else f"{scheme.pad_base}·tp"
    return [
        f"{scheme.name} at tp {tp} needs linear dims divisible by {why} = {multiple} "
        f"(TensorRT-LLM pads them otherwise, in a layout not confirmed for prebuilt checkpoints): {', '.join(bad)}"
    ]


def group_size_problems(scheme: Scheme, group_size: int | None) -> list[str]:
    """Reasons a requested AWQ block size cannot be used with the scheme."""
    if group_size is None:
        return []
    if not scheme.group_sizes:
        return [f"--awq-block-size applies to AWQ schemes only, not {scheme.name}"]
    if group_size not in scheme.group_sizes:
        return [f"{scheme.name} supports block sizes {', '.join(map(str, scheme.group_sizes))} (TensorRT-LLM groupwise kernels), not {group_size}"]
    return []
