"""Pre-load checks of a quantization request: padding/AWQ groups per split, target GPU, dtype, block size,
and the known-bad Yi combinations as warnings."""

from __future__ import annotations

import pytest

from yitrt.errors import UsageError
from yitrt.models.config import parse_config
from yitrt.models.registry import load_registry, request_pitfalls
from yitrt.plan.gpus import get_gpu, known_gpus
from yitrt.plan.rules import format_problems
from yitrt.quant.rules import group_size_problems, linear_dims, padding_problems
from yitrt.quant.schemes import KV_CACHE_FORMATS, SCHEMES

YI_6B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 4, "intermediate_size": 11008, "vocab_size": 64000, "max_position_embeddings": 4096,
         "rope_theta": 5000000.0, "rms_norm_eps": 1e-5}
YI_34B = {**YI_6B, "hidden_size": 7168, "num_hidden_layers": 60, "num_attention_heads": 56, "num_key_value_heads": 8,
          "intermediate_size": 20480}
SMOLLM2 = {**YI_6B, "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536, "vocab_size": 49152, "rope_theta": 100000.0}


def test_linear_dims_count_repeated_kv_heads():
    cfg = parse_config(YI_6B)
    assert linear_dims(cfg, 1)["qkv out"] == 4096 + 2 * 4 * 128
    assert linear_dims(cfg, 8)["qkv out"] == 4096 + 2 * 8 * 128  # tp 8 > 4 KV heads: each KV head twice


@pytest.mark.parametrize(("raw", "scheme", "tp", "group", "bad"), [
    (YI_6B, "int4-awq", 1, None, None),
    (YI_6B, "int4-awq", 2, None, None),
    (YI_6B, "int4-awq", 4, None, "intermediate 11008"),  # 11008 % (128·4)
    (YI_6B, "int4-awq", 4, 64, None),  # 11008 % (64·4) == 0
    (YI_34B, "int4-awq", 8, None, None),
    (SMOLLM2, "int4-awq", 1, None, "hidden 576"),  # ModelOpt would fail only after calibration
    (SMOLLM2, "int4-awq", 3, 64, None),
    (SMOLLM2, "w4a8-awq", 1, None, "hidden 576"),  # the W4A8 kernel pads to 128 whatever the group size
    (YI_6B, "w8a16", 8, None, "intermediate 11008"),
    (YI_6B, "fp8", 8, None, None),  # FP8 layers are never padded
])
def test_padding_and_group_splits(raw, scheme, tp, group, bad):
    problems = padding_problems(parse_config(raw), SCHEMES[scheme], tp, group)
    if bad is None:
        assert problems == []
    else:
        assert len(problems) == 1 and bad in problems[0] and f"tp {tp}" in problems[0]


def test_target_gpu_rules_come_from_the_registry():
    fp8, sq, awq, w8 = SCHEMES["fp8"], SCHEMES["int8-sq"], SCHEMES["int4-awq"], SCHEMES["w8a16"]

    def problems(scheme, kv, gpu, dtype="bfloat16"):
        return format_problems(get_gpu(gpu) if gpu else None, scheme, KV_CACHE_FORMATS[kv] if kv else None, dtype, 1, 1)

    assert problems(fp8, None, "H100") == []
    assert "SM >= 89" in problems(fp8, None, "A100")[0]
    assert "A100-80GB is SM 80" in problems(fp8, None, "a100-80gb")[0]  # aliases, any case
    assert "above SM 99" in problems(sq, None, "B200")[0]  # SmoothQuant is refused on SM100
    assert problems(w8, None, "B200") and problems(awq, None, "B200") == []
    assert "int8 KV cache" in problems(fp8, "int8", "B200")[0]
    assert "fp8 KV cache" in problems(awq, "fp8", "A10G")[0]
    assert problems(fp8, None, "sm89") == [] and get_gpu("sm89").sm == 89
    assert problems(fp8, None, None) == []
    assert "float16" in problems(SCHEMES["w4a8-awq"], None, None, "bfloat16")[0]
    assert problems(SCHEMES["w4a8-awq"], None, None, "auto") == [] and problems(awq, None, None, "bfloat16") == []
    with pytest.raises(UsageError) as info:
        get_gpu("H900")
    assert "H100" in info.value.hint and len(known_gpus()) > 10


def test_block_size_rules():
    assert group_size_problems(SCHEMES["int4-awq"], 64) == []
    assert "64, 128" in group_size_problems(SCHEMES["int4-awq"], 32)[0]
    assert "AWQ schemes only" in group_size_problems(SCHEMES["fp8"], 64)[0]
    assert group_size_problems(SCHEMES["fp8"], None) == []


def test_calibrated_schemes_name_their_modelopt_preset():
    for scheme in SCHEMES.values():
        assert (scheme.modelopt_config is not None) == scheme.calibrated
        if scheme.group_size:
            assert scheme.group_size in scheme.group_sizes


def test_known_bad_yi_combinations_warn():
    yi6 = parse_config(YI_6B)
    assert load_registry().match(yi6).checkpoint is None  # a local Yi-6B-shaped folder: several candidates
    int8_kv = request_pitfalls(yi6, None, {"kv_cache": "int8", "scheme": "fp8", "pp": 1})
    assert len(int8_kv) == 1 and "NVIDIA/TensorRT-LLM#889" in int8_kv[0]
    assert request_pitfalls(yi6, None, {"kv_cache": "fp8", "scheme": "fp8", "pp": 1}) == []
    sq = request_pitfalls(yi6, "01-ai/Yi-6B-Chat", {"kv_cache": None, "scheme": "int8-sq", "pp": 1})
    assert len(sq) == 1 and "per-tensor SmoothQuant" in sq[0] and "#945" in sq[0]
    pp2 = request_pitfalls(parse_config(YI_34B), "01-ai/Yi-34B-Chat", {"kv_cache": None, "scheme": "int4-awq", "pp": 2})
    assert len(pp2) == 1 and "#1321" in pp2[0]
    assert request_pitfalls(parse_config(YI_34B), "01-ai/Yi-34B", {"kv_cache": None, "scheme": "int4-awq", "pp": 2}) == []
