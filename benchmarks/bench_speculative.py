"""Speculative decoding on the demo deployment (issue #19, "Bench"): the same draft-target deployment with speculation
on (the BLS drafts K tokens per round) and off (`--num-draft-tokens 0`), side by side, with the greedy answers compared.

The demo model, converted at tp 1 under build/bench-speculative, is the target; the draft is the demo model cut to its
first `--draft-layers` decoder layers (with its embedding, final norm and lm_head: a real, weaker draft with the same
tokenizer), made by `yitrt.checkpoint.truncate`. One repository is deployed on the CPU reference slot with the draft
(`yitrt deploy TARGET --engine reference --draft DRAFT --speculative draft-target --num-draft-tokens K`), served on a
real tritonserver (a fresh server per run, so neither run finds the other's prompts in the KV cache) and benchmarked at
concurrency 1 and 4: once with `--num-draft-tokens K`, once with `--num-draft-tokens 0`, the same prompts (same seed)
and greedy decoding with a fixed output length. The figures are the reference slot's on this CPU machine: they show
acceptance (mean accepted draft tokens per target step, acceptance rate, tokens per step) and what it changes (output
throughput, TPOT, TTFT ratios from `yitrt bench compare`), never a GPU's speed; greedy speculation must give the
target's own answers, so every answer of the two runs is compared. Results go to benchmarks/results/speculative.json.

    python benchmarks/bench_speculative.py [--concurrency 1,4] [--num-draft-tokens 4] [--draft-layers 24] [--isl 32] [--osl 16] [--num-requests 4]

"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import served
from served import YITRT

from yitrt import __version__

NAME = "bench-speculative"

ROOT = Path(__file__).resolve().parent
REPO_ROOT = ROOT.parent
WORK = REPO_ROOT / "build" / "bench-speculative"
#: (label, what the bench sends as num_draft_tokens: None = the --num-draft-tokens argument)
RUNS = (("off", 0), ("on", None))


def draft_checkpoint(target: Path, layers: int, commands: list[str]) -> Path:
    """The demo draft: the target checkpoint cut to its first ``layers`` decoder layers, made once."""
    from yitrt.checkpoint import truncate

    draft = WORK / f"draft-{layers}-layers"
    if not (draft / "yitrt-manifest.json").is_file():
        commands.append(f"python: yitrt.checkpoint.truncate.truncate_checkpoint({target}, {draft}, layers={layers})")
        truncate.truncate_checkpoint(target, draft, layers)
    return draft


def _points(summary: dict) -> list[dict]:
    keep = ("mean_accepted_per_step", "acceptance_rate", "tokens_per_step", "target_steps", "accepted_draft_tokens",
            "draft_tokens", "cross_check", "measured")
    return [{"load": p["load"]["label"], "output_token_throughput": p["output_token_throughput"],
             "request_throughput": p["request_throughput"], "ttft_ms_p50": p["ttft_ms"]["p50"], "ttft_ms_p90": p["ttft_ms"]["p90"],
             "tpot_ms_p50": p["tpot_ms"]["p50"], "tpot_ms_p90": p["tpot_ms"]["p90"], "errors": p["counts"]["errors"],
             "short_outputs": p["short_outputs"], "speculation": {k: p["speculation"][k] for k in keep}} for p in summary["points"]]


def same_answers(off: Path, on: Path) -> dict:
    """Greedy speculation must answer exactly as the target alone: every request's text, point by point (the runs
    sent the same prompts in the same order: same seed, same counts)."""
    texts = {}
    for label, path in (("off", off), ("on", on)):
        report = json.loads(path.read_text())
        texts[label] = {(p["load"]["label"], r["index"]): r["text"] for p in report["points"] for r in p["requests"] if r["ok"]}
    common = sorted(set(texts["off"]) & set(texts["on"]))
    differ = [{"load": load, "index": index, "off": texts["off"][(load, index)], "on": texts["on"][(load, index)]}
              for load, index in common if texts["off"][(load, index)] != texts["on"][(load, index)]]
    return {"compared": len(common), "identical": len(common) - len(differ), "differ": differ[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="K: draft tokens per round (deploy and bench)")
    parser.add_argument("--draft-layers", type=int, default=24, help="decoder layers the demo draft keeps (24 of 30, as recipes/demo-spec.yaml)")
    parser.add_argument("--isl", default="32")
    parser.add_argument("--osl", default="16")
    # the slot runs a draft round and a verification request per step on the CPU: measured at ~0.3-0.5 output tok/s
    # per request on the 2-core machine (demo target, 4-layer draft), so a point of 4 requests takes minutes
    parser.add_argument("--num-requests", type=int, default=4, help="per point")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "speculative.json")
    args = parser.parse_args()
    commands: list[str] = []
    WORK.mkdir(parents=True, exist_ok=True)
    # the same tp-1 demo checkpoint as bench-serving's (made once, shared)
    target = served.demo_checkpoint(REPO_ROOT / "build" / "bench-serving", commands)
    draft = draft_checkpoint(target, args.draft_layers, commands)
    repo = WORK / "repo"
    # max batch 16: the highest concurrency is served in flight; KV reuse is required for a speculative target
    served.run([*YITRT, "deploy", str(target), "--engine", "reference", "--draft", str(draft), "--speculative", "draft-target",
         "--num-draft-tokens", str(args.num_draft_tokens), "--kv-reuse", "--max-batch-size", "16", "--max-seq-len", "512",
         "--out", str(repo), "--force"], commands, NAME)
    runs = {}
    for label, sent in RUNS:
        k = args.num_draft_tokens if sent is None else sent
        report_dir = WORK / f"bench-{label}"
        with served.Served(repo, commands, WORK / f"serve-{label}.log", NAME) as server:  # a fresh server: an empty KV cache
            bench = [*YITRT, "bench", f"localhost:{server.grpc}", "--tokenizer", str(repo), "--concurrency", args.concurrency,
                     "--isl", args.isl, "--osl", args.osl, "--warmup", str(args.warmup), "--num-draft-tokens", str(k),
                     *(["--num-requests", str(args.num_requests)] if args.num_requests else []),
                     "--metrics-url", f"http://localhost:{server.metrics}/metrics", "--out", str(report_dir), "--json"]
            summary = json.loads(served.run(bench, commands, NAME).stdout)
        runs[label] = {"num_draft_tokens": k, "report": summary["report"], "warnings": summary["warnings"],
                       "points": _points(summary)}
    compared = json.loads(served.run([*YITRT, "bench", "compare", runs["off"]["report"], runs["on"]["report"], "--json"],
                                     commands, NAME).stdout)
    answers = same_answers(Path(runs["off"]["report"]), Path(runs["on"]["report"]))
    result = {
        "benchmark": "speculative decoding: draft-target on vs off on one demo deployment, CPU reference slot (not a GPU engine's speed)",
        "yitrt": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "target": str(target), "draft": {"checkpoint": str(draft), "layers": args.draft_layers},
        "workload": {"concurrency": args.concurrency, "isl": args.isl, "osl": args.osl, "warmup": args.warmup,
                     "num_requests": args.num_requests, "decoding": "greedy, end token ignored (fixed output length)"},
        "repository": str(repo), "runs": runs,
        "speedup": {"a": "off", "b": "on", "ratios": "B / A", "points": compared["speedup"], "warnings": compared["warnings"]},
        "answers": answers,
        "commands": commands,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for row in compared["speedup"]:
        b = row["b_speculation"]
        rate = "-" if b["acceptance_rate"] is None else f"{b['acceptance_rate']:.0%}"
        print(f"{row['load']:5}  out tok/s ×{row['output_throughput_ratio']}  TPOT ×{row['tpot_p50_ratio']}  TTFT ×{row['ttft_p50_ratio']}  "
              f"accepted/step {b['mean_accepted_per_step']}  acceptance {rate}  tokens/step {b['tokens_per_step']}")
    print(f"answers: {answers['identical']} of {answers['compared']} identical with speculation on and off")
    print(f"results: {args.out}")
    if answers["identical"] != answers["compared"]:
        raise SystemExit(f"{NAME}: greedy speculation changed answers (see 'answers' in the results)")


if __name__ == "__main__":
    main()
