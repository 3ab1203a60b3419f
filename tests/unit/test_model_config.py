"""`parse_config`: every config.json spelling yitrt meets, and parameter counts against the reference.

Expected values come from shared reference/yi-models.md §1.2 (config values) and §1.3 (parameter counts),
never from the code under test.
"""

from __future__ import annotations

import copy

import pytest

from yitrt.errors import CheckpointError, UnsupportedModelError
from yitrt.models.config import parse_config

# Yi-34B config.json in Llama format (yi-models.md §1.2, revision 3ace5f0 of 01-ai/Yi-34B).
YI_34B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 7168,
    "num_hidden_layers": 60,
    "num_attention_heads": 56,
    "num_key_value_heads": 8,
    "intermediate_size": 20480,
    "vocab_size": 64000,
    "max_position_embeddings": 4096,
    "rope_theta": 5000000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "attention_bias": False,
    "initializer_range": 0.02,
    "use_cache": True,
}


def _with(base: dict, **changes) -> dict:
    raw = copy.deepcopy(base)
    for key, value in changes.items():
        if value is _DROP:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


_DROP = object()


def _llama(hidden, layers, heads, kv, inter, **extra) -> dict:
    return _with(
        YI_34B,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        **extra,
    )


def _reference_params(V, H, L, kv, I, d=128, tied=False):  # noqa: E741
    """yi-models.md §1.3: 2·V·H + L·(2H² + 2·H·kv·128 + 3·H·I + 2H) + H (untied)."""
    return (1 if tied else 2) * V * H + L * (2 * H * H + 2 * H * kv * d + 3 * H * I + 2 * H) + H


def test_yi_34b_llama_format_every_field():
    cfg = parse_config(YI_34B)
    assert cfg.architecture == "LlamaForCausalLM"
    assert cfg.legacy_yi is False
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (7168, 60, 56, 8)
    assert cfg.head_dim == 128  # 7168 / 56
    assert cfg.intermediate_size == 20480
    assert cfg.vocab_size == 64000
    assert cfg.max_position_embeddings == 4096
    assert cfg.rope_theta == 5e6
    assert cfg.rope_scaling is None
    assert cfg.rms_norm_eps == 1e-5
    assert cfg.hidden_act == "silu"
    assert cfg.tie_word_embeddings is False
    assert cfg.attention_bias is False and cfg.mlp_bias is False
    assert cfg.dtype == "bfloat16"
    assert cfg.bos_token_id == 1
    assert cfg.eos_token_ids == (2,)
    assert cfg.source_quantization is None
    assert cfg.q_size == 56 * 128
    assert cfg.kv_size == 8 * 128


def test_yi_9b_rope_and_eps_taken_from_config():
    # Yi-9B: rope_theta 1e4, rms_norm_eps 1e-6 (§1.2; checklist §7.2/7.3: read per repo)
    cfg = parse_config(_llama(4096, 48, 32, 4, 11008, rope_theta=10000.0, rms_norm_eps=1e-6))
    assert cfg.rope_theta == 1e4
    assert cfg.rms_norm_eps == 1e-6
    coder = parse_config(_llama(2048, 24, 16, 16, 5504, rope_theta=10000000.0, max_position_embeddings=131072))
    assert coder.rope_theta == 1e7
    assert coder.max_position_embeddings == 131072


def test_legacy_yi_for_causal_lm():
    raw = _with(YI_34B, architectures=["YiForCausalLM"], model_type="Yi", auto_map={"AutoConfig": "configuration_yi.YiConfig"})
    cfg = parse_config(raw)
    assert cfg.legacy_yi is True
    assert cfg.architecture == "YiForCausalLM"
    assert cfg.num_layers == 60 and cfg.num_kv_heads == 8


