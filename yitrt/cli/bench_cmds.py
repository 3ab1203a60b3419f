"""`yitrt bench URL ...` (run a benchmark) and `yitrt bench compare A B` (registered on the main app by ``register``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from yitrt.cli import render
from yitrt.cli.options import EXISTING_DIR, EXISTING_PATH, JsonOpt
from yitrt.errors import UsageError


class _BenchGroup(TyperGroup):
    """A group whose default command is ``run``: `yitrt bench URL` means `yitrt bench run URL`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _numbers(text: str | None, option: str) -> list[float]:
    if text is None:
        return []
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers, got {text!r}", f"e.g. {option} 1,4,16") from None


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _trio(dist: dict[str, Any]) -> str:
    return "/".join(_fmt(dist.get(k), 0 if (dist.get(k) or 0) >= 100 else 1) for k in ("p50", "p90", "p99"))


def _hit(kv: dict[str, Any] | None) -> str:
    """The KV hit rate with its blocks (reused/allocated), "-" when not measured."""
    if not kv or kv.get("hit_rate") is None:
        return "-"
    return f"{kv['hit_rate']:.0%} ({kv['reused_blocks']}/{kv['alloc_total_blocks']})"


def _render_report(report: dict[str, Any]) -> None:
    slo = report["slo"]
    columns = ["load", "ok/sent", "req/s", "out tok/s", "goodput/s", "TTFT ms p50/90/99", "TPOT ms p50/90/99",
               "E2E ms p50/90/99", "KV hit", "SLO"]
    table = render.table(f"yitrt bench — {report['target']['model']} at {report['target']['url']}", columns, [])
    for i, p in enumerate(report["points"]):
        verdict = "-" if p["meets_slo"] is None else ("met" if p["meets_slo"] else "missed")
        row = [("★ " if i == report["best"] else "") + p["load"]["label"], f"{p['counts']['answered']}/{p['counts']['sent']}",
               _fmt(p["request_throughput"], 2), _fmt(p["output_token_throughput"]), _fmt(p["goodput"], 2),
               _trio(p["ttft_ms"]), _trio(p["tpot_ms"]), _trio(p["e2e_ms"]), _hit(p.get("kv_cache")), verdict]
        table.add_row(*row, style="bold green" if i == report["best"] else None)
    render.print_wide(table)
    _render_speculation(report)
    _render_adapters(report)
    if slo:
        bounds = ", ".join(f"{k.split('_')[0].upper()} ≤ {slo[k]:g} ms" for k in ("ttft_ms", "tpot_ms") if slo[k] is not None)
        render.out.print(f"SLO: {bounds} at p{slo['percentile']:g}; goodput counts requests within every bound")
    if report["best"] is not None:
        best = report["points"][report["best"]]
        why = "the highest output tokens/s meeting the SLO" if slo else "the highest output tokens/s (no SLO given)"
        render.out.print(f"best: {best['load']['label']} — {_fmt(best['output_token_throughput'])} output tok/s, "
                         f"{_fmt(best['request_throughput'], 2)} req/s ({why})")


def _render_adapters(report: dict[str, Any]) -> None:
    """One line per point and adapter of a LoRA run: requests, output tok/s, TTFT p50 and TPOT p50."""
    if not report.get("lora"):
        return
    for p in report["points"]:
        for name, m in (p.get("adapters") or {}).items():
            render.out.print(f"adapter {p['load']['label']} {name}: {m['counts']['answered']}/{m['counts']['sent']} answered, "
                             f"{_fmt(m['output_token_throughput'])} out tok/s, TTFT p50 {_fmt((m['ttft_ms'] or {}).get('p50'))} ms, "
                             f"TPOT p50 {_fmt((m['tpot_ms'] or {}).get('p50'))} ms")


def _render_speculation(report: dict[str, Any]) -> None:
    """One line per point with its acceptance — when the run sent speculation inputs or a point measured some."""
    from yitrt.bench.acceptance import describe

    asked = (report.get("speculation") or {}).get("requested")
    if not asked and not any((p.get("speculation") or {}).get("measured") for p in report["points"]):
        return
    for p in report["points"]:
        render.out.print(f"speculation {p['load']['label']}: {describe(p.get('speculation'))}")


def _render_speedup(rows: list[dict[str, Any]], a: Path, b: Path) -> None:
    """The speed-up table of `bench compare`: B / A per point, with both runs' acceptance."""
    columns = ["load", "out tok/s B/A", "TPOT p50 B/A", "TTFT p50 B/A", "accepted/step A", "accepted/step B",
               "acceptance A", "acceptance B", "tokens/step B"]
    table = render.table(f"speed-up: B = {b} over A = {a} (ratios B / A: throughput > 1 and TPOT/TTFT < 1 are faster)", columns, [])
    for row in rows:
        sa, sb = row["a_speculation"], row["b_speculation"]
        table.add_row(row["load"], _fmt(row["output_throughput_ratio"], 3), _fmt(row["tpot_p50_ratio"], 3),
                      _fmt(row["ttft_p50_ratio"], 3), _fmt(sa["mean_accepted_per_step"], 2), _fmt(sb["mean_accepted_per_step"], 2),
                      _pct(sa["acceptance_rate"]), _pct(sb["acceptance_rate"]), _fmt(sb["tokens_per_step"], 2))
    render.print_wide(table)


