"""`ModelConfig`: one normalised view of a Hugging Face ``config.json`` for the Llama family (Yi included).

Spellings handled (reference/yi-models.md §2, transformers 4.x vs 5.x):
- ``architectures: ["LlamaForCausalLM"]`` and the legacy ``["YiForCausalLM"]`` (model_type ``Yi``) of the
  first Yi uploads, whose per-layer norms are named ``ln1``/``ln2``;
- transformers 4.x ``rope_theta`` + ``rope_scaling`` and 5.x ``rope_parameters`` (theta and scaling in one dict);
- ``torch_dtype`` (4.x) and ``dtype`` (5.x); explicit ``head_dim``; ``tie_word_embeddings``.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder described by the numbers conversion and planning need.

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
        """JSON-ready dict of every field."""
        data = asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data


def _require_int(raw: dict[str, Any], key: str, source: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(
            f"{source}: '{key}' must be a positive integer, found {value!r}",
            "the config.json is damaged or not a causal-LM config; re-download it",
        )
    return value


def _normalise_rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, rope_scaling) from either transformers spelling."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):  # transformers >= 5
        theta = float(params.get("rope_theta", raw.get("rope_theta", _LLAMA_DEFAULTS["rope_theta"])))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type in (None, "default"):
            return theta, None
        scaling = {k: v for k, v in params.items() if k not in _ROPE_BASE_KEYS and k != "type"}
        scaling["rope_type"] = rope_type
        return theta, scaling
    theta = float(raw.get("rope_theta", _LLAMA_DEFAULTS["rope_theta"]))
    scaling = raw.get("rope_scaling")
    if not scaling:
        return theta, None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return theta, None
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    return theta, scaling


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def parse_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Normalise a parsed HF ``config.json`` dict.

    Args:
        raw: the JSON object.
        source: where it came from, for messages.

    Returns:
        The normalised ModelConfig.

    Raises:
        UnsupportedModelError: the architecture is not in ``SUPPORTED_ARCHITECTURES``.
        CheckpointError: a required dimension is missing or inconsistent.
    """
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{source}: architecture {arch!r} is not supported",
            "yitrt converts " + ", ".join(SUPPORTED_ARCHITECTURES) + " (Yi, Yi-1.5, Yi-Coder and other Llama-family models)",
        )
    hidden = _require_int(raw, "hidden_size", source)
    heads = _require_int(raw, "num_attention_heads", source)
    kv_heads = raw.get("num_key_value_heads") or heads
    head_dim = raw.get("head_dim") or (hidden // heads)
    if raw.get("head_dim") is None and hidden % heads:
        raise CheckpointError(
            f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} and no head_dim is given",
            "the config.json is inconsistent; add head_dim or fix the head count",
        )
    if heads % kv_heads:
        raise CheckpointError(
            f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}",
            "the config.json is inconsistent; grouped-query attention needs whole groups",
        )
    theta, scaling = _normalise_rope(raw)
    dtype = raw.get("torch_dtype", raw.get("dtype"))
    return ModelConfig(
        architecture=arch,
        legacy_yi=SUPPORTED_ARCHITECTURES[arch],
        hidden_size=hidden,
        num_layers=_require_int(raw, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        intermediate_size=_require_int(raw, "intermediate_size", source),
        vocab_size=_require_int(raw, "vocab_size", source),
        max_position_embeddings=int(raw.get("max_position_embeddings") or _LLAMA_DEFAULTS["max_position_embeddings"]),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(raw.get("rms_norm_eps", _LLAMA_DEFAULTS["rms_norm_eps"])),
        hidden_act=str(raw.get("hidden_act", _LLAMA_DEFAULTS["hidden_act"])),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", _LLAMA_DEFAULTS["tie_word_embeddings"])),
        attention_bias=bool(raw.get("attention_bias", _LLAMA_DEFAULTS["attention_bias"])),
        mlp_bias=bool(raw.get("mlp_bias", _LLAMA_DEFAULTS["mlp_bias"])),
        dtype=str(dtype) if dtype else None,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_as_ids(raw.get("eos_token_id")),
        source_quantization=(raw.get("quantization_config") or {}).get("quant_method"),
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
    raw = read_json(path, "config.json", error=CheckpointError, fix="re-download the model")
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
