"""`yitrt bench` pieces without a server: metric definitions on hand-made records, prompt lengths from a real
tokenizer, dataset checks, report comparison, and the CLI refusing bad options before connecting."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from yitrt.bench.compare import compare_reports, load_report
from yitrt.bench.metrics import RequestRecord, Slo, best_point, percentile, summarize
from yitrt.bench.workload import LengthSpec, PromptFactory, load_dataset, synthetic_prompts
from yitrt.errors import UsageError


def _record(index, sent, ttft, e2e, tokens, *, error=None, warmup=False, max_tokens=None):
    r = RequestRecord(index, f"r{index}", max_tokens or tokens or 1, warmup=warmup, sent_at=sent, scheduled_at=sent)
    if error is None:
        r.ttft, r.e2e, r.output_tokens, r.input_tokens = ttft, e2e, tokens, 10
        r.response_times = [ttft + (e2e - ttft) * i / max(1, tokens - 1) for i in range(tokens)]
    else:
        r.e2e, r.error = e2e, error
    return r


def test_percentile_matches_numpy():
    rng = random.Random(0)
    values = [rng.random() for _ in range(37)]
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_summarize_counts_window_throughput_tpot_and_goodput():
    records = [
        _record(0, 0.0, 0.1, 1.0, 10, warmup=True),     # warmup: kept, not measured
        _record(1, 1.0, 0.2, 2.0, 10),                  # ends at 3.0; TPOT 0.2 s
        _record(2, 1.5, 0.5, 1.4, 4),                   # ends at 2.9; TPOT 0.3 s; TTFT over the bound
        _record(3, 2.0, None, 3.0, None, error="boom"),  # ends at 5.0: the window runs to the failure
        _record(4, 2.5, 0.1, 0.1, 1),                   # one token: no TPOT
    ]
    m = summarize(records, Slo(ttft_ms=300, tpot_ms=250))
    assert m["counts"] == {"sent": 4, "answered": 3, "errors": 1, "error_messages": {"boom": 1}, "warmup": 1}
    assert m["duration_s"] == pytest.approx(4.0)
    assert m["request_throughput"] == pytest.approx(3 / 4) and m["output_token_throughput"] == pytest.approx(15 / 4)
    assert m["tpot_ms"]["count"] == 2 and m["tpot_ms"]["mean"] == pytest.approx((200 + 300) / 2)
    assert m["good_requests"] == 2 and m["goodput"] == pytest.approx(2 / 4)  # record 2 misses TTFT; 4 has no TPOT to miss
    assert m["ttft_ms"]["max"] == pytest.approx(500) and m["e2e_ms"]["min"] == pytest.approx(100)
    assert m["meets_slo"] is False  # an error fails the point
    assert m["itl_ms"]["count"] == 9 + 3


def test_summarize_without_slo_and_best_point():
    fast = summarize([_record(0, 0.0, 0.1, 1.0, 10), _record(1, 0.0, 0.1, 1.0, 10)], Slo())
    assert fast["goodput"] is None and fast["meets_slo"] is None
    slo = Slo(ttft_ms=150, percentile=50)
    points = [summarize([_record(0, 0.0, 0.1, 1.0, 10)], slo),                              # 10 tok/s, meets
              summarize([_record(0, 0.0, 0.1, 0.5, 10), _record(1, 0.0, 0.2, 0.5, 10)], slo),  # 40 tok/s, p50 TTFT 150: meets
              summarize([_record(0, 0.0, 0.3, 0.5, 50)], slo)]                              # 100 tok/s, misses
    assert [p["meets_slo"] for p in points] == [True, True, False]
    assert best_point(points) == 1
    assert best_point([summarize([_record(0, 0.0, 0.3, 0.5, 50)], slo)]) is None


def test_length_spec_parses_and_refuses():
    assert LengthSpec.parse("128,16", "--isl") == LengthSpec(128, 16.0)
    assert LengthSpec.parse("64", "--osl").draw(random.Random(0)) == 64
    spec = LengthSpec(100, 30)
    draws = [spec.draw(random.Random(1), cap=120) for _ in range(5)]
    assert draws == [spec.draw(random.Random(1), cap=120) for _ in range(5)] and max(draws) <= 120
    for bad in ("x", "0", "10,-1", "1,2,3"):
        with pytest.raises(UsageError, match="--isl"):
            LengthSpec.parse(bad, "--isl")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from yitrt.reference.verify import load_tokenizer
    from yitrt.synthetic import write_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder, 4096)
    return load_tokenizer(folder)


@pytest.mark.parametrize("add_special", [True, False])
def test_synthetic_prompts_have_exact_token_lengths(tokenizer, add_special):
    factory = PromptFactory(tokenizer, add_special_tokens=add_special, seed=5)
    prompts = synthetic_prompts(factory, 30, LengthSpec(40, 15), LengthSpec(8, 2))
    for p in prompts:
        assert len(tokenizer(p.text, add_special_tokens=add_special)["input_ids"]) == p.input_tokens
    lengths = [p.input_tokens for p in prompts]
    assert len(set(lengths)) > 5 and min(p.max_tokens for p in prompts) >= 1
    assert len({p.text for p in prompts}) == 30  # no two prompts alike
    again = synthetic_prompts(PromptFactory(tokenizer, add_special_tokens=add_special, seed=5), 30, LengthSpec(40, 15), LengthSpec(8, 2))
    assert again == prompts


def test_a_small_vocabulary_refuses_synthetic_prompts_only(tmp_path):
    """A tokenizer with too few whole words cannot draw synthetic prompts (the refusal names --dataset), but it still
    counts and encodes a dataset's prompts: the check waits until a synthetic prompt is drawn."""
    from yitrt.reference.verify import load_tokenizer
    from yitrt.synthetic import write_tokenizer

    write_tokenizer(tmp_path, 64)
    factory = PromptFactory(load_tokenizer(tmp_path), add_special_tokens=False, seed=0)
    assert factory.count("hello world") == len(factory.encode("hello world")) > 0
    with pytest.raises(UsageError, match="too few whole-word tokens") as info:
        factory.make(16)
    assert "--dataset" in info.value.hint