def register(app: typer.Typer) -> None:
    """Add the bench group to ``app``."""
    bench_app = typer.Typer(cls=_BenchGroup, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                            context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
                            help="Measure a deployment: `yitrt bench URL [options]` runs load points and writes a report; "
                                 "`yitrt bench compare A B` compares two reports.")
    app.add_typer(bench_app, name="bench")

    @bench_app.command("run")
    def run(
        url: Annotated[str, typer.Argument(help="gRPC endpoint, host:port (yitrt serve prints it).", show_default=False)],
        model: Annotated[str | None, typer.Option("--model", help="Model to ask [default: the deployment's BLS entry model]; or ensemble.", show_default=False)] = None,
        concurrency: Annotated[str | None, typer.Option("--concurrency", help="Requests kept in flight, one load point each [default: 1,4,16,64].", show_default=False)] = None,
        request_rate: Annotated[str | None, typer.Option("--request-rate", help="Poisson arrival rates (requests/s), one load point each.", show_default=False)] = None,
        num_requests: Annotated[int | None, typer.Option("--num-requests", min=1, help="Measured requests per point [default: 4 × concurrency or 10 s of arrivals, at least 16].", show_default=False)] = None,
        duration: Annotated[float | None, typer.Option("--duration", min=0.1, help="Seconds to keep sending per point (then its answers are awaited).", show_default=False)] = None,
        dataset: Annotated[str, typer.Option("--dataset", help="synthetic, a JSONL file of {\"text\"} or {\"messages\"} lines (optional max_tokens), or multiturn:synthetic / multiturn:FILE (sessions: {\"turns\": [...]} lines; each turn resends the conversation so far).")] = "synthetic",
        prefix_tokens: Annotated[int | None, typer.Option("--prefix-tokens", help="Synthetic prompts start with a shared prefix of exactly N tokens (then their own --isl suffix).", show_default=False)] = None,
        num_prefixes: Annotated[int | None, typer.Option("--num-prefixes", help="Distinct shared prefixes (prompt i uses prefix i mod K) [default: 1].", show_default=False)] = None,
        turns: Annotated[int | None, typer.Option("--turns", help="User turns per multiturn:synthetic session, --isl tokens each [default: 3].", show_default=False)] = None,
        metrics_url: Annotated[str | None, typer.Option("--metrics-url", help="Triton's metrics endpoint for the KV-cache reuse figures [default: http://<gRPC host>:8002/metrics]; none: skip.", show_default=False)] = None,
        num_draft_tokens: Annotated[int | None, typer.Option("--num-draft-tokens", help="Draft tokens per round, sent as the BLS input num_draft_tokens (draft-target; 0: the same deployment without speculation) [default: not sent, the deployment's own].", show_default=False)] = None,
        lookahead: Annotated[str | None, typer.Option("--lookahead", help="W,N,G sent as tensorrt_llm's lookahead_window_size/ngram_size/verification_set_size (with --model tensorrt_llm; 1,1,0: plain decoding).", show_default=False)] = None,
        perf_metrics: Annotated[bool | None, typer.Option("--perf-metrics/--no-perf-metrics", help="Send return_perf_metrics (the server's acceptance outputs) [default: with --num-draft-tokens or --lookahead].", show_default=False)] = None,
        isl: Annotated[str, typer.Option("--isl", help="Prompt tokens MEAN[,STD] (synthetic prompts).")] = "128",
        osl: Annotated[str, typer.Option("--osl", help="Output tokens MEAN[,STD] (max_tokens; the end token is ignored unless --respect-eos).")] = "64",
        slo_ttft: Annotated[float | None, typer.Option("--slo-ttft", help="TTFT bound in ms (goodput, best point).", show_default=False)] = None,
        slo_tpot: Annotated[float | None, typer.Option("--slo-tpot", help="TPOT bound in ms (goodput, best point).", show_default=False)] = None,
        slo_percentile: Annotated[float, typer.Option("--slo-percentile", help="Percentile at which a load point must meet the bounds.")] = 90.0,
        warmup: Annotated[int, typer.Option("--warmup", min=0, help="Requests sent before each point's measured window.")] = 0,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Report folder [default: yitrt-bench/<time>].", show_default=False)] = None,
        tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="The deployed repository (or HF model folder) with the tokenizer [default: the one the server's preprocessing model names, when it is here].", show_default=False, **EXISTING_DIR)] = None,
        respect_eos: Annotated[bool, typer.Option("--respect-eos", help="Let answers end at the end token (default: end_id -1, every answer has --osl tokens).")] = False,
        timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds one request may take.")] = 600.0,
        seed: Annotated[int, typer.Option("--seed", help="Seed of prompts, lengths and arrival times.")] = 0,
        lora: Annotated[str | None, typer.Option("--lora", help="Every request asks for this LoRA adapter of the repository (lora_adapters.json; see --repo).", show_default=False)] = None,
        lora_mix: Annotated[str | None, typer.Option("--lora-mix", help="NAME:WEIGHT,... — each request asks for an adapter drawn with these weights (positive, summing to 1; base: no adapter), e.g. a:0.5,b:0.3,base:0.2.", show_default=False)] = None,
        repo: Annotated[Path | None, typer.Option("--repo", help="The deployed repository listing the adapters [default: --tokenizer when it is one, else the current folder when it is one].", show_default=False, **EXISTING_DIR)] = None,
        json_: JsonOpt = False,
    ) -> None:
        """Run load points against a served deployment: TTFT, TPOT, E2E, throughput and goodput under an SLO, with plots."""
        from yitrt.bench.loadgen import Load
        from yitrt.bench.metrics import Slo
        from yitrt.bench.runner import REPORT_NAME, BenchRequest, run_bench
        from yitrt.bench.workload import LengthSpec
        from yitrt.speculation import parse_lookahead

        if concurrency is not None and request_rate is not None:
            raise UsageError("--concurrency and --request-rate cannot be mixed in one run", "run them as two benchmarks")
        loads = ([Load("rate", v) for v in _numbers(request_rate, "--request-rate")] if request_rate is not None else
                 [Load("concurrency", v) for v in _numbers(concurrency or "1,4,16,64", "--concurrency")])
        folder = out or Path("yitrt-bench") / time.strftime("%Y%m%d-%H%M%S")
        from yitrt.triton.lora_client import ADAPTERS_FILE

        if (lora or lora_mix) and repo is None and not (tokenizer and (tokenizer / ADAPTERS_FILE).is_file()) and Path(ADAPTERS_FILE).is_file():
            repo = Path(".")  # run from inside the repository, as its README's examples are
        req = BenchRequest(url, tuple(loads), folder, model=model, num_requests=num_requests, duration=duration, dataset=dataset,
                           isl=LengthSpec.parse(isl, "--isl"), osl=LengthSpec.parse(osl, "--osl"),
                           slo=Slo(slo_ttft, slo_tpot, slo_percentile), warmup=warmup, tokenizer=tokenizer,
                           ignore_eos=not respect_eos, timeout=timeout, seed=seed, prefix_tokens=prefix_tokens,
                           num_prefixes=num_prefixes, turns=turns, metrics_url=metrics_url, num_draft_tokens=num_draft_tokens,
                           lookahead=None if lookahead is None else parse_lookahead(lookahead), perf_metrics=perf_metrics,
                           lora=lora, lora_mix=lora_mix, repo=repo)
        progress = None if json_ else (lambda line: render.err.print(f"bench {line}"))
        result = run_bench(req, progress)
        report = result.report
        if json_:
            summary = {k: v for k, v in report.items() if k != "points"}
            summary["points"] = [{k: v for k, v in p.items() if k != "requests"} for p in report["points"]]
            summary["plots"] = [str(result.out / p) for p in result.plots]
            render.emit_json({"ok": True, "report": str(result.out / REPORT_NAME), **summary})
            return
        _render_report(report)
        for warning in result.warnings:
            render.warn(warning)
        render.out.print(f"report: {result.out / REPORT_NAME}")
        render.out.print(f"plots:  {', '.join(str(result.out / p) for p in result.plots)}")

    @bench_app.command("compare")
    def compare(
        a: Annotated[Path, typer.Argument(help="First report (bench.json or its folder).", show_default=False, **EXISTING_PATH)],
        b: Annotated[Path, typer.Argument(help="Second report.", show_default=False, **EXISTING_PATH)],
        json_: JsonOpt = False,
    ) -> None:
        """Put two bench reports side by side: each load point both ran, B's change against A."""
        from yitrt.bench.compare import compare_reports, load_report

        result = compare_reports(load_report(a), load_report(b))
        if json_:
            render.emit_json({"a": str(a), "b": str(b), **result})
            return
        sections = [(f"load {p['load']}", p["rows"]) for p in result["points"]]
        if result["best_rows"] is not None:
            sections.append((f"best points: A {result['best']['a']} vs B {result['best']['b']}", result["best_rows"]))
        for title, rows in sections:
            table = render.table(f"{title}: A = {a}, B = {b}", ["metric", "A", "B", "change", "better"], [])
            for row in rows:
                change = "-" if row["change_pct"] is None else f"{row['change_pct']:+.1f}%"
                table.add_row(row["metric"], _fmt(row["a"], 2), _fmt(row["b"], 2), change, (row["better"] or "-").upper())
            render.print_wide(table)
        if result["speedup"]:
            _render_speedup(result["speedup"], a, b)
        for side in ("only_a", "only_b"):
            if result[side]:
                render.out.print(f"only in {side[-1].upper()}: {', '.join(result[side])}")
        for warning in result["warnings"]:
            render.warn(warning)
        if not sections:
            render.warn("the reports share no load point and have no best points to compare")
            sys.exit(1)
