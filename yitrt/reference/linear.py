"""Linear layers of a TensorRT-LLM checkpoint, emulated format by format from the checkpoint's own tensors.

Each class computes ``y = x·Wᵀ`` for one rank's slice the way the engine's layer does: weights are decoded from
the stored integers/FP8 values and scales (rounded to the dtype TensorRT-LLM declares the parameter in), and
activations are fake-quantized exactly where the format quantizes them. The products are accumulated in the
compute dtype (float32 by default); the engine's own rounding of intermediate activations to fp16/bf16 is not
reproduced (it depends on the kernel chosen at build time).

Sources: reference/trtllm-checkpoint-and-build.md §3 (tensors, build-time transforms §3.2, packing §3.4,
scale conventions §3.3) and the TensorRT-LLM kernels cited per class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from yitrt.quant.data_free import FP8_MAX, FP8_MIN_SCALE

_INT_RANGE = {8: (-128.0, 127.0), 4: (-8.0, 7.0)}


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``round()``: halves away from zero (torch.round rounds halves to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast to float8_e4m3fn and back to float32 (the kernels convert with saturation to ±448)."""
    return x.to(torch.float32).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def _as_fp8_values(weight: torch.Tensor) -> torch.Tensor:
    # int8 bits are re-viewed as float8_e4m3fn by the build (§3.2)
    w = weight.view(torch.float8_e4m3fn) if weight.dtype == torch.int8 else weight
    return w.to(torch.float32)


def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(()).to(torch.float32)


class DecodedWeight:
    """The float weight a layer's GEMM uses, decoded from the stored tensors on each call or, after
    ``keep_decoded()``, once (trading memory for speed: decoding every linear at every decode step dominates
    the runtime of small models)."""

    keep: bool = False
    _decoded: torch.Tensor | None = None

    def _decode(self) -> torch.Tensor:
        raise NotImplementedError

    def weight_for_gemm(self) -> torch.Tensor:
        """The decoded [out, in] weight."""
        if self._decoded is not None:
            return self._decoded
        w = self._decode()
        if self.keep:
            self._decoded = w
        return w

    def keep_decoded(self) -> None:
        """Decode once and keep the result."""
        self.keep = True

    def weights_only(self, x: torch.Tensor) -> torch.Tensor:
        """The layer with its stored weights and scales but unquantized activations: ``(x · prequant) · W``
        with ``W`` the dequantized weight. Activation rounding is what makes two computations of a quantized
        model drift apart (one flipped rounding changes the next layer's input, which flips others), so this
        is the form in which a checkpoint can be compared tightly with the model it was exported from."""
        return self(x)

    def decoded_numel(self) -> int:
        """Elements of the decoded weight (what keeping it costs)."""
        stored = getattr(self, "q", None)  # unpacked integers, where the stored form is packed or pre-quantization
        return (stored if stored is not None else self.weight).numel()


class DenseLinear(DecodedWeight):
    """Unquantized: the stored model-dtype weight."""

    def __init__(self, weight: torch.Tensor, compute: torch.dtype) -> None:
        self.weight, self.compute = weight, compute

    def _decode(self) -> torch.Tensor:
        return self.weight.to(self.compute)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_for_gemm().T


