"""Reading a TensorRT-LLM checkpoint for the reference runtime: config refusals, rank layouts, RoPE tables."""

from __future__ import annotations

import json
import math

import pytest
import torch

from yitrt.checkpoint.safetensors_io import TensorInfo
from yitrt.errors import CheckpointError, UnsupportedModelError
from yitrt.reference.layout import check_rank_file, expected_tensors, is_quantized
from yitrt.reference.rope import Rotary
from yitrt.reference.spec import load_spec

YI_6B = {"vocab_size": 64000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 4, "intermediate_size": 11008, "head_size": 128}


def _config(**changes):
    cfg = {"architecture": "LlamaForCausalLM", "dtype": "bfloat16", **YI_6B, "hidden_act": "silu",
           "position_embedding_type": "rope_gpt_neox", "rotary_base": 5000000.0, "norm_epsilon": 1e-5,
           "max_position_embeddings": 4096, "use_parallel_embedding": True, "embedding_sharding_dim": 0,
           "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1}, "quantization": {"quant_algo": None, "kv_cache_quant_algo": None}}
    for key, value in changes.items():
        if key in ("quant_algo", "kv_cache_quant_algo", "group_size", "pre_quant_scale", "has_zero_point", "exclude_modules"):
            cfg["quantization"][key] = value
        elif key in ("tp", "pp"):
            cfg["mapping"][f"{key}_size"] = value
            cfg["mapping"]["world_size"] = cfg["mapping"]["tp_size"] * cfg["mapping"]["pp_size"]
        else:
            cfg[key] = value
    return cfg


def _spec(tmp_path, **changes):
    (tmp_path / "config.json").write_text(json.dumps(_config(**changes)))
    return load_spec(tmp_path)


@pytest.mark.parametrize(("changes", "named"), [
    ({"quant_algo": "W4A16_GPTQ"}, "W4A16_GPTQ"),
    ({"quant_algo": "NVFP4"}, "NVFP4"),
    ({"quant_algo": "W8A8_SQ_PER_TENSOR_PLUGIN"}, "W8A8_SQ_PER_TENSOR_PLUGIN"),
    ({"quant_algo": "MIXED_PRECISION"}, "MIXED_PRECISION"),
    ({"quant_algo": "W4A16_AWQ", "has_zero_point": True}, "has_zero_point"),
    ({"kv_cache_quant_algo": "NVFP4"}, "kv_cache_quant_algo"),
    ({"rotary_scaling": {"type": "longrope", "factor": 4.0}}, "longrope"),
    ({"architecture": "GPTForCausalLM"}, "GPTForCausalLM"),
    ({"rotary_pct": 0.5}, "partial rotary"),
])
def test_formats_that_cannot_be_emulated_are_refused_by_name(tmp_path, changes, named):
    with pytest.raises(UnsupportedModelError) as info:
        _spec(tmp_path, **changes)
    assert named in info.value.message


def test_stage_layers_follow_tensor_split(tmp_path):
    spec = _spec(tmp_path, num_hidden_layers=10, pp=3)
    assert [list(spec.stage_layers(r)) for r in range(3)] == [list(b.tolist()) for b in torch.arange(10).tensor_split(3)]


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_yi6b_rank_shapes(tmp_path, tp):
    spec = _spec(tmp_path, tp=tp)
    exp = expected_tensors(spec, tp - 1)
    kv_local = max(1, 4 // tp)  # tp 8 repeats KV heads: one per rank
    assert exp["transformer.layers.0.attention.qkv.weight"].shape == ((32 // tp + 2 * kv_local) * 128, 4096)
    assert exp["transformer.layers.31.mlp.proj.weight"].shape == (4096, 11008 // tp)
    assert exp["lm_head.weight"].shape == (64000 // tp, 4096)
    assert exp["transformer.vocab_embedding.weight"].shape == (64000 // tp, 4096)


def test_awq_tensors_and_exclusions(tmp_path):
    spec = _spec(tmp_path, quant_algo="W4A8_AWQ", group_size=128, pre_quant_scale=True, exclude_modules=["lm_head"], tp=2)
    exp = expected_tensors(spec, 0)
    p = "transformer.layers.0.mlp.proj."
    assert exp[p + "weight"].shape == (2048, 5504) and exp[p + "weight"].dtypes == {"I8"}
    assert exp[p + "weights_scaling_factor"].shape == (4096, 43)
    assert exp[p + "prequant_scaling_factor"].shape == (5504,)
    assert {p + "weights_scaling_factor_2", p + "activation_scaling_factor"} <= set(exp)
    assert exp["lm_head.weight"].dtypes == {"BF16"}  # excluded → unquantized
    assert is_quantized(spec, "transformer.layers.0.mlp.proj") and not is_quantized(spec, "lm_head")


def test_default_exclusions_keep_lm_head_dense(tmp_path):
    spec = _spec(tmp_path, quant_algo="FP8")
    assert not is_quantized(spec, "lm_head")
    assert is_quantized(spec, "transformer.layers.3.attention.dense")


def _infos(exp, **overrides):
    infos = {}
    for name, e in exp.items():
        dtype, shape = overrides.get(name, (sorted(e.dtypes)[0], e.shape))
        infos[name] = TensorInfo(name, dtype, tuple(shape), 0, 0)
    return infos


def test_rank_check_reports_missing_misshaped_mistyped_and_extra(tmp_path):
    spec = _spec(tmp_path, num_hidden_layers=2, tp=2)
    exp = expected_tensors(spec, 1)
    infos = _infos(exp, **{"lm_head.weight": ("BF16", (31999, 4096)), "transformer.ln_f.weight": ("F16", (4096,))})
    del infos["transformer.layers.1.mlp.fc.weight"]
    infos["transformer.layers.0.attention.rotary_inv_freq"] = TensorInfo("x", "F32", (64,), 0, 0)
    problems, extras = check_rank_file(spec, 1, infos)
    assert any("lm_head.weight is [31999, 4096], expected [32000, 4096]" in p for p in problems)
    assert any("ln_f.weight is F16" in p for p in problems)
    assert any("layers.1.mlp.fc.weight is missing" in p for p in problems)
    assert extras == ["transformer.layers.0.attention.rotary_inv_freq"]


def test_separate_k_v_cache_scales_stand_for_the_merged_one(tmp_path):
    spec = _spec(tmp_path, num_hidden_layers=1, kv_cache_quant_algo="INT8")
    infos = _infos(expected_tensors(spec, 0))
    del infos["transformer.layers.0.attention.kv_cache_scaling_factor"]
    for kv in ("k", "v"):
        name = f"transformer.layers.0.attention.{kv}_cache_scaling_factor"
        infos[name] = TensorInfo(name, "F32", (), 0, 0)
    assert check_rank_file(spec, 0, infos) == ([], [])


def test_missing_config_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        load_spec(tmp_path)


# RoPE: the tables TensorRT-LLM builds equal transformers' for these settings (transformers as the oracle)
@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    {"rope_type": "dynamic", "factor": 2.0},
])
def test_inverse_frequencies_match_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=4096, rope_theta=500000.0, rope_scaling=scaling)
    kind = (scaling or {}).get("rope_type", "default")
    rotary = Rotary(500000.0, 128, scaling, 4096)
    if kind == "default":
        ours, attention = rotary.inv_freq, rotary.attention_factor
        theirs, their_attention = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128)), 1.0
    elif kind == "dynamic":
        ours, attention = rotary.inv_freq_for(10000), 1.0
        theirs, their_attention = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=10000)
        assert torch.equal(rotary.inv_freq_for(4096), rotary.inv_freq)  # unchanged within the trained length
    else:
        ours, attention = rotary.inv_freq, rotary.attention_factor
        theirs, their_attention = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=0)
    assert attention == pytest.approx(their_attention)
    if kind == "yarn":
        assert attention == pytest.approx(0.1 * math.log(4.0) + 1.0)


def test_emulation_notes_name_what_differs_from_an_engine(tmp_path):
    from yitrt.reference.spec import emulation_notes

    assert emulation_notes(_spec(tmp_path)) == []
    notes = emulation_notes(_spec(tmp_path, quant_algo="W4A8_AWQ", kv_cache_quant_algo="FP8"))
    assert any("FP8 context FMHA" in n for n in notes)
    assert any("bfloat16" in n and "float16" in n for n in notes)  # the model dtype here is bfloat16


@pytest.mark.parametrize(("tp", "parallel", "shared"), [(1, False, True), (2, True, True), (2, False, False)])
def test_omitted_lm_head_only_where_tensorrt_llm_shares_the_embedding(tmp_path, tp, parallel, shared):
    spec = _spec(tmp_path, num_hidden_layers=1, tp=tp, use_parallel_embedding=parallel)
    infos = _infos(expected_tensors(spec, 0))
    del infos["lm_head.weight"]
    problems, _ = check_rank_file(spec, 0, infos)
    assert (problems == []) is shared
    if not shared:
        assert problems == ["lm_head.weight is missing"]
