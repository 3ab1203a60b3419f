"""`yitrt run` with a `lora:` section: the convert-lora row converts every adapter for the checkpoint (each cached by its
own inputs), the build gets the LoRA plugin and flags, deploy copies the adapters into the repository. Engines come
from the TEST DOUBLE of trtllm-build (our side of it)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.unit.test_triton_repository import write_adapter
from yitrt.pipeline import RunOptions, recipe_stages, run_recipe, stage_parameters
from yitrt.recipe import load_recipe
from yitrt.synthetic import SyntheticSpec, write_synthetic_model
from yitrt.triton.pbtxt import parse_config

pytestmark = pytest.mark.integration


@pytest.fixture
def hf(tmp_path):
    return write_synthetic_model(tmp_path / "hf", SyntheticSpec(seed=5, tokenizer=True))


def _recipe(tmp_path, hf, lora: dict | None, engine: str = "trtllm", verify: dict | None = None) -> str:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny-lora", "model": {"path": str(hf)}, "target": {"gpu": "H100-SXM", "engine": engine},
        "workload": {"isl": 64, "osl": 32}, "verify": verify or {"enabled": False}, **({"lora": lora} if lora else {}),
    }))
    return str(recipe)


def _statuses(report) -> dict[str, str]:
    return {s.stage: s.status for s in report.stages}


def test_stage_table_adds_convert_lora_only_with_a_lora_section(tmp_path, hf):
    adapter = write_adapter(tmp_path / "a", hf)
    plain = load_recipe(_recipe(tmp_path, hf, None)).spec
    spec = load_recipe(_recipe(tmp_path, hf, {"adapters": [{"name": "a", "source": str(adapter)}]})).spec
    assert recipe_stages(plain) == ("fetch", "convert", "verify", "plan", "build", "deploy", "smoke")
    assert recipe_stages(spec) == ("fetch", "convert", "verify", "convert-lora", "verify-lora", "plan", "build", "deploy", "smoke")
    for stage in ("plan", "build", "deploy"):  # the keys of a recipe without LoRA are the ones it always had
        assert "lora" not in stage_parameters(plain, stage) and stage_parameters(spec, stage)["lora"]["adapters"][0]["name"] == "a"


def test_lora_recipe_converts_builds_and_deploys_the_adapters(tmp_path, hf, tool_doubles, monkeypatch):
    argv_log = tmp_path / "argv.jsonl"
    monkeypatch.setenv("YITRT_DOUBLE_ARGV", str(argv_log))
    tool_doubles()  # the TEST DOUBLES of trtllm-build (1.2 flags) and nvidia-smi (an H100)
    qv = write_adapter(tmp_path / "peft-qv", hf, ("q_proj", "v_proj"), r=4)
    mlp = write_adapter(tmp_path / "peft-mlp", hf, ("gate_proj", "down_proj"), r=8, seed=1)
    recipe = _recipe(tmp_path, hf, {"adapters": [{"name": "qv", "source": str(qv)}, {"name": "mlp", "source": str(mlp), "task_id": 5}],
                                    "cache": {"gpu_memory_fraction": 0.2}})
    work = tmp_path / "work"
    report = run_recipe(load_recipe(recipe), RunOptions(work, until_stage="deploy"))
    assert _statuses(report) == {"fetch": "ran", "convert": "ran", "verify": "skipped", "convert-lora": "ran", "verify-lora": "skipped",
                                 "plan": "ran", "build": "ran", "deploy": "ran", "smoke": "skipped"}
    (call,) = [json.loads(line) for line in argv_log.read_text().splitlines()]
    at = call.index("--lora_target_modules")
    assert call[at + 1 : at + 6] == ["attn_q", "attn_k", "attn_v", "mlp_h_to_4h", "mlp_4h_to_h"]  # q/k/v completed, module-id order
    assert call[call.index("--max_lora_rank") + 1] == "8" and call[call.index("--lora_plugin") + 1] == "bfloat16"
    assert call[call.index("--lora_dir") + 1] == str(work / "lora-adapters" / "qv" / "hf")
    assert (work / "lora-adapters" / "qv" / "hf" / "adapter_model.safetensors").is_file()
    engine = json.loads((work / "engine" / "config.json").read_text())["build_config"]
    assert engine["lora_config"]["max_lora_rank"] == 8 and engine["plugin_config"]["lora_plugin"] == "bfloat16"
    plan = json.loads((work / "plan" / "plan.json").read_text())["candidates"][0]["plan"]["lora"]
    assert plan["max_rank"] == 8 and plan["gpu_memory_fraction"] == 0.2 and plan["fits"]
    repo = work / "triton-repo"
    index = json.loads((repo / "lora_adapters.json").read_text())["adapters"]
    assert [(a["name"], a["task_id"], a["rank"]) for a in index] == [("qv", 1, 4), ("mlp", 5, 8)]
    params = {k: v.string_value for k, v in parse_config((repo / "tensorrt_llm" / "config.pbtxt").read_text()).parameters.items()}
    assert params["lora_cache_gpu_memory_fraction"] == "0.2" and params["lora_cache_max_adapter_size"] == "8"
    assert "| `mlp` | 5 | 8 |" in (repo / "README.md").read_text()

    again = run_recipe(load_recipe(recipe), RunOptions(work, until_stage="deploy"))
    assert {s for s, status in _statuses(again).items() if status == "ran"} == set()  # everything cached
    qv_manifest = work / "lora-adapters" / "qv" / "yitrt-manifest.json"
    before = qv_manifest.stat().st_mtime_ns
    write_adapter(tmp_path / "peft-mlp2", hf, ("gate_proj", "down_proj"), r=8, seed=2)  # new weights for mlp, same shape
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (mlp / name).write_bytes((tmp_path / "peft-mlp2" / name).read_bytes())
    changed = run_recipe(load_recipe(recipe), RunOptions(work, until_stage="deploy"))
    statuses = _statuses(changed)
    assert statuses["convert"] == "cached" and statuses["convert-lora"] == "ran" and statuses["deploy"] == "ran"
    assert qv_manifest.stat().st_mtime_ns == before  # the unchanged adapter is not converted again
    assert (repo / "tensorrt_llm/lora/mlp/model.lora_weights.npy").read_bytes() == \
        (work / "lora-adapters" / "mlp" / "model.lora_weights.npy").read_bytes()


def test_reference_recipe_gives_the_slot_its_lora_limits(tmp_path, hf):
    qv = write_adapter(tmp_path / "peft-qv", hf, ("q_proj", "v_proj"), r=4)
    recipe = _recipe(tmp_path, hf, {"adapters": [{"name": "qv", "source": str(qv)}], "max_rank": 16}, engine="reference")
    work = tmp_path / "work"
    report = run_recipe(load_recipe(recipe), RunOptions(work, until_stage="deploy"))
    assert _statuses(report)["build"] == "not-applicable" and _statuses(report)["convert-lora"] == "ran"
    params = {k: v.string_value for k, v in parse_config((work / "triton-repo/tensorrt_llm/config.pbtxt").read_text()).parameters.items()}
    assert params["yitrt_lora_target_modules"] == "attn_q,attn_k,attn_v" and params["yitrt_max_lora_rank"] == "16"
    assert params["lora_cache_max_adapter_size"] == "16"  # 64 clamped to the max rank
    assert json.loads((work / "triton-repo/lora_adapters.json").read_text())["adapters"][0]["dir"] == "tensorrt_llm/lora/qv"


@pytest.mark.slow  # ~27 s (transformers + peft and the reference runtime); `verify --lora` itself is tested in test_lora_verify
def test_verify_lora_proves_each_adapter_against_peft(tmp_path, hf):
    pytest.importorskip("peft")
    qv = write_adapter(tmp_path / "peft-qv", hf, ("q_proj", "v_proj", "down_proj"), r=4)
    lora = {"adapters": [{"name": "qv", "source": str(qv)}]}
    work = tmp_path / "work"
    run_recipe(load_recipe(_recipe(tmp_path, hf, lora, engine="reference")), RunOptions(work, until_stage="convert-lora"))
    # the base checkpoint's own verify is test_run's: start at verify-lora (the earlier artifacts as they are)
    recipe = _recipe(tmp_path, hf, lora, engine="reference", verify={"enabled": True, "max_new_tokens": 4, "eval_tokens": 64})
    report = run_recipe(load_recipe(recipe), RunOptions(work, from_stage="verify-lora", until_stage="verify-lora"))
    stage = next(s for s in report.stages if s.stage == "verify-lora")
    assert stage.status == "ran" and stage.data["qv"]["passed"] and stage.data["qv"]["top1_agreement"] == 1.0
    reports = json.loads((work / "verify-lora" / "reports.json").read_text())
    assert reports["qv"]["lora"] is not None  # the adapter, not the base model, was compared
