"""`yitrt build` argv: golden command lines per (model, scheme, GPU, TensorRT-LLM version), each also parsed by
an independent copy of the 1.2 parser (the trtllm-build test double) and checked against the versions' flag
facts; and every invalid combination refused with all its reasons at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.doubles.trtllm_build_1_2 import parser as trtllm_12_parser
from yitrt.build.argv import assemble
from yitrt.build.profiles import builtin_profiles, load_profile, pick_profile
from yitrt.checkpoint.sharding import Mapping
from yitrt.checkpoint.trtllm_config import build_config
from yitrt.errors import UsageError, ValidationError
from yitrt.models.registry import load_registry
from yitrt.plan.gpus import get_gpu
from yitrt.quant.schemes import KV_CACHE_FORMATS, SCHEMES

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "build"

#: Flags that release lines lack, from the reference's version facts (§4.4 and the per-release help pages),
#: written here independently of yitrt's own table.
ABSENT = {
    "0.18": {"dora_plugin", "gemm_allreduce_plugin", "norm_quant_fusion", "fuse_fp4_quant"},
    "1.0": {"max_output_len", "paged_kv_cache_enable"},
    "1.2": {"auto_parallel", "gpus_per_node", "cluster_key", "max_output_len", "strongly_typed"},
}


def write_checkpoint(folder: Path, repo: str, scheme: str = "none", kv: str | None = None, tp: int = 1, pp: int = 1,
                     dtype: str = "bfloat16") -> Path:
    """A checkpoint's config.json for a Yi shape (what plan/build read; no weights needed for a dry run)."""
    cfg = load_registry().config_of(repo)
    folder.mkdir(parents=True)
    config = build_config(cfg, Mapping(tp, pp), dtype, SCHEMES[scheme], KV_CACHE_FORMATS[kv] if kv else None, True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


CASES = {
    "yi34b-fp8-tp1-h100-1.2": dict(repo="01-ai/Yi-34B-Chat", scheme="fp8", gpu="H100", version="1.2"),
    "yi34b-fp8kv-tp2-h100-1.2": dict(repo="01-ai/Yi-1.5-34B-Chat", scheme="fp8", kv="fp8", tp=2, gpu="H100", version="1.2.0"),
    "yi6b-bf16-tp1-l4-1.2": dict(repo="01-ai/Yi-1.5-6B-Chat", gpu="L4", version="1.2"),
    "yi9b-awq-tp1-a100-1.2": dict(repo="01-ai/Yi-1.5-9B-Chat", scheme="int4-awq", gpu="A100-80GB", version="1.2"),
    "yi6b-sq-tp2-a10g-1.0": dict(repo="01-ai/Yi-6B-Chat", scheme="int8-sq", tp=2, gpu="A10G", version="1.0.0"),
    "yi9b-fp8-tp1-l40s-0.18": dict(repo="01-ai/Yi-Coder-9B-Chat", scheme="fp8", gpu="L40S", version="0.18.2"),
    "yi34b200k-fp8kv-tp4-h200-long-1.2": dict(repo="01-ai/Yi-34B-200K", scheme="fp8", kv="fp8", tp=4, gpu="H200", version="1.2", plugins="long-context"),
    "yi9b-w8a16-tp2-h100-0.19": dict(repo="01-ai/Yi-9B", scheme="w8a16", tp=2, gpu="H100-PCIe", version="0.19.0"),
}


def _argv(tmp_path: Path, case: dict) -> tuple[list[str], dict]:
    case = dict(case)
    ckpt = write_checkpoint(tmp_path / "ckpt", case.pop("repo"), case.pop("scheme", "none"), case.pop("kv", None), case.pop("tp", 1))
    spec = assemble(ckpt, get_gpu(case.pop("gpu")), trtllm_version=case.pop("version"), **case)
    argv = spec.argv(Path("/ENGINE"))
    argv = [a.replace(str(ckpt), "/CKPT") for a in argv]
    return argv, spec.build_config()


def _pairs(argv: list[str]) -> dict[str, str]:
    out, i = {}, 1
    while i < len(argv):
        out[argv[i][2:]] = argv[i + 1]
        i += 2
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_argv(tmp_path, name):
    argv, config = _argv(tmp_path, CASES[name])
    golden = GOLDEN / f"{name}.json"
    if os.environ.get("YITRT_UPDATE_GOLDEN") == "1":  # regenerate after a deliberate change, then review the diff
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(json.dumps({"argv": argv, "limits": config["limits"], "profiles": config["profiles"]}, indent=1) + "\n")
    expected = json.loads(golden.read_text())
    assert argv == expected["argv"]
    assert config["limits"] == expected["limits"] and config["profiles"] == expected["profiles"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_argv_is_valid_for_its_version_and_carries_the_plan(tmp_path, name):
    argv, config = _argv(tmp_path, CASES[name])
    flags = _pairs(argv)
    line = config["release_line"]
    if line == "1.2":
        args = trtllm_12_parser().parse_args(argv[1:])  # argparse exits on any flag or value 1.2 lacks
        assert args.kv_cache_type == "PAGED"
    assert not set(flags) & ABSENT.get(line, set())
    for name_ in ("max_batch_size", "max_seq_len", "max_num_tokens", "max_input_len"):
        assert int(flags[name_]) == config["limits"][name_]  # none missing that the plan requires
    assert flags["kv_cache_type"] == "paged" and flags["remove_input_padding"] == "enable"
    assert flags["gpt_attention_plugin"] == "auto" and int(flags["tokens_per_block"]) in (32, 64)
    assert flags["output_timing_cache"] == "/ENGINE/timing.cache" and flags["checkpoint_dir"] == "/CKPT"
    assert ("reduce_fusion" in flags) == (config["tp"] > 1)
    assert config["limits"]["max_batch_size"] <= config["plan"]["max_concurrent_sequences"]  # no batch the KV pool cannot hold
    assert config["plan"]["max_tokens_in_paged_kv_cache"] <= config["plan"]["kv_tokens"]


def test_profiles_are_picked_from_gpu_and_scheme():
    assert pick_profile(get_gpu("H100"), SCHEMES["fp8"]).name == "fp8-hopper"
    assert pick_profile(get_gpu("L40S"), SCHEMES["fp8"]).name == "fp8"
    assert pick_profile(get_gpu("B200"), SCHEMES["fp8"]).name == "fp8"
    assert pick_profile(get_gpu("A100"), SCHEMES["int4-awq"]).name == "int4-awq"
    assert pick_profile(get_gpu("A10G"), SCHEMES["int8-sq"]).name == "int8-sq"
    assert pick_profile(get_gpu("H100"), SCHEMES["w8a16"]).name == "weight-only"
    assert pick_profile(get_gpu("L4"), SCHEMES["none"]).name == "default"
    for profile in builtin_profiles().values():
        assert profile.summary and all(profile.why.get(flag) for flag in profile.flags)


def test_a_custom_profile_file_and_its_version_check(tmp_path):
    custom = tmp_path / "mine.yaml"
    custom.write_text("name: mine\nsummary: test\nflags:\n  dora_plugin: {value: enable, why: test}\n  tokens_per_block: {value: 64, why: test}\n")
    assert load_profile(str(custom)).flags == {"dora_plugin": "enable", "tokens_per_block": 64}
    ckpt = write_checkpoint(tmp_path / "ckpt", "01-ai/Yi-6B")
    spec = assemble(ckpt, get_gpu("H100"), plugins=str(custom), trtllm_version="1.2")
    assert "--dora_plugin" in spec.argv(tmp_path) and spec.plan.request.workload.tokens_per_block == 64
    with pytest.raises(ValidationError) as info:
        assemble(ckpt, get_gpu("H100"), plugins=str(custom), trtllm_version="0.18")
    assert "--dora_plugin, which TensorRT-LLM 0.18 does not have (it exists in 0.19-1.2)" in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nflags:\n  context_fmha: enable\n")
    with pytest.raises(UsageError, match="needs {value"):
        load_profile(str(bad))
    with pytest.raises(UsageError, match="unknown plugin profile"):
        load_profile("no-such-profile")


def test_invalid_combinations_fail_with_every_reason(tmp_path):
    ckpt = write_checkpoint(tmp_path / "fp8", "01-ai/Yi-34B", scheme="fp8")
    with pytest.raises(ValidationError) as info:
        assemble(ckpt, get_gpu("A100"), trtllm_version="1.3", workers=4)
    text = str(info.value)
    assert "scheme fp8 needs SM >= 89" in text and "no trtllm-build" in text and "--workers 4 exceeds the 1 ranks" in text
    assert "does not fit" not in text  # FP8 Yi-34B (34 GB) fits 80 GB: only the real problems are listed
    int8kv = write_checkpoint(tmp_path / "int8kv", "01-ai/Yi-6B", scheme="int8-sq", kv="int8")
    with pytest.raises(ValidationError, match="requires kv.algo"):
        assemble(int8kv, get_gpu("A100"), plugins="long-context", trtllm_version="1.2")
    with pytest.raises(ValidationError) as info:
        assemble(ckpt, get_gpu("L40S"), plugins="low-latency", trtllm_version="1.2")
    assert "requires gpu.sm" in str(info.value) and "Hopper (SM 90) kernel" in str(info.value)
    huge = write_checkpoint(tmp_path / "bf16", "01-ai/Yi-34B")
    with pytest.raises(ValidationError, match="does not fit L40S"):
        assemble(huge, get_gpu("L40S"), trtllm_version="1.2")
    with pytest.raises(UsageError, match="not a TensorRT-LLM checkpoint"):
        hf = tmp_path / "hf"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
                                                    "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 256}))
        assemble(hf, get_gpu("H100"))


def test_limits_on_the_command_line_win_over_profile_and_plan(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", "01-ai/Yi-34B", scheme="fp8")
    auto = assemble(ckpt, get_gpu("H100"), plugins="low-latency")
    assert auto.limits["max_batch_size"] == 16  # the profile's hint
    mine = assemble(ckpt, get_gpu("H100"), plugins="low-latency", max_batch_size=8, max_seq_len=2048, max_num_tokens=1024)
    assert (mine.limits["max_batch_size"], mine.limits["max_seq_len"], mine.limits["max_num_tokens"]) == (8, 2048, 1024)
    assert mine.limits["max_input_len"] == 2047


# -- LoRA (trtllm-serving-features.md §2.1) ----------------------------------------------------------------------------

LORA_GOLDEN = {
    # Yi-1.5-6B-Chat bf16 on an L4: adapter "qv" (rank 8, q and v: k is completed) and "mlp" (rank 16, gate/up/down);
    # the device cache takes 0.1 of what the KV pool leaves (TensorRT-LLM's 0.05 holds no rank-16 adapter here)
    "lora-yi6b-bf16-tp1-l4-1.2": dict(repo="01-ai/Yi-1.5-6B-Chat", gpu="L4", dtype="bfloat16", tp=1, cache={"gpu_memory_fraction": 0.1},
                                      adapters=(("qv", 8, ("attn_q", "attn_v")), ("mlp", 16, ("mlp_h_to_4h", "mlp_gate", "mlp_4h_to_h")))),
    # Yi-1.5-9B fp16 at tp 2 on H100s, one dense-only adapter with an explicit max rank 32
    "lora-yi9b-fp16-tp2-h100-1.2": dict(repo="01-ai/Yi-1.5-9B-Chat", gpu="H100", dtype="float16", tp=2, max_rank=32,
                                        adapters=(("dense", 4, ("attn_dense",)),)),
}


def _lora_spec(tmp_path, case, **overrides):
    from yitrt.build.lora import ConvertedAdapter, lora_build

    case = {**case, **overrides}
    ckpt = write_checkpoint(tmp_path / "ckpt", case["repo"], tp=case["tp"], dtype=case["dtype"])
    adapters = [ConvertedAdapter(tmp_path / "lora" / name, name, rank, modules, case.get("adapter_dtype", case["dtype"]),
                                 case.get("adapter_tp", case["tp"])) for name, rank, modules in case["adapters"]]
    lora = lora_build(adapters, case.get("max_rank"), case.get("target_modules"), case.get("cache"))
    return assemble(ckpt, get_gpu(case["gpu"]), trtllm_version="1.2", lora=lora), ckpt


@pytest.mark.parametrize("name", sorted(LORA_GOLDEN))
def test_golden_lora_argv(tmp_path, name):
    spec, ckpt = _lora_spec(tmp_path, LORA_GOLDEN[name])
    argv = [a.replace(str(ckpt), "/CKPT").replace(str(tmp_path), "/TMP") for a in spec.argv(Path("/ENGINE"))]
    config = spec.build_config()
    record = {"argv": argv, "limits": config["limits"], "lora": {k: v for k, v in config["lora"].items() if k != "adapters"}}
    record["lora"]["lora_dir"] = record["lora"]["lora_dir"].replace(str(tmp_path), "/TMP")
    golden = GOLDEN / f"{name}.json"
    if os.environ.get("YITRT_UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(record, indent=1) + "\n")
    assert record == json.loads(golden.read_text())


@pytest.mark.parametrize("name", sorted(LORA_GOLDEN))
def test_lora_argv_parses_as_1_2_and_says_everything_explicitly(tmp_path, name):
    case = LORA_GOLDEN[name]
    spec, _ = _lora_spec(tmp_path, case)
    args = trtllm_12_parser().parse_args(spec.argv(Path("/ENGINE"))[1:])  # argparse exits on a flag or value 1.2 lacks
    assert args.lora_plugin == case["dtype"]  # the engine's dtype, never auto (lora_weights must match it, §2.6)
    modules = {m for _, _, mods in case["adapters"] for m in mods}
    if modules & {"attn_q", "attn_k", "attn_v"}:
        modules |= {"attn_q", "attn_k", "attn_v"}  # all-or-none, as TensorRT-LLM completes them
    ids = {"attn_q": 1, "attn_k": 2, "attn_v": 3, "attn_dense": 4, "mlp_h_to_4h": 5, "mlp_4h_to_h": 6, "mlp_gate": 7}
    assert args.lora_target_modules == sorted(modules, key=ids.__getitem__)
    assert args.max_lora_rank == case.get("max_rank", max(r for _, r, _ in case["adapters"]))
    assert args.lora_dir == [str(tmp_path / "lora" / case["adapters"][0][0] / "hf")] and args.lora_ckpt_source == "hf"
    assert spec.plan.lora is not None and spec.plan.lora["modules"] == args.lora_target_modules


def test_lora_builds_are_refused_with_every_reason(tmp_path):
    case = LORA_GOLDEN["lora-yi6b-bf16-tp1-l4-1.2"]
    with pytest.raises(ValidationError) as info:
        _lora_spec(tmp_path / "a", case, max_rank=8, target_modules=["attn_q", "mlp_h_to_4h", "q_proj"])
    text = str(info.value)
    assert "adapter mlp has rank 16, above max_lora_rank 8" in text
    assert "adapter mlp adapts mlp_4h_to_h, which the engine would not enable" in text  # mlp_gate comes with mlp_h_to_4h
    assert "q_proj is the PEFT name" in text
    with pytest.raises(ValidationError, match="the device LoRA cache of rank 0 is 42.2 MiB .* less than one max-sized adapter "
                       r"\(rank 16 over attn_q, attn_k, attn_v, mlp_h_to_4h, mlp_4h_to_h, mlp_gate: 61.2 MiB\)"):
        _lora_spec(tmp_path / "e", case, cache=None)  # TensorRT-LLM's default fraction 0.05 on the L4
    with pytest.raises(ValidationError) as info:
        _lora_spec(tmp_path / "b", case, adapter_dtype="float16")
    assert "adapter qv was converted for float16, the engine is bfloat16" in str(info.value)
    # k/v rows follow the KV-head repetition only past the KV heads (Yi-6B: 4): tp 2 vs 1 is fine, tp 8 vs 1 is not
    kv = {**case, "adapters": (("k", 8, ("attn_k",)),)}
    assert _lora_spec(tmp_path / "c", kv, tp=2, adapter_tp=1)[0].lora.adapters[0].tp == 1
    with pytest.raises(ValidationError, match="adapter k was converted at tp 1, the engine is tp 8"):
        _lora_spec(tmp_path / "d", {**kv, "gpu": "H100"}, tp=8, adapter_tp=1)


def test_lora_fc_and_gate_are_enabled_as_a_pair_and_swiglu_plugins_are_refused(tmp_path):
    """The fused gated MLP adds an fc/gate LoRA only when the engine has both modules: an adapter of gate_proj alone
    still gets mlp_gate enabled (else the engine would silently serve the base MLP); the FP8 SwiGLU GEMM plugins have no
    fc/gate LoRA path at all."""
    from yitrt.build.lora import ConvertedAdapter, lora_build

    gate_only = ConvertedAdapter(tmp_path / "g", "g", 4, ("mlp_h_to_4h",), "float16", 1)
    built = lora_build([gate_only])
    assert built.target_modules == ("mlp_h_to_4h", "mlp_gate")
    assert lora_build([ConvertedAdapter(tmp_path / "u", "u", 4, ("mlp_gate", "attn_dense"), "float16", 1)]).target_modules == (
        "attn_dense", "mlp_h_to_4h", "mlp_gate")
    assert built.problems("float16", 1, 4, {"gemm_swiglu_plugin": "disable"}) == []
    (problem,) = built.problems("float16", 1, 4, {"low_latency_gemm_swiglu_plugin": "fp8"})
    assert "--low_latency_gemm_swiglu_plugin has no LoRA path for mlp_h_to_4h/mlp_gate" in problem
    dense = lora_build([ConvertedAdapter(tmp_path / "d", "d", 4, ("attn_dense",), "float16", 1)])
    assert dense.problems("float16", 1, 4, {"gemm_swiglu_plugin": "fp8"}) == []  # no fc/gate adapter: nothing to lose
