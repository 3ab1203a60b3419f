"""The recipe's `speculative:` section: the schema, mode-specific fields, the draft against what is known of it, all
problems at once, and `yitrt recipe validate` staying instant."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT, weightless_tiny_model
from yitrt.errors import ValidationError
from yitrt.recipe import Draft, Speculative, load_recipe
from yitrt.speculation import MAX_DRAFT_TOKENS, UNSUPPORTED_MODES, LookaheadSizes
from yitrt.synthetic import SyntheticSpec, hf_config

TARGET = {"name": "t", "model": {"repo": "01-ai/Yi-34B-Chat"}, "target": {"gpu": "H100-SXM"},
          "precision": {"scheme": "fp8", "kv_cache": "fp8"}, "parallelism": {"tp": 2}}
DRAFT_TARGET = {"mode": "draft-target", "max_draft_len": 4,
                "draft": {"model": {"repo": "01-ai/Yi-6B-Chat"}, "precision": {"scheme": "fp8"}}}


def recipe(tmp_path, speculative, **sections):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**TARGET, **sections, "speculative": speculative}))
    return path


def problems_of(tmp_path, speculative, **sections):
    with pytest.raises(ValidationError) as info:
        load_recipe(recipe(tmp_path, speculative, **sections))
    return info.value.problems


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return weightless_tiny_model(tmp_path_factory.mktemp("spec") / "tiny")


def test_draft_target_section_parses_with_defaults(tmp_path):
    loaded = load_recipe(recipe(tmp_path, DRAFT_TARGET))
    spec = loaded.spec.speculative
    assert isinstance(spec, Speculative) and isinstance(spec.draft, Draft)
    assert spec.mode == "draft-target" and spec.max_draft_len == 4 and spec.use_draft_logits is False
    assert spec.draft.model.repo == "01-ai/Yi-6B-Chat" and spec.draft.precision.scheme == "fp8"
    assert spec.draft.tp is None and loaded.spec.draft_tp == 2  # the target's tp
    assert spec.engine_max_draft_len == 4 and spec.lookahead is None
    resolved = loaded.spec.resolved()["speculative"]
    assert resolved["draft"]["kv_fraction"] == "auto" and resolved["window"] is None
    assert not any(w.startswith("speculative") for w in loaded.warnings)  # a known pair: the registry answers


def test_no_section_means_no_speculation(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(TARGET))
    spec = load_recipe(path).spec
    assert spec.speculative is None and spec.draft_tp is None


def test_lookahead_fills_the_executor_defaults_and_derives_max_draft_len(tmp_path):
    spec = load_recipe(recipe(tmp_path, {"mode": "lookahead"})).spec.speculative
    assert (spec.window, spec.ngram, spec.verification_set) == (4, 3, 4)
    assert spec.lookahead == LookaheadSizes(4, 3, 4) and spec.engine_max_draft_len == 15
    spec = load_recipe(recipe(tmp_path, {"mode": "lookahead", "window": 7, "ngram": 5, "verification_set": 3})).spec.speculative
    assert spec.engine_max_draft_len == 39  # the reference's worked example


@pytest.mark.parametrize("mode", sorted(UNSUPPORTED_MODES))
def test_eagle_medusa_redrafter_are_refused_with_the_reason(tmp_path, mode):
    assert f"speculative.mode: {mode} is not supported: {UNSUPPORTED_MODES[mode]}" in problems_of(tmp_path, {"mode": mode})


def test_unknown_mode_names_the_known_ones_and_trtllm_build_names(tmp_path):
    assert "speculative.mode: unknown mode 'fast' (known: draft-target, lookahead)" in problems_of(tmp_path, {"mode": "fast"})
    assert ("speculative.mode: unknown mode 'draft_tokens_external' (known: draft-target, lookahead; draft_tokens_external is "
            "trtllm-build's name for draft-target)") in problems_of(tmp_path, {"mode": "draft_tokens_external"})


def test_draft_target_needs_a_draft_and_a_draft_len(tmp_path):
    problems = problems_of(tmp_path, {"mode": "draft-target"})
    assert "speculative.max_draft_len: required for draft-target (draft tokens per round, e.g. 4)" in problems
    assert "speculative.draft: required for draft-target (the draft model: model, and optionally precision, tp, layers)" in problems


@pytest.mark.parametrize("k", [0, MAX_DRAFT_TOKENS + 1])
def test_draft_len_out_of_range(tmp_path, k):
    problems = problems_of(tmp_path, {**DRAFT_TARGET, "max_draft_len": k})
    assert any(p.startswith(f"speculative.max_draft_len must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {k}") for p in problems)


def test_lookahead_fields_are_refused_for_draft_target_and_draft_fields_for_lookahead(tmp_path):
    problems = problems_of(tmp_path, {**DRAFT_TARGET, "window": 4, "ngram": 3})
    assert problems == ["speculative.window, speculative.ngram: lookahead only (mode is draft-target)"]
    problems = problems_of(tmp_path, {"mode": "lookahead", "max_draft_len": 4, "use_draft_logits": True, "draft": DRAFT_TARGET["draft"]})
    assert "speculative.max_draft_len: lookahead derives it from window, ngram and verification_set (here 15); remove it" in problems
    assert "speculative.draft: draft-target only (lookahead drafts from the target itself); remove it or use mode draft-target" in problems
    assert "speculative.use_draft_logits: draft-target only (lookahead has no draft model)" in problems
    assert len(problems) == 3


def test_lookahead_sizes_are_checked_as_tensorrt_llm_checks_them(tmp_path):
    problems = problems_of(tmp_path, {"mode": "lookahead", "window": 4, "ngram": 1, "verification_set": 4})
    assert len(problems) == 1 and problems[0].startswith(
        "speculative: lookahead ngram 1 needs window 1 and verification_set 0 (plain decoding), got window 4, verification_set 4")
    problems = problems_of(tmp_path, {"mode": "lookahead", "window": 0})
    assert problems[0].startswith("speculative: lookahead window must be >= 1, got 0")
    assert "speculative.ngram: Input should be a valid integer, got '3'" in problems_of(tmp_path, {"mode": "lookahead", "ngram": "3"})


def test_draft_tp_must_divide_the_drafts_heads(tmp_path):
    problems = problems_of(tmp_path, {**DRAFT_TARGET, "draft": {**DRAFT_TARGET["draft"], "tp": 3}})
    assert problems == ["speculative.draft.tp 3: tp 3 does not divide the 32 attention heads; tp 3 does not divide the 4 KV heads; "
                        "tp 3 does not divide intermediate_size 11008"]


def test_draft_tp_defaults_to_the_targets_and_says_so(tmp_path, tiny_folder):
    # Yi-34B at tp 8 is fine; a 6-head draft is not
    folder = tmp_path / "six-heads"
    shutil.copytree(tiny_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 192}))
    problems = problems_of(tmp_path, {**DRAFT_TARGET, "draft": {"model": {"path": str(folder)}}}, parallelism={"tp": 4},
                           model={"path": str(tiny_folder)}, precision={"scheme": "none"})
    assert "speculative.draft.tp 4 (the target's tp; set speculative.draft.tp): tp 4 does not divide the 6 attention heads" in problems


def test_draft_layers_below_the_drafts_layer_count(tmp_path):
    problems = problems_of(tmp_path, {**DRAFT_TARGET, "draft": {**DRAFT_TARGET["draft"], "layers": 32}})
    assert problems == ["speculative.draft.layers 32: must be fewer than the draft's 32 layers (null keeps them all)"]
    assert "speculative.draft.layers: Input should be greater than or equal to 1, got 0" in problems_of(
        tmp_path, {**DRAFT_TARGET, "draft": {**DRAFT_TARGET["draft"], "layers": 0}})
    spec = load_recipe(recipe(tmp_path, {**DRAFT_TARGET, "draft": {**DRAFT_TARGET["draft"], "layers": 31}})).spec
    assert spec.speculative.draft.layers == 31


def test_known_repos_pair_within_one_family_chat_for_chat(tmp_path):
    problems = problems_of(tmp_path, {**DRAFT_TARGET, "draft": {"model": {"repo": "01-ai/Yi-1.5-6B"}}})
    assert ("speculative.draft.model: 01-ai/Yi-1.5-6B (Yi-1.5) and 01-ai/Yi-34B-Chat (Yi 1.0) are of different tokenizer families, "
            "whose identity is unconfirmed (yitrt pairs within one family); known drafts for 01-ai/Yi-34B-Chat: 01-ai/Yi-6B-Chat") in problems
    assert any(p.startswith("speculative.draft.model: 01-ai/Yi-1.5-6B (base) ends a turn with id 2, 01-ai/Yi-34B-Chat (chat) with 7")
               for p in problems)
    assert len(problems) == 2


def test_an_unsupported_draft_repo_is_refused(tmp_path):
    problems = problems_of(tmp_path, {**DRAFT_TARGET, "draft": {"model": {"repo": "01-ai/Yi-6B-Chat-4bits"}}})
    assert problems == ["speculative.draft.model.repo: 01-ai/Yi-6B-Chat-4bits is pre-quantized AutoAWQ weights (zero-point); "
                        "convert 01-ai/Yi-6B-Chat with --scheme int4-awq instead"]


def test_local_folders_are_compared_file_by_file(tmp_path, tiny_folder):
    draft = tmp_path / "draft"
    shutil.copytree(tiny_folder, draft)
    local = {"model": {"path": str(tiny_folder)}, "precision": {"scheme": "none"}, "parallelism": {"tp": 1}}
    spec = {"mode": "draft-target", "max_draft_len": 3, "draft": {"model": {"path": str(draft)}, "layers": 2}}
    assert load_recipe(recipe(tmp_path, spec, **local)).spec.speculative.draft.layers == 2
    tok = json.loads((draft / "tokenizer.json").read_text())
    tok["model"]["merges"][5] = ["x", "y"] if isinstance(tok["model"]["merges"][5], list) else "x y"
    (draft / "tokenizer.json").write_text(json.dumps(tok))
    problems = problems_of(tmp_path, spec, **local)
    assert len(problems) == 1 and problems[0].startswith("speculative.draft: tokenizer.json merges differ at 1 position(s) (first #5: ")


def test_a_draft_of_another_vocab_is_refused_without_its_tokenizer(tmp_path, tiny_folder):
    problems = problems_of(tmp_path, {**DRAFT_TARGET, "draft": {"model": {"path": str(tiny_folder)}}})
    assert problems == ["speculative.draft: vocab_size 512 differs from the target's 64000 (the draft's token ids must be the target's)"]


def test_an_unchecked_pair_is_a_warning_that_says_when_it_is_checked(tmp_path):
    folder = tmp_path / "yi6b-shaped"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(SyntheticSpec(shape="yi-6b"))))
    loaded = load_recipe(recipe(tmp_path, {**DRAFT_TARGET, "draft": {"model": {"path": str(folder)}}}))
    assert (f"speculative.draft: the tokenizers of {folder} and 01-ai/Yi-34B-Chat are compared once both are fetched "
            f"(`yitrt inspect 01-ai/Yi-34B-Chat --draft {folder}` compares them now)") in loaded.warnings


def test_draft_target_needs_kv_reuse_on_both_models(tmp_path):
    problems = problems_of(tmp_path, DRAFT_TARGET, serve={"kv_reuse": False})
    assert problems == ["serve.kv_reuse: false, but the target of draft-target speculation needs KV-cache block reuse (TensorRT-LLM: "
                        "\"KV cache block reuse must be enabled for speculative decoding target model\"); leave it unset or true"]
    problems = problems_of(tmp_path, {**DRAFT_TARGET, "draft": {**DRAFT_TARGET["draft"], "precision": {"scheme": "fp8", "kv_cache": "int8"}}})
    assert problems == ["speculative.draft.precision.kv_cache int8: the build turns paged context FMHA off for KV cache int8 with quant_algo FP8, "
                        "so the draft of draft-target speculation gets no KV-cache reuse, which it needs; use kv_cache fp8 with the fp8 scheme, or null"]


def test_the_drafts_precision_is_checked_like_the_targets(tmp_path):
    problems = problems_of(tmp_path, {**DRAFT_TARGET, "draft": {**DRAFT_TARGET["draft"], "precision": {"scheme": "fp9", "dtype": "fp32x"}}})
    assert any(p.startswith("speculative.draft.precision.scheme: unknown scheme 'fp9'") for p in problems)
    assert any(p.startswith("speculative.draft.precision.dtype: unknown dtype 'fp32x'") for p in problems)
    # its scheme against the GPU: FP8 needs SM >= 89 (the target is bf16 here, so only the draft is wrong)
    problems = problems_of(tmp_path, DRAFT_TARGET, target={"gpu": "A100-80GB"}, precision={"scheme": "none"})
    assert len(problems) == 1 and problems[0].startswith("speculative.draft: scheme fp8 needs SM >= 89; A100-80GB is SM 80")


def test_typos_inside_the_section_name_the_nearest_key(tmp_path):
    problems = problems_of(tmp_path, {**DRAFT_TARGET, "max_draft_lenn": 4, "draft": {"modle": {"repo": "01-ai/Yi-6B-Chat"}}})
    assert "speculative.max_draft_lenn: unknown key (did you mean max_draft_len?)" in problems
    assert "speculative.draft.modle: unknown key (did you mean model?)" in problems
    assert "speculative.draft.model: required" in problems


def test_every_problem_at_once(tmp_path):
    problems = problems_of(tmp_path, {"mode": "draft-target", "max_draft_len": 99, "verification_set": 2,
                                      "draft": {"model": {"repo": "01-ai/Yi-1.5-6B-Chat"}, "tp": 3, "layers": 40,
                                                "precision": {"scheme": "int4-awq", "kv_cache": "int8"}}},
                           serve={"kv_reuse": False}, parallelism={"tp": 3})
    text = "\n".join(problems)
    for expected in ("speculative.max_draft_len must be an integer from 1 to 64, got 99",
                     "speculative.verification_set: lookahead only",
                     "serve.kv_reuse: false, but the target of draft-target speculation needs KV-cache block reuse",
                     "speculative.draft.precision.kv_cache int8",
                     "speculative.draft.tp 3: tp 3 does not divide the 32 attention heads",
                     "speculative.draft.layers 40: must be fewer than the draft's 32 layers",
                     "speculative.draft.model: 01-ai/Yi-1.5-6B-Chat (Yi-1.5) and 01-ai/Yi-34B-Chat (Yi 1.0)",
                     "tp 3 does not divide the 56 attention heads"):  # the target's own problems are still there
        assert expected in text, expected


def test_validating_a_speculative_recipe_stays_light(tmp_path, tiny_folder):
    draft = tmp_path / "draft"
    shutil.copytree(tiny_folder, draft)
    path = recipe(tmp_path, {"mode": "draft-target", "max_draft_len": 3, "draft": {"model": {"path": str(draft)}, "layers": 2}},
                  model={"path": str(tiny_folder)}, precision={"scheme": "none"}, parallelism={"tp": 1})
    code = (f"import sys; from yitrt.recipe import load_recipe; load_recipe({str(path)!r}); "
            "heavy = {'torch', 'transformers', 'modelopt'} & set(sys.modules); assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
