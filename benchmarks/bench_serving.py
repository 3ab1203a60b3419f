"""KV-cache block reuse on the demo deployment (issue #18, "Measured"): the same workload against the CPU reference
slot with reuse on and with reuse off, side by side.

The demo model, converted at tp 1 under build/bench-serving, is deployed twice with `--engine reference --kv-reuse` / `--no-kv-reuse`; each repository is served on a real
tritonserver (`yitrt serve`, its metrics port scraped by the bench) and benchmarked at concurrency 1, 4 and 16 with
prompts that share one 256-token prefix and end in their own 32-token suffix, 16 tokens out. The figures are the
reference slot's on this CPU machine: they show what reuse changes (TTFT next to the prefix hit rate), never a GPU's
speed. Results go to benchmarks/results/serving.json (per deployment and point: throughput, TTFT p50/p90, hit rate;
the commands run; the machine), with the two bench reports and `yitrt bench compare`'s rows.

    python benchmarks/bench_serving.py [--concurrency 1,4,16] [--prefix-tokens 256] [--isl 32] [--osl 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import served
from served import YITRT

from yitrt import __version__

NAME = "bench-serving"
ROOT = Path(__file__).resolve().parent
REPO_ROOT = ROOT.parent
#: the same workload measured on the slot before in-flight batching (static batching, commit 409c3ac): unique
#: 288-token prompts (as long as prefix + suffix here), 16 tokens out, same checkpoint and machine
STATIC_BASELINE = ROOT / "results" / "serving-static-409c3ac.json"
WORK = REPO_ROOT / "build" / "bench-serving"
#: (label, deploy flag)
DEPLOYMENTS = (("reuse-off", "--no-kv-reuse"), ("reuse-on", "--kv-reuse"))


def run(argv: list[str], commands: list[str], **kwargs):
    return served.run(argv, commands, NAME, **kwargs)


def demo_checkpoint(commands: list[str]) -> Path:
    """The demo model converted at tp 1 (the slot's fastest form on this machine, and the checkpoint the static-batching
    baseline was measured on), made once under build/bench-serving."""
    return served.demo_checkpoint(WORK, commands)


def _baseline() -> dict | None:
    """The static-batching numbers recorded before the change (the switch was not kept: it would cost a second
    scheduler), per point."""
    if not STATIC_BASELINE.is_file():
        return None
    report = json.loads(STATIC_BASELINE.read_text())
    return {"source": str(STATIC_BASELINE.relative_to(REPO_ROOT)), "commit": "409c3ac",
            "workload": "unique 288-token prompts, 16 tokens out, max batch 16",
            "points": [{"load": p["load"]["label"], "output_token_throughput": p["output_token_throughput"],
                        "request_throughput": p["request_throughput"], "ttft_ms_p50": p["ttft_ms"]["p50"],
                        "ttft_ms_p90": p["ttft_ms"]["p90"], "tpot_ms_p50": p["tpot_ms"]["p50"]} for p in report["points"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--prefix-tokens", type=int, default=256)
    parser.add_argument("--num-prefixes", type=int, default=1)
    parser.add_argument("--isl", default="32")
    parser.add_argument("--osl", default="16")
    parser.add_argument("--num-requests", type=int, default=None, help="per point [default: yitrt bench's]")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serving.json")
    args = parser.parse_args()
    commands: list[str] = []
    WORK.mkdir(parents=True, exist_ok=True)
    if not Path(YITRT[0]).is_file():
        raise SystemExit(f"{NAME}: no yitrt next to {sys.executable}: run it with the project's .venv/bin/python (make bench-serving)")
    checkpoint = demo_checkpoint(commands)
    deployments = {}
    for label, flag in DEPLOYMENTS:
        repo, report_dir = WORK / f"{label}-repo", WORK / f"{label}-bench"
        # max batch 16: the highest concurrency is served in flight, not queued in Triton
        run([*YITRT, "deploy", str(checkpoint), "--engine", "reference", flag, "--max-batch-size", "16",
             "--max-seq-len", "512", "--out", str(repo), "--force"], commands)
        with served.Served(repo, commands, WORK / f"{label}-serve.log", NAME) as server:
            bench = [*YITRT, "bench", f"localhost:{server.grpc}", "--tokenizer", str(repo), "--concurrency", args.concurrency,
                     "--prefix-tokens", str(args.prefix_tokens), "--num-prefixes", str(args.num_prefixes), "--isl", args.isl,
                     "--osl", args.osl, "--warmup", str(args.warmup),
                     *(["--num-requests", str(args.num_requests)] if args.num_requests else []),
                     "--metrics-url", f"http://localhost:{server.metrics}/metrics", "--out", str(report_dir), "--json"]
            summary = json.loads(run(bench, commands).stdout)
        deployments[label] = {
            "repository": str(repo), "report": summary["report"], "warnings": summary["warnings"],
            "points": [{"load": p["load"]["label"], "output_token_throughput": p["output_token_throughput"],
                        "request_throughput": p["request_throughput"], "ttft_ms_p50": p["ttft_ms"]["p50"],
                        "ttft_ms_p90": p["ttft_ms"]["p90"], "tpot_ms_p50": p["tpot_ms"]["p50"],
                        "kv_hit_rate": p["kv_cache"]["hit_rate"], "kv_reused_blocks": p["kv_cache"]["reused_blocks"],
                        "kv_alloc_total_blocks": p["kv_cache"]["alloc_total_blocks"],
                        "kv_missing": p["kv_cache"]["missing"], "errors": p["counts"]["errors"]} for p in summary["points"]],
        }
    compared = json.loads(run([*YITRT, "bench", "compare", deployments["reuse-off"]["report"],
                               deployments["reuse-on"]["report"], "--json"], commands).stdout)
    result = {
        "benchmark": "serving: KV-cache block reuse on vs off, CPU reference slot (not a GPU engine's speed)",
        "yitrt": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "workload": {"concurrency": args.concurrency, "prefix_tokens": args.prefix_tokens, "num_prefixes": args.num_prefixes,
                     "isl": args.isl, "osl": args.osl, "warmup": args.warmup, "num_requests": args.num_requests},
        "deployments": deployments,
        "static_batching_before": _baseline(),
        "compare": {"a": "reuse-off", "b": "reuse-on",
                    "points": [{"load": p["load"], "rows": [r for r in p["rows"] if r["metric"] in (
                        "output tok/s", "TTFT p50 ms", "TTFT p90 ms", "KV hit rate", "KV reused blocks")]}
                        for p in compared["points"]],
                    "warnings": compared["warnings"]},
        "commands": commands,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for label, data in deployments.items():
        for p in data["points"]:
            hit = "-" if p["kv_hit_rate"] is None else f"{p['kv_hit_rate']:.0%}"
            print(f"{label:9} {p['load']:5}  TTFT p50 {p['ttft_ms_p50']} ms  p90 {p['ttft_ms_p90']} ms  "
                  f"{p['output_token_throughput']} out tok/s  KV hit {hit}")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