def weight_only_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``trtllm-build`` does to a full-precision weight under W8A16/W4A16.

    ``symmetric_quantize_last_axis_of_batched_matrix`` (cutlass_preprocessors.cpp ``symmetric_quantize``) sees
    the model-dtype weight transposed to [in, out] and takes one scale per output channel,
    ``amax · 2^-(bits-1)`` in float32 — the divisor is 128 for int8 and 8 for int4, not 127/7. The integer is
    ``round(w / scale)`` with that float32 scale (C ``round``: halves away from zero), clamped to [-128, 127] /
    [-8, 7], so the largest positive weight lands on 127 (7). The scale is *stored* rounded to the model dtype
    (the op allocates the scales with the weight's dtype) and the kernel dequantizes ``q · stored scale``.

    Returns:
        (integers as float32 [out, in], stored scales in the model dtype [out]).
    """
    w = weight.to(torch.float32)
    scale = w.abs().amax(dim=1) * (1.0 / (1 << (bits - 1)))
    s = scale[:, None]
    q = torch.where(s != 0, round_half_away(w / torch.where(s != 0, s, torch.ones_like(s))), torch.zeros_like(w))
    low, high = _INT_RANGE[bits]
    return q.clamp(low, high), scale.to(weight.dtype)


class WeightOnlyLinear(DecodedWeight):
    """W8A16 / W4A16: the build quantizes the stored full-precision weight per output channel."""

    def __init__(self, weight: torch.Tensor, bits: int, compute: torch.dtype) -> None:
        q, scale = weight_only_quantize(weight, bits)
        self.q = q.to(torch.int8)
        self.scale = scale
        self.compute = compute

    def _decode(self) -> torch.Tensor:
        return self.q.to(self.compute) * self.scale.to(self.compute)[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_for_gemm().T


class Fp8Linear(DecodedWeight):
    """FP8 per tensor (FP8Linear/FP8RowLinear): x divided by the activation scale *cast to the model dtype*
    (quantization/layers.py casts it before TensorRT's quantize), saturated to ±448 and cast to e4m3 (round to
    nearest even); FP8 weight; the GEMM output multiplied by ``alpha = act_scale · weight_scale`` (float32)."""

    def __init__(self, weight, weight_scale, act_scale, model_dtype: torch.dtype, compute: torch.dtype) -> None:
        self.weight = weight
        self.weight_scale, self.act_scale = _scalar(weight_scale), _scalar(act_scale)
        self.act_divisor = self.act_scale.to(model_dtype).to(torch.float32)
        self.compute = compute

    def _decode(self) -> torch.Tensor:
        return _as_fp8_values(self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xq = to_fp8(x.to(torch.float32) / self.act_divisor)
        y = xq @ self.weight_for_gemm().T
        return (y * (self.act_scale * self.weight_scale)).to(self.compute)

    def weights_only(self, x: torch.Tensor) -> torch.Tensor:
        """See ``DecodedWeight.weights_only``."""
        return (x.to(torch.float32) @ (self.weight_for_gemm() * self.weight_scale).T).to(self.compute)


class Fp8RowwiseLinear(DecodedWeight):
    """FP8_PER_CHANNEL_PER_TOKEN, every decoder GEMM input (qkv, dense, fc/gate, proj) quantized per token by
    the per-token kernel (quantization.cu): values clamped to ``clamp_val``, amax over the row (floor 1e-6),
    dequant scale ``max(amax/448, 1/(448·512))``, FP8 value ``e4m3_sat(x · min(448/amax, 448·512))``; weights
    FP8 with one ``per_channel_scale`` per output row; output = GEMM · token scale · channel scale."""

    _AMAX_FLOOR = 1e-6

    def __init__(self, weight: torch.Tensor, channel_scale: torch.Tensor, clamp: tuple[float, float] | None, compute: torch.dtype) -> None:
        self.weight, self.channel_scale = weight, channel_scale.to(torch.float32)
        self.clamp, self.compute = clamp, compute

    def _decode(self) -> torch.Tensor:
        return _as_fp8_values(self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        if self.clamp:
            xf = xf.clamp(*self.clamp)
        amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=self._AMAX_FLOOR)
        token_scale = (amax / FP8_MAX).clamp(min=FP8_MIN_SCALE)
        xq = to_fp8(xf * (FP8_MAX / amax).clamp(max=1.0 / FP8_MIN_SCALE))
        y = xq @ self.weight_for_gemm().T
        return (y * token_scale * self.channel_scale).to(self.compute)

    def weights_only(self, x: torch.Tensor) -> torch.Tensor:
        """See ``DecodedWeight.weights_only``."""
        return (x.to(torch.float32) @ (self.weight_for_gemm() * self.channel_scale[:, None]).T).to(self.compute)


class SmoothQuantLinear(DecodedWeight):
    """W8A8_SQ_PER_CHANNEL (Int8SmoothQuantLinear, Q/DQ in TensorRT): x·prequant, quantized to int8 with the
    static activation scale (TensorRT's quantize rounds half to even and clamps to [-128, 127]), int8 weight
    dequantized per output channel."""

    def __init__(self, weight, weight_scale, act_scale, prequant, model_dtype: torch.dtype, compute: torch.dtype) -> None:
        self.weight = weight
        self.weight_scale = weight_scale.to(torch.float32)
        self.act_scale = _scalar(act_scale)
        self.prequant = prequant.to(model_dtype)  # the parameter is declared in the model dtype
        self.compute = compute

    def _decode(self) -> torch.Tensor:
        return self.weight.to(torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.to(torch.float32) * self.prequant.to(torch.float32)
        xq = torch.round(xs / self.act_scale).clamp(-128, 127)
        y = xq @ self.weight_for_gemm().T
        return (y * self.act_scale * self.weight_scale).to(self.compute)

    def weights_only(self, x: torch.Tensor) -> torch.Tensor:
        """See ``DecodedWeight.weights_only``."""
        xs = x.to(torch.float32) * self.prequant.to(torch.float32)
        return (xs @ (self.weight_for_gemm() * self.weight_scale[:, None]).T).to(self.compute)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out/2, in] → int4 values [out, in] as int8: row 2j is the low nibble of byte row j, row 2j+1 the high
    nibble, each a two's-complement int4 (ModelOpt ``pack_int4_in_uint8``; reference §3.4)."""
    b = packed.to(torch.int16) & 0xFF
    low, high = b & 0x0F, (b >> 4) & 0x0F
    low = torch.where(low >= 8, low - 16, low)
    high = torch.where(high >= 8, high - 16, high)
    return torch.stack([low, high], dim=1).reshape(packed.shape[0] * 2, packed.shape[1]).to(torch.int8)


@dataclass
class Step:
    """Facts about the forward step in progress that change which kernel a layer runs."""

    tokens: int = 0  # real (unpadded) tokens in the step: the GEMM's m


#: below this many tokens the groupwise plugin runs its CUDA GEMV instead of the CUTLASS GEMM
#: (weightOnlyGroupwiseQuantMatmulPlugin.cpp SMALL_M_FAST_PATH)
SMALL_M_FAST_PATH = 5


class AwqLinear(DecodedWeight):
    """W4A16_AWQ / W4A8_AWQ groupwise int4 (WeightOnlyGroupwiseQuantLinear).

    W4A16: ``y = (x · prequant) · (q · scale[group])ᵀ``, scales and prequant in the model dtype (the build casts
    them, §3.2). W4A8: the build divides the group scales by ``weights_scaling_factor_2`` (stored fp16) and the
    prequant scale by ``activation_scaling_factor``, and passes ``alpha = act_scale · scale_2``. With m >= 5
    tokens the CUTLASS path casts ``x · prequant'`` to FP8 (saturating), casts the dequantized weight
    ``q · scale'`` to FP8 for the FP8 MMA and multiplies the result by alpha; below 5 tokens the GEMV path
    quantizes nothing and uses ``q · scale' · alpha`` as the weight (weightOnlyBatchedGemv ``ApplyAlphaInAdvance``).
    """

    def __init__(self, packed, scales, prequant, group_size: int, model_dtype: torch.dtype, compute: torch.dtype,
                 weight_scale_2=None, act_scale=None, step: Step | None = None) -> None:
        self.q = unpack_int4(packed)
        self.group_size = group_size
        self.scales = scales.to(model_dtype)
        self.prequant = prequant.to(model_dtype) if prequant is not None else None
        self.w4a8 = weight_scale_2 is not None
        self.step = step or Step()
        if self.w4a8:
            self.scale_2, self.act_scale = _scalar(weight_scale_2), _scalar(act_scale)
            self.scales = (self.scales.to(torch.float32) / self.scale_2).to(torch.float16)
            pq = self.prequant.to(torch.float32) if self.prequant is not None else torch.ones(self.q.shape[1])
            self.prequant = (pq / self.act_scale).to(model_dtype)
        self.compute = compute

    def _decode(self) -> torch.Tensor:
        s = self.scales.to(torch.float32).repeat_interleave(self.group_size, dim=1)
        return self.q.to(torch.float32) * s

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        if self.prequant is not None:
            xf = xf * self.prequant.to(torch.float32)
        if not self.w4a8:
            return (xf @ self.weight_for_gemm().T).to(self.compute)
        alpha = self.act_scale * self.scale_2
        if self.step.tokens < SMALL_M_FAST_PATH:
            return (xf @ (self.weight_for_gemm() * alpha).T).to(self.compute)
        y = to_fp8(xf) @ to_fp8(self.weight_for_gemm()).T
        return (y * alpha).to(self.compute)

    def weights_only(self, x: torch.Tensor) -> torch.Tensor:
        """See ``DecodedWeight.weights_only``: W4A8 keeps the FP8 weight of its MMA path."""
        if not self.w4a8:
            return self(x)
        xf = x.to(torch.float32) * self.prequant.to(torch.float32)
        return (xf @ to_fp8(self.weight_for_gemm()).T * (self.act_scale * self.scale_2)).to(self.compute)


class KvQuantizer:
    """INT8/FP8 KV cache, K after RoPE. Written as ``quantize(x · rcp)`` with ``rcp`` =
    ``kv_cache_rcp_scaling_factor`` (default 1/``kv_cache_scaling_factor``), read back as ``q · scale``. INT8:
    ``cvt.rni.sat.s8.f32`` (round half to even, saturate to [-128, 127]) on a float32 product; FP8: the
    reciprocal is converted to the model dtype, the product cast to e4m3 with saturation."""

    def __init__(self, algo: str, scale: torch.Tensor, rcp: torch.Tensor | None, model_dtype: torch.dtype) -> None:
        self.algo = algo
        self.scale = _scalar(scale)
        self.rcp = _scalar(rcp) if rcp is not None else 1.0 / self.scale
        if algo == "FP8":
            self.rcp = self.rcp.to(model_dtype).to(torch.float32)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """What reading back a cached value gives."""
        xf = x.to(torch.float32) * self.rcp
        q = torch.round(xf).clamp(-128, 127) if self.algo == "INT8" else to_fp8(xf)
        return (q * self.scale).to(x.dtype)
