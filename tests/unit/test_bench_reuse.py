"""`yitrt bench` and KV-cache reuse, without tritonserver: shared-prefix prompts from a real tokenizer (token-exact,
shared exactly within a group), multi-turn sessions against the gRPC double (every turn resends the conversation with
the double's actual answers), the KV figures scraped from the metrics double around each measured window, the
hit-rate arithmetic (absent family, nothing allocated, older backends), compare rows, the hit-rate plot, and the
new options refused up front."""

from __future__ import annotations

import json
import random

import pytest

from tests.doubles.metrics_http import MetricsDouble, exposition
from tests.doubles.triton_grpc import TritonDouble, answer
from yitrt.bench import kvmetrics
from yitrt.bench.compare import compare_reports
from yitrt.bench.loadgen import Load
from yitrt.bench.runner import BenchRequest, run_bench
from yitrt.bench.workload import (
    TURN_SEPARATOR,
    LengthSpec,
    PromptFactory,
    continue_history,
    load_sessions,
    prefix_prompts,
    render_turn,
)
from yitrt.errors import UsageError

PNG = b"\x89PNG\r\n\x1a\n"
STATES = {"max": 100, "free": 60, "used": 40, "tokens_per": 16, "fraction": 0.4}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from yitrt.synthetic import write_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder, 4096)
    return folder


@pytest.fixture(scope="module", params=["plain", "bos"])
def tokenizer(request, tok_dir):
    """The synthetic BPE tokenizer as is, and with a BOS that every encoding starts with (as Llama/Yi's do)."""
    from tokenizers import processors

    from yitrt.reference.verify import load_tokenizer

    tok = load_tokenizer(tok_dir)
    if request.param == "bos":
        tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_prefix_prompts_are_exact_and_share_exactly_their_groups_prefix(tokenizer):
    factory = PromptFactory(tokenizer, add_special_tokens=True, seed=3)
    n, k = 40, 3
    prompts = prefix_prompts(factory, 12, n, k, LengthSpec(12, 5), LengthSpec(4))
    encoded = [tokenizer(p.text)["input_ids"] for p in prompts]
    for p, ids in zip(prompts, encoded, strict=True):
        assert len(ids) == p.input_tokens and p.input_tokens > n  # whole prompt exact: prefix + its own suffix
    assert len({p.input_tokens for p in prompts}) > 2  # the --isl deviation reaches the suffixes
    for i, ids in enumerate(encoded):
        group = [e for j, e in enumerate(encoded) if j % k == i % k]  # prompt i uses prefix i mod K
        assert all(e[:n] == ids[:n] for e in group)
        # exactly N: no two prompts of a group share the token after the prefix's N (their suffixes are their own)
        assert len({e[n] for e in group}) == len(group)
        others = [e for j, e in enumerate(encoded) if j % k != i % k]
        first_word = factory.special  # the groups differ from their first word on (only special tokens are shared)
        assert all(e[first_word] != ids[first_word] for e in others)
    assert len({p.text for p in prompts}) == 12
    again = prefix_prompts(PromptFactory(tokenizer, add_special_tokens=True, seed=3), 12, n, k, LengthSpec(12, 5), LengthSpec(4))
    assert again == prompts


def test_prefix_shorter_than_the_special_tokens_is_refused(tokenizer):
    factory = PromptFactory(tokenizer, add_special_tokens=True, seed=0)
    if factory.special == 0:
        assert len(tokenizer(prefix_prompts(factory, 1, 1, 1, LengthSpec(3), LengthSpec(1))[0].text)["input_ids"]) == 4
        return
    with pytest.raises(UsageError, match="--prefix-tokens 1 leaves no room"):
        prefix_prompts(factory, 1, 1, 1, LengthSpec(3), LengthSpec(1))


def test_sessions_file_schema_is_checked_whole(tmp_path):
    good = tmp_path / "s.jsonl"
    good.write_text('{"turns": ["hi", "and then?"]}\n\n{"turns": ["one"], "max_tokens": 3}\n'
                    '{"turns": ["a", "b"], "max_tokens": [2, 5]}\n')
    sessions = load_sessions(good, LengthSpec(7))
    assert [(s.turns, s.max_tokens) for s in sessions] == [(("hi", "and then?"), (7, 7)), (("one",), (3,)), (("a", "b"), (2, 5))]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": []}\n{"turns": ["x"], "max_tokens": [1, 2]}\n{"text": "x"}\n{"turns": ["x", 3]}\n')
    with pytest.raises(UsageError) as info:
        load_sessions(bad, LengthSpec(7))
    assert all(f"line {i}" in info.value.message for i in (1, 2, 3)) and "1 more" in info.value.message