def test_dataset_lines_are_checked_before_anything_is_sent(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello there", "max_tokens": 5}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    prompts = load_dataset(good, LengthSpec(7))
    assert [(p.text, p.max_tokens, len(p.messages)) for p in prompts] == [("hello there", 5, 0), ("", 7, 1)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n[1, 2]\n{"prompt": ""}\n{"text": "x", "max_tokens": 0}\nnot json\n')
    with pytest.raises(UsageError) as info:
        load_dataset(bad, LengthSpec(7))
    assert "line 2" in info.value.message and "line 3" in info.value.message and "line 4" in info.value.message
    assert "1 more" in info.value.message


def _report(label_values):
    points = [{"load": {"label": label}, "output_token_throughput": tps, "request_throughput": 1.0, "goodput": None,
               "ttft_ms": {"p50": ttft, "p90": ttft, "p99": ttft}, "tpot_ms": {"p50": 10.0, "p90": 10.0, "p99": 10.0},
               "e2e_ms": {"p50": 100.0, "p99": 100.0}, "counts": {"errors": 0}} for label, tps, ttft in label_values]
    return {"kind": "yitrt-bench", "mode": "concurrency", "workload": {"dataset": "synthetic"}, "slo": None,
            "points": points, "best": 0}


def test_compare_reports_directions_and_unmatched_points(tmp_path):
    a = _report([("c=1", 100.0, 50.0), ("c=4", 300.0, 80.0)])
    b = _report([("c=1", 150.0, 40.0), ("c=8", 500.0, 90.0)])
    result = compare_reports(a, b)
    rows = {r["metric"]: r for r in result["points"][0]["rows"]}
    assert result["points"][0]["load"] == "c=1" and len(result["points"]) == 1
    assert rows["output tok/s"]["change_pct"] == 50.0 and rows["output tok/s"]["better"] == "b"
    assert rows["TTFT p50 ms"]["change_pct"] == -20.0 and rows["TTFT p50 ms"]["better"] == "b"
    assert rows["TPOT p50 ms"]["better"] is None and rows["goodput req/s"]["change_pct"] is None
    assert result["only_a"] == ["c=4"] and result["only_b"] == ["c=8"]
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"points": []}))
    with pytest.raises(UsageError, match="not a yitrt bench report"):
        load_report(path)


def test_cli_refuses_bad_options_before_connecting(cli, tmp_path):
    out = tmp_path / "never"
    for args, words in ((["--concurrency", "0"], "concurrency must be a positive integer"),
                        (["--concurrency", "1,x"], "comma-separated numbers"),
                        (["--concurrency", "1", "--request-rate", "2"], "cannot be mixed"),
                        (["--isl", "abc"], "--isl takes MEAN"),
                        (["--dataset", str(tmp_path / "missing.jsonl")], "does not exist")):
        done = cli("bench", "localhost:1", *args, "--out", str(out))
        assert done.returncode == 2, (args, done.stderr)
        assert words in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert not out.exists()


def test_cli_unreachable_server_is_one_line_and_writes_nothing(cli, tmp_path):
    from yitrt.pipeline import free_ports

    out = tmp_path / "report"
    done = cli("bench", f"localhost:{free_ports(1)[0]}", "--concurrency", "1", "--out", str(out))
    assert done.returncode == 1 and "cannot reach a Triton server" in done.stderr and not out.exists()

