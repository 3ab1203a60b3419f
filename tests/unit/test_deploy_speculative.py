"""`yitrt deploy --speculative`: the settings checked against the engines' config.json (engine folders faked here as
TEST DOUBLES of what trtllm-build writes: config.json and rank files, no engine), every refusal with its fix, the
draft-target repository (tensorrt_llm_draft, BLS parameters, orchestrator launch) and the lookahead one — golden
config.pbtxt files parsed by Triton's ModelConfig schema (facts: reference/trtllm-serving-features.md §1, §6)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from yitrt.errors import UsageError, ValidationError
from yitrt.speculation import LookaheadSizes
from yitrt.triton.pbtxt import parse_config
from yitrt.triton.repository import (
    DeployRequest,
    EngineFacts,
    _check_serving,
    _launch_script,
    _readme,
    engine_facts,
    render_repository,
)
from yitrt.triton.speculative import DRAFT_MODEL, STOCK_BLS_LIMITS, Speculation, resolve

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "triton"
#: SpeculativeDecodingMode flags as config.json holds them
NONE, DRAFT_TOKENS_EXTERNAL, LOOKAHEAD = 1, 2, 8


def _engine(folder: Path, *, tp: int = 1, mode: int | str | None = NONE, max_draft_len: int = 0, gather: bool = False,
            vocab: int = 64000, logits: str = "float32", beam: int = 1, paged_ctx: bool = True, version: str = "1.2.1",
            max_seq_len: int = 4096) -> Path:
    """A TEST DOUBLE of an engine folder: the config.json a TensorRT-LLM 1.2 build writes (the keys deploy reads)
    and empty rank files."""
    folder.mkdir(parents=True)
    pretrained = {"architecture": "LlamaForCausalLM", "dtype": "bfloat16", "logits_dtype": logits, "vocab_size": vocab,
                  "max_position_embeddings": 4096, "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
                  "quantization": {"quant_algo": None, "kv_cache_quant_algo": None}}
    build = {"max_batch_size": 8, "max_input_len": 2048, "max_seq_len": max_seq_len, "max_num_tokens": 8192, "max_beam_width": beam,
             "kv_cache_type": "PAGED", "gather_generation_logits": gather, "max_draft_len": max_draft_len,
             "speculative_decoding_mode": mode,
             "plugin_config": {"paged_kv_cache": True, "remove_input_padding": True, "use_paged_context_fmha": paged_ctx, "context_fmha": True}}
    (folder / "config.json").write_text(json.dumps({"version": version, "pretrained_config": pretrained, "build_config": build}))
    for rank in range(tp):
        (folder / f"rank{rank}.engine").write_bytes(b"test double: not an engine\n")
    return folder


@pytest.fixture
def pair(tmp_path):
    """A tp 2 draft-target target (max_draft_len 4) and a tp 1 draft with generation logits."""
    return (_engine(tmp_path / "target", tp=2, mode=DRAFT_TOKENS_EXTERNAL, max_draft_len=4),
            _engine(tmp_path / "draft", gather=True))


def _request(source: Path, **options) -> DeployRequest:
    return DeployRequest(source, Path("/REPO"), **options)


def _resolve(source: Path, **options):
    req = _request(source, **options)
    return resolve(req, engine_facts(req))


def _problems(source: Path, **options) -> str:
    spec, problems, _ = _resolve(source, **options)
    return " | ".join(problems)


# -- engine facts -------------------------------------------------------------------------------------------------


def test_engine_facts_read_the_speculative_build(pair, tmp_path):
    target, draft = (engine_facts(_request(p)) for p in pair)
    assert (target.speculative_mode, target.max_draft_len, target.vocab_size, target.max_beam_width) == ("draft_tokens_external", 4, 64000, 1)
    assert (draft.speculative_mode, draft.max_draft_len, draft.gather_generation_logits) == (None, 0, True)
    named = engine_facts(_request(_engine(tmp_path / "named", mode="SpeculativeDecodingMode.LOOKAHEAD_DECODING", max_draft_len=15)))
    assert named.speculative_mode == "lookahead_decoding"
    old = _engine(tmp_path / "old", mode=None)  # engines built before the key existed
    assert engine_facts(_request(old)).speculative_mode is None
    from yitrt.errors import CheckpointError

    with pytest.raises(CheckpointError, match="names no TensorRT-LLM mode"):
        engine_facts(_request(_engine(tmp_path / "bad", mode=3)))


# -- draft-target: resolved settings --------------------------------------------------------------------------------


def test_draft_target_defaults_come_from_the_engines(pair):
    target, draft = pair
    spec, problems, warnings = _resolve(target, speculative="draft-target", draft=draft)
    assert problems == [] and warnings == []
    assert (spec.num_draft_tokens, spec.max_draft_len) == (4, 4)  # K defaults to the engine's max_draft_len
    assert spec.gpu_ids == (0, 1) and spec.draft_gpu_ids == (0,)  # both on the target's GPUs
    assert spec.kv_fraction == spec.draft_kv_fraction == 0.45  # no plan: half the backend's 0.9 each (DTM: 0.5/0.5)
    assert spec.orchestrator and spec.orchestrator_gpus == [0, 1]
    k2, _, _ = _resolve(target, speculative="draft-target", draft=draft, num_draft_tokens=2, use_draft_logits=True)
    assert (k2.num_draft_tokens, k2.max_draft_len, k2.use_draft_logits) == (2, 4, True)


def test_kv_fractions_split_the_plan_and_keep_what_is_given(pair):
    target, draft = pair
    facts = engine_facts(_request(target))
    facts.plan["kv_cache_free_gpu_mem_fraction"] = 0.8
    req = _request(target, speculative="draft-target", draft=draft)
    spec, _, _ = resolve(req, facts)
    assert (spec.kv_fraction, spec.draft_kv_fraction) == (0.4, 0.4)
    spec, _, _ = resolve(dataclasses.replace(req, kv_fraction=0.6, draft_kv_fraction=0.2), facts)
    assert (spec.kv_fraction, spec.draft_kv_fraction) == (0.6, 0.2)
    spec, _, _ = resolve(dataclasses.replace(req, gpu_ids=(0, 1), draft_gpu_ids=(2,)), facts)  # own GPUs: no split
    assert (spec.kv_fraction, spec.draft_kv_fraction) == (0.8, None) and spec.orchestrator_gpus == [0, 1, 2]
    # a pair plan (yitrt build of the target with its draft) recorded both models' KV parameters: they win
    facts.plan["pair"] = {"triton": {"tensorrt_llm": {"kv_cache_free_gpu_mem_fraction": 0.7123, "max_tokens_in_paged_kv_cache": 90000},
                                     DRAFT_MODEL: {"kv_cache_free_gpu_mem_fraction": 0.3011, "max_tokens_in_paged_kv_cache": 40000}}}
    spec, _, _ = resolve(req, facts)
    assert (spec.kv_fraction, spec.draft_kv_fraction, spec.kv_tokens, spec.draft_kv_tokens) == (0.7123, 0.3011, 90000, 40000)
    _, cfg = _configs(facts, spec)
    assert _params(cfg["tensorrt_llm"])["max_tokens_in_paged_kv_cache"] == "90000"
    assert _params(cfg[DRAFT_MODEL])["max_tokens_in_paged_kv_cache"] == "40000"
    spec, _, _ = resolve(dataclasses.replace(req, kv_fraction=0.5, max_kv_tokens=50000), facts)
    assert (spec.kv_fraction, spec.draft_kv_fraction, spec.kv_tokens) == (0.5, 0.3011, 50000)


# -- draft-target: every refusal names its fix ----------------------------------------------------------------------


@pytest.mark.parametrize("change, options, expected", [
    ({"target": {"mode": NONE, "max_draft_len": 0}}, {}, "not built for draft-target speculation"),
    ({"target": {"mode": LOOKAHEAD, "max_draft_len": 15}}, {}, "--speculative draft-target --max-draft-len K"),
    ({}, {"num_draft_tokens": 5}, "--num-draft-tokens 5 exceeds the target engine's max_draft_len 4"),
    ({}, {"num_draft_tokens": 65}, "--num-draft-tokens must be an integer from 1 to 64"),
    ({"draft": {"gather": False}}, {"use_draft_logits": True}, "--use-draft-logits needs the draft's generation logits"),
    ({"draft": {"vocab": 32000}}, {}, "the draft's vocabulary (32000 tokens) differs from the target's (64000)"),
    ({"draft": {"logits": "float16"}}, {}, "rebuild the draft with --logits_dtype float32"),
    ({"target": {"beam": 4}}, {}, "rebuild it with max_beam_width 1"),
    ({"draft": {"mode": DRAFT_TOKENS_EXTERNAL, "max_draft_len": 4}}, {}, "a draft is an ordinary engine"),
    ({"draft": {"paged_ctx": False}}, {}, "rebuild the draft with --use_paged_context_fmha enable"),
    ({"draft": {"version": "1.1.0"}}, {}, "build both with the same version"),
    ({}, {"kv_reuse": False}, "KV cache block reuse must be enabled for speculative decoding target model"),
    ({}, {"draft_gpu_ids": (0, 1)}, "--draft-gpu-ids 0,1: the draft engine has 1 rank (tp × pp), so give 1 distinct GPU ids"),
    ({}, {"gpu_ids": (0, 0)}, "--gpu-ids 0,0: the target engine has 2 ranks"),
])
def test_draft_target_mismatches_are_refused_with_the_fix(tmp_path, change, options, expected):
    target = _engine(tmp_path / "target", tp=2, **{"mode": DRAFT_TOKENS_EXTERNAL, "max_draft_len": 4, **change.get("target", {})})
    draft = _engine(tmp_path / "draft", **{"gather": True, **change.get("draft", {})})
    assert expected in _problems(target, speculative="draft-target", draft=draft, **options)


def test_every_problem_is_reported_at_once_with_the_serving_ones(tmp_path):
    target = _engine(tmp_path / "target", mode=NONE, beam=2, paged_ctx=False)
    draft = _engine(tmp_path / "draft", vocab=100, logits="float16")
    req = _request(target, speculative="draft-target", draft=draft, use_draft_logits=True, kv_reuse=True)
    facts = engine_facts(req)
    spec, problems, _ = resolve(req, facts)
    with pytest.raises(ValidationError) as caught:
        _check_serving(req, facts, "1.2", problems)
    text = str(caught.value)
    for expected in ("not built for draft-target", "max_beam_width 1", "generation logits", "vocabulary", "logits_dtype",
                     "KV-cache reuse needs paged context FMHA"):
        assert expected in text


def test_missing_or_wrong_draft_folders_are_problems(pair, tmp_path):
    target, _ = pair
    assert "needs --draft: the draft engine folder" in _problems(target, speculative="draft-target")
    _, problems, warnings = _resolve(target, speculative="draft-target", draft=target)
    assert "the draft is the target itself" in warnings[0] and not any("is the target" in p for p in problems)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert f"--draft {hf}: " in _problems(target, speculative="draft-target", draft=hf)


@pytest.mark.parametrize("options, expected", [
    ({"draft": Path("/DRAFT")}, "--draft: draft-target options (pass --speculative draft-target)"),
    ({"speculative": "lookahead", "num_draft_tokens": 3}, "or drop them for lookahead"),
    ({"lookahead": LookaheadSizes(4, 3, 4)}, "--lookahead W,N,G needs --speculative lookahead"),
    ({"gpu_ids": (0,)}, "--gpu-ids: for draft-target deployments of engines"),
])
def test_options_of_another_mode_are_refused(tmp_path, options, expected):
    plain = _engine(tmp_path / "plain")
    assert expected in _problems(plain, **options)


def test_unserved_modes_are_refused_with_their_reason(tmp_path):
    plain = _engine(tmp_path / "plain")
    with pytest.raises(UsageError, match="EAGLE needs trained EAGLE heads") as caught:
        _resolve(plain, speculative="eagle")
    assert "draft-target, lookahead" in caught.value.hint
    with pytest.raises(UsageError, match="unknown --speculative mode 'fast'"):
        _resolve(plain, speculative="fast")
    medusa = _engine(tmp_path / "medusa", mode=4, max_draft_len=63)
    assert "Medusa needs trained Medusa heads" in _problems(medusa)


def test_a_speculative_engine_deployed_plainly(tmp_path):
    target = _engine(tmp_path / "target", mode=DRAFT_TOKENS_EXTERNAL, max_draft_len=4)
    spec, problems, warnings = _resolve(target)
    assert spec is None and problems == [] and "deployed without a draft" in warnings[0]
    assert "KV cache block reuse must be enabled" in _problems(target, kv_reuse=False)  # the executor throws even without drafts
    lookahead = _engine(tmp_path / "lookahead", mode=LOOKAHEAD, max_draft_len=15)
    assert "deploy it with --speculative lookahead --lookahead W,N,G (sizes whose max_draft_len is 15, e.g. 4,3,4)" in _problems(lookahead)


# -- lookahead -----------------------------------------------------------------------------------------------------


def test_lookahead_sizes_must_give_the_engines_max_draft_len(tmp_path):
    engine = _engine(tmp_path / "la", mode=LOOKAHEAD, max_draft_len=39)  # (7, 5, 3) → 39 (reference §1.2)
    spec, problems, _ = _resolve(engine, speculative="lookahead", lookahead=LookaheadSizes(7, 5, 3))
    assert problems == [] and spec.max_draft_len == 39 and spec.lookahead == LookaheadSizes(7, 5, 3)
    text = _problems(engine, speculative="lookahead")  # the default 4,3,4 gives 15
    assert "the default lookahead 4,3,4 needs max_draft_len 15, the engine was built with 39" in text
    assert "pass --lookahead sizes whose max_draft_len is 39, e.g." in text
    text = _problems(engine, speculative="lookahead", lookahead=LookaheadSizes(7, 7, 7))
    assert "--lookahead 7,7,7 needs max_draft_len 83" in text
    plain = _engine(tmp_path / "plain")
    assert "yitrt build --speculative lookahead --lookahead 4,3,4" in _problems(plain, speculative="lookahead")


# -- the reference slot: the flags are the truth --------------------------------------------------------------------


def _checkpoint(folder: Path, *, vocab: int = 64000, context: int = 4096, kv: str | None = None) -> Path:
    """A TEST DOUBLE of a TensorRT-LLM checkpoint folder: config.json and rank files whose headers are empty
    safetensors (the slot checks the headers it will load)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architecture": "LlamaForCausalLM", "dtype": "float16", "logits_dtype": "float32", "vocab_size": vocab,
        "max_position_embeddings": context, "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": kv}}))
    header = b"{}"
    (folder / "rank0.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return folder


def _reference(tmp_path, **options):
    target = tmp_path / "t" if (tmp_path / "t").is_dir() else _checkpoint(tmp_path / "t")
    draft = options.pop("draft_ckpt", None) or (tmp_path / "d" if (tmp_path / "d").is_dir() else _checkpoint(tmp_path / "d"))
    req = DeployRequest(target, Path("/REPO"), engine="reference", speculative="draft-target", draft=draft, **options)
    facts = engine_facts(req)
    return req, facts, resolve(req, facts)


def test_reference_slot_takes_k_from_the_flags(tmp_path):
    req, facts, (spec, problems, _) = _reference(tmp_path, num_draft_tokens=3)
    assert problems == [] and (spec.num_draft_tokens, spec.max_draft_len) == (3, 3) and not spec.orchestrator
    assert spec.gpu_ids is None and spec.kv_fraction is None
    texts = render_repository(req, facts, "1.2", 7, [], spec)
    params = {name: {k: v.string_value for k, v in parse_config(text).parameters.items()} for name, text in texts.items()}
    assert params["tensorrt_llm"]["yitrt_max_draft_len"] == "3" and "yitrt_max_draft_len" not in params[DRAFT_MODEL]
    assert params[DRAFT_MODEL]["gpt_model_path"] == str(spec.draft.path) and params["tensorrt_llm"]["gpt_model_path"] == str(facts.path)
    assert params[DRAFT_MODEL]["max_seq_len"] == params["tensorrt_llm"]["max_seq_len"]  # the draft slot has the target's limits
    assert params[DRAFT_MODEL]["yitrt_engine_slot"].startswith("reference")
    assert parse_config(texts[DRAFT_MODEL]).backend == "python"
    assert params["tensorrt_llm_bls"]["yitrt_num_draft_tokens"] == "3"
    assert "TRTLLM_ORCHESTRATOR" not in _launch_script(facts, spec)  # Python models: no orchestrator mode


def test_reference_slot_refusals(tmp_path):
    _, _, (_, problems, _) = _reference(tmp_path)
    assert "needs --num-draft-tokens K" in " | ".join(problems)
    short = _checkpoint(tmp_path / "short", context=1024)
    _, _, (_, problems, _) = _reference(tmp_path, num_draft_tokens=2, draft_ckpt=short)
    assert "the draft checkpoint's context (1024 tokens) is shorter than the target's max_seq_len 4096" in " | ".join(problems)
    other = _checkpoint(tmp_path / "other", vocab=32000)
    _, _, (_, problems, _) = _reference(tmp_path, num_draft_tokens=2, draft_ckpt=other)
    assert "differs from the target's (64000)" in " | ".join(problems)


# -- the repositories -----------------------------------------------------------------------------------------------


def _facts(**changes) -> EngineFacts:
    base = EngineFacts("trtllm", Path("/ENGINE"), "1.2.1", "bfloat16", "float32", 2, 1, 64, 4095, 4096,
                       {"paged_kv_cache": True, "remove_input_padding": True},
                       plan={"kv_cache_free_gpu_mem_fraction": 0.9, "max_tokens_in_paged_kv_cache": 200000}, vocab_size=64000)
    return dataclasses.replace(base, **changes)


def _draft_target() -> tuple[EngineFacts, Speculation]:
    target = _facts(speculative_mode="draft_tokens_external", max_draft_len=8)
    draft = _facts(path=Path("/DRAFT"), tp=1, max_batch_size=16, plan={"max_tokens_in_paged_kv_cache": 100000},
                   gather_generation_logits=True)
    return target, Speculation("draft-target", 8, 4, True, None, draft, 0.45, 0.45, (0, 1), (0,), None, 100000)


def _lookahead() -> tuple[EngineFacts, Speculation]:
    sizes = LookaheadSizes(7, 5, 3)
    return _facts(speculative_mode="lookahead_decoding", max_draft_len=sizes.max_draft_len), Speculation("lookahead", 39, lookahead=sizes)


def _configs(facts, spec, **req):
    texts = render_repository(DeployRequest(Path("/ENGINE"), Path("/REPO"), **req), facts, "1.2", 7, [2], spec)
    return texts, {name: parse_config(text) for name, text in texts.items()}


def _params(cfg) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def test_draft_target_repository(tmp_path):
    texts, cfg = _configs(*_draft_target())
    assert list(cfg) == ["ensemble", "preprocessing", "tensorrt_llm", DRAFT_MODEL, "postprocessing", "tensorrt_llm_bls"]
    target, draft, bls = (_params(cfg[n]) for n in ("tensorrt_llm", DRAFT_MODEL, "tensorrt_llm_bls"))
    assert cfg[DRAFT_MODEL].name == DRAFT_MODEL and cfg[DRAFT_MODEL].backend == "tensorrtllm"
    # the draft is a copy of tensorrt_llm: the same tensors
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg[DRAFT_MODEL].input] == [(t.name, t.data_type, list(t.dims)) for t in cfg["tensorrt_llm"].input]
    assert [t.name for t in cfg[DRAFT_MODEL].output] == [t.name for t in cfg["tensorrt_llm"].output]
    assert (target["gpt_model_path"], draft["gpt_model_path"]) == ("/ENGINE", "/DRAFT")
    assert (target["gpu_device_ids"], draft["gpu_device_ids"]) == ("0,1", "0")
    assert (target["kv_cache_free_gpu_mem_fraction"], draft["kv_cache_free_gpu_mem_fraction"]) == ("0.45", "0.45")
    assert (target["max_tokens_in_paged_kv_cache"], draft["max_tokens_in_paged_kv_cache"]) == ("200000", "100000")  # each its own plan
    assert target["enable_kv_cache_reuse"] == draft["enable_kv_cache_reuse"] == "true"
    assert target["exclude_input_in_output"] == draft["exclude_input_in_output"] == "false"  # safe for either stock BLS (§1.1)
    assert "yitrt_max_draft_len" not in target  # an engine carries its own max_draft_len
    assert bls["tensorrt_llm_model_name"] == "tensorrt_llm" and bls["tensorrt_llm_draft_model_name"] == DRAFT_MODEL
    assert (bls["yitrt_num_draft_tokens"], bls["yitrt_max_draft_len"], bls["yitrt_use_draft_logits"]) == ("4", "8", "true")
    assert cfg[DRAFT_MODEL].max_batch_size == 16 and cfg["tensorrt_llm"].max_batch_size == 64  # never above the draft engine's
    logits = {n: {t.name: t.data_type for t in cfg[n].output}["generation_logits"] for n in ("tensorrt_llm", DRAFT_MODEL)}
    assert logits["tensorrt_llm"] == logits[DRAFT_MODEL]  # the BLS forwards one as the other's draft_logits
    draft_logits = {t.name: t.data_type for t in cfg["tensorrt_llm"].input}["draft_logits"]
    assert draft_logits == logits[DRAFT_MODEL]
    assert cfg["tensorrt_llm"].model_transaction_policy.decoupled == cfg[DRAFT_MODEL].model_transaction_policy.decoupled
    assert "draft of draft-target speculation" in texts[DRAFT_MODEL]


