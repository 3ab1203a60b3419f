"""`yitrt plan` through the CLI: hand-checked figures, what does not fit and what would, --compare, checkpoints as
input, and the SLO-aware choice with the real AIConfigurator package."""

from __future__ import annotations

import json
import sys

import pytest

from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.errors import MissingDependencyError
from yitrt.plan.memory import Workload
from yitrt.plan.perf import choose_under_slo
from yitrt.plan.planner import PlanOptions, plan


@pytest.fixture
def plan_json(cli):
    def call(*args):
        proc = cli("plan", *args, "--json")
        return proc, (json.loads(proc.stdout) if proc.stdout.strip() else None)

    return call


def test_hand_checked_figures_through_the_cli(plan_json):
    proc, data = plan_json("01-ai/Yi-34B", "--gpu", "h100")
    assert proc.returncode == 0, proc.stderr
    rank = data["candidates"][0]["plan"]["ranks"][0]
    assert rank["kv_bytes_per_token"] == 245_760 and rank["weight_bytes"] == 68_777_834_496
    assert data["source"]["origin"] == "registry" and data["gpu"]["name"] == "H100-SXM"
    proc, data = plan_json("01-ai/Yi-6B", "--gpu", "A100-80GB", "--tp", "8")
    assert data["candidates"][0]["plan"]["ranks"][0]["kv_bytes_per_token"] == 16_384
    plan_ = data["candidates"][0]["plan"]
    assert plan_["triton"]["kv_cache_free_gpu_mem_fraction"] == 0.9 and plan_["build_limits"]["max_seq_len"] == 4096


def test_a_plan_that_does_not_fit_exits_13_and_says_what_would(plan_json, cli):
    proc, data = plan_json("01-ai/Yi-34B-Chat", "--gpu", "L40S")
    assert proc.returncode == 13
    cand = data["candidates"][0]
    assert not cand["fits"] and "L40S" in cand["plan"]["problems"][0]
    assert any(s.startswith("--tp 2: fits") for s in data["suggestions"])
    assert any(s.startswith("--scheme fp8: fits") for s in data["suggestions"])
    assert not any("TP1 x PP2" in w for w in data["warnings"])  # pp 1: the pp=2 pitfall stays silent
    text = cli("plan", "01-ai/Yi-34B-Chat", "--gpu", "L40S")
    assert text.returncode == 13 and "does not fit" in text.stdout and "would fit: --tp 2" in text.stdout


def test_invalid_combinations_report_every_reason(cli):
    proc = cli("plan", "01-ai/Yi-34B", "--gpu", "A100", "--tp", "3", "--scheme", "fp8", "--kv-cache", "fp8")
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1
    for part in ("56 attention heads", "8 KV heads", "scheme fp8 needs SM >= 89", "fp8 KV cache needs SM >= 89"):
        assert part in proc.stderr
    several = cli("plan", "01-ai/Yi-6B", "--gpu", "H100", "--tp", "1", "--tp", "2")
    assert several.returncode == 2 and "--compare" in several.stderr


def test_compare_lists_tp_by_scheme(plan_json, cli):
    proc, data = plan_json("01-ai/Yi-1.5-34B-Chat", "--gpu", "L40S", "--compare")
    assert proc.returncode == 0
    rows = {(c["scheme"], c["tp"]): c for c in data["candidates"]}
    assert len(rows) == 6 * 4
    assert not rows[("none", 1)]["fits"] and rows[("fp8", 1)]["fits"] and rows[("int4-awq", 1)]["fits"]
    assert rows[("fp8", 1)]["plan"]["max_concurrent_sequences"] < rows[("fp8", 2)]["plan"]["max_concurrent_sequences"]
    assert rows[("fp8", 1)]["invalid"] == [] and rows[("none", 2)]["fits"]  # L40S is Ada: FP8 runs
    text = cli("plan", "01-ai/Yi-1.5-9B-Chat", "--gpu", "L4", "--compare", "--scheme", "fp8", "--scheme", "int4-awq", "--tp", "1")
    assert text.returncode == 0 and "fp8" in text.stdout and "int4-awq" in text.stdout and "none" not in text.stdout.split("status")[1]


