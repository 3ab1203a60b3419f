"""The recipe's `lora:` section: the schema, task ids, max rank, target modules, the cache and its plan, and every
refusal at once (duplicate names and ids, a rank above max_rank, unknown or fused modules, bf16 + prefetch)."""

from __future__ import annotations

import json

import pytest
import yaml

from yitrt.errors import ValidationError
from yitrt.recipe import load_recipe
from yitrt.recipe_lora import PREFETCH_BF16, Lora

BASE = {"name": "t", "model": {"repo": "01-ai/Yi-1.5-9B-Chat"}, "target": {"gpu": "H100-SXM"}}


def adapter(tmp_path, name, r=8, modules=("q_proj", "v_proj"), **extra):
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 16, "target_modules": list(modules),
                                                            "peft_type": "LORA", **extra}))
    return str(folder)


def recipe(tmp_path, lora, **sections):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, **sections, "lora": lora}))
    return path


def problems_of(tmp_path, lora, **sections):
    with pytest.raises(ValidationError) as info:
        load_recipe(recipe(tmp_path, lora, **sections))
    return info.value.problems


def test_section_parses_with_defaults_and_task_ids_fill_in_order(tmp_path):
    a, b = adapter(tmp_path, "a"), adapter(tmp_path, "b", r=16, modules=("gate_proj", "up_proj", "down_proj"))
    loaded = load_recipe(recipe(tmp_path, {"adapters": [{"name": "a", "source": a}, {"name": "b", "source": b}]}))
    spec = loaded.spec.lora
    assert isinstance(spec, Lora) and spec.task_ids == {"a": 1, "b": 2}
    assert spec.max_rank is None and spec.target_modules is None
    assert (spec.cache.optimal_adapter_size, spec.cache.max_adapter_size, spec.cache.gpu_memory_fraction,
            spec.cache.host_memory_bytes, spec.cache.prefetch) == (8, 64, 0.05, 1 << 30, False)
    resolved = loaded.spec.resolved()["lora"]
    assert resolved["cache"]["host_memory_bytes"] == 1 << 30 and resolved["adapters"][1]["task_id"] is None
    # the plan holds the adapter cache for the largest rank (16) over the union of modules, q/k/v completed
    lora = loaded.plan["candidates"][0]["plan"]["lora"]
    assert lora["max_rank"] == 16 and lora["max_adapter_size"] == 16
    assert lora["modules"] == ["attn_q", "attn_k", "attn_v", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate"]
    assert lora["fits"] and lora["stages"][0]["max_adapters_on_device"] >= 1


def test_given_task_ids_are_kept_and_the_others_take_the_free_ones(tmp_path):
    a = adapter(tmp_path, "a")
    spec = load_recipe(recipe(tmp_path, {"adapters": [{"name": "x", "source": a}, {"name": "y", "source": a, "task_id": 1},
                                                      {"name": "z", "source": a}]})).spec.lora
    assert spec.task_ids == {"x": 2, "y": 1, "z": 3}


def test_no_section_means_no_lora(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    loaded = load_recipe(path)
    assert loaded.spec.lora is None and loaded.plan["candidates"][0]["plan"]["lora"] is None


def test_duplicate_names_and_task_ids_are_refused(tmp_path):
    a = adapter(tmp_path, "a")
    problems = problems_of(tmp_path, {"adapters": [{"name": "a", "source": a}, {"name": "a", "source": a}]})
    assert "lora: adapter names must be unique: a given twice" in problems
    problems = problems_of(tmp_path, {"adapters": [{"name": "a", "source": a, "task_id": 3}, {"name": "b", "source": a, "task_id": 3}]})
    assert "lora: adapter task_id values must be unique: 3 given twice" in problems


def test_bad_names_ids_and_typos_are_refused(tmp_path):
    a = adapter(tmp_path, "a")
    problems = problems_of(tmp_path, {"adapters": [{"name": "Chat Bot", "source": a}, {"name": "b", "source": a, "task_id": 0},
                                                   {"name": "c", "sorce": a}], "cahce": {}})
    assert any(p.startswith("lora.adapters.0.name:") for p in problems)
    assert any(p.startswith("lora.adapters.1.task_id:") for p in problems)
    assert "lora.adapters.2.sorce: unknown key (did you mean source?)" in problems
    assert "lora.cahce: unknown key (did you mean cache?)" in problems
    assert any(p.startswith("lora.adapters: ") for p in problems_of(tmp_path, {"adapters": []}))


def test_rank_above_max_rank_is_refused(tmp_path):
    big = adapter(tmp_path, "big", r=32)
    problems = problems_of(tmp_path, {"adapters": [{"name": "big", "source": big}], "max_rank": 16})
    assert any(p.startswith("lora.adapters.0 (big): rank 32 exceeds lora.max_rank 16") for p in problems)
    patterned = adapter(tmp_path, "patterned", r=8, rank_pattern={"model.layers.0.self_attn.q_proj": 24})
    problems = problems_of(tmp_path, {"adapters": [{"name": "p", "source": patterned}], "max_rank": 16})
    assert any(p.startswith("lora.adapters.0 (p): rank 24 exceeds lora.max_rank 16") for p in problems)  # a module's own rank


def test_unknown_fused_and_unadapted_modules_are_refused_by_name(tmp_path):
    odd = adapter(tmp_path, "odd", modules=("q_proj", "qkv_proj", "wq", "lm_head"))
    problems = problems_of(tmp_path, {"adapters": [{"name": "odd", "source": odd}]})
    assert any("target module qkv_proj: a fused qkv_proj adapter" in p for p in problems)
    assert any("unknown target module 'wq'" in p for p in problems)
    assert any("target module lm_head: lm_head adapters are not supported" in p for p in problems)
    a = adapter(tmp_path, "a", modules=("q_proj", "o_proj"))
    problems = problems_of(tmp_path, {"adapters": [{"name": "a", "source": a}], "target_modules": ["attn_q", "q_proj", "attn_qkv", "moe_gate", "nope"]})
    assert "lora.target_modules: q_proj is the PEFT name; the engine takes TensorRT-LLM names (q_proj is attn_q)" in problems
    assert any(p.startswith("lora.target_modules: attn_qkv adapts a fused qkv_proj") for p in problems)
    assert any(p.startswith("lora.target_modules: moe_gate is a TensorRT-LLM module Yi's decoder does not have") for p in problems)
    assert any(p.startswith("lora.target_modules: unknown module 'nope'") for p in problems)
    problems = problems_of(tmp_path, {"adapters": [{"name": "a", "source": a}], "target_modules": ["attn_q"]})
    assert any(p.startswith("lora.target_modules: the adapters also adapt attn_dense") for p in problems)


def test_dora_and_a_missing_adapter_are_refused(tmp_path):
    dora = adapter(tmp_path, "dora", use_dora=True)
    problems = problems_of(tmp_path, {"adapters": [{"name": "d", "source": dora}, {"name": "gone", "source": str(tmp_path / "nowhere")}]})
    assert any(p.startswith("lora.adapters.0 (d): a DoRA adapter") for p in problems)
    assert any(p.startswith("lora.adapters.1 (gone).source:") for p in problems)


def test_prefetch_is_refused_for_a_bf16_engine_and_allowed_for_fp16(tmp_path):
    a = adapter(tmp_path, "a")
    section = {"adapters": [{"name": "a", "source": a}], "cache": {"prefetch": True}}
    problems = problems_of(tmp_path, section)  # Yi-1.5-9B-Chat is bf16
    assert any(p.startswith(f"lora.cache.prefetch: {PREFETCH_BF16}") and "precision.dtype float16" in p for p in problems)
    loaded = load_recipe(recipe(tmp_path, section, precision={"dtype": "float16"}))
    assert loaded.spec.lora.cache.prefetch


def test_a_cache_that_cannot_hold_one_adapter_is_refused_up_front(tmp_path):
    a = adapter(tmp_path, "a", r=64)
    problems = problems_of(tmp_path, {"adapters": [{"name": "a", "source": a}], "cache": {"host_memory_bytes": 1024}})
    assert any("host LoRA cache" in p and "lora.cache.host_memory_bytes" in p for p in problems)


def test_hub_adapters_are_checked_once_fetched_and_speculation_is_refused(tmp_path):
    loaded = load_recipe(recipe(tmp_path, {"adapters": [{"name": "hub", "source": "someone/yi-lora", "revision": "main"}]}))
    assert any("lora.adapters.0 (hub): the Hub adapter someone/yi-lora is checked" in w for w in loaded.warnings)
    assert loaded.plan["candidates"][0]["plan"]["lora"] is None  # no rank known yet: planned once fetched
    a = adapter(tmp_path, "a")
    problems = problems_of(tmp_path, {"adapters": [{"name": "a", "source": a, "revision": "main"}]}, speculative={"mode": "lookahead"})
    assert any(p.startswith("lora: yitrt does not combine LoRA adapters with speculative decoding") for p in problems)
    assert any(p.startswith("lora.adapters.0.revision: applies to a Hub adapter") for p in problems)


def test_a_device_cache_too_small_names_its_fix_and_no_unrelated_one(tmp_path):
    a = adapter(tmp_path, "a", r=16, modules=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
    problems = problems_of(tmp_path, {"adapters": [{"name": "a", "source": a}]}, model={"repo": "01-ai/Yi-1.5-6B-Chat"}, target={"gpu": "L4"})
    (problem,) = [p for p in problems if "device LoRA cache" in p]
    # TensorRT-LLM's default 0.05 of what a 0.9 KV pool leaves on an L4 is 42.2 MiB; a rank-16 q/k/v + MLP adapter of Yi-6B is 61.2 MiB
    assert "is 42.2 MiB" in problem and "61.2 MiB" in problem and "raise lora.cache.gpu_memory_fraction" in problem
    assert "what fits" not in problem  # another tp or scheme is not the fix
    load_recipe(recipe(tmp_path, {"adapters": [{"name": "a", "source": a}], "cache": {"gpu_memory_fraction": 0.1}},
                       model={"repo": "01-ai/Yi-1.5-6B-Chat"}, target={"gpu": "L4"}))


def test_peft_target_module_spellings_are_read_as_peft_reads_them(tmp_path):
    """A string target_modules is PEFT's regex (checked at conversion, not refused here), a dotted name is matched by its
    end, and a value of another type is a refusal naming it, never a TypeError."""
    regex = adapter(tmp_path, "regex", modules=())
    cfg = json.loads((tmp_path / "regex/adapter_config.json").read_text())
    (tmp_path / "regex/adapter_config.json").write_text(json.dumps({**cfg, "target_modules": "q_proj|v_proj"}))
    dotted = adapter(tmp_path, "dotted", modules=("self_attn.q_proj", "mlp.down_proj"))
    spec = load_recipe(recipe(tmp_path, {"adapters": [{"name": "r", "source": regex}, {"name": "d", "source": dotted}]})).spec.lora
    assert spec.task_ids == {"r": 1, "d": 2}
    bad = adapter(tmp_path, "bad", modules=())
    (tmp_path / "bad/adapter_config.json").write_text(json.dumps({**cfg, "target_modules": 5}))
    assert any("target_modules is 5, not a list of module names" in p for p in problems_of(tmp_path, {"adapters": [{"name": "b", "source": bad}]}))


def test_a_source_that_is_no_repo_id_is_a_missing_folder(tmp_path):
    """`../nonexist` is not a Hub repo id (hub.is_repo_id): it is refused as a missing folder now, not fetched later."""
    problems = problems_of(tmp_path, {"adapters": [{"name": "a", "source": str(tmp_path / ".." / "nonexist")}]})
    assert any("is not a folder" in p for p in problems)
