"""`yitrt run`: the demo recipe end to end (real stages, real tritonserver), caching, --from/--until, resume after
a kill, and a TensorRT-LLM recipe whose build runs against the TEST DOUBLE of trtllm-build (our side of it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, run_cli
from yitrt.manifest import RECIPE_NAME, artifact_digest, read_manifest
from yitrt.synthetic import SyntheticSpec, write_synthetic_model

pytestmark = pytest.mark.integration
#: a shorter verification than the recipe's (the stage is the same; fewer tokens scored)
FAST = ("--set", "verify.eval_tokens=128", "--set", "verify.max_new_tokens=4")


def _run(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = run_cli("run", *args, "--json")
    return result, json.loads(result.stdout) if result.stdout.strip() else {}


def statuses(data: dict) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in data["stages"]}


def stage(data: dict, name: str) -> dict:
    return next(s for s in data["stages"] if s["stage"] == name)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The built-in demo recipe run once into a fresh work folder: (work folder, process, JSON)."""
    work = tmp_path_factory.mktemp("run") / "demo"
    result, data = _run("demo", "--work-dir", str(work), *FAST)
    return work, result, data


def test_demo_recipe_runs_every_stage_and_answers(demo_run):
    work, result, data = demo_run
    assert result.returncode == 0, result.stderr
    assert statuses(data) == {"fetch": "ran", "convert": "ran", "verify": "ran", "plan": "ran", "build": "not-applicable",
                              "deploy": "ran", "smoke": "ran"}
    assert data["ok"] and data["did_work"] == ["fetch", "convert", "verify", "plan", "deploy", "smoke"]
    assert "paris" in stage(data, "smoke")["data"]["text"].lower()
    assert stage(data, "verify")["data"]["passed"] is True
    assert json.loads((work / "run.json").read_text()) == data
    resolved = yaml.safe_load((work / "recipe.resolved.yaml").read_text())
    assert resolved["verify"]["eval_tokens"] == 128 and resolved["_overrides"] == list(FAST[1::2])
    for s in data["stages"]:
        if s["artifact"] is None:
            continue
        folder = Path(s["artifact"])
        assert folder.parent == work  # every artifact stays inside the work folder
        assert yaml.safe_load((folder / RECIPE_NAME).read_text()) == resolved  # the recipe that made it
        assert RECIPE_NAME in {f["path"] for f in read_manifest(folder).files}
        assert s["digest"] == artifact_digest(folder) and len(s["key"]) == 64


def test_second_run_does_no_work(demo_run):
    work, first, _ = demo_run
    assert first.returncode == 0, first.stderr
    manifests = {p: p.stat().st_mtime_ns for p in work.glob("*/yitrt-manifest.json")}
    result, data = _run("demo", "--work-dir", str(work), *FAST)
    assert result.returncode == 0, result.stderr
    assert data["did_work"] == [] and set(statuses(data).values()) == {"cached"}
    assert {p: p.stat().st_mtime_ns for p in work.glob("*/yitrt-manifest.json")} == manifests  # nothing rewritten


def test_changed_limit_reruns_only_the_stages_that_depend_on_it(demo_run):
    work, first, _ = demo_run
    assert first.returncode == 0, first.stderr
    result, data = _run("demo", "--work-dir", str(work), *FAST, "--set", "build.max_seq_len=384", "--until", "deploy")
    assert result.returncode == 0, result.stderr
    assert statuses(data) == {"fetch": "cached", "convert": "cached", "verify": "cached", "plan": "cached",
                              "build": "not-applicable", "deploy": "ran", "smoke": "skipped"}
    config = (work / "triton-repo" / "tensorrt_llm" / "config.pbtxt").read_text()
    assert 'key: "max_seq_len"\n  value {\n    string_value: "384"' in config
    # back to the recipe's limit: deploy again, the rest cached
    result, data = _run("demo", "--work-dir", str(work), *FAST, "--until", "deploy")
    assert statuses(data)["deploy"] == "ran" and data["did_work"] == ["deploy"]


@pytest.mark.slow  # keeps `make test` near 12 min; --until runs in test_run_speculative and test_process_faults
def test_from_and_until(demo_run, tmp_path):
    work, first, _ = demo_run
    assert first.returncode == 0, first.stderr
    result, data = _run("demo", "--work-dir", str(work), *FAST, "--from", "deploy", "--until", "deploy", "--force")
    assert result.returncode == 0, result.stderr
    assert statuses(data) == {"fetch": "skipped", "convert": "skipped", "verify": "skipped", "plan": "skipped",
                              "build": "skipped", "deploy": "ran", "smoke": "skipped"}
    assert stage(data, "convert")["artifact"] == str(work / "checkpoint")  # earlier artifacts are taken as they are
    empty = run_cli("run", "demo", "--work-dir", str(tmp_path / "new"), "--from", "plan")
    assert empty.returncode == 2 and "needs the fetch stage's artifact" in empty.stderr
    backwards = run_cli("run", "demo", "--work-dir", str(tmp_path / "new"), "--from", "smoke", "--until", "deploy")
    assert backwards.returncode == 2 and "comes after" in backwards.stderr and "Traceback" not in backwards.stderr
    unknown = run_cli("run", "demo", "--work-dir", str(tmp_path / "new"), "--until", "ship")
    assert unknown.returncode == 2 and "'ship' is not a stage" in unknown.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = run_cli("run", "demo", "--work-dir", str(foreign))
    assert refused.returncode == 7 and "not made by yitrt run" in refused.stderr and (foreign / "notes.txt").exists()