def test_checkpoints_and_model_folders_are_planned_as_they_are(make_model, tmp_path, plan_json, cli):
    src = make_model()
    ckpt = tmp_path / "ckpt"
    convert(ConvertRequest(src, ckpt, tp=2, kv_cache="fp8"))
    proc, data = plan_json(str(ckpt), "--gpu", "L4")
    assert proc.returncode == 0, proc.stderr
    cand = data["candidates"][0]
    assert data["source"]["origin"] == "checkpoint" and cand["tp"] == 2 and cand["plan"]["kv_cache"] == "fp8"
    clash = cli("plan", str(ckpt), "--gpu", "L4", "--tp", "1")
    assert clash.returncode == 2 and "checkpoint at --tp 2" in clash.stderr
    proc, data = plan_json(str(src), "--gpu", "L4", "--scheme", "fp8")
    assert proc.returncode == 0 and data["source"]["origin"] == "model" and data["candidates"][0]["scheme"] == "fp8"


def test_slo_choice_with_aiconfigurator():
    pytest.importorskip("aiconfigurator", reason="the yitrt[plan] extra is installed by make setup")
    report = plan("01-ai/Yi-1.5-6B-Chat", PlanOptions(gpu="H100", tp=(1, 2), schemes=("none", "fp8"), workload=Workload(isl=1024, osl=256), compare=True))
    slo = choose_under_slo(report, 250.0, 12.0)
    rows = slo["candidates"]
    assert slo["system"] == "h100_sxm" and rows and {r["scheme"] for r in rows} == {"none", "fp8"}
    for r in rows:
        assert r["meets_slo"] == (r["ttft_ms"] <= 250.0 and r["tpot_ms"] <= 12.0) and r["tokens_per_s_per_gpu"] > 0
    passing = [r for r in rows if r["meets_slo"]]
    assert all(r["data"] == "measured" for r in rows)  # bf16 and FP8 have measured data on H100
    assert slo["best"] == max(passing, key=lambda r: r["tokens_per_s_per_gpu"])
    # more batch → more throughput per GPU and a longer TPOT, for one candidate
    fp8 = sorted((r for r in rows if r["scheme"] == "fp8" and r["tp"] == 1), key=lambda r: r["batch"])
    assert fp8[-1]["tokens_per_s_per_gpu"] > fp8[0]["tokens_per_s_per_gpu"] and fp8[-1]["tpot_ms"] > fp8[0]["tpot_ms"]
    l4 = choose_under_slo(plan("01-ai/Yi-1.5-6B-Chat", PlanOptions(gpu="L4", tp=(1,), schemes=("fp8",), compare=True)), 500, 50)
    assert "no performance data for L4" in l4["error"]


def test_plugins_and_gpus_commands(cli):
    listed = cli("plugins", "list", "--json")
    names = {p["name"] for p in json.loads(listed.stdout)["profiles"]}
    assert {"default", "fp8-hopper", "fp8", "int4-awq", "int8-sq", "weight-only", "long-context", "low-latency"} <= names
    shown = cli("plugins", "show", "long-context")
    assert shown.returncode == 0 and "chunked context" in shown.stdout and "tokens_per_block" in shown.stdout
    missing = cli("plugins", "show", "nope")
    assert missing.returncode == 2 and "unknown plugin profile" in missing.stderr
    gpus = json.loads(cli("gpus", "--json").stdout)["gpus"]
    assert any(g["name"] == "GH200" and g["sm"] == 90 for g in gpus)


def test_slo_without_the_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "aiconfigurator", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "aiconfigurator.cli", None)
    monkeypatch.setitem(sys.modules, "aiconfigurator.cli.api", None)
    report = plan("01-ai/Yi-6B", PlanOptions(gpu="H100", compare=True, tp=(1,), schemes=("none",)))
    with pytest.raises(MissingDependencyError) as info:
        choose_under_slo(report, 100, 10)
    assert "yitrt[plan]" in info.value.hint