def test_render_turn_appends_the_answer_and_the_new_turn():
    first = render_turn("", "hello")
    second = render_turn(continue_history(first, " hi there"), "bye")
    assert first == "hello" + TURN_SEPARATOR and second == "hello\n hi there\nbye\n"


def _kv_body(double, states=STATES):
    return lambda: exposition({**double.kv, **states}, {"completed": len(double.received)},
                              models=(("tensorrt_llm", "1"), ("tensorrt_llm", "2")))


def test_multiturn_resends_the_whole_conversation_with_the_servers_answers(tmp_path, tok_dir):
    with TritonDouble() as grpc_double, MetricsDouble(_kv_body(grpc_double)) as metrics:
        req = BenchRequest(grpc_double.url, (Load("concurrency", 2),), tmp_path / "out", num_requests=7, warmup=1,
                           dataset="multiturn:synthetic", turns=3, isl=LengthSpec(6), osl=LengthSpec(4),
                           tokenizer=tok_dir, metrics_url=metrics.url)
        report = run_bench(req).report
    received = {r["request_id"]: (n, r) for n, r in enumerate(grpc_double.received)}
    point = report["points"][0]
    records = point["requests"]
    assert len(records) == len(received) == 3 * 4  # 1 warmup session + ceil(7 / 3) measured, 3 turns each
    sessions = {}
    for r in records:
        sessions.setdefault(r["session"], []).append(r)
    assert len(sessions) == 4 and point["sessions"]["count"] == 3 and point["sessions"]["ended_early"] == 0
    first_turns = set()
    for turns in sessions.values():
        assert [t["turn"] for t in turns] == [0, 1, 2]
        texts = [received[t["request_id"]][1]["text_input"] for t in turns]
        first_turns.add(texts[0])
        for prev, cur, record in zip(turns, turns[1:], texts[1:], strict=False):
            n_prev, sent_prev = received[prev["request_id"]]
            assert prev["text"] == answer(n_prev)  # the record holds the answer the double actually gave
            history = continue_history(sent_prev["text_input"], answer(n_prev))
            assert record.startswith(history) and record.endswith(TURN_SEPARATOR)
            assert "\n" not in record[len(history):-1]  # then exactly one new user turn
            # sequential within a session: a turn goes out after the previous turn's answer completed
            assert cur["sent_at_s"] * 1000 >= prev["sent_at_s"] * 1000 + prev["e2e_ms"] - 1e-3
        assert all(answer(received[t["request_id"]][0]) in texts[2] for t in turns[:2])  # both earlier answers resent
    assert len(first_turns) == 4  # the warmup session is not run again in the measured window
    assert set(point["sessions"]["ttft_ms_p50_by_turn"]) == {"0", "1", "2"}
    assert report["workload"]["multiturn"]["turns"] == [3]


def test_kv_figures_cover_the_measured_window_only(tmp_path, tok_dir):
    with TritonDouble() as grpc_double, MetricsDouble(_kv_body(grpc_double)) as metrics:
        req = BenchRequest(grpc_double.url, (Load("concurrency", 1), Load("concurrency", 2)), tmp_path / "out",
                           num_requests=4, warmup=2, isl=LengthSpec(6), osl=LengthSpec(3), tokenizer=tok_dir,
                           prefix_tokens=24, num_prefixes=1, metrics_url=metrics.url)
        result = run_bench(req)
    by_id = {r["request_id"]: r for r in grpc_double.received}
    for point in result.report["points"]:
        measured = [by_id[r["request_id"]] for r in point["requests"] if not r["warmup"]]
        kv = point["kv_cache"]
        assert kv["reused_blocks"] == sum(r["reused"] for r in measured) > 0  # warmup blocks left out
        assert kv["alloc_total_blocks"] == sum(r["blocks"] for r in measured)
        assert kv["alloc_new_blocks"] == kv["alloc_total_blocks"] - kv["reused_blocks"]
        assert kv["hit_rate"] == round(kv["reused_blocks"] / kv["alloc_total_blocks"], 4)
        # states are summed over the two model/version label sets; the request family's completed count is a change
        assert (kv["tokens_per_block"], kv["max_blocks"], kv["used_fraction"]) == (16, 100, 0.4)
        assert kv["requests_completed"] == len(measured) and kv["missing"] == []
        assert kv["source"] == metrics.url
    assert result.report["workload"]["prefix"]["tokens"] == 24 and result.report["metrics_url"] == metrics.url
    plot = result.out / "ttft_vs_hit_rate.png"
    assert "ttft_vs_hit_rate.png" in result.plots and plot.read_bytes()[:8] == PNG