@pytest.mark.parametrize(
    ("rope_type", "scaling"),
    [
        ("yarn", {"factor": 4.0, "original_max_position_embeddings": 4096}),
        ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        ("linear", {"factor": 2.0}),
        ("dynamic", {"factor": 2.0}),
    ],
)
def test_rope_parameters_v5_equals_v4_spellings(rope_type, scaling):
    expected = {**scaling, "rope_type": rope_type}
    # transformers 5.x: theta and scaling in one dict
    v5 = _with(YI_34B, rope_theta=_DROP, rope_scaling=_DROP, rope_parameters={"rope_type": rope_type, "rope_theta": 5e6, **scaling})
    # transformers 4.x, old spelling ("type") and newer ("rope_type"), and both at once
    v4_type = _with(YI_34B, rope_theta=5e6, rope_scaling={"type": rope_type, **scaling})
    v4_rope_type = _with(YI_34B, rope_theta=5e6, rope_scaling={"rope_type": rope_type, **scaling})
    v4_both = _with(YI_34B, rope_theta=5e6, rope_scaling={"type": rope_type, "rope_type": rope_type, **scaling})
    configs = [parse_config(r) for r in (v5, v4_type, v4_rope_type, v4_both)]
    for cfg in configs:
        assert cfg.rope_theta == 5e6
        assert cfg.rope_scaling == expected
        assert "type" not in cfg.rope_scaling
    assert configs[0] == configs[1] == configs[2] == configs[3]


def test_rope_parameters_default_type_means_no_scaling():
    v5 = _with(YI_34B, rope_theta=_DROP, rope_scaling=_DROP, rope_parameters={"rope_type": "default", "rope_theta": 1e7})
    v4 = _with(YI_34B, rope_theta=1e7, rope_scaling=None)
    a, b = parse_config(v5), parse_config(v4)
    assert a.rope_theta == 1e7 and a.rope_scaling is None
    assert a == b


def test_missing_rope_theta_uses_llama_default():
    # transformers' LlamaConfig default rope_theta is 10000.0
    cfg = parse_config(_with(YI_34B, rope_theta=_DROP, rope_scaling=_DROP))
    assert cfg.rope_theta == 10000.0
    assert cfg.rope_scaling is None


def test_explicit_head_dim_differs_from_hidden_over_heads():
    raw = _llama(2048, 2, 16, 4, 5504, head_dim=256)  # hidden / heads would be 128
    cfg = parse_config(raw)
    assert cfg.head_dim == 256
    assert cfg.q_size == 16 * 256
    assert cfg.kv_size == 4 * 256
    H, I, V, L, q, kv = 2048, 5504, 64000, 2, 16 * 256, 4 * 256  # noqa: E741
    # q_proj [q, H], k/v [kv, H], o_proj [H, q], 3 MLP [I, H], 2 norms per layer; final norm; embed + lm_head
    per_layer = q * H + 2 * kv * H + H * q + 3 * H * I + 2 * H
    assert cfg.param_count() == 2 * V * H + L * per_layer + H


def test_hidden_not_multiple_of_heads_without_head_dim_is_an_error():
    with pytest.raises(CheckpointError, match="head_dim"):
        parse_config(_llama(1000, 2, 16, 4, 5504))


def test_tied_embeddings_count_the_table_once():
    raw = _llama(2048, 24, 16, 16, 5504, tie_word_embeddings=True)
    cfg = parse_config(raw)
    assert cfg.tie_word_embeddings is True
    assert cfg.param_count() == 1_476_495_360 - 64000 * 2048


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_dtype_spellings(key):
    raw = _with(YI_34B, torch_dtype=_DROP)
    raw[key] = "float16"
    assert parse_config(raw).dtype == "float16"


def test_no_dtype_is_none():
    assert parse_config(_with(YI_34B, torch_dtype=_DROP)).dtype is None


def test_quantization_config_quant_method():
    raw = _with(YI_34B, quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True})
    assert parse_config(raw).source_quantization == "awq"
    raw = _with(YI_34B, quantization_config={"quant_method": "gptq", "bits": 8})
    assert parse_config(raw).source_quantization == "gptq"


def test_eos_list_and_missing_kv_heads():
    raw = _with(YI_34B, eos_token_id=[2, 7], num_key_value_heads=_DROP)
    cfg = parse_config(raw)
    assert cfg.eos_token_ids == (2, 7)
    assert cfg.num_kv_heads == 56  # absent: multi-head attention