def test_lookahead_repository():
    _, cfg = _configs(*_lookahead())
    params = _params(cfg["tensorrt_llm"])
    assert (params["decoding_mode"], params["lookahead_window_size"], params["lookahead_ngram_size"],
            params["lookahead_verification_set_size"]) == ("lookahead", "7", "5", "3")
    assert DRAFT_MODEL not in cfg and params["exclude_input_in_output"] == "true"
    assert _params(cfg["tensorrt_llm_bls"])["tensorrt_llm_draft_model_name"].startswith("${")  # no draft: left unfilled


def test_plain_repositories_are_unchanged_by_speculation_code():
    _, cfg = _configs(_facts(), None)
    params = _params(cfg["tensorrt_llm"])
    assert params["decoding_mode"] == "${decoding_mode}" and params["gpu_device_ids"] == "${gpu_device_ids}"
    assert "yitrt_num_draft_tokens" not in _params(cfg["tensorrt_llm_bls"])


@pytest.mark.parametrize("name, make", [("draft-target", _draft_target), ("lookahead", _lookahead)])
def test_golden_speculative_repository(name, make):
    texts, _ = _configs(*make())
    folder = GOLDEN / f"1.2-{name}"
    if os.environ.get("YITRT_UPDATE_GOLDEN") == "1":  # regenerate after a deliberate change, then review the diff
        folder.mkdir(parents=True, exist_ok=True)
        for model, text in texts.items():
            (folder / f"{model}.pbtxt").write_text(_stable(text))
    assert sorted(p.stem for p in folder.glob("*.pbtxt")) == sorted(texts)
    for model, text in texts.items():
        assert _stable(text) == (folder / f"{model}.pbtxt").read_text(), f"1.2-{name}/{model}.pbtxt differs from the golden file"


