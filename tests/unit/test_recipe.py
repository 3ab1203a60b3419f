"""Recipes: the strict schema, every problem at once, overrides, the built-in recipes, `yitrt recipe ...`."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from yitrt.errors import UsageError, ValidationError
from yitrt.pipeline import STAGES, stage_parameters
from yitrt.recipe import Recipe, apply_overrides, builtin_recipes, load_recipe

MINIMAL = {"name": "t", "model": {"repo": "01-ai/Yi-1.5-9B-Chat"}, "target": {"gpu": "H100-SXM"}}


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def problems_of(tmp_path, data, overrides=()):
    with pytest.raises(ValidationError) as info:
        load_recipe(write(tmp_path, data), list(overrides))
    return info.value.problems


def test_every_builtin_recipe_validates_and_plans_on_its_gpu():
    recipes = builtin_recipes()
    # the deployments the recipes folder promises
    wanted = {"demo", "yi-1.5-6b-chat-bf16-l4", "yi-1.5-9b-chat-bf16-l40s", "yi-1.5-9b-chat-fp8-h100", "yi-34b-chat-int4-awq-a100-80gb",
              "yi-1.5-34b-chat-fp8-tp2-h100", "yi-34b-200k-fp8-fp8kv-tp4-h100", "yi-coder-9b-chat-fp8-l40s", "yi-6b-base-bf16-a10g",
              "yi-34b-base-fp8-tp2-h100"}
    assert wanted <= set(recipes)
    for name, path in recipes.items():
        loaded = load_recipe(path)
        assert loaded.spec.name == name == path.stem
        assert path.read_text().startswith("#"), f"{name}: the recipe must open with who it is for and why"
        cand = loaded.plan["candidates"][0]
        assert cand["fits"] and cand["tp"] == loaded.spec.parallelism.tp and cand["scheme"] == loaded.spec.precision.scheme
        assert cand["plan"]["max_concurrent_sequences"] >= 1
        # the figures quoted in the comment are the plan's
        assert str(cand["plan"]["max_concurrent_sequences"]) in path.read_text(), f"{name}: comment and plan disagree"


def test_several_mistakes_are_reported_at_once(tmp_path):
    bad = textwrap.dedent("""\
        name: bad
        model: {repo: 01-ai/Yi-34B-Chat}
        target: {gpu: A100-80GB, engine: trtllm}
        precision: {scheme: fp8, kv_cache: int8}
        parallelism: {tp: 3}
        build: {max_batch_size: lots, max_seq_lenn: 4096}
        serve: {chunked_context: true}
        """)
    problems = problems_of(tmp_path, bad)
    text = "\n".join(problems)
    assert "build.max_batch_size: expected a positive integer or 'auto', got 'lots'" in problems  # wrong type
    assert "build.max_seq_lenn: unknown key (did you mean max_seq_len?)" in problems  # typo, with the fix
    assert "tp 3 does not divide the 56 attention heads" in text  # sharding against the model (registry dims)
    assert "scheme fp8 needs SM >= 89" in text  # rules.yaml: GPU × scheme
    assert "chunked context needs paged context FMHA" in text  # rules.yaml: serving feature × INT8 KV cache
    assert len(problems) >= 5


def test_schema_refuses_unknown_sections_and_ambiguous_sources(tmp_path):
    problems = problems_of(tmp_path, {**MINIMAL, "servve": {}, "model": {"repo": "01-ai/Yi-6B", "path": "/x"}})
    assert "servve: unknown key (did you mean serve?)" in problems
    assert any(p.startswith("model: give exactly one of repo, path, demo") for p in problems)
    assert "target.gpu: required" in problems_of(tmp_path, {"name": "t", "model": {"demo": True}, "target": {}})
    assert any("unknown GPU 'H1000'" in p for p in problems_of(tmp_path, {**MINIMAL, "target": {"gpu": "H1000"}}))
    assert any("parallelism.tp" in p and "greater than or equal to 1" in p
               for p in problems_of(tmp_path, {**MINIMAL, "parallelism": {"tp": 0}}))


def test_auto_limits_and_defaults_resolve(tmp_path):
    loaded = load_recipe(write(tmp_path, {**MINIMAL, "build": {"max_batch_size": "auto", "max_seq_len": 2048}}))
    assert loaded.spec.build.max_batch_size is None and loaded.spec.build.max_seq_len == 2048
    resolved = loaded.spec.resolved()
    assert resolved["build"]["max_batch_size"] == "auto" and resolved["serve"]["streaming"] is True
    assert Recipe.model_validate(resolved) == loaded.spec  # the resolved recipe is itself a valid recipe
    assert any("pin a commit sha" in w for w in loaded.warnings)  # revision unset


def test_overrides_parse_yaml_values_and_are_validated(tmp_path):
    path = write(tmp_path, MINIMAL)
    loaded = load_recipe(path, ["build.max_batch_size=64", "serve.kv_reuse=true", "precision.scheme=fp8", "precision.kv_cache=fp8", "slo.ttft_ms=200",
                                "slo.tpot_ms=20"])
    assert loaded.spec.build.max_batch_size == 64 and loaded.spec.serve.kv_reuse is True
    assert loaded.spec.precision.kv_cache == "fp8" and loaded.spec.slo.ttft_ms == 200
    with pytest.raises(ValidationError, match="build.max_batchsize: unknown key"):
        load_recipe(path, ["build.max_batchsize=64"])
    with pytest.raises(UsageError, match="not key.path=value"):
        load_recipe(path, ["build.max_batch_size"])
    with pytest.raises(UsageError, match="target is not a section|gpu is not a section"):
        load_recipe(path, ["target.gpu.name=H100"])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=null"]) == {"a": {"b": 1, "c": None}}
    # an FP8 KV cache without FP8 weights turns paged context FMHA off, so KV reuse is refused (rules.yaml)
    with pytest.raises(ValidationError, match="KV-cache reuse needs paged context FMHA"):
        load_recipe(path, ["serve.kv_reuse=true", "precision.kv_cache=fp8"])


def test_data_free_scheme_with_calibration_settings_is_refused(tmp_path):
    problems = problems_of(tmp_path, {**MINIMAL, "precision": {"scheme": "w8a16", "calibration": {"size": 64}}})
    assert any("w8a16 is data-free" in p for p in problems)


def test_names_are_checked_against_yitrts_tables(tmp_path):
    problems = problems_of(tmp_path, {**MINIMAL, "precision": {"scheme": "int4-awq", "dtype": "fp16", "kv_cache": "fp4",
                                                               "calibration": {"awq_block_size": 32}}})
    assert "precision.dtype: unknown dtype 'fp16' (known: auto, bfloat16, float16, float32)" in problems
    assert any(p.startswith("precision.kv_cache: unknown KV-cache format 'fp4'") for p in problems)
    assert "precision.calibration.awq_block_size 32: int4-awq takes 64 or 128" in problems
    fp8 = problems_of(tmp_path, {**MINIMAL, "precision": {"scheme": "fp8", "calibration": {"awq_block_size": 128}}})
    assert fp8 == ["precision.calibration.awq_block_size 128: fp8 takes none (it is not an AWQ scheme)"]


def test_recipe_that_does_not_fit_says_what_would(tmp_path):
    problems = problems_of(tmp_path, {"name": "t", "model": {"repo": "01-ai/Yi-34B-Chat"}, "target": {"gpu": "L4"}})
    assert len(problems) == 1 and problems[0].startswith("does not fit L4 at tp 1 × pp 1")
    assert "what fits:" in problems[0]


def test_stage_keys_read_only_their_settings():
    base = load_recipe("yi-1.5-9b-chat-fp8-h100").spec
    changed = load_recipe("yi-1.5-9b-chat-fp8-h100", ["build.max_batch_size=64"]).spec
    differ = [s for s in STAGES if stage_parameters(base, s) != stage_parameters(changed, s)]
    assert differ == ["build"]  # deploy follows through the engine's digest, not its own settings
    ref = load_recipe("demo").spec
    ref_changed = load_recipe("demo", ["build.max_seq_len=256"]).spec
    assert [s for s in STAGES if stage_parameters(ref, s) != stage_parameters(ref_changed, s)] == ["build", "deploy"]


def test_recipe_cli_list_show_new_validate(cli, tmp_path):
    listed = cli("recipe", "list", "--json")
    assert listed.returncode == 0
    names = {r["name"] for r in yaml.safe_load(listed.stdout)["recipes"]}
    assert names == set(builtin_recipes())
    shown = cli("recipe", "show", "demo")
    assert shown.stdout == builtin_recipes()["demo"].read_text()
    out = tmp_path / "mine.yaml"
    assert cli("recipe", "new", str(out), "--from", "yi-1.5-9b-chat-fp8-h100").returncode == 0
    assert yaml.safe_load(out.read_text())["name"] == "mine" and out.read_text().startswith("# Yi-1.5-9B-Chat")
    again = cli("recipe", "new", str(out))
    assert again.returncode == 2 and "exists" in again.stderr
    every = cli("recipe", "validate", "--json")  # no argument: every built-in recipe
    assert every.returncode == 0 and {r["recipe"] for r in yaml.safe_load(every.stdout)["recipes"]} == set(builtin_recipes())
    ok = cli("recipe", "validate", str(out), "demo", "--json")
    assert ok.returncode == 0 and all(r["valid"] and r["fits"] for r in yaml.safe_load(ok.stdout)["recipes"])
    bad = write(tmp_path, {**MINIMAL, "build": {"max_batch_size": "lots"}, "serve": {"kv_reus": True}}, "bad.yaml")
    result = cli("recipe", "validate", str(bad))
    assert result.returncode == 3
    assert "build.max_batch_size" in result.stdout and "serve.kv_reus: unknown key (did you mean kv_reuse?)" in result.stdout
    planned = cli("recipe", "plan", "yi-1.5-34b-chat-fp8-tp2-h100", "--json")
    plan = yaml.safe_load(planned.stdout)["candidates"][0]
    assert planned.returncode == 0 and (plan["tp"], plan["scheme"], plan["kv_cache"]) == (2, "fp8", "fp8") and plan["fits"]
    missing = cli("recipe", "show", "yi-9b-fp8")
    assert missing.returncode == 2 and "no recipe file" in missing.stderr and "Traceback" not in missing.stderr