def test_to_dict_is_json_ready():
    import json

    data = parse_config(_with(YI_34B, eos_token_id=[2, 7])).to_dict()
    assert data["eos_token_ids"] == [2, 7]
    assert json.loads(json.dumps(data))["num_kv_heads"] == 8


@pytest.mark.parametrize("archs", [["MistralForCausalLM"], ["LlavaLlamaForCausalLM"], [], None])
def test_unknown_architecture_lists_supported(archs):
    raw = _with(YI_34B, architectures=archs) if archs is not None else _with(YI_34B, architectures=_DROP)
    with pytest.raises(UnsupportedModelError) as info:
        parse_config(raw)
    assert "LlamaForCausalLM" in info.value.hint
    assert "YiForCausalLM" in info.value.hint
    if archs:
        assert archs[0] in info.value.message


@pytest.mark.parametrize("value", [_DROP, 0, -7, None, "7168", 7168.0, True])
def test_missing_or_bad_hidden_size(value):
    with pytest.raises(CheckpointError, match="hidden_size"):
        parse_config(_with(YI_34B, hidden_size=value))


@pytest.mark.parametrize("key", ["num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"])
def test_missing_required_dims(key):
    with pytest.raises(CheckpointError, match=key):
        parse_config(_with(YI_34B, **{key: _DROP}))


def test_heads_not_multiple_of_kv_heads():
    with pytest.raises(CheckpointError) as info:
        parse_config(_with(YI_34B, num_key_value_heads=6))
    assert "56" in info.value.message and "6" in info.value.message


# ---- parameter counts: yi-models.md §1.3 ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("dims", "expected"),
    [
        ((4096, 32, 32, 4, 11008), 6_061_035_520),  # Yi-6B family
        ((4096, 48, 32, 4, 11008), 8_829_407_232),  # Yi-9B family
        ((7168, 60, 56, 8, 20480), 34_388_917_248),  # Yi-34B family
        ((2048, 24, 16, 16, 5504), 1_476_495_360),  # Yi-Coder-1.5B
    ],
    ids=["6b", "9b", "34b", "coder-1.5b"],
)
def test_param_count_matches_reference(dims, expected):
    H, L, heads, kv, I = dims  # noqa: E741
    assert _reference_params(64000, H, L, kv, I) == expected  # the formula reproduces the table
    assert parse_config(_llama(*dims)).param_count() == expected


def test_param_count_with_biases():
    # attention_bias adds q, k, v and o biases; mlp_bias adds gate/up [I] and down [H] biases
    H, L, heads, kv, I, V = 64, 2, 4, 2, 96, 100  # noqa: E741
    base = _llama(H, L, heads, kv, I, vocab_size=V)
    d = H // heads
    plain = parse_config(base).param_count()
    assert plain == _reference_params(V, H, L, kv, I, d=d)
    with_attn = parse_config(_with(base, attention_bias=True)).param_count()
    assert with_attn - plain == L * (heads * d + 2 * kv * d + H)
    with_mlp = parse_config(_with(base, mlp_bias=True)).param_count()
    assert with_mlp - plain == L * (2 * I + H)


# ---- values that cannot be right are refused by ModelConfig itself ---------------------------------------------

_NAN, _INF = float("nan"), float("inf")