def _stable(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("# Written by yitrt")) + "\n"


def test_orchestrator_launch_and_readme():
    facts, spec = _draft_target()
    script = _launch_script(facts, spec)
    assert "export TRTLLM_ORCHESTRATOR=1\nexport TRTLLM_ORCHESTRATOR_SPAWN_PROCESSES=1\n" in script
    assert "exec mpirun --allow-run-as-root -n 1 \\\n" in script and script.count('"$TRITONSERVER"') == 1
    assert "--pinned-memory-pool-byte-size=0 --enable-peer-access=false --cuda-memory-pool-byte-size=0:0 --cuda-memory-pool-byte-size=1:0" in script
    assert "--load-model" not in script  # no leader-mode ranks
    readme = _readme(DeployRequest(Path("/ENGINE"), Path("/REPO")), facts, "1.2", 7, [], spec)
    assert "## Speculative decoding: draft-target" in readme and STOCK_BLS_LIMITS in readme
    assert "batch size 1 per BLS call and no streaming" in readme and "streams each round's accepted tokens" in readme
    assert "`tensorrt_llm_draft_model_name: tensorrt_llm_draft`" in readme and "`exclude_input_in_output: false`" in readme
    lfacts, lspec = _lookahead()
    readme = _readme(DeployRequest(Path("/ENGINE"), Path("/REPO")), lfacts, "1.2", 7, [], lspec)
    assert "exist only on tensorrt_llm, not on the ensemble or the BLS" in readme and "w <= 7, n <= 5, g <= 3" in readme
    assert "TRTLLM_ORCHESTRATOR" not in _launch_script(lfacts, lspec)


def test_serve_argv_in_orchestrator_mode():
    from yitrt.triton.server import Ports, launch_argv

    argv = launch_argv("/R", 1, "tritonserver", Ports(), orchestrator_gpus=[0, 1])
    assert argv[:4] == ["mpirun", "--allow-run-as-root", "-n", "1"] and argv.count("tritonserver") == 1 and ":" not in argv
    assert argv[-2:] == ["--cuda-memory-pool-byte-size=0:0", "--cuda-memory-pool-byte-size=1:0"]
    with pytest.raises(ValueError):
        launch_argv("/R", 2, "tritonserver", Ports(), orchestrator_gpus=[0])
