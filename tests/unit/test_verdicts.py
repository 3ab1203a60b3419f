"""The one rule of every judgement (``yitrt.verdict``): NaN, None, ±Inf or nothing measured fails, never passes —
checked on each judge that applies it: verify's thresholds and pipeline check, bench's SLO, goodput and best point,
plan's fits and workload, the recipe's verify bounds and smoke expectation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from yitrt.bench.metrics import RequestRecord, Slo, best_point, meets_slo, summarize
from yitrt.errors import UsageError, ValidationError
from yitrt.plan.memory import Workload
from yitrt.recipe import load_recipe
from yitrt.reference.verify import (
    LogitComparison,
    PipelineCheck,
    VerifyReport,
    _judge,
    perplexity,
    thresholds_for,
)
from yitrt.verdict import bound_failure, measured

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("value", [None, NAN, INF, -INF, True, "0.9"])
def test_a_value_that_is_not_a_number_fails_every_bound(value):
    assert not measured(value)
    assert "not a number" in bound_failure("x", value, minimum=0.5)
    assert "not a number" in bound_failure("x", value)  # even with no bound at all


def test_bounds_are_judged_and_a_nan_bound_fails():
    assert bound_failure("x", 0.4, minimum=0.5) and bound_failure("x", -3.0, maximum=2.0, magnitude=True)
    assert bound_failure("x", 0.6, minimum=0.5) is None and bound_failure("x", -1.0, maximum=2.0, magnitude=True) is None
    assert "bound" in bound_failure("x", 0.6, minimum=NAN)


# ---- verify ----------------------------------------------------------------------------------------------------

def _report(comparison, ppl_ref=10.0, ppl_got=10.0, greedy=None, thresholds=None) -> VerifyReport:
    t = {"min_top1": 0.9, "max_ppl_delta_pct": 1.0, "max_logit_diff_rel": 0.1, "min_greedy": 0.5} if thresholds is None else thresholds
    return VerifyReport(Path("c"), Path("m"), None, comparison, ppl_ref, ppl_got,
                        [{"prompt": "p", "matched": 4, "generated": 4}] if greedy is None else greedy, t, [], [], 8, 0.0, [])


def _comparison(got_value=None) -> LogitComparison:
    c = LogitComparison()
    ref = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    got = ref.clone()
    if got_value is not None:
        got[1, 2] = got_value
    c.add(ref, got)
    return c


def test_verify_passes_only_measured_figures():
    hard, loss = _judge(_report(_comparison()))
    assert hard == [] and loss == []


@pytest.mark.parametrize("bad", [NAN, INF])
def test_verify_fails_nonfinite_logits_that_python_max_would_hide(bad):
    c = _comparison(bad)
    assert c.nonfinite == 1 and not math.isfinite(c.max_abs)  # max(0.0, nan) would have been 0.0
    hard, loss = _judge(_report(c))
    assert any("NaN or Inf at 1 of 2 positions" in f for f in hard)
    assert any("max |Δlogit|" in f and "not a number" in f for f in loss)


def test_verify_fails_nan_perplexity_no_positions_no_greedy_and_no_threshold():
    hard, loss = _judge(_report(_comparison(), ppl_got=NAN, greedy=[{"prompt": "p", "matched": 0, "generated": 0}]))
    assert any(f.startswith("perplexity delta") and "not a number" in f for f in loss)
    assert any(f.startswith("greedy tokens matched") and "not a number" in f for f in loss)
    hard, loss = _judge(_report(LogitComparison()))
    assert any("positions compared is 0" in f for f in hard) and any("top-1 agreement" in f for f in loss)
    hard, _ = _judge(_report(_comparison(), thresholds={k: None for k in ("min_top1", "max_ppl_delta_pct")}))
    assert any("every threshold is off" in f for f in hard)


def test_perplexity_of_nothing_or_of_nan_logits_is_nan():
    assert math.isnan(perplexity([], []))
    assert math.isnan(perplexity([torch.full((3, 4), NAN)], [[0, 1, 2]]))
    assert perplexity([torch.zeros(3, 4)], [[0, 1, 2]]) == pytest.approx(4.0)


@pytest.mark.parametrize("value", [NAN, INF, -0.1])
def test_verify_threshold_overrides_must_be_numbers(value):
    spec = type("Spec", (), {"quant_algo": None, "kv_cache_quant_algo": None})()
    with pytest.raises(UsageError, match="min_top1"):
        thresholds_for(spec, {"min_top1": value})


@pytest.mark.parametrize("changes, says", [
    ({"top1_agreement": None}, "top-1"),
    ({"top1_agreement": NAN}, "top-1"),
    ({"ppl_checkpoint": NAN}, "perplexity delta"),
    ({"ppl_recorded": 0.0}, "perplexity delta"),
    ({"positions": 0}, "positions compared"),
])
def test_pipeline_check_never_passes_what_it_did_not_measure(changes, says):
    fields = {"ran": True, "ppl_recorded": 10.0, "ppl_checkpoint": 10.0, "top1_agreement": 1.0, "positions": 16,
              "thresholds": {"min_top1": 0.99, "max_ppl_delta_pct": 1.0}}
    ok = PipelineCheck(**fields)
    ok.judge([])
    assert ok.failures == []
    check = PipelineCheck(**(fields | changes))
    check.judge([])
    assert any(says in f for f in check.failures), check.failures


# ---- bench -----------------------------------------------------------------------------------------------------

def _answered(index, ttft, e2e, tokens):
    r = RequestRecord(index, f"r{index}", tokens, sent_at=0.0)
    r.ttft, r.e2e, r.output_tokens = ttft, e2e, tokens
    r.response_times = [ttft, e2e]
    return r


@pytest.mark.parametrize("kwargs", [{"ttft_ms": NAN}, {"tpot_ms": INF}, {"ttft_ms": 0}, {"tpot_ms": -5}, {"percentile": NAN},
                                    {"percentile": 0}, {"percentile": 101}])
def test_slo_bounds_must_be_judgeable(kwargs):
    with pytest.raises(UsageError):
        Slo(**kwargs)


def test_a_nan_latency_breaks_every_bound():
    slo = Slo(ttft_ms=100, tpot_ms=100)
    assert slo.request_ok(0.05, 0.05)
    assert not slo.request_ok(NAN, 0.05) and not slo.request_ok(0.05, NAN) and not slo.request_ok(None, 0.05)


def test_a_bounded_latency_nobody_measured_does_not_meet_the_slo():
    slo = Slo(ttft_ms=1000, tpot_ms=1000)
    one_token = summarize([_answered(0, 0.01, 0.01, 1), _answered(1, 0.01, 0.01, 1)], slo)  # no TPOT sample at all
    assert one_token["tpot_ms"]["p90"] is None and one_token["meets_slo"] is False
    assert summarize([_answered(0, 0.01, 0.02, 4)], slo)["meets_slo"] is True
    assert summarize([], slo)["meets_slo"] is False


def test_best_point_needs_answers_and_a_measured_throughput():
    good = summarize([_answered(0, 0.01, 0.05, 8)], Slo())
    nothing = summarize([], Slo())
    assert best_point([nothing]) is None
    assert best_point([nothing, good]) == 1
    assert best_point([{**good, "output_token_throughput": NAN}]) is None
    assert meets_slo(nothing | {"counts": {**nothing["counts"], "errors": 0}}, Slo(ttft_ms=5)) is False


# ---- plan and recipes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"kv_fraction": NAN}, {"kv_fraction": 0.0}, {"kv_fraction": 1.5}, {"isl": 0}, {"osl": -1},
                                    {"tokens_per_block": 0}, {"max_seq_len": 0}, {"max_batch_size": True}, {"isl": 1.5}])
def test_a_workload_no_plan_can_size_is_refused(kwargs):
    with pytest.raises(UsageError):
        Workload(**kwargs)


@pytest.mark.parametrize("section, says", [
    ({"serve": {"smoke": {"enabled": True, "expect": ""}}}, "expect"),
    ({"serve": {"smoke": {"enabled": True, "expect": "   "}}}, "expect"),
    ({"verify": {"min_top1": "nan"}}, "min_top1"),
    ({"verify": {"max_ppl_delta": ".inf"}}, "max_ppl_delta"),
])
def test_recipe_checks_that_would_judge_nothing_are_refused(tmp_path, section, says):
    recipe = {"name": "t", "model": {"repo": "01-ai/Yi-1.5-9B-Chat"}, "target": {"gpu": "H100-SXM"}, **section}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe).replace("'nan'", ".nan").replace("'.inf'", ".inf"))
    with pytest.raises(ValidationError) as info:
        load_recipe(path)
    assert any(says in p for p in info.value.problems), info.value.problems