def _snap(kv, requests=None):
    return kvmetrics.Snapshot.from_text(exposition(kv, requests))


def test_hit_rate_arithmetic_and_what_is_missing():
    full = {**STATES, "reused": 10, "alloc_new": 30, "alloc_total": 40}
    kv = kvmetrics.kv_point(_snap(full), _snap({**full, "reused": 16, "alloc_new": 34, "alloc_total": 50}), "u")
    assert (kv["reused_blocks"], kv["alloc_total_blocks"], kv["alloc_new_blocks"], kv["hit_rate"]) == (6, 10, 4, 0.6)
    assert kv["missing"] == [kvmetrics.REQUEST_FAMILY]
    idle = kvmetrics.kv_point(_snap(full), _snap(full), "u")  # nothing allocated: no rate, not a rate of 0
    assert idle["reused_blocks"] == 0 and idle["alloc_total_blocks"] == 0 and idle["hit_rate"] is None
    cold = kvmetrics.kv_point(_snap(full), _snap({**full, "alloc_new": 35, "alloc_total": 45}), "u")
    assert cold["hit_rate"] == 0.0  # allocated, none reused: measured 0
    absent = kvmetrics.kv_point(_snap({}), _snap({}), "u")
    assert absent["hit_rate"] is None and absent["reused_blocks"] is None and absent["tokens_per_block"] is None
    assert kvmetrics.KV_FAMILY in absent["missing"]
    old = {k: v for k, v in full.items() if not k.startswith("alloc") and k != "fraction"}  # an older C++ backend
    older = kvmetrics.kv_point(_snap(old), _snap({**old, "reused": 14}), "u")
    assert older["reused_blocks"] == 4 and older["hit_rate"] is None and older["used_fraction"] is None
    assert {"kv_cache_block_type=alloc_total", "kv_cache_block_type=alloc_new", "kv_cache_block_type=fraction"} <= set(older["missing"])
    restarted = kvmetrics.kv_point(_snap(full), _snap({**full, "reused": 2, "alloc_total": 5}), "u")
    assert restarted["reused_blocks"] is None and restarted["hit_rate"] is None  # counts went down: not a change
    unscraped = kvmetrics.kv_point(None, None, None)
    assert unscraped["hit_rate"] is None and unscraped["missing"] == [] and unscraped["source"] is None


def test_prometheus_parser_handles_escapes_timestamps_and_refuses_garbage():
    text = ('# TYPE x gauge\nx{a="q\\"uo\\\\te",b="new\\nline"} 1.5 1700000000000\ny NaN\nz{} +Inf\n'
            f'{kvmetrics.KV_FAMILY}{{kv_cache_block_type="reused",model="m}}x"}} 3\n')
    samples = kvmetrics.parse_prometheus(text)
    assert samples[0].labels == {"a": 'q"uo\\te', "b": "new\nline"} and samples[0].value == 1.5
    assert samples[1].value != samples[1].value and samples[2].value == float("inf")
    assert kvmetrics.family_sums(samples, kvmetrics.KV_FAMILY, kvmetrics.KV_LABEL) == {"reused": 3.0}
    with pytest.raises(ValueError, match="line 2"):
        kvmetrics.parse_prometheus("ok 1\n<html>\n")


def test_default_metrics_url_unreachable_is_a_warning_explicit_one_an_error(tmp_path, tok_dir):
    from yitrt.pipeline import free_ports

    with TritonDouble() as grpc_double:
        base = dict(num_requests=2, isl=LengthSpec(5), osl=LengthSpec(2), tokenizer=tok_dir)
        # the default (port 8002 of the gRPC host) is nothing in this test: warned, kv figures None
        report = run_bench(BenchRequest(grpc_double.url, (Load("concurrency", 1),), tmp_path / "a", **base)).report
        assert report["metrics_url"] is None and report["points"][0]["kv_cache"]["hit_rate"] is None
        assert sum("http://127.0.0.1:8002/metrics" in w and "kv_cache figures are None" in w for w in report["warnings"]) == 1
        sent = len(grpc_double.received)
        with pytest.raises(kvmetrics.MetricsError, match="cannot read Triton metrics"):
            run_bench(BenchRequest(grpc_double.url, (Load("concurrency", 1),), tmp_path / "b",
                                   metrics_url=f"http://127.0.0.1:{free_ports(1)[0]}/metrics", **base))
        assert len(grpc_double.received) == sent and not (tmp_path / "b").exists()  # refused before any request
        with MetricsDouble(lambda: exposition({}, {"completed": 0})) as metrics:
            report = run_bench(BenchRequest(grpc_double.url, (Load("concurrency", 1),), tmp_path / "c",
                                            metrics_url=metrics.url, **base)).report
        assert report["points"][0]["kv_cache"]["missing"] == [kvmetrics.KV_FAMILY]
        assert any("exports no nv_trt_llm_kv_cache_block_metrics" in w for w in report["warnings"])
        assert "ttft_vs_hit_rate.png" not in report["plots"] and not (tmp_path / "c" / "ttft_vs_hit_rate.png").exists()