#: (config.json change, the key the one-line error must name)
IMPOSSIBLE = [
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_attention_heads": -56}, "num_attention_heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),  # was silently "no GQA" (0 is falsy)
    ({"num_key_value_heads": -8}, "num_key_value_heads"),
    ({"num_key_value_heads": 12}, "num_key_value_heads"),  # 56 heads are not whole groups of 12
    ({"head_dim": -128}, "head_dim"),  # was accepted (truthy)
    ({"head_dim": 0}, "head_dim"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"hidden_size": -7168}, "hidden_size"),
    ({"intermediate_size": 0}, "intermediate_size"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"max_position_embeddings": -1}, "max_position_embeddings"),
    ({"hidden_size": 7168 * 10**6}, "hidden_size"),  # absurd: beyond DIM_LIMITS
    ({"num_hidden_layers": 100_000}, "num_hidden_layers"),
    ({"vocab_size": 10**12}, "vocab_size"),
    ({"max_position_embeddings": 10**12}, "max_position_embeddings"),
    ({"num_hidden_layers": 60.0}, "num_hidden_layers"),  # floats and bools are not integers
    ({"num_attention_heads": True}, "num_attention_heads"),
    ({"vocab_size": "64000"}, "vocab_size"),
    ({"rope_theta": _NAN}, "rope_theta"),
    ({"rope_theta": _INF}, "rope_theta"),
    ({"rope_theta": 0}, "rope_theta"),
    ({"rope_theta": -5e6}, "rope_theta"),
    ({"rope_theta": "5e6"}, "rope_theta"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"rms_norm_eps": _NAN}, "rms_norm_eps"),
    ({"rms_norm_eps": 1.5}, "rms_norm_eps"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),  # bool("false") is True
    ({"attention_bias": 1}, "attention_bias"),
    ({"mlp_bias": "no"}, "mlp_bias"),
    ({"hidden_act": 3}, "hidden_act"),
    ({"rope_scaling": "linear"}, "rope_scaling"),
    ({"rope_scaling": {"type": "linear", "factor": 0}}, "factor"),
    ({"rope_scaling": {"type": "linear", "factor": _NAN}}, "factor"),
    ({"rope_scaling": {"type": "linear", "factor": _INF}}, "factor"),
    ({"rope_scaling": {"type": "dynamic", "factor": 1e9}}, "factor"),
    ({"rope_scaling": {"type": "yarn", "factor": "4"}}, "factor"),
    ({"rope_scaling": {"type": 4, "factor": 2.0}}, "type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}, "high_freq_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": -1}}, "original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "beta_fast": _NAN}}, "beta_fast"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": _NAN, "factor": 2.0}}, "rope_theta"),
    ({"rope_parameters": ["linear"]}, "rope_parameters"),
    ({"eos_token_id": "2"}, "eos_token_id"),
    ({"eos_token_id": [2, -7]}, "token ids"),
    ({"bos_token_id": 1.0}, "bos_token_id"),
    ({"quantization_config": "awq"}, "quantization_config"),
    ({"architectures": "LlamaForCausalLM"}, "architectures"),
    ({"architectures": {"0": "LlamaForCausalLM"}}, "architectures"),
]


@pytest.mark.parametrize("change, key", IMPOSSIBLE, ids=[f"{k}={v!r}"[:60] for c, _ in IMPOSSIBLE for k, v in c.items()])
def test_values_that_cannot_be_right_are_refused(change, key):
    with pytest.raises(CheckpointError) as info:
        parse_config(_with(YI_34B, **change), "x/config.json")
    message = info.value.message
    assert message.startswith("x/config.json: ") and key in message and "\n" not in message, message
    assert info.value.hint


@pytest.mark.parametrize("raw", [[YI_34B], "LlamaForCausalLM", None, 3])
def test_config_that_is_not_an_object(raw):
    with pytest.raises(CheckpointError, match="not a JSON object"):
        parse_config(raw)


def test_every_construction_path_is_validated():
    """ModelConfig itself refuses, so paths that build it without parse_config (dataclasses.replace, the
    registry, the demo header) cannot carry an impossible value either."""
    import dataclasses

    cfg = parse_config(YI_34B)
    for field_name, value in (("num_kv_heads", 0), ("head_dim", -1), ("rope_theta", _NAN), ("tie_word_embeddings", "false"),
                              ("num_heads", 57)):
        with pytest.raises(CheckpointError, match=field_name.replace("num_heads", "num_attention_heads").replace("num_kv_heads", "num_key_value_heads")):
            dataclasses.replace(cfg, **{field_name: value})
    assert dataclasses.replace(cfg, num_kv_heads=7).num_kv_heads == 7  # 56 = 8 groups of 7: valid


def test_null_means_the_default_for_optional_keys():
    cfg = parse_config(_with(YI_34B, num_key_value_heads=None, head_dim=None, max_position_embeddings=None,
                             tie_word_embeddings=None, rope_theta=None))
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.max_position_embeddings, cfg.tie_word_embeddings, cfg.rope_theta) == \
        (56, 128, 2048, False, 10000.0)
