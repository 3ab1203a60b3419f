"""Speculative builds: golden argv for a draft-target target, its draft (with and without draft logits) and a lookahead
engine, each parsed by the independent 1.2 parser double; the limits trtllm-build derives; every refusal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.doubles.trtllm_build_1_2 import parser as trtllm_12_parser
from tests.unit.test_build_argv import write_checkpoint
from yitrt.build.argv import assemble
from yitrt.build.runner import BuildRequest, build_engine
from yitrt.build.speculative import ENGINE_MODE_VALUES, engine_speculation, parse_lookahead, speculative_build
from yitrt.errors import UsageError, ValidationError
from yitrt.plan.gpus import get_gpu

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "build"

#: golden name → (target or engine checkpoint, pair checkpoint or None, speculative_build kwargs, GPU)
CASES = {
    "spec-yi34b-fp8-tp2-h100-target-k4": ("target", "draft", dict(speculative="draft-target", max_draft_len=4), "H100-SXM"),
    "spec-yi6b-fp8-tp2-h100-draft-k4": ("draft", "target", dict(draft_engine=True, max_draft_len=4), "H100-SXM"),
    "spec-yi6b-fp8-tp2-h100-draft-logits-k4": ("draft", "target", dict(draft_engine=True, max_draft_len=4, use_draft_logits=True), "H100-SXM"),
    "spec-yi9b-bf16-l40s-lookahead-434": ("la", None, dict(speculative="lookahead", lookahead="4,3,4"), "L40S"),
}


@pytest.fixture
def checkpoints(tmp_path):
    return {
        "target": write_checkpoint(tmp_path / "target", "01-ai/Yi-34B-Chat", "fp8", "fp8", tp=2),
        "draft": write_checkpoint(tmp_path / "draft", "01-ai/Yi-6B-Chat", "fp8", "fp8", tp=2),
        "la": write_checkpoint(tmp_path / "la", "01-ai/Yi-1.5-9B-Chat"),
        "tmp": tmp_path,
    }


def _spec(checkpoints, name):
    engine, pair, kwargs, gpu = CASES[name]
    speculation = speculative_build(**kwargs, pair=checkpoints[pair] if pair else None)
    return assemble(checkpoints[engine], get_gpu(gpu), trtllm_version="1.2", speculation=speculation)


def _pairs(argv: list[str]) -> dict[str, str | bool]:
    out: dict[str, str | bool] = {}
    i = 1
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[argv[i][2:]] = argv[i + 1]
            i += 2
        else:
            out[argv[i][2:]] = True
            i += 1
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_speculative_argv(checkpoints, name):
    spec = _spec(checkpoints, name)
    root = str(checkpoints["tmp"])
    argv = [a.replace(root, "/TMP") for a in spec.argv(Path("/ENGINE"))]
    config = spec.build_config()
    golden = GOLDEN / f"{name}.json"
    record = {"argv": argv, "limits": config["limits"], "engine_limits": config["engine_limits"], "speculative": config["speculative"]}
    record["speculative"].pop("planned_with", None)
    if os.environ.get("YITRT_UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(record, indent=1) + "\n")
    assert record == json.loads(golden.read_text())
    args = trtllm_12_parser().parse_args(argv[1:])  # argparse exits on a flag or value 1.2 lacks
    assert not args.gather_context_logits and not args.gather_all_token_logits


def test_target_argv_carries_mode_draft_len_and_paged_context_fmha(checkpoints):
    spec = _spec(checkpoints, "spec-yi34b-fp8-tp2-h100-target-k4")
    flags = _pairs(spec.argv(Path("/E")))
    assert flags["speculative_decoding_mode"] == "draft_tokens_external" and flags["max_draft_len"] == "4"
    assert flags["use_paged_context_fmha"] == "enable" and flags["max_beam_width"] == "1"
    assert "gather_generation_logits" not in flags and "gather_context_logits" not in flags
    # the argv carries the sequence length asked for; the engine gets +K (trtllm-build adds it)
    lim, eng = spec.limits, spec.build_config()["engine_limits"]
    assert eng["max_seq_len"] == lim["max_seq_len"] + 4 and eng["max_draft_len"] == 4
    assert int(flags["max_num_tokens"]) >= lim["max_batch_size"] * 5


def test_draft_is_an_ordinary_engine_with_logits_only_when_used(checkpoints):
    plain = _pairs(_spec(checkpoints, "spec-yi6b-fp8-tp2-h100-draft-k4").argv(Path("/E")))
    logits = _pairs(_spec(checkpoints, "spec-yi6b-fp8-tp2-h100-draft-logits-k4").argv(Path("/E")))
    for flags in (plain, logits):
        assert "speculative_decoding_mode" not in flags and "max_draft_len" not in flags
        assert flags["use_paged_context_fmha"] == "enable"
    assert "gather_generation_logits" not in plain and logits["gather_generation_logits"] is True


def test_both_builds_of_a_pair_get_the_same_batch_and_the_planned_split(checkpoints):
    target = _spec(checkpoints, "spec-yi34b-fp8-tp2-h100-target-k4")
    draft = _spec(checkpoints, "spec-yi6b-fp8-tp2-h100-draft-k4")
    assert target.limits["max_batch_size"] == draft.limits["max_batch_size"] == target.pair.max_batch_size
    assert target.limits["max_seq_len"] == draft.limits["max_seq_len"]
    assert target.pair.triton() == draft.pair.triton()
    # alone, the target would claim the whole GPU: a larger batch than the pair can hold
    alone = assemble(checkpoints["target"], get_gpu("H100-SXM"), speculation=speculative_build("draft-target", max_draft_len=4))
    assert alone.limits["max_batch_size"] > target.limits["max_batch_size"] and alone.pair is None
    assert any("planned alone" in n for n in alone.notes)


def test_lookahead_draft_len_comes_from_the_formula_and_raises_max_num_tokens(checkpoints):
    small = _spec(checkpoints, "spec-yi9b-bf16-l40s-lookahead-434")
    assert _pairs(small.argv(Path("/E")))["max_draft_len"] == "15"  # (4,3,4) → 15
    big = assemble(checkpoints["la"], get_gpu("L40S"), speculation=speculative_build("lookahead", lookahead="7,7,7"), max_batch_size=128)
    flags = _pairs(big.argv(Path("/E")))
    assert flags["speculative_decoding_mode"] == "lookahead_decoding" and flags["max_draft_len"] == "83"
    assert int(flags["max_num_tokens"]) == 128 * 84  # max_batch_size × (D + 1), what trtllm-build would set
    assert any("raised from 8192" in n for n in big.plan.notes)
    assert big.plan.blocks_per_sequence == -(-(1024 + 512 + 83) // 32)  # each sequence's blocks hold its D draft tokens


def test_speculative_option_contradictions_are_refused_together():
    with pytest.raises(UsageError) as info:
        speculative_build("lookahead", lookahead="7,7,7", max_draft_len=3, use_draft_logits=True, max_beam_width=4)
    text = str(info.value)
    assert "beam width 1 only" in text and "derived for lookahead" in text and "--use-draft-logits" in text
    with pytest.raises(UsageError, match="needs --max-draft-len"):
        speculative_build("draft-target")
    with pytest.raises(UsageError, match="from 1 to 64"):
        speculative_build("draft-target", max_draft_len=65)
    with pytest.raises(UsageError, match="no EAGLE heads exist for Yi"):
        speculative_build("eagle")
    with pytest.raises(UsageError, match="Medusa"):
        speculative_build("medusa")
    with pytest.raises(UsageError, match="--max-draft-len needs --speculative"):
        speculative_build(None, max_draft_len=4)
    with pytest.raises(UsageError, match="pass it with --draft-engine"):
        speculative_build("draft-target", max_draft_len=4, use_draft_logits=True)
    with pytest.raises(UsageError, match="W,N,G"):
        parse_lookahead("4,3")
    with pytest.raises(UsageError, match="ngram 1 needs window 1"):
        speculative_build("lookahead", lookahead="4,1,4")
    with pytest.raises(UsageError, match="drafts no token"):
        speculative_build("lookahead", lookahead="1,1,0")
    assert speculative_build(None) is None
    assert speculative_build("lookahead").draft_len == 15  # DEFAULT_LOOKAHEAD (4, 3, 4)


def test_context_logit_gathering_is_refused_with_the_references_text(checkpoints):
    profile = checkpoints["tmp"] / "logits.yaml"
    profile.write_text("name: logits\nsummary: test\nextends: auto\nflags:\n  gather_context_logits: {value: true, why: test}\n")
    with pytest.raises(ValidationError) as info:
        assemble(checkpoints["target"], get_gpu("H100-SXM"), plugins=str(profile),
                 speculation=speculative_build("draft-target", max_draft_len=4))
    assert "Gather context logits is not support with draft len > 0" in str(info.value)
    every = checkpoints["tmp"] / "all.yaml"
    every.write_text("name: all\nsummary: test\nextends: auto\nflags:\n  gather_all_token_logits: {value: true, why: test}\n")
    with pytest.raises(ValidationError, match="gather_all_token_logits gathers context logits"):
        assemble(checkpoints["la"], get_gpu("L40S"), plugins=str(every), speculation=speculative_build("lookahead"))
    # without speculation the same profile builds
    assert assemble(checkpoints["target"], get_gpu("H100-SXM"), plugins=str(profile)).speculation is None


def test_paged_context_fmha_is_required_for_draft_target(checkpoints):
    off = checkpoints["tmp"] / "off.yaml"
    off.write_text("name: off\nsummary: test\nextends: auto\nflags:\n  use_paged_context_fmha: {value: disable, why: test}\n")
    with pytest.raises(ValidationError, match="needs --use_paged_context_fmha enable on the draft"):
        assemble(checkpoints["draft"], get_gpu("H100-SXM"), plugins=str(off), speculation=speculative_build(draft_engine=True))
    int8kv = write_checkpoint(checkpoints["tmp"] / "int8kv", "01-ai/Yi-6B-Chat", "int8-sq", "int8")
    with pytest.raises(ValidationError, match="needs paged context FMHA on the target"):
        assemble(int8kv, get_gpu("A100-80GB"), speculation=speculative_build("draft-target", max_draft_len=4))


def test_a_mismatched_pair_is_refused(checkpoints):
    wide = write_checkpoint(checkpoints["tmp"] / "wide", "01-ai/Yi-6B-Chat", "fp8", tp=4)
    with pytest.raises(ValidationError, match="the draft's tp 4 exceeds the target's 2"):
        assemble(checkpoints["target"], get_gpu("H100-SXM"), speculation=speculative_build("draft-target", max_draft_len=4, pair=wide))
    with pytest.raises(ValidationError, match="speculative decoding needs SM >= 80"):
        assemble(checkpoints["la"], get_gpu("T4"), speculation=speculative_build("lookahead"))


def test_engine_config_mode_values_round_trip():
    assert engine_speculation({"speculative_decoding_mode": 2, "max_draft_len": 4}) == ("draft_tokens_external", 4)
    assert engine_speculation({"speculative_decoding_mode": 8, "max_draft_len": 15}) == ("lookahead_decoding", 15)
    assert engine_speculation({"speculative_decoding_mode": 1, "max_draft_len": 0}) == (None, 0)
    assert engine_speculation({}) == (None, 0)
    assert ENGINE_MODE_VALUES["draft_tokens_external"] == 2 and ENGINE_MODE_VALUES["lookahead_decoding"] == 8
    with pytest.raises(UsageError):
        engine_speculation({"speculative_decoding_mode": 3})


def test_dry_run_reports_the_speculative_build(checkpoints):
    result = build_engine(BuildRequest(checkpoint=checkpoints["target"], out=checkpoints["tmp"] / "engine", gpu="H100-SXM", dry_run=True,
                                       speculative="draft-target", max_draft_len=4, pair_checkpoint=checkpoints["draft"]))
    data = result.to_json()
    assert data["dry_run"] and "--speculative_decoding_mode" in data["argv"]
    cfg = data["build_config"]
    assert cfg["speculative"]["role"] == "target" and cfg["engine_limits"]["max_seq_len"] == cfg["limits"]["max_seq_len"] + 4
    pair = cfg["plan"]["pair"]
    assert pair["max_batch_size"] == cfg["limits"]["max_batch_size"] and set(pair["triton"]) == {"tensorrt_llm", "tensorrt_llm_draft"}


def test_build_dry_run_cli_prints_the_argv_and_refuses_bad_combinations(cli, checkpoints):
    out = str(checkpoints["tmp"] / "engine")
    shown = cli("build", str(checkpoints["target"]), "--out", out, "--gpu", "H100-SXM", "--dry-run",
                "--speculative", "draft-target", "--max-draft-len", "4", "--draft", str(checkpoints["draft"]))
    assert shown.returncode == 0, shown.stderr
    first = shown.stdout.splitlines()[0]
    assert "--speculative_decoding_mode draft_tokens_external --max_draft_len 4" in first and "--use_paged_context_fmha enable" in first
    assert "# speculative: target" in shown.stdout and "tensorrt_llm_draft" in shown.stdout
    draft = cli("build", str(checkpoints["draft"]), "--out", out, "--gpu", "H100-SXM", "--dry-run", "--draft-engine",
                "--use-draft-logits", "--target", str(checkpoints["target"]), "--max-draft-len", "4", "--json")
    argv = json.loads(draft.stdout)["argv"]
    assert "--gather_generation_logits" in argv and "--speculative_decoding_mode" not in argv
    la = cli("build", str(checkpoints["la"]), "--out", out, "--gpu", "L40S", "--dry-run", "--speculative", "lookahead",
             "--lookahead", "7,7,7", "--max-batch-size", "8")
    assert "--speculative_decoding_mode lookahead_decoding --max_draft_len 83" in la.stdout
    for args, text in ((("--speculative", "eagle"), "no EAGLE heads"),
                       (("--speculative", "draft-target", "--max-draft-len", "4", "--max-beam-width", "2"), "beam width 1 only"),
                       (("--speculative", "draft-target", "--max-draft-len", "4", "--target", str(checkpoints["draft"])), "--target is for the draft build"),
                       (("--lookahead", "4,3,4"), "--lookahead needs --speculative")):
        bad = cli("build", str(checkpoints["target"]), "--out", out, "--gpu", "H100-SXM", "--dry-run", *args)
        assert bad.returncode == 2 and text in bad.stderr, (args, bad.stderr)
