"""`yitrt bench` against a real tritonserver serving the demo repository (CPU reference engine slot), short runs:
every sent request is answered or counted as an error (and Triton's own statistics agree), TTFT <= E2E, throughputs
are the received tokens over the measured window, goodput <= throughput, the OSL is enforced, plots are written, and
two reports compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SERVED_MAX_INPUT
from yitrt.bench import kvmetrics
from yitrt.bench.loadgen import Load
from yitrt.bench.metrics import Slo
from yitrt.bench.runner import BenchRequest, run_bench
from yitrt.bench.workload import LengthSpec

pytestmark = pytest.mark.integration
PNG = b"\x89PNG\r\n\x1a\n"
SLO = Slo(ttft_ms=1500, tpot_ms=400)


@pytest.fixture(scope="module")
def concurrency_run(served, tmp_path_factory):
    """Two concurrencies (1, 3), three measured requests each after one warmup request, 16-token prompts, 4 tokens out."""
    _, url, repo = served
    out = tmp_path_factory.mktemp("bench") / "c"
    req = BenchRequest(url, (Load("concurrency", 1), Load("concurrency", 3)), out, num_requests=3, warmup=1,
                       isl=LengthSpec(16), osl=LengthSpec(4), slo=SLO, tokenizer=repo, seed=3)
    return run_bench(req), repo


def _measured(point):
    return [r for r in point["requests"] if not r["warmup"]]


def test_every_request_is_accounted_for_and_the_server_agrees(concurrency_run):
    result, _ = concurrency_run
    report = json.loads((result.out / "bench.json").read_text())
    assert [p["load"]["label"] for p in report["points"]] == ["c=1", "c=3"]
    for point in report["points"]:
        counts, measured = point["counts"], _measured(point)
        assert counts["sent"] == len(measured) == 3
        assert counts["answered"] + counts["errors"] == counts["sent"]
        assert counts["answered"] == sum(r["ok"] for r in measured)
        assert counts["warmup"] == 1 and sum(r["warmup"] for r in point["requests"]) == 1
        # Triton's statistics extension is an independent count of what reached the model in the measured window
        assert sum(point["server_counts"].values()) == counts["sent"]
        assert len({r["request_id"] for r in point["requests"]}) == len(point["requests"])


def test_timings_are_ordered_and_throughput_is_the_received_tokens_over_the_window(concurrency_run):
    result, repo = concurrency_run
    from yitrt.bench.workload import resolve_tokenizer_dir
    from yitrt.reference.verify import load_tokenizer

    tokenizer = load_tokenizer(resolve_tokenizer_dir(repo))
    for point in result.report["points"]:
        measured = _measured(point)
        for r in measured:
            assert r["ok"], r["error"]
            assert 0 < r["ttft_ms"] <= r["e2e_ms"]
            assert r["response_ms"] == sorted(r["response_ms"]) and r["response_ms"][-1] <= r["e2e_ms"]
            assert r["output_tokens"] == r["max_tokens"] == 4 and r["token_source"] == "server"  # end_id -1: the OSL holds
            assert r["input_tokens"] == 16  # the server's count of the synthetic prompt
            assert r["tpot_ms"] == pytest.approx((r["e2e_ms"] - r["ttft_ms"]) / 3, abs=1e-3)
        # the received text re-tokenized: the server's counts describe what actually arrived
        retokenized = sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in measured)
        assert abs(retokenized - sum(r["output_tokens"] for r in measured)) <= len(measured)
        window = max(r["sent_at_s"] + r["e2e_ms"] / 1000 for r in measured) - min(r["sent_at_s"] for r in measured)
        assert point["duration_s"] == pytest.approx(window, abs=1e-3)
        assert point["output_token_throughput"] == pytest.approx(sum(r["output_tokens"] for r in measured) / window, rel=1e-3)
        assert point["request_throughput"] == pytest.approx(len(measured) / window, rel=1e-3)
        assert point["ttft_ms"]["p50"] <= point["e2e_ms"]["p50"]
        good = sum(1 for r in measured if r["ttft_ms"] <= SLO.ttft_ms and r["tpot_ms"] <= SLO.tpot_ms)
        assert point["good_requests"] == good
        assert point["goodput"] == pytest.approx(good / window, rel=1e-3) and point["goodput"] <= point["request_throughput"]
        assert point["client"]["cpu_fraction"] is not None and point["client"]["loop_lag_ms"]["count"] > 0


def test_best_point_and_plots(concurrency_run):
    result, _ = concurrency_run
    points = result.report["points"]
    meeting = [i for i, p in enumerate(points) if p["meets_slo"]]
    expected = max(meeting, key=lambda i: points[i]["output_token_throughput"]) if meeting else None
    assert result.report["best"] == expected
    for p in points:  # judged at the default percentile, p90
        assert p["meets_slo"] == (p["ttft_ms"]["p90"] <= SLO.ttft_ms and p["tpot_ms"]["p90"] <= SLO.tpot_ms and not p["counts"]["errors"])
    assert sorted(result.plots) == ["latency_throughput.png", "throughput_vs_tpot.png", "throughput_vs_ttft.png"]
    for name in result.plots:
        data = (result.out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    manifest = json.loads((result.out / "yitrt-manifest.json").read_text())
    assert manifest["stage"] == "bench" and {f["path"] for f in manifest["files"]} == {"bench.json", *result.plots}


def test_rate_mode_counts_failed_requests_and_sends_chat_messages(served, tmp_path):
    """A Poisson-rate point over a JSONL dataset: a chat line, and a prompt over the deployment's limit that fails."""
    _, url, repo = served
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text(json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 3}) + "\n"
                       + json.dumps({"text": "word " * (SERVED_MAX_INPUT + 20), "max_tokens": 3}) + "\n")
    req = BenchRequest(url, (Load("rate", 5.0),), tmp_path / "r", num_requests=4, dataset=str(dataset), tokenizer=repo, seed=1)
    result = run_bench(req)
    point = result.report["points"][0]
    measured = _measured(point)
    assert point["counts"]["sent"] == 4 and point["counts"]["answered"] == 2 and point["counts"]["errors"] == 2
    failed = [r for r in measured if not r["ok"]]
    assert all(f"at most {SERVED_MAX_INPUT}" in r["error"] for r in failed)
    assert sum(point["server_counts"].values()) == 4  # Triton counts requests its decoupled model took, failed or not
    assert any("2 of 4 requests failed" in w for w in result.warnings)
    answered = [r for r in measured if r["ok"]]
    assert all(r["output_tokens"] == 3 for r in answered)
    assert point["goodput"] is None and result.report["best"] is None  # no SLO given, and the point has errors
    scheduled = [r["scheduled_at_s"] for r in measured]
    assert scheduled == sorted(scheduled) and all(r["sent_at_s"] >= r["scheduled_at_s"] for r in measured)


