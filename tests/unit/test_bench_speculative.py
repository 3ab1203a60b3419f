"""`yitrt bench` and speculative decoding, without tritonserver: the gRPC double answers with crafted speculative
outputs (yitrt's per-step ``accepted_draft_tokens`` and TensorRT-LLM's perf metrics), and the bench's per-point
figures are checked against sums worked out by hand (sums over requests, not means of means), a point that measured
nothing reports None, responses whose tokens disagree with their accepted counts are counted, the requests carry
exactly the inputs the options ask for (BLS: num_draft_tokens/return_perf_metrics; tensorrt_llm asked directly:
token ids and the lookahead sizes), bad options are refused before anything is sent, and `bench compare` shows the
speed-up of a speculative run over its baseline."""

from __future__ import annotations

import json
import math

import pytest

from tests.doubles.triton_grpc import ENGINE, ENGINE_INPUTS, INPUTS, MODEL, Reply, TritonDouble
from yitrt.bench.acceptance import PER_STEP, RATE, TOTAL_ACCEPTED, TOTAL_DRAFT, Acceptance, point_figures
from yitrt.bench.compare import compare_reports
from yitrt.bench.loadgen import Load
from yitrt.bench.metrics import RequestRecord
from yitrt.bench.runner import BenchRequest, run_bench
from yitrt.bench.workload import LengthSpec
from yitrt.errors import UsageError
from yitrt.speculation import LookaheadSizes

#: the BLS model of a draft-target deployment: the speculation inputs and the token counts
SPEC_BLS = {**INPUTS, "num_draft_tokens": "TYPE_INT32", "return_perf_metrics": "TYPE_BOOL", "return_num_output_tokens": "TYPE_BOOL"}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from yitrt.synthetic import write_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder, 4096)
    return folder


def spec_stream(steps, k, tokens=None, ids=False, rate=None, per_step=True):
    """The responses of one request that ran ``steps`` (accepted draft tokens per target step), drafting ``k``
    tokens per step: one response per step holding ``tokens[i]`` tokens (default: accepted + 1), each with the
    cumulative totals, then an empty final response. ``ids``: as token ids (tensorrt_llm, which was not asked for
    token counts), else as text with the cumulative num_output_tokens on every response (a yitrt BLS asked for
    them); ``rate``: the acceptance_rate to report (default accepted / drafted); ``per_step``: with yitrt's
    accepted_draft_tokens (else only TensorRT-LLM's cumulative perf metrics, as a stock engine)."""
    replies, accepted, drafted, count, next_id = [], 0, 0, 0, 100
    for i, a in enumerate(steps):
        accepted, drafted = accepted + a, drafted + k
        n = tokens[i] if tokens is not None else a + 1
        count += n
        outputs = {TOTAL_ACCEPTED: ("INT32", [accepted]), TOTAL_DRAFT: ("INT32", [drafted]),
                   RATE: ("FP32", [rate if rate is not None else accepted / drafted])}
        if per_step:
            outputs[PER_STEP] = ("INT32", [a])
        if not ids:
            outputs["num_output_tokens"] = ("INT32", [count])
        if ids:
            replies.append(Reply(ids=list(range(next_id, next_id + n)), outputs=outputs))
            next_id += n
        else:
            replies.append(Reply(text=" w" * n, outputs=outputs))
    replies.append(Reply(final=True, outputs={} if ids else {"num_output_tokens": ("INT32", [count])}))
    return replies


def _bench(double, tmp_path, tok_dir, name="out", **options):
    base = {"num_requests": 2, "isl": LengthSpec(6), "osl": LengthSpec(8), "tokenizer": tok_dir, "metrics_url": "none"}
    return run_bench(BenchRequest(double.url, (Load("concurrency", 1),), tmp_path / name, **{**base, **options})).report


