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
