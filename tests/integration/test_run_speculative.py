"""`yitrt run` with a `speculative:` section: the draft's rows of the stage table (fetch-draft, convert-draft with its
own precision/tp/layers, build-draft) feed plan, build and deploy; lookahead passes (W, N, G) through. Engines come
from the TEST DOUBLE of trtllm-build (our side of it); the reference slot needs none."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import run_cli
from yitrt.pipeline import STAGES, recipe_stages, stage_parameters
from yitrt.recipe import load_recipe
from yitrt.synthetic import SyntheticSpec, write_synthetic_model
from yitrt.triton.pbtxt import parse_config

pytestmark = pytest.mark.integration


def _run(*args: str) -> tuple:
    result = run_cli("run", *args, "--json")
    return result, json.loads(result.stdout) if result.stdout.strip() else {}


def statuses(data: dict) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in data["stages"]}


def _params(path) -> dict[str, str]:
    return {k: v.string_value for k, v in parse_config(path.read_text()).parameters.items()}


def _recipe(tmp_path, hf, engine: str, speculative: dict, tp: int = 1) -> str:
    recipe = tmp_path / f"{engine}.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": f"tiny-{engine}", "model": {"path": str(hf)}, "target": {"gpu": "H100-SXM", "engine": engine},
        "parallelism": {"tp": tp}, "workload": {"isl": 64, "osl": 32}, "verify": {"enabled": False},
        "build": {"max_seq_len": 256} if engine == "reference" else {}, "speculative": speculative,
    }))
    return str(recipe)


@pytest.fixture
def hf(tmp_path):
    return write_synthetic_model(tmp_path / "hf", SyntheticSpec(seed=5, tokenizer=True))


def test_stage_table_adds_the_draft_rows_only_with_a_draft(tmp_path, hf):
    plain = load_recipe(_recipe(tmp_path, hf, "reference", None)).spec
    spec = load_recipe(_recipe(tmp_path, hf, "trtllm", {"mode": "draft-target", "max_draft_len": 3,
                                                        "draft": {"model": {"path": str(hf)}, "layers": 1}})).spec
    lookahead = load_recipe(_recipe(tmp_path, hf, "trtllm", {"mode": "lookahead"})).spec
    assert recipe_stages(plain) == recipe_stages(lookahead) == ("fetch", "convert", "verify", "plan", "build", "deploy", "smoke")
    assert recipe_stages(spec) == tuple(s for s in STAGES if s not in ("convert-lora", "verify-lora")) and STAGES.index("build-draft") < STAGES.index("build") < STAGES.index("deploy")
    assert stage_parameters(spec, "convert-draft")["layers"] == 1 and stage_parameters(spec, "convert-draft")["tp"] == 1
    assert "speculative" not in stage_parameters(plain, "build") and stage_parameters(lookahead, "build")["speculative"]["window"] == 4


@pytest.mark.slow  # a whole speculative run; the stage table is a fast test here and the served pair is test_speculative_serving's
def test_draft_target_recipe_builds_and_deploys_the_pair(tmp_path, hf, tool_doubles, monkeypatch):
    argv_log = tmp_path / "argv.jsonl"
    monkeypatch.setenv("YITRT_DOUBLE_ARGV", str(argv_log))
    tool_doubles()  # the TEST DOUBLES of trtllm-build (1.2 flags) and nvidia-smi (an H100)
    recipe = _recipe(tmp_path, hf, "trtllm", {"mode": "draft-target", "max_draft_len": 3, "use_draft_logits": True,
                                              "draft": {"model": {"path": str(hf)}, "layers": 1, "tp": 1}}, tp=2)
    work = tmp_path / "work"
    result, data = _run(recipe, "--work-dir", str(work), "--until", "deploy")
    assert result.returncode == 0, result.stderr
    assert statuses(data) == {"fetch": "ran", "convert": "ran", "verify": "skipped", "fetch-draft": "ran", "convert-draft": "ran",
                              "plan": "ran", "build-draft": "ran", "build": "ran", "deploy": "ran", "smoke": "skipped"}
    draft_ckpt = json.loads((work / "draft-checkpoint" / "config.json").read_text())
    assert draft_ckpt["num_hidden_layers"] == 1 and draft_ckpt["mapping"]["tp_size"] == 1
    calls = [json.loads(line) for line in argv_log.read_text().splitlines()]
    draft_call, target_call = calls  # build-draft runs first
    assert target_call[target_call.index("--speculative_decoding_mode") + 1] == "draft_tokens_external"
    assert target_call[target_call.index("--max_draft_len") + 1] == "3"
    assert "--speculative_decoding_mode" not in draft_call and "--gather_generation_logits" in draft_call
    repo = work / "triton-repo"
    draft, bls = _params(repo / "tensorrt_llm_draft" / "config.pbtxt"), _params(repo / "tensorrt_llm_bls" / "config.pbtxt")
    assert draft["gpt_model_path"] == str(work / "draft-engine") and draft["gpu_device_ids"] == "0"
    assert bls["yitrt_num_draft_tokens"] == "3" and bls["yitrt_use_draft_logits"] == "true"
    deploy = next(s for s in data["stages"] if s["stage"] == "deploy")
    assert deploy["data"]["speculative"]["mode"] == "draft-target" and "draft-target, 3 draft tokens" in deploy["detail"]
    assert "TRTLLM_ORCHESTRATOR=1" in (repo / "launch.sh").read_text()
    result, data = _run(recipe, "--work-dir", str(work), "--until", "deploy")
    assert result.returncode == 0 and data["did_work"] == []  # everything cached, the draft's rows too
    result, data = _run(recipe, "--work-dir", str(work), "--until", "deploy", "--set", "speculative.draft.layers=2")
    assert result.returncode == 0, result.stderr
    again = statuses(data)
    assert {s: again[s] for s in ("fetch", "convert", "fetch-draft")} == {"fetch": "cached", "convert": "cached", "fetch-draft": "cached"}
    assert {s: again[s] for s in ("convert-draft", "plan", "build-draft", "deploy")} == dict.fromkeys(("convert-draft", "plan", "build-draft", "deploy"), "ran")
    assert again["build"] in ("ran", "reused")  # the target's argv is unchanged: trtllm-build may keep its engine


@pytest.mark.slow  # a whole speculative run; the stage table is a fast test here and the served pair is test_speculative_serving's
def test_reference_recipes_deploy_a_draft_slot_and_lookahead(tmp_path, hf):
    recipe = _recipe(tmp_path, hf, "reference", {"mode": "draft-target", "max_draft_len": 2,
                                                 "draft": {"model": {"path": str(hf)}, "layers": 1}})
    work = tmp_path / "work"
    result, data = _run(recipe, "--work-dir", str(work), "--until", "deploy")
    assert result.returncode == 0, result.stderr
    assert statuses(data)["build-draft"] == "not-applicable" and statuses(data)["fetch-draft"] == "ran"
    assert next(s for s in data["stages"] if s["stage"] == "fetch-draft")["artifact"] == str(hf)  # the target's own folder
    repo = work / "triton-repo"
    target, draft = _params(repo / "tensorrt_llm" / "config.pbtxt"), _params(repo / "tensorrt_llm_draft" / "config.pbtxt")
    assert target["yitrt_max_draft_len"] == "2" and draft["gpt_model_path"] == str(work / "draft-checkpoint")
    assert (repo / "tensorrt_llm_draft" / "1" / "model.py").is_file()
    lookahead = _recipe(tmp_path, hf, "reference", {"mode": "lookahead", "window": 3, "ngram": 3, "verification_set": 2})
    result, data = _run(lookahead, "--work-dir", str(tmp_path / "la"), "--until", "deploy")
    assert result.returncode == 0, result.stderr
    params = _params(tmp_path / "la" / "triton-repo" / "tensorrt_llm" / "config.pbtxt")
    assert (params["decoding_mode"], params["lookahead_window_size"], params["lookahead_ngram_size"],
            params["lookahead_verification_set_size"]) == ("lookahead", "3", "3", "2")
    unknown = run_cli("run", lookahead, "--work-dir", str(tmp_path / "la"), "--until", "build-draft")
    assert unknown.returncode == 2 and "has no build-draft stage" in unknown.stderr


def test_a_fetched_draft_with_another_tokenizer_stops_the_run(tmp_path):
    """Recipe validation cannot compare the tokenizers of two Hub models it has not fetched (it warns); the run
    compares them as soon as both are fetched and stops before converting the draft — exit 2, the difference named."""
    import os

    from tests.hub_double import HubDouble

    target = write_synthetic_model(tmp_path / "target", SyntheticSpec(seed=5, tokenizer=True))
    draft = write_synthetic_model(tmp_path / "draft", SyntheticSpec(seed=6, layers=1, tokenizer=True))
    tok = json.loads((draft / "tokenizer.json").read_text())
    merges = tok["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]  # one merge rank changed: another tokenizer, same vocabulary
    (draft / "tokenizer.json").write_text(json.dumps(tok))
    recipe = tmp_path / "pair.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny-pair", "model": {"repo": "someone/tiny-target"}, "target": {"gpu": "H100-SXM", "engine": "reference"},
        "workload": {"isl": 64, "osl": 32}, "verify": {"enabled": False}, "build": {"max_seq_len": 256},
        "speculative": {"mode": "draft-target", "max_draft_len": 3, "draft": {"model": {"repo": "someone/tiny-draft"}}}}))
    with HubDouble() as hub:
        hub.add_repo("someone/tiny-target", target)
        hub.add_repo("someone/tiny-draft", draft)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_")) and "proxy" not in k.lower()}
        env.update(hub.env(tmp_path / "hf-home"))
        result = run_cli("run", str(recipe), "--work-dir", str(tmp_path / "work"), "--until", "deploy", env=env)
    assert result.returncode == 2, result.stderr
    assert "speculative.draft someone/tiny-draft cannot draft for someone/tiny-target" in result.stderr
    assert "merges" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "work" / "draft-checkpoint").exists()