def test_point_figures_are_sums_over_requests_not_means_of_means(tmp_path, tok_dir):
    scripts = {0: spec_stream([2, 0, 1], 3), 1: spec_stream([3, 3], 3)}
    with TritonDouble({MODEL: SPEC_BLS}, lambda n, model, inputs: scripts[n]) as double:
        report = _bench(double, tmp_path, tok_dir, num_draft_tokens=3)
    spec = report["points"][0]["speculation"]
    # request 0: 3 steps, 3 of 9 drafted accepted; request 1: 2 steps, 6 of 6 accepted
    assert (spec["target_steps"], spec["accepted_draft_tokens"], spec["draft_tokens"]) == (5, 9, 15)
    assert spec["mean_accepted_per_step"] == 1.8  # 9 / 5 (the mean of per-request means would be 2.0)
    assert spec["acceptance_rate"] == 0.6  # 9 / 15 (the mean of per-request rates would be 0.6667)
    assert spec["tokens_per_step"] == 2.8  # (9 + 5) / 5
    assert spec["measured"] is True and spec["requests"] == 2 and spec["steps_source"] == {"responses": 2}
    assert spec["accepted_histogram"] == {"0": 1, "1": 1, "2": 1, "3": 2}
    assert spec["cross_check"] == {"responses_checked": 5, "mismatches": 0, "cut_at_end": 0}
    assert spec["totals_disagree"] == 0 and spec["server_rate_disagrees"] == 0
    by_n = {r["request_id"]: n for n, r in enumerate(double.received)}
    per_request = {by_n[r["request_id"]]: r["speculation"] for r in report["points"][0]["requests"]}
    assert per_request[0]["accepted_per_step"] == [2, 0, 1] and per_request[1]["accepted_per_step"] == [3, 3]
    assert (per_request[0]["steps"], per_request[0]["accepted"], per_request[0]["drafted"]) == (3, 3, 9)
    assert [r["output_tokens"] for r in sorted(report["points"][0]["requests"], key=lambda r: by_n[r["request_id"]])] == [6, 8]
    assert report["speculation"]["inputs"] == {"num_draft_tokens": 3, "return_perf_metrics": True}
    # what the BLS received: the draft length and the perf-metrics switch on every request
    assert all(r["inputs"]["num_draft_tokens"] == [3] and r["inputs"]["return_perf_metrics"] == [True] for r in double.received)
    assert not any("mismatch" in w or "tokens other than" in w for w in report["warnings"])


def test_no_speculative_data_is_null_and_said_so(tmp_path, tok_dir, cli):
    zeros = [Reply(text=" a", outputs={TOTAL_ACCEPTED: ("INT32", [0]), TOTAL_DRAFT: ("INT32", [0]), RATE: ("FP32", [math.nan])}),
             Reply(text=" b"), Reply(final=True)]
    with TritonDouble({MODEL: SPEC_BLS}, lambda n, model, inputs: zeros) as double:
        report = _bench(double, tmp_path, tok_dir, num_draft_tokens=0)
        assert all(r["inputs"]["num_draft_tokens"] == [0] for r in double.received)  # 0 is sent: speculation off
        out = tmp_path / "cli"
        done = cli("bench", double.url, "--concurrency", "1", "--num-requests", "2", "--isl", "6", "--osl", "4",
                   "--tokenizer", str(tok_dir), "--metrics-url", "none", "--num-draft-tokens", "0", "--out", str(out))
    spec = report["points"][0]["speculation"]
    assert spec["measured"] is False and spec["requests"] == 2  # the outputs came, but nothing was drafted
    for key in ("target_steps", "accepted_draft_tokens", "draft_tokens", "mean_accepted_per_step", "acceptance_rate",
                "tokens_per_step", "accepted_histogram"):
        assert spec[key] is None, key
    assert spec["cross_check"]["mismatches"] is None  # nothing could be checked: not a count of 0
    assert report["points"][0]["requests"][0]["speculation"]["server_acceptance_rate"] is None  # NaN is not kept
    json.dumps(report, allow_nan=False)
    assert done.returncode == 0, done.stderr
    assert "speculation c=1: no speculation measured" in done.stdout

    with TritonDouble() as plain:  # no speculative outputs at all, no options: no inputs sent, nothing measured
        report = _bench(plain, tmp_path, tok_dir, name="plain")
    spec = report["points"][0]["speculation"]
    assert spec["measured"] is False and spec["requests"] == 0 and spec["mean_accepted_per_step"] is None
    assert report["points"][0]["requests"][0]["speculation"] is None and report["speculation"]["requested"] is False