def test_an_invalid_recipe_stops_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel: {repo: 01-ai/Yi-34B-Chat}\ntarget: {gpu: L4}\nparallelism: {tp: 3}\nbuild: {max_batch_size: 0}\n")
    work = tmp_path / "work"
    result = run_cli("run", str(bad), "--work-dir", str(work), "--json")
    assert result.returncode == 3 and not work.exists()  # nothing fetched, nothing written
    error = json.loads(result.stdout)["error"]
    assert "build.max_batch_size: expected a positive integer or 'auto', got 0" in error["problems"]
    assert "tp 3 does not divide the 56 attention heads" in error["problems"]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr  # one line


def test_a_killed_run_resumes_at_the_stage_it_was_in(demo_build, tmp_path):
    model = demo_build[0].path
    work = tmp_path / "work"
    args = ["run", "demo", "--work-dir", str(work), *FAST, "--set", "model.demo=false", "--set", f"model.path={model}", "--set", "parallelism.tp=1",
            "--until", "verify"]
    proc = subprocess.Popen([sys.executable, "-m", "yitrt", *args], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stderr:
            if line.startswith("▶ verify"):
                os.killpg(proc.pid, signal.SIGKILL)  # the whole job, rank processes included
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (work / ".yitrt-run" / "convert.json").is_file() and not (work / ".yitrt-run" / "verify.json").exists()
    result, data = _run(*args[1:])
    assert result.returncode == 0, result.stderr
    assert statuses(data)["fetch"] == "cached" and statuses(data)["convert"] == "cached" and statuses(data)["verify"] == "ran"
    assert stage(data, "fetch")["artifact"] == str(model)  # a local model folder is used in place, not copied


@pytest.mark.slow  # the engine path through the trtllm-build double; test_run_speculative and test_build_runner use the double in make test
def test_trtllm_recipe_stops_before_build_without_tensorrt_llm_then_builds_with_the_double(tmp_path, tool_doubles, monkeypatch):
    hf = write_synthetic_model(tmp_path / "hf", SyntheticSpec(seed=5, tokenizer=True))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny", "model": {"path": str(hf)}, "target": {"gpu": "H100-SXM", "engine": "trtllm"},
        "parallelism": {"tp": 2}, "workload": {"isl": 64, "osl": 32},
        "verify": {"device": "cpu", "eval_tokens": 64, "max_new_tokens": 4},
    }))
    work = tmp_path / "work"
    tool_doubles(trtllm=False, gpu=False, only=True)  # nothing on PATH: no trtllm-build, no nvidia-smi
    result, data = _run(str(recipe), "--work-dir", str(work))
    assert result.returncode == 12 and not data["ok"]
    assert "stopped before build" in result.stderr and "Traceback" not in result.stderr
    assert statuses(data) == {"fetch": "ran", "convert": "ran", "verify": "ran", "plan": "ran", "build": "blocked"}
    assert data["error"]["exit_code"] == 12 and not (work / "engine").exists()

    monkeypatch.undo()
    argv_log = tmp_path / "argv.jsonl"
    monkeypatch.setenv("YITRT_DOUBLE_ARGV", str(argv_log))
    tool_doubles()  # the TEST DOUBLES of trtllm-build (1.2 flags) and nvidia-smi (an H100)
    result, data = _run(str(recipe), "--work-dir", str(work))
    assert result.returncode == 0, result.stderr
    assert statuses(data) == {"fetch": "cached", "convert": "cached", "verify": "cached", "plan": "cached", "build": "ran",
                              "deploy": "ran", "smoke": "skipped"}
    assert (work / "triton-repo" / "launch.sh").read_text().count("tritonserver") >= 2  # tp 2: mpirun with two ranks
    result, data = _run(str(recipe), "--work-dir", str(work), "--set", "build.max_batch_size=16")
    assert result.returncode == 0, result.stderr
    assert data["did_work"] == ["build", "deploy"]
    calls = [json.loads(line) for line in argv_log.read_text().splitlines()]
    assert len(calls) == 2 and calls[1][calls[1].index("--max_batch_size") + 1] == "16"
    pbtxt = (work / "triton-repo" / "tensorrt_llm" / "config.pbtxt").read_text()
    assert "max_batch_size: 16" in pbtxt