def test_cli_bench_json_and_compare(served, cli, concurrency_run, tmp_path):
    _, url, repo = served
    done = cli("bench", url, "--concurrency", "1", "--num-requests", "2", "--isl", "8", "--osl", "3",
               "--tokenizer", str(repo), "--slo-ttft", "5000", "--out", str(tmp_path / "b"), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["ok"] and data["points"][0]["counts"]["answered"] == 2 and "requests" not in data["points"][0]
    assert data["best"] == 0 and len(data["plots"]) == 3 and all(Path(p).is_file() and p.endswith(".png") for p in data["plots"])
    first, _ = concurrency_run
    done = cli("bench", "compare", str(first.out / "bench.json"), str(tmp_path / "b"), "--json")
    assert done.returncode == 0, done.stderr
    compared = json.loads(done.stdout)
    row = next(r for r in compared["points"][0]["rows"] if r["metric"] == "output tok/s")
    a = first.report["points"][0]["output_token_throughput"]
    b = data["points"][0]["output_token_throughput"]
    assert compared["points"][0]["load"] == "c=1" and (row["a"], row["b"]) == (a, b)
    assert row["change_pct"] == pytest.approx((b - a) / a * 100, abs=0.06) and row["better"] == ("b" if b > a else "a")
    assert compared["only_a"] == ["c=3"] and any("workload" in w for w in compared["warnings"])


def test_prefix_prompts_and_sessions_against_the_real_server(served, tmp_path):
    """Shared-prefix prompts are exact as the deployment's preprocessing counts them (the server's own count), and a
    multi-turn session's later turn carries the earlier turn and its answer; the metrics port is scraped."""
    server, url, repo = served
    metrics_url = server.endpoints["metrics"]
    req = BenchRequest(url, (Load("concurrency", 2),), tmp_path / "p", num_requests=4, isl=LengthSpec(6), osl=LengthSpec(3),
                       tokenizer=repo, prefix_tokens=24, num_prefixes=2, metrics_url=metrics_url, seed=2)
    report = run_bench(req).report
    assert report["target"]["reports_token_counts"]  # the input counts below are the server's
    point = report["points"][0]
    assert point["counts"]["answered"] == 4 and all(r["input_tokens"] == 24 + 6 for r in _measured(point))
    kv = point["kv_cache"]
    assert kv["source"] == metrics_url
    if kvmetrics.KV_FAMILY in kv["missing"]:  # a slot without KV-cache metrics: nothing invented
        assert kv["hit_rate"] is None and kv["reused_blocks"] is None
    elif kv["hit_rate"] is not None:
        assert 0 <= kv["reused_blocks"] <= kv["alloc_total_blocks"] and kv["hit_rate"] == round(kv["reused_blocks"] / kv["alloc_total_blocks"], 4)
    req = BenchRequest(url, (Load("concurrency", 2),), tmp_path / "m", num_requests=4, dataset="multiturn:synthetic", turns=2,
                       isl=LengthSpec(8), osl=LengthSpec(3), tokenizer=repo, metrics_url=metrics_url, seed=2)
    point = run_bench(req).report["points"][0]
    measured = _measured(point)
    assert point["counts"]["answered"] == 4 and point["sessions"]["count"] == 2
    for session in {r["session"] for r in measured}:
        first, second = sorted((r for r in measured if r["session"] == session), key=lambda r: r["turn"])
        # turn 2 resends turn 1 (its 8 words and separator), its 3-token answer, then 8 new words: at least 8 + 3 + 8
        assert second["input_tokens"] >= first["input_tokens"] + first["output_tokens"] + 8 - 1
        assert second["sent_at_s"] * 1000 >= first["sent_at_s"] * 1000 + first["e2e_ms"] - 1e-3
