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
        modelopt_config: the ``modelopt.torch.quantization`` preset that calibrates it.
        summary: one line for help text.
        unquantized: which tensors stay in the model dtype.
        pad_base: TensorRT-LLM's quantized linear layers pad every global in/out dim up to a multiple of
            ``max(pad_base, group_size) * tp`` (quantization/layers.py; reference §2.5); None = no padding.
        group_sizes: the AWQ block sizes TensorRT-LLM's groupwise kernels accept (``--awq-block-size``).
        dtypes: model dtypes the build accepts for the scheme (None: any).
        scales: the scale tensors each quantized linear carries in the engine, as (elements, dtype) pairs;
            elements is "out", "in", "1" or "groups" (out × in / group size), dtype "float32" or "model"
            (reference §3.2-3.3). The planner sizes weights with it.
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
    modelopt_config: str | None = None
    pad_base: int | None = None
    group_sizes: tuple[int, ...] = ()
    dtypes: tuple[str, ...] | None = None
    scales: tuple[tuple[str, str], ...] = ()

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
               "INT8 weight-only, per channel; trtllm-build quantizes the full-precision weights", _KEEP, pad_base=64,
               scales=(("out", "model"),)),
        Scheme("w4a16", "W4A16", Encoding.FULL_PRECISION, 4, 70, 99,
               "INT4 weight-only, per channel; trtllm-build quantizes the full-precision weights", _KEEP, pad_base=64,
               scales=(("out", "model"),)),
        Scheme("fp8-rowwise", "FP8_PER_CHANNEL_PER_TOKEN", Encoding.FP8_ROWWISE, 8, 89, 99,
               "FP8 weights with per-channel scales, FP8 activations with per-token scales (data-free)", _KEEP,
               scales=(("out", "float32"),)),
        Scheme("fp8", "FP8", Encoding.CALIBRATED, 8, 89, None,
               "FP8 weights and activations, per-tensor scales (calibrated)", "lm_head, embedding and norms",
               modelopt_format="fp8", modelopt_config="FP8_DEFAULT_CFG", scales=(("1", "float32"), ("1", "float32"))),
        # SmoothQuant (all modes) is refused by the build on SM100-119 (reference §4.3)
        Scheme("int8-sq", "W8A8_SQ_PER_CHANNEL", Encoding.CALIBRATED, 8, 70, 99,
               "INT8 SmoothQuant, per-channel weights, per-tensor activations (calibrated)", "lm_head, embedding and norms",
               modelopt_format="int8_sq", modelopt_config="INT8_SMOOTHQUANT_CFG",
               scales=(("out", "float32"), ("1", "float32"), ("in", "model"))),
        Scheme("int4-awq", "W4A16_AWQ", Encoding.CALIBRATED, 4, 75, None,
               "INT4 AWQ weights in groups (default 128), FP16/BF16 activations (calibrated)", "lm_head, embedding and norms",
               group_size=128, modelopt_format="int4_awq", modelopt_config="INT4_AWQ_CFG", pad_base=64, group_sizes=(64, 128),
               scales=(("groups", "model"), ("in", "model"))),
        # the W4A8 groupwise kernel takes FP16 activations only: a bfloat16 build fails (observed, issue #3)
        Scheme("w4a8-awq", "W4A8_AWQ", Encoding.CALIBRATED, 4, 89, None,
               "INT4 AWQ weights in groups of 128 with FP8 activations (calibrated; float16 models)", "lm_head, embedding and norms",
               group_size=128, modelopt_format="w4a8_awq", modelopt_config="W4A8_AWQ_BETA_CFG", pad_base=128,
               group_sizes=(128,), dtypes=("float16",),
               scales=(("groups", "model"), ("in", "model"), ("1", "float32"), ("1", "float32"), ("1", "float32"))),
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
    modelopt_config: str | None = None  # the modelopt.torch.quantization preset (None: yitrt builds it, see below)
    num_bits: int | tuple[int, int] = 8  # the K/V quantizers' format in ModelOpt's terms ((4, 3) = FP8 E4M3)


KV_CACHE_FORMATS: dict[str, KvCacheFormat] = {
    k.name: k
    for k in (
        KvCacheFormat("fp8", "FP8", 1, True, 89, None, "FP8 KV cache (scale 1.0 data-free; calibrated with ModelOpt)",
                      modelopt_config="FP8_KV_CFG", num_bits=(4, 3)),
        # ModelOpt 0.47 has no INT8 KV preset; yitrt enables its K/V quantizers with 8 bits per tensor.
        # The build refuses INT8 KV on SM100-119 (reference §4.3).
        KvCacheFormat("int8", "INT8", 1, False, 70, 99, "INT8 KV cache (calibrated with ModelOpt)", num_bits=8),
    )
}

#: Element sizes of the unquantized KV cache (model dtype).
KV_BYTES_FP16 = 2


def calibrated_schemes() -> list[str]:
    """Names of schemes that need calibration with ModelOpt."""
    return [s.name for s in SCHEMES.values() if s.calibrated]


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