def test_options_send_only_what_they_ask_for(tmp_path, tok_dir):
    with TritonDouble({MODEL: SPEC_BLS}) as double:
        _bench(double, tmp_path, tok_dir, name="none")
        _bench(double, tmp_path, tok_dir, name="perf", perf_metrics=True)
        _bench(double, tmp_path, tok_dir, name="off", num_draft_tokens=4, perf_metrics=False)
    sent = [r["inputs"] for r in double.received]
    assert all("num_draft_tokens" not in s and "return_perf_metrics" not in s for s in sent[:2])
    assert all(s["return_perf_metrics"] == [True] and "num_draft_tokens" not in s for s in sent[2:4])
    assert all(s["num_draft_tokens"] == [4] and "return_perf_metrics" not in s for s in sent[4:])


def test_mismatched_token_counts_are_counted_and_a_cut_last_step_is_not(tmp_path, tok_dir):
    scripts = {0: spec_stream([1, 0, 2], 2, tokens=[2, 3, 2]),  # ok; 3 tokens for 1 step with 0 accepted; last cut short
               1: spec_stream([1, 1], 2, tokens=[2, 5])}  # ok; the last step holds more than it accepted + 1
    with TritonDouble({MODEL: SPEC_BLS}, lambda n, model, inputs: scripts[n]) as double:
        report = _bench(double, tmp_path, tok_dir, num_draft_tokens=2)
    spec = report["points"][0]["speculation"]
    assert spec["cross_check"] == {"responses_checked": 5, "mismatches": 2, "cut_at_end": 1}
    assert (spec["target_steps"], spec["accepted_draft_tokens"], spec["draft_tokens"]) == (5, 5, 10)
    assert any("c=1: 2 of 5 responses hold a number of tokens other than" in w for w in report["warnings"])


def test_counts_without_every_response_counted_are_not_checked():
    a = Acceptance()
    a.take([2], {TOTAL_ACCEPTED: 2, TOTAL_DRAFT: 3, RATE: 2 / 3}, None)  # no token count on this response
    a.take([1], {TOTAL_ACCEPTED: 3, TOTAL_DRAFT: 6, RATE: 0.9}, 2)  # the server's rate disagrees with 3 / 6
    a.take(None, {TOTAL_ACCEPTED: None, TOTAL_DRAFT: None, RATE: None}, 7)  # no speculative output: not recorded
    f = a.figures(5)
    assert (f["steps"], f["accepted"], f["drafted"], f["responses_checked"], f["mismatches"]) == (2, 3, 6, 1, 0)
    assert len(a.responses) == 2
    record = RequestRecord(0, "r0", 5, output_tokens=5, e2e=1.0)
    record.acceptance = a
    assert point_figures([record])["server_rate_disagrees"] == 1


def test_stream_steps_need_the_count_on_every_step():
    """A streamed tensorrt_llm answer: one step per response, accepted = the change of the cumulative count; one
    step without the count and the steps come from the totals instead (nothing is checked then)."""
    def steps(missing):
        a = Acceptance()
        a.take(None, {TOTAL_ACCEPTED: 2, TOTAL_DRAFT: 4, RATE: 0.5}, 3, one_step=True)
        if missing:
            a.take(None, {TOTAL_ACCEPTED: None, TOTAL_DRAFT: None, RATE: None}, 1, one_step=True)
        a.take(None, {TOTAL_ACCEPTED: 3, TOTAL_DRAFT: 8, RATE: 3 / 8}, 2, one_step=True)
        a.take(None, {TOTAL_ACCEPTED: None, TOTAL_DRAFT: None, RATE: None}, 0, one_step=True)  # the empty final response
        return a.figures(6 if missing else 5)

    whole = steps(missing=False)
    assert (whole["steps_source"], whole["accepted_per_step"], whole["responses_checked"], whole["mismatches"]) == ("stream", [2, 1], 2, 0)
    gap = steps(missing=True)
    assert (gap["steps_source"], gap["steps"], gap["accepted"], gap["responses_checked"]) == ("totals", 3, 3, 0)


def test_stock_totals_give_steps_from_the_output_tokens():
    """A stock engine reports only the totals: steps = output tokens − accepted; a failed or warmup request is left out."""
    records = []
    for i, (out, acc, drafted, warmup, error) in enumerate(((10, 4, 8, False, None), (7, 1, 4, False, None),
                                                              (9, 9, 9, True, None), (3, 3, 3, False, "boom"))):
        r = RequestRecord(i, f"r{i}", out, warmup=warmup, output_tokens=out, e2e=1.0, error=error)
        r.acceptance.take(None, {TOTAL_ACCEPTED: acc, TOTAL_DRAFT: drafted, RATE: acc / drafted}, None)
        records.append(r)
    spec = point_figures(records)
    assert spec["steps_source"] == {"totals": 2} and spec["target_steps"] == 6 + 6
    assert spec["mean_accepted_per_step"] == round(5 / 12, 4) and spec["acceptance_rate"] == round(5 / 12, 4)
    assert spec["accepted_histogram"] is None and spec["cross_check"]["mismatches"] is None


