"""`ModelConfig`: one normalised view of a Hugging Face ``config.json`` for the Llama family (Yi included).

Spellings handled (reference/yi-models.md §2, transformers 4.x vs 5.x):
- ``architectures: ["LlamaForCausalLM"]`` and the legacy ``["YiForCausalLM"]`` (model_type ``Yi``) of the
  first Yi uploads, whose per-layer norms are named ``ln1``/``ln2``;
- transformers 4.x ``rope_theta`` + ``rope_scaling`` and 5.x ``rope_parameters`` (theta and scaling in one dict);
- ``torch_dtype`` (4.x) and ``dtype`` (5.x); explicit ``head_dim``; ``tie_word_embeddings``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from yitrt.errors import CheckpointError, UnsupportedModelError

#: HF architecture class → whether it is the legacy Yi layout. The one list of what yitrt converts.
SUPPORTED_ARCHITECTURES: dict[str, bool] = {
    "LlamaForCausalLM": False,
    "YiForCausalLM": True,  # first Yi uploads (Nov 2023), needed trust_remote_code; same tensors but ln1/ln2
}

#: transformers' LlamaConfig defaults for keys a config may omit.
_LLAMA_DEFAULTS = {
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "max_position_embeddings": 2048,
}

#: Keys of a transformers-5 ``rope_parameters`` dict that are not scaling parameters.
_ROPE_BASE_KEYS = {"rope_theta", "partial_rotary_factor"}

#: Largest value accepted per dimension: far above every published decoder, so only a damaged or forged config
#: reaches them. The largest known (2025): hidden 16384 (Llama-3.1-405B) to 18432 (Nemotron-4-340B), 126 layers,
#: 128 heads, head_dim 256, intermediate 53248, vocab 262144 (Gemma 3), context 10M (Llama 4 Scout).
DIM_LIMITS: dict[str, int] = {
    "hidden_size": 1 << 17,
    "num_layers": 1 << 10,
    "num_heads": 1 << 10,
    "num_kv_heads": 1 << 10,
    "head_dim": 1 << 12,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 23,
    "max_position_embeddings": 1 << 28,
}
#: largest RoPE scaling ``factor`` accepted (published models use 2-64; transformers requires factor >= 1)
MAX_ROPE_FACTOR = 1024.0
#: ModelConfig field → the config.json key it comes from (for messages)
_HF_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
            "eos_token_ids": "eos_token_id"}
_FIX = "fix config.json (it is damaged or not a causal-LM config), or download it again"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _rope_problems(scaling: Any) -> list[str]:
    """Why a (normalised, transformers-4 form) rope_scaling dict is unusable."""
    if scaling is None:
        return []
    if not isinstance(scaling, dict) or not all(isinstance(k, str) for k in scaling):
        return [f"rope_scaling must be an object, found {scaling!r}"[:160]]
    problems = []
    if not isinstance(scaling.get("rope_type"), str):
        problems.append(f"rope_scaling type must be a string, found {scaling.get('rope_type')!r}")
    for key, value in scaling.items():
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, dict | list) for v in items):
            problems.append(f"rope_scaling.{key} must be a number, string or list of numbers, found {value!r}"[:160])
        elif any(_is_number(v) and not math.isfinite(v) for v in items):
            problems.append(f"rope_scaling.{key} is {value!r}, not a finite number"[:160])
        elif "factor" in key and not all(_finite(v) and v > 0 for v in items):
            problems.append(f"rope_scaling.{key} must be positive numbers, found {value!r}"[:160])
    factor = scaling.get("factor")
    if factor is not None and not (_finite(factor) and 1.0 <= factor <= MAX_ROPE_FACTOR):
        problems.append(f"rope_scaling.factor must be a number from 1 to {MAX_ROPE_FACTOR:g}, found {factor!r}")
    original = scaling.get("original_max_position_embeddings")
    if original is not None and not (_is_int(original) and 0 < original <= DIM_LIMITS["max_position_embeddings"]):
        problems.append(f"rope_scaling.original_max_position_embeddings must be a positive integer, found {original!r}")
    low, high = scaling.get("low_freq_factor"), scaling.get("high_freq_factor")
    if scaling.get("rope_type") == "llama3" and _finite(low) and _finite(high) and high <= low:
        # llama3 scaling divides by (high - low) (transformers _compute_llama3_parameters)
        problems.append(f"rope_scaling.high_freq_factor {high} must exceed low_freq_factor {low}")
    return problems


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder described by the numbers conversion and planning need.

    Every construction (``parse_config``, the registry's dims, the demo GGUF header) is validated in
    ``__post_init__``: positive dims within ``DIM_LIMITS``, whole GQA groups, a finite positive rope_theta, an
    epsilon in (0, 1), a well-formed rope_scaling, the right Python types. So no plan, inspect report or
    conversion ever computes with a size that cannot be right.

    Attributes:
        architecture: HF class name from ``architectures[0]``.
        legacy_yi: True for the ``YiForCausalLM`` layout (norms named ``ln1``/``ln2``).
        hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size, vocab_size: dims.
        max_position_embeddings: trained context length.
        rope_theta: rotary base.
        rope_scaling: the scaling dict in transformers-4 form (``rope_type``/``type`` + parameters), or None.
        rms_norm_eps: RMSNorm epsilon.
        hidden_act: MLP activation (``silu`` for Yi).
        tie_word_embeddings: lm_head shares the embedding table.
        attention_bias, mlp_bias: whether q/k/v/o and MLP projections carry biases.
        dtype: declared weight dtype string (``bfloat16``…) or None.
        bos_token_id, eos_token_ids: special ids as declared in config.json.
        source: where the values came from (for messages; not compared).

    Raises:
        CheckpointError: (on construction) every value that cannot be right, named with its key and value.
    """

    architecture: str
    legacy_yi: bool
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    dtype: str | None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    source_quantization: str | None = None  # quant_method of a pre-quantized HF checkpoint (awq, gptq, fp8...)
    source: str = field(default="config.json", compare=False, repr=False)

    def __post_init__(self) -> None:
        problems = []
        for name, limit in DIM_LIMITS.items():
            value = getattr(self, name)
            if not (_is_int(value) and 0 < value <= limit):
                problems.append(f"'{_HF_KEYS.get(name, name)}' is {value!r}, must be an integer from 1 to {limit}")
        if not problems and self.num_heads % self.num_kv_heads:
            problems.append(f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads} "
                            "(grouped-query attention needs whole groups)")
        if not (_finite(self.rope_theta) and self.rope_theta > 0):
            problems.append(f"'rope_theta' is {self.rope_theta!r}, must be a positive finite number")
        if not (_finite(self.rms_norm_eps) and 0 < self.rms_norm_eps < 1):
            problems.append(f"'rms_norm_eps' is {self.rms_norm_eps!r}, must be a number in (0, 1)")
        problems += _rope_problems(self.rope_scaling)
        for name in ("legacy_yi", "tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"'{name}' is {getattr(self, name)!r}, must be true or false")
        for name in ("architecture", "hidden_act"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"'{name}' is {getattr(self, name)!r}, must be a string")
        if self.dtype is not None and not isinstance(self.dtype, str):
            problems.append(f"'torch_dtype' is {self.dtype!r}, must be a string")
        if self.source_quantization is not None and not isinstance(self.source_quantization, str):
            problems.append(f"'quantization_config.quant_method' is {self.source_quantization!r}, must be a string")
        ids = ([self.bos_token_id] if self.bos_token_id is not None else []) + list(self.eos_token_ids)
        if not all(_is_int(i) and i >= 0 for i in ids):
            problems.append(f"special token ids must be non-negative integers, found bos {self.bos_token_id!r}, eos {list(self.eos_token_ids)!r}")
        if problems:
            raise CheckpointError(f"{self.source}: " + "; ".join(problems), _FIX)

    @property
    def q_size(self) -> int:
        """Rows of q_proj: heads × head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Rows of k_proj (and v_proj): KV heads × head_dim."""
        return self.num_kv_heads * self.head_dim

    def param_count(self) -> int:
        """Number of parameters (embedding and lm_head counted once each unless tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = h * self.q_size + 2 * h * self.kv_size + self.q_size * h + 3 * h * i + 2 * h
        if self.attention_bias:
            per_layer += self.q_size + 2 * self.kv_size + h
        if self.mlp_bias:
            per_layer += 2 * i + h
        embeddings = v * h * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_layers * per_layer + h

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (``source`` aside)."""
        data = asdict(self)
        data.pop("source")
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data


class _Raw:
    """Typed reads of a config.json object: a value of the wrong JSON type is an error naming its key (a string
    "false" is not false; 4096.0 and true are not integers); absent or null takes the default."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def _fail(self, key: str, value: Any, what: str):
        raise CheckpointError(f"{self.source}: '{key}' must be {what}, found {value!r}"[:300], _FIX)

    def integer(self, key: str, default: Any = ..., container: dict[str, Any] | None = None) -> int:
        value = (self.raw if container is None else container).get(key)
        if value is None:
            if default is ...:
                self._fail(key, value, "a positive integer")
            return default
        if not _is_int(value):
            self._fail(key, value, "an integer")
        return value

    def number(self, key: str, default: float, container: dict[str, Any] | None = None) -> float:
        value = (self.raw if container is None else container).get(key)
        if value is None:
            return default
        if not _is_number(value):
            self._fail(key, value, "a number")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self._fail(key, value, "true or false")
        return value

    def string(self, key: str, default: str | None) -> str | None:
        value = self.raw.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self._fail(key, value, "a string")
        return value

    def mapping(self, key: str) -> dict[str, Any] | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, dict):
            self._fail(key, value, "an object")
        return value

    def ids(self, key: str) -> tuple[int, ...]:
        value = self.raw.get(key)
        if value is None:
            return ()
        values = value if isinstance(value, list) else [value]
        if not all(_is_int(v) for v in values):
            self._fail(key, value, "an integer or a list of integers")
        return tuple(values)


def _normalise_rope(read: _Raw) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, rope_scaling) from either transformers spelling."""
    params = read.mapping("rope_parameters")
    if params is not None:  # transformers >= 5
        theta = read.number("rope_theta", read.number("rope_theta", _LLAMA_DEFAULTS["rope_theta"]), container=params)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type in (None, "default"):
            return theta, None
        scaling = {k: v for k, v in params.items() if k not in _ROPE_BASE_KEYS and k != "type"}
        scaling["rope_type"] = rope_type
        return theta, scaling
    theta = read.number("rope_theta", _LLAMA_DEFAULTS["rope_theta"])
    scaling = read.mapping("rope_scaling")
    if not scaling:
        return theta, None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return theta, None
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    return theta, scaling


def parse_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Normalise a parsed HF ``config.json`` dict.

    Args:
        raw: the JSON object.
        source: where it came from, for messages.

    Returns:
        The normalised ModelConfig.

    Raises:
        UnsupportedModelError: the architecture is not in ``SUPPORTED_ARCHITECTURES``.
        CheckpointError: a value of the wrong JSON type, missing, or impossible (see ``ModelConfig``).
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: not a JSON object (a {type(raw).__name__})", _FIX)
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"{source}: 'architectures' must be a list of class names, found {archs!r}"[:300], _FIX)
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{source}: architecture {arch!r} is not supported",
            "yitrt converts " + ", ".join(SUPPORTED_ARCHITECTURES) + " (Yi, Yi-1.5, Yi-Coder and other Llama-family models)",
        )
    read = _Raw(raw, source)
    hidden = read.integer("hidden_size")
    heads = read.integer("num_attention_heads")
    head_dim = read.integer("head_dim", None)
    if head_dim is None:
        if hidden > 0 and heads > 0 and hidden % heads:
            raise CheckpointError(
                f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} and no head_dim is given",
                "the config.json is inconsistent; add head_dim or fix the head count",
            )
        head_dim = hidden // heads if heads > 0 else 0  # 0 (refused below) when heads is not positive
    theta, scaling = _normalise_rope(read)
    quantization = read.mapping("quantization_config") or {}
    return ModelConfig(
        architecture=arch,
        legacy_yi=SUPPORTED_ARCHITECTURES[arch],
        hidden_size=hidden,
        num_layers=read.integer("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=read.integer("num_key_value_heads", heads),
        head_dim=head_dim,
        intermediate_size=read.integer("intermediate_size"),
        vocab_size=read.integer("vocab_size"),
        max_position_embeddings=read.integer("max_position_embeddings", _LLAMA_DEFAULTS["max_position_embeddings"]),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=read.number("rms_norm_eps", _LLAMA_DEFAULTS["rms_norm_eps"]),
        hidden_act=read.string("hidden_act", _LLAMA_DEFAULTS["hidden_act"]),
        tie_word_embeddings=read.boolean("tie_word_embeddings", _LLAMA_DEFAULTS["tie_word_embeddings"]),
        attention_bias=read.boolean("attention_bias", _LLAMA_DEFAULTS["attention_bias"]),
        mlp_bias=read.boolean("mlp_bias", _LLAMA_DEFAULTS["mlp_bias"]),
        dtype=read.string("torch_dtype", None) or read.string("dtype", None),
        bos_token_id=read.integer("bos_token_id", None),
        eos_token_ids=read.ids("eos_token_id"),
        source_quantization=quantization.get("quant_method"),
        source=source,
    )


def load_config(model_dir: Path) -> ModelConfig:
    """Read and normalise ``model_dir/config.json``.

    Raises:
        CheckpointError: the file is missing or not JSON.
        UnsupportedModelError: see ``parse_config``.
    """
    from yitrt.userfiles import read_json

    path = Path(model_dir) / "config.json"
    if not os.path.lexists(path):
        raise CheckpointError(f"{model_dir}: no config.json", "point to a Hugging Face model folder (or fetch one with `yitrt fetch`)")
    # the one reader of user-named files: a regular UTF-8 file holding a JSON object, one line otherwise
    raw = read_json(path, "config.json", error=CheckpointError, fix="re-download the model", strict=True)
    return parse_config(raw, str(path))


#: Rotary scaling types whose ``factor`` stretches the context TensorRT-LLM's build assumes (reference
#: trtllm-checkpoint-and-build.md §4.3: the factor is ignored for su/longrope/llama3, whose max_position_embeddings
#: is already the long one).
_STRETCHING_ROPE = ("linear", "dynamic", "yarn")


def context_length(max_position_embeddings: int | None, rope_scaling: dict[str, Any] | None) -> int:
    """The longest sequence (prompt + output) a model supports as TensorRT-LLM's build derives its default
    ``max_seq_len``: max_position_embeddings (2048 when unset) × the rotary scaling factor where it stretches."""
    scaling = rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    factor = float(scaling.get("factor", 1.0)) if kind in _STRETCHING_ROPE else 1.0
    return int((max_position_embeddings or 2048) * factor)