def _point(label, ttft, hit, reused):
    return {"load": {"label": label}, "output_token_throughput": 10.0, "request_throughput": 1.0, "goodput": None,
            "ttft_ms": {"p50": ttft, "p90": ttft, "p99": ttft}, "tpot_ms": {"p50": 5.0, "p90": 5.0, "p99": 5.0},
            "e2e_ms": {"p50": 50.0, "p99": 50.0}, "counts": {"errors": 0},
            "kv_cache": {"hit_rate": hit, "reused_blocks": reused}}


def test_compare_shows_the_ttft_change_next_to_the_hit_rate():
    def report(points):
        return {"kind": "yitrt-bench", "mode": "concurrency", "slo": None, "best": 0, "points": points,
                "workload": {"dataset": "synthetic", "prefix": {"tokens": 256, "count": 1}}}

    off = report([_point("c=1", 100.0, 0.0, 0), _point("c=4", 200.0, None, None)])
    on = report([_point("c=1", 40.0, 0.8, 16), _point("c=4", 90.0, 0.75, 30)])
    result = compare_reports(off, on)
    names = [r["metric"] for r in result["points"][0]["rows"]]
    assert names.index("KV hit rate") == names.index("TTFT p99 ms") + 1
    rows = {r["metric"]: r for r in result["points"][0]["rows"]}
    assert rows["TTFT p50 ms"]["change_pct"] == -60.0 and rows["TTFT p50 ms"]["better"] == "b"
    assert rows["KV hit rate"]["a"] == 0.0 and rows["KV hit rate"]["b"] == 0.8 and rows["KV hit rate"]["better"] == "b"
    assert rows["KV hit rate"]["change_pct"] is None  # a change from 0 has no percentage
    c4 = {r["metric"]: r for r in result["points"][1]["rows"]}
    assert c4["KV hit rate"]["a"] is None and c4["KV hit rate"]["better"] is None  # not measured: no verdict
    other = report([_point("c=1", 40.0, 0.8, 16)])
    other["workload"]["prefix"] = {"tokens": 128, "count": 1}
    assert any("different workload" in w for w in compare_reports(off, other)["warnings"])


def test_cli_refuses_bad_reuse_options_before_connecting(cli, tmp_path):
    out = tmp_path / "never"
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    for args, words in ((["--num-prefixes", "2"], "--num-prefixes needs --prefix-tokens"),
                        (["--prefix-tokens", "0"], "--prefix-tokens must be >= 1"),
                        (["--prefix-tokens", "8", "--dataset", str(data)], "--prefix-tokens applies to --dataset synthetic"),
                        (["--turns", "2"], "--turns applies to --dataset multiturn:synthetic"),
                        (["--dataset", "multiturn:synthetic", "--request-rate", "2"], "run at a concurrency"),
                        (["--dataset", "multiturn:"], "needs a source"),
                        (["--dataset", f"multiturn:{tmp_path / 'none.jsonl'}"], "does not exist"),
                        (["--metrics-url", "localhost:8002"], "--metrics-url must be an http://")):
        done = cli("bench", "localhost:1", *args, "--out", str(out))
        assert done.returncode == 2, (args, done.stderr)
        assert words in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert not out.exists()


def test_request_assignment_is_round_robin_over_prefixes(tok_dir):
    from yitrt.reference.verify import load_tokenizer

    tok = load_tokenizer(tok_dir)
    factory = PromptFactory(tok, add_special_tokens=False, seed=random.Random(9).randrange(1000))
    prompts = prefix_prompts(factory, 7, 16, 2, LengthSpec(4), LengthSpec(2))
    heads = [tok(p.text, add_special_tokens=False)["input_ids"][:16] for p in prompts]
    assert [heads.index(h) for h in heads] == [0, 1, 0, 1, 0, 1, 0]
    assert json.dumps([p.input_tokens for p in prompts]) == json.dumps([20] * 7)