def test_lookahead_asks_tensorrt_llm_with_token_ids(tmp_path, tok_dir):
    from yitrt.reference.verify import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    # as a stock engine answers: no per-step output, the cumulative perf metrics on every streamed step's response
    scripts = {0: spec_stream([2, 1], 15, ids=True, per_step=False),
               1: spec_stream([1, 0, 3], 15, tokens=[2, 2, 4], ids=True, per_step=False)}  # the 2nd step's 2 tokens: 1 expected
    with TritonDouble({ENGINE: ENGINE_INPUTS}, lambda n, model, inputs: scripts[n]) as double:
        report = _bench(double, tmp_path, tok_dir, model=ENGINE, lookahead=LookaheadSizes(4, 3, 4))
    assert len(double.received) == 2
    for r in double.received:
        sent = r["inputs"]
        assert r["model"] == ENGINE and "text_input" not in sent
        assert sent["input_lengths"] == [len(sent["input_ids"])] and len(sent["input_ids"]) == 6  # --isl 6, exactly
        assert sent["request_output_len"] == [8] and sent["streaming"] == [True] and sent["end_id"] == [-1]
        assert (sent["lookahead_window_size"], sent["lookahead_ngram_size"], sent["lookahead_verification_set_size"]) == ([4], [3], [4])
        assert sent["return_perf_metrics"] == [True] and sent["exclude_input_in_output"] == [True]
    by_n = {r["request_id"]: n for n, r in enumerate(double.received)}
    record = next(r for r in report["points"][0]["requests"] if by_n[r["request_id"]] == 0)
    assert record["output_tokens"] == 5 and record["token_source"] == "output_ids"
    assert record["text"] == tokenizer.decode(list(range(100, 105)), skip_special_tokens=True)
    assert len(record["response_ms"]) == 2  # the two responses with tokens; the empty final one is no arrival
    assert record["speculation"]["accepted_per_step"] == [2, 1] and record["speculation"]["steps_source"] == "stream"
    spec = report["points"][0]["speculation"]
    # 2 + 3 steps (one per streamed response), 3 + 4 accepted (the changes of the cumulative count), 30 + 45 drafted
    assert (spec["target_steps"], spec["accepted_draft_tokens"], spec["draft_tokens"]) == (5, 7, 75)
    assert spec["steps_source"] == {"stream": 2} and spec["mean_accepted_per_step"] == 1.4
    assert spec["cross_check"] == {"responses_checked": 5, "mismatches": 1, "cut_at_end": 0}
    assert report["target"]["entry"] == "tokens" and report["speculation"]["lookahead"] == [4, 3, 4]


def test_bad_speculation_options_are_refused_before_connecting(cli, tmp_path):
    out = tmp_path / "never"
    for args, words in ((["--lookahead", "4,3,4"], "pass --model tensorrt_llm"),
                        (["--lookahead", "4,3", "--model", "tensorrt_llm"], "--lookahead takes W,N,G"),
                        (["--lookahead", "0,3,4", "--model", "tensorrt_llm"], "window must be >= 1"),
                        (["--lookahead", "4,1,4", "--model", "tensorrt_llm"], "ngram 1 needs window 1"),
                        (["--num-draft-tokens", "65"], "--num-draft-tokens must be an integer from 1 to 64"),
                        (["--num-draft-tokens", "-1"], "--num-draft-tokens must be an integer from 1 to 64"),
                        (["--num-draft-tokens", "2", "--lookahead", "4,3,4", "--model", "tensorrt_llm"], "pass one of them")):
        done = cli("bench", "localhost:1", *args, "--out", str(out))
        assert done.returncode == 2, (args, done.stderr)
        assert words in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, (args, done.stderr)
        assert not out.exists()


