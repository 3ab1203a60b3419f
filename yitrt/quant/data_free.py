"""Data-free weight encoders: what the converter writes for each linear weight under each scheme.

FP8 rowwise follows TensorRT-LLM's own converter (quantization/functional.py ``postprocess_fp8_rowwise`` and
models/llama/convert.py): weights clamped to ``clamp_val`` (±1200), one scale per output row
``max(amax/448, 1/(448·512))`` computed on the rank's slice, weight = clamp(w/scale, ±448) as float8_e4m3fn,
``per_channel_scale`` float32 of shape [out_local] (the shape Fp8RowwiseLinear declares, quantization/layers.py).
A per-rank scale is exact for row-parallel layers too: each rank dequantizes its own partial product before the
all-reduce.
"""

from __future__ import annotations

from yitrt.checkpoint.safetensors_writer import PlannedTensor
from yitrt.quant.schemes import Encoding, Scheme

FP8_MAX = 448.0
FP8_ROWWISE_CLAMP = (-1200.0, 1200.0)  # TensorRT-LLM convert_checkpoint.py --use_fp8_rowwise sets this clamp_val
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # TensorRT-LLM's floor for FP8 rowwise scales (weights and tokens)


def plan_linear(scheme: Scheme, target: str, shape: tuple[int, ...], dtype_code: str) -> list[PlannedTensor]:
    """Tensors written for one linear weight of local ``shape`` ([out, in]).

    Args:
        scheme: the data-free scheme.
        target: the weight's name (ends with ``.weight``).
        shape: local shape.
        dtype_code: safetensors code of the model dtype.
    """
    if scheme.encoding is Encoding.FP8_ROWWISE:
        prefix = target.removesuffix(".weight")
        return [PlannedTensor(target, "F8_E4M3", shape), PlannedTensor(prefix + ".per_channel_scale", "F32", (shape[0],))]
    return [PlannedTensor(target, dtype_code, shape)]


def fp8_rowwise_quantize(weight):
    """Quantize a [out, in] weight to float8_e4m3fn with one float32 scale per output row.

    Returns:
        (fp8 weight, float32 scales of shape [out]).
    """
    import torch

    w = weight.to(torch.float32).clamp(*FP8_ROWWISE_CLAMP)
    scales = (w.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    q = (w / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scales.reshape(-1)


def encode_linear(scheme: Scheme, weight, dtype) -> list:
    """Encode one rank's linear weight; tensors in the order of ``plan_linear``."""
    if scheme.encoding is Encoding.FP8_ROWWISE:
        return list(fp8_rowwise_quantize(weight))
    return [weight.to(dtype)]
