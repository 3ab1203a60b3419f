"""`yitrt bench URL`: check the request, build the workload, run every load point, judge it, write the report.

The report is an artifact folder (written whole or not at all, yitrt-manifest.json included): ``bench.json`` with
every point's metrics and every request's timings, and the PNG plots.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from yitrt import __version__
from yitrt.bench import loadgen, metrics
from yitrt.bench.loadgen import Load, PointRun, Target
from yitrt.bench.workload import (
    LengthSpec,
    Prompt,
    PromptFactory,
    load_dataset,
    resolve_tokenizer_dir,
    synthetic_prompts,
)
from yitrt.errors import UsageError, require

#: ``kind`` of a bench.json (compare refuses other files).
REPORT_KIND = "yitrt-bench"
REPORT_NAME = "bench.json"
#: Prompts prepared when the run is bounded by time, not count (reused cyclically beyond that).
DURATION_POOL = 512
#: The client is called the bottleneck when its process uses this share of a CPU core (Python runs one at a time).
CLIENT_CPU_LIMIT = 0.9
#: ... or when the event loop wakes later than this share of the smallest latency it measures.
TIMESTAMP_ERROR_SHARE = 0.1


@dataclass(frozen=True)
class BenchRequest:
    """A benchmark: where, what load, what prompts, which SLO, where the report goes.

    Attributes:
        url: gRPC endpoint (``host:port``).
        loads: the load points, run in order (all concurrencies or all rates).
        out: report folder (replaced only if it holds an earlier yitrt bench report).
        model: model to ask (None: the deployment's BLS entry model).
        num_requests: measured requests per point (None with no ``duration``: 4 × concurrency or 10 s of arrivals,
            at least 16).
        duration: seconds to keep sending per point (the point then waits for its answers).
        dataset: ``synthetic`` or a JSONL file.
        isl / osl: token lengths (synthetic prompts; ``osl`` also for dataset lines without max_tokens).
        slo: latency bounds for goodput and for judging points.
        warmup: requests sent before each point's measured window (recorded, not measured).
        tokenizer: a yitrt repository or HF folder with the model's tokenizer.
        ignore_eos: send end_id -1 so that every request generates exactly its max_tokens.
        timeout: seconds one request may take.
        seed: seed of prompt words, lengths and arrival times.
    """

    url: str
    loads: tuple[Load, ...]
    out: Path
    model: str | None = None
    num_requests: int | None = None
    duration: float | None = None
    dataset: str = "synthetic"
    isl: LengthSpec = LengthSpec(128)
    osl: LengthSpec = LengthSpec(64)
    slo: metrics.Slo = metrics.Slo()
    warmup: int = 0
    tokenizer: Path | None = None
    ignore_eos: bool = True
    timeout: float = 600.0
    seed: int = 0


@dataclass
class BenchResult:
    """The report, as written to bench.json, and where it went."""

    report: dict[str, Any]
    out: Path
    plots: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return self.report["warnings"]


def check_request(req: BenchRequest) -> None:
    """Every problem with the options, before connecting to anything.

    Raises:
        UsageError: no loads, mixed load kinds, non-positive values, both or neither bounds misused.
    """
    problems = []
    if not req.loads:
        problems.append("no load points: pass --concurrency 1,4,16 or --request-rate 2,4")
    if len({load.kind for load in req.loads}) > 1:
        problems.append("--concurrency and --request-rate cannot be mixed in one run")
    for load in req.loads:
        if load.value <= 0 or (load.kind == "concurrency" and load.value != int(load.value)):
            problems.append(f"{load.kind} must be a positive {'integer' if load.kind == 'concurrency' else 'number'}, got {load.value:g}")
    for name, value in (("--num-requests", req.num_requests), ("--duration", req.duration), ("--timeout", req.timeout)):
        if value is not None and value <= 0:
            problems.append(f"{name} must be positive, got {value:g}")
    if req.warmup < 0:
        problems.append(f"--warmup must be >= 0, got {req.warmup}")
    for name, bound in (("--slo-ttft", req.slo.ttft_ms), ("--slo-tpot", req.slo.tpot_ms)):
        if bound is not None and bound <= 0:
            problems.append(f"{name} must be a positive number of milliseconds, got {bound:g}")
    if not 0 < req.slo.percentile <= 100:
        problems.append(f"--slo-percentile must be in (0, 100], got {req.slo.percentile:g}")
    if req.dataset != "synthetic":
        from yitrt.userfiles import check_readable_file

        try:
            check_readable_file(Path(req.dataset), "dataset")
        except UsageError as exc:
            problems.append(f"{exc.message} (pass --dataset synthetic or a JSONL file)")
    from yitrt.triton.client import parse_url

    try:
        parse_url(req.url)
    except UsageError as exc:
        problems.append(exc.message)
    if problems:
        raise UsageError("; ".join(problems), "fix the options named")


def requests_per_point(req: BenchRequest, load: Load) -> int | None:
    """Measured requests of one point: the number asked for; None when bounded by time only; else the default."""
    if req.num_requests is not None or req.duration is not None:
        return req.num_requests
    return max(16, 4 * int(load.value) if load.kind == "concurrency" else math.ceil(10 * load.value))


def _tokenizer(req: BenchRequest, target: Target):
    """(tokenizer folder, add_special_tokens) from --tokenizer, else from the server's preprocessing model when it
    names an absolute folder that exists here (stock deployments do); (None, True) when neither."""
    add_special = True
    folder = req.tokenizer
    try:
        grpc = require("tritonclient.grpc", "bench")
        config = grpc.InferenceServerClient(target.url).get_model_config("preprocessing", as_json=True)["config"]
        params = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
        add_special = (params.get("add_special_tokens") or "true").lower() in ("true", "1", "yes")
        named = params.get("tokenizer_dir")
        if folder is None and named and os.path.isabs(named) and os.path.isdir(named):
            folder = Path(named)
    except Exception:  # noqa: BLE001 - a deployment without a preprocessing model: rely on --tokenizer
        pass
    return (resolve_tokenizer_dir(folder) if folder is not None else None), add_special


def _prompts(req: BenchRequest, factory: PromptFactory | None, total: int, dataset: list[Prompt] | None) -> list[Prompt]:
    if dataset is None:
        if factory is None:
            raise UsageError("synthetic prompts need the model's tokenizer to control their lengths",
                             "pass --tokenizer REPO (the folder yitrt deploy wrote, or the HF model folder)")
        return synthetic_prompts(factory, total, req.isl, req.osl)
    if factory is None:
        return dataset
    return [replace(p, input_tokens=factory.count(p.text)) if p.text else p for p in dataset]


def run_bench(req: BenchRequest, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run the benchmark and write its report folder.

    Raises:
        UsageError: bad options, or a dataset/model mismatch (nothing is sent).
        YitrtError: the server cannot be reached.
        ArtifactError: ``out`` is a folder yitrt did not make.
    """
    from yitrt.manifest import ArtifactWriter, check_output_folder

    check_request(req)
    check_output_folder(req.out, "bench")
    # the dataset is read and checked whole before connecting to anything (its token counts come with the tokenizer)
    dataset = None if req.dataset == "synthetic" else load_dataset(Path(req.dataset), req.osl, req.seed)
    say = progress or (lambda line: None)
    target = loadgen.resolve_target(req.url, req.model)
    tok_dir, add_special = _tokenizer(req, target)
    factory = None
    if tok_dir is not None:
        from yitrt.reference.verify import load_tokenizer

        factory = PromptFactory(load_tokenizer(tok_dir), add_special, req.seed)
    counts = [requests_per_point(req, load) for load in req.loads]
    total = sum((n if n is not None else DURATION_POOL) + req.warmup for n in counts)
    prompts = _prompts(req, factory, total, dataset)
    items = loadgen.prepare(target, prompts, req.ignore_eos)
    count_tokens = (lambda text: len(factory.tokenizer(text, add_special_tokens=False)["input_ids"])) if factory else None
    runs: list[PointRun] = []
    offset = 0
    for load, n in zip(req.loads, counts, strict=True):
        say(f"{load.label}: {n if n is not None else 'up to ' + format(req.duration, 'g') + ' s of'} requests"
            + (f" after {req.warmup} warmup" if req.warmup else ""))
        rotated = items[offset:] + items[:offset]  # every point starts on prompts it has not sent yet
        run = asyncio.run(loadgen.run_point(target, load, rotated, num_requests=n, duration=req.duration, warmup=req.warmup,
                                            timeout=req.timeout, seed=req.seed, count_tokens=count_tokens))
        offset = (offset + len(run.records)) % len(items)
        runs.append(run)
    report = build_report(req, target, runs, prompts, tok_dir)
    with ArtifactWriter(req.out, "bench", {"url": req.url, "model": target.model}, {}) as art:
        from yitrt.bench.plots import write_plots

        plots = write_plots(art.path, report)
        report["plots"] = plots
        (art.path / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    return BenchResult(report, req.out, plots)


def build_report(req: BenchRequest, target: Target, runs: list[PointRun], prompts: list[Prompt],
                 tokenizer: Path | None) -> dict[str, Any]:
    """bench.json's content: settings, every point (metrics, client and server measurements, requests), the best
    point and the warnings."""
    points, warnings = [], []
    for run in runs:
        point = {"load": run.load.to_json(), "model": target.model, **metrics.summarize(run.records, req.slo),
                 "client": run.client, "server_counts": run.server_counts}
        warnings += point_warnings(req, run.load, point)
        point["requests"] = [r.to_json() for r in run.records]
        points.append(point)
    best = metrics.best_point(points)
    if req.slo.given and best is None:
        warnings.append("no load point met the SLO: lower the load, or relax --slo-ttft/--slo-tpot")
    lengths = [p.input_tokens for p in prompts if p.input_tokens is not None]
    return {
        "kind": REPORT_KIND, "format": 1, "yitrt": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": target.to_json(), "mode": req.loads[0].kind,
        "workload": {"dataset": req.dataset, "isl": req.isl.to_json(), "osl": req.osl.to_json(), "ignore_eos": req.ignore_eos,
                     "prompts": len(prompts), "prompt_tokens": metrics.distribution([float(n) for n in lengths], scale=1.0),
                     "tokenizer": None if tokenizer is None else str(tokenizer)},
        "settings": {"num_requests": req.num_requests, "duration_s": req.duration, "warmup": req.warmup,
                     "timeout_s": req.timeout, "seed": req.seed},
        "slo": req.slo.to_json() if req.slo.given else None,
        "points": points, "best": best, "warnings": warnings, "plots": [],
    }


def point_warnings(req: BenchRequest, load: Load, point: dict[str, Any]) -> list[str]:
    """What makes a point's figures doubtful: errors, short outputs, a client that may be the bottleneck, the
    server counting other requests than the client sent."""
    out = []
    label, counts = load.label, point["counts"]
    if counts["errors"]:
        first = next(iter(counts["error_messages"]))
        out.append(f"{label}: {counts['errors']} of {counts['sent']} requests failed (first: {first})")
    if point["short_outputs"]:
        why = ("the deployment's max_seq_len or max_tokens cap" if req.ignore_eos else "the end token (--respect-eos)")
        out.append(f"{label}: {point['short_outputs']} answers stopped before their max_tokens ({why})")
    client = point["client"]
    if client["cpu_fraction"] is not None and client["cpu_fraction"] >= CLIENT_CPU_LIMIT:
        out.append(f"{label}: the client used {client['cpu_fraction']:.0%} of a CPU core: it, not the server, may be "
                   "the bottleneck (run bench on another machine, or fewer requests in flight)")
    smallest = point["tpot_ms"]["p50"] or point["ttft_ms"]["p50"]
    lag = client["loop_lag_ms"]["p99"]
    if smallest and lag is not None and lag > TIMESTAMP_ERROR_SHARE * smallest:
        out.append(f"{label}: the client's event loop woke up to {lag:.1f} ms late (p99), over "
                   f"{TIMESTAMP_ERROR_SHARE:.0%} of the {smallest:.1f} ms latencies measured: the client is the bottleneck")
    send = client["send_lag_ms"]["p90"]
    if load.kind == "rate" and send is not None and send > TIMESTAMP_ERROR_SHARE * 1000 / load.value:
        out.append(f"{label}: requests went out {send:.1f} ms behind their Poisson schedule (p90): the client could "
                   "not keep the rate")
    server = point["server_counts"]
    # Triton counts a decoupled model's request as a success once the model took it (an error it sends back later
    # is not a failure there), so what compares is the number of requests that reached the model
    if server is not None and server["success"] + server["fail"] != counts["sent"]:
        out.append(f"{label}: the server counted {server['success'] + server['fail']} requests for {point['model']}, the "
                   f"client sent {counts['sent']} (another client was using the server, or requests never arrived)")
    return out
