"""The one registry of quantization schemes and KV-cache formats.

Every fact about a scheme lives here: its TensorRT-LLM ``quant_algo``, whether it needs calibration, how the
data-free converter encodes it, the GPU architectures that can run it, its group size and its weight width.
CLI choices, help text and validation are derived from these tables.

Sources: reference/trtllm-checkpoint-and-build.md §3.1 (algos), §3.3 (tensors), §3.6 (what a converter without
TensorRT-LLM can emit), §4.3 (SM100-119 refuse INT8/INT4 weight-only, INT8 KV, SmoothQuant and per-channel/
per-token modes), §7 (ModelOpt format names).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from yitrt.errors import UsageError


class Encoding(str, Enum):
    """How the data-free converter writes a scheme's linear weights."""

    FULL_PRECISION = "full_precision"  # model-dtype weights; trtllm-build quantizes (W8A16/W4A16) or nothing to do
    FP8_ROWWISE = "fp8_rowwise"  # float8_e4m3fn weights + float32 per-channel scales
    CALIBRATED = "calibrated"  # written by ModelOpt after calibration (issue #4)


@dataclass(frozen=True)
class Scheme:
    """A weight/activation quantization recipe.

    Attributes:
        name: CLI name.
        quant_algo: TensorRT-LLM ``QuantAlgo`` written to the checkpoint (None: no quantization).
        encoding: how weights are written.
        weight_bits: stored bits per linear weight after the build (16, 8 or 4).
        min_sm / max_sm: GPU compute capability range (e.g. 89 = Ada) that can run it.
        group_size: per-group scale width, for groupwise schemes.
        modelopt_format: ModelOpt's name for the format, for calibrated schemes.
        summary: one line for help text.
        unquantized: which tensors stay in the model dtype.
    """

    name: str
    quant_algo: str | None
    encoding: Encoding
    weight_bits: int
    min_sm: int
    max_sm: int | None
    summary: str
    unquantized: str
    group_size: int | None = None
    modelopt_format: str | None = None

    @property
    def calibrated(self) -> bool:
        """Whether the scheme needs calibration data (ModelOpt)."""
        return self.encoding is Encoding.CALIBRATED

    @property
    def weight_bytes(self) -> float:
        """Bytes per quantized linear weight, group scales included."""
        scale = 2 / self.group_size if self.group_size else 0.0  # one fp16 scale per group
        return self.weight_bits / 8 + scale


_KEEP = "embedding, lm_head and norms stay in the model dtype"

SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("none", None, Encoding.FULL_PRECISION, 16, 70, None, "no quantization (model dtype)", "everything"),
        Scheme("w8a16", "W8A16", Encoding.FULL_PRECISION, 8, 70, 99,
               "INT8 weight-only, per channel; trtllm-build quantizes the full-precision weights", _KEEP),
        Scheme("w4a16", "W4A16", Encoding.FULL_PRECISION, 4, 70, 99,
               "INT4 weight-only, per channel; trtllm-build quantizes the full-precision weights", _KEEP),
        Scheme("fp8-rowwise", "FP8_PER_CHANNEL_PER_TOKEN", Encoding.FP8_ROWWISE, 8, 89, 99,
               "FP8 weights with per-channel scales, FP8 activations with per-token scales (data-free)", _KEEP),
        Scheme("fp8", "FP8", Encoding.CALIBRATED, 8, 89, None,
               "FP8 weights and activations, per-tensor scales (calibrated)", "lm_head, embedding and norms", modelopt_format="fp8"),
        Scheme("int8-sq", "W8A8_SQ_PER_CHANNEL", Encoding.CALIBRATED, 8, 70, 99,
               "INT8 SmoothQuant, per-channel weights (calibrated)", "lm_head, embedding and norms", modelopt_format="int8_sq"),
        Scheme("int4-awq", "W4A16_AWQ", Encoding.CALIBRATED, 4, 75, None,
               "INT4 AWQ, group size 128, FP16 activations (calibrated)", "lm_head, embedding and norms",
               group_size=128, modelopt_format="int4_awq"),
        Scheme("w4a8-awq", "W4A8_AWQ", Encoding.CALIBRATED, 4, 89, None,
               "INT4 AWQ weights with FP8 activations (calibrated)", "lm_head, embedding and norms",
               group_size=128, modelopt_format="w4a8_awq"),
    )
}


@dataclass(frozen=True)
class KvCacheFormat:
    """A KV-cache element format."""

    name: str
    kv_cache_quant_algo: str
    bytes_per_element: int
    data_free: bool  # can be written without calibration (scale 1.0, as TensorRT-LLM's own converter does)
    min_sm: int
    max_sm: int | None
    summary: str


KV_CACHE_FORMATS: dict[str, KvCacheFormat] = {
    k.name: k
    for k in (
        KvCacheFormat("fp8", "FP8", 1, True, 89, None, "FP8 KV cache (scale 1.0 data-free; calibrated with ModelOpt)"),
        KvCacheFormat("int8", "INT8", 1, False, 70, 99, "INT8 KV cache (needs calibrated scales)"),
    )
}

#: Element sizes of the unquantized KV cache (model dtype).
KV_BYTES_FP16 = 2


def data_free_schemes() -> list[str]:
    """Names of schemes the converter writes without calibration (``none`` excluded)."""
    return [s.name for s in SCHEMES.values() if not s.calibrated and s.quant_algo]


def get_scheme(name: str) -> Scheme:
    """Look up a scheme by CLI name.

    Raises:
        UsageError: unknown name (the message lists the known ones).
    """
    try:
        return SCHEMES[name]
    except KeyError:
        raise UsageError(f"unknown scheme {name!r}", "choose one of: " + ", ".join(SCHEMES)) from None


def get_kv_cache(name: str | None) -> KvCacheFormat | None:
    """Look up a KV-cache format by CLI name (None: model dtype).

    Raises:
        UsageError: unknown name.
    """
    if name in (None, "", "auto", "none"):
        return None
    try:
        return KV_CACHE_FORMATS[name]
    except KeyError:
        raise UsageError(f"unknown KV-cache format {name!r}", "choose one of: " + ", ".join(KV_CACHE_FORMATS)) from None