def test_inputs_the_model_lacks_are_refused_before_any_request(tmp_path, tok_dir):
    with TritonDouble() as double:  # the plain BLS: no num_draft_tokens, no return_perf_metrics
        with pytest.raises(UsageError, match="has no num_draft_tokens input"):
            _bench(double, tmp_path, tok_dir, name="a", num_draft_tokens=2)
        with pytest.raises(UsageError, match="has no return_perf_metrics input"):
            _bench(double, tmp_path, tok_dir, name="b", perf_metrics=True)
        assert double.received == [] and not (tmp_path / "a").exists()
    with TritonDouble({ENGINE: {k: v for k, v in ENGINE_INPUTS.items() if not k.startswith("lookahead")}}) as double:
        with pytest.raises(UsageError, match="has no lookahead_window_size, lookahead_ngram_size"):
            _bench(double, tmp_path, tok_dir, name="c", model=ENGINE, lookahead=LookaheadSizes(2, 2, 1))
        assert double.received == []
    with TritonDouble({ENGINE: ENGINE_INPUTS}) as double:  # token ids need the tokenizer
        with pytest.raises(UsageError, match="takes token ids"):
            run_bench(BenchRequest(double.url, (Load("concurrency", 1),), tmp_path / "d", model=ENGINE, metrics_url="none"))


def _spec(measured, per_step=None, rate=None, tokens=None):
    return {"measured": measured, "mean_accepted_per_step": per_step, "acceptance_rate": rate, "tokens_per_step": tokens,
            "target_steps": 10 if measured else None}


def _report(points, requested):
    return {"kind": "yitrt-bench", "mode": "concurrency", "workload": {"dataset": "synthetic"}, "slo": None, "best": 0,
            "speculation": {"requested": requested},
            "points": [{"load": {"label": label}, "output_token_throughput": tps, "request_throughput": 1.0, "goodput": None,
                        "ttft_ms": {"p50": ttft, "p90": ttft, "p99": ttft}, "tpot_ms": {"p50": tpot, "p90": tpot, "p99": tpot},
                        "e2e_ms": {"p50": 100.0, "p99": 100.0}, "counts": {"errors": 0}, "speculation": spec}
                       for label, tps, ttft, tpot, spec in points]}


def test_compare_shows_the_speedup_over_the_baseline(tmp_path, cli):
    baseline = _report([("c=1", 100.0, 50.0, 20.0, _spec(False)), ("c=4", 300.0, 80.0, 25.0, _spec(False))], True)
    spec = _report([("c=1", 150.0, 55.0, 12.0, _spec(True, 1.8, 0.6, 2.8)), ("c=4", 330.0, 80.0, 20.0, _spec(True, 1.2, 0.4, 2.2))], True)
    result = compare_reports(baseline, spec)
    c1, c4 = result["speedup"]
    assert (c1["load"], c1["output_throughput_ratio"], c1["tpot_p50_ratio"], c1["ttft_p50_ratio"]) == ("c=1", 1.5, 0.6, 1.1)
    assert (c4["output_throughput_ratio"], c4["tpot_p50_ratio"], c4["ttft_p50_ratio"]) == (1.1, 0.8, 1.0)
    assert c1["b_speculation"]["acceptance_rate"] == 0.6 and c1["b_speculation"]["tokens_per_step"] == 2.8
    assert c1["a_speculation"]["measured"] is False and c1["a_speculation"]["acceptance_rate"] is None
    rows = {r["metric"]: r for r in result["points"][0]["rows"]}
    assert rows["acceptance rate"]["a"] is None and rows["acceptance rate"]["b"] == 0.6 and rows["acceptance rate"]["better"] is None
    assert rows["tokens/target step"]["b"] == 2.8 and rows["accepted draft tokens/step"]["b"] == 1.8
    assert not any("pass the baseline first" in w for w in result["warnings"])
    assert any("pass the baseline first" in w for w in compare_reports(spec, baseline)["warnings"])
    plain = _report([("c=1", 100.0, 50.0, 20.0, _spec(False))], False)
    assert compare_reports(plain, plain)["speedup"] == []  # no speculation on either side: no speed-up table

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(baseline))
    b.write_text(json.dumps(spec))
    done = cli("bench", "compare", str(a), str(b), "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["speedup"][0]["output_throughput_ratio"] == 1.5 and shown["speedup"][1]["tpot_p50_ratio"] == 0.8
    text = cli("bench", "compare", str(a), str(b))
    assert text.returncode == 0 and "speed-up" in text.stdout and "1.500" in text.stdout and "60.0%" in text.stdout
