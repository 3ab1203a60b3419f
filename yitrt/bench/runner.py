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
from yitrt.bench import acceptance, kvmetrics, loadgen, metrics
from yitrt.bench.loadgen import Load, PointRun, Target, TokenCodec
from yitrt.bench.workload import (
    MULTITURN,
    TURN_SEPARATOR,
    LengthSpec,
    Prompt,
    PromptFactory,
    Session,
    load_dataset,
    load_sessions,
    prefix_prompts,
    resolve_tokenizer_dir,
    synthetic_prompts,
    synthetic_sessions,
)
from yitrt.errors import UsageError, require
from yitrt.speculation import LookaheadSizes

#: ``kind`` of a bench.json (compare refuses other files).
REPORT_KIND = "yitrt-bench"
REPORT_NAME = "bench.json"
#: Prompts prepared when the run is bounded by time, not count (reused cyclically beyond that).
DURATION_POOL = 512
#: The client is called the bottleneck when its process uses this share of a CPU core (Python runs one at a time).
CLIENT_CPU_LIMIT = 0.9
#: ... or when the event loop wakes later than this share of the smallest latency it measures.
TIMESTAMP_ERROR_SHARE = 0.1
#: Turns of a synthetic multi-turn session when --turns is not given.
DEFAULT_TURNS = 3
#: ``--metrics-url`` value that turns the scrape off.
NO_METRICS = "none"


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
        dataset: ``synthetic``, a JSONL file of prompts, or ``multiturn:synthetic`` / ``multiturn:FILE`` (sessions).
        prefix_tokens / num_prefixes: synthetic prompts start with one of ``num_prefixes`` (default 1) shared
            prefixes of exactly ``prefix_tokens`` tokens (prompt i uses prefix i mod num_prefixes).
        turns: user turns per ``multiturn:synthetic`` session (default 3).
        metrics_url: Triton's metrics endpoint for the KV-cache figures (None: http://<gRPC host>:8002/metrics, a
            warning if it does not answer; ``none``: not scraped; any other URL must answer).
        num_draft_tokens: sent as the BLS input ``num_draft_tokens`` (draft tokens per round, 1..MAX_DRAFT_TOKENS;
            0: the same deployment without speculation; None: not sent, the deployment's default).
        lookahead: sent as the ``tensorrt_llm`` model's three ``lookahead_*`` inputs (``model`` must be
            ``tensorrt_llm``; (1, 1, 0) is plain decoding).
        perf_metrics: send ``return_perf_metrics`` (the server's acceptance outputs); None: when ``num_draft_tokens``
            or ``lookahead`` is given.
        isl / osl: token lengths (synthetic prompts; ``osl`` also for dataset lines without max_tokens).
        slo: latency bounds for goodput and for judging points.
        warmup: requests sent before each point's measured window (recorded, not measured).
        tokenizer: a yitrt repository or HF folder with the model's tokenizer.
        ignore_eos: send end_id -1 so that every request generates exactly its max_tokens.
        timeout: seconds one request may take.
        seed: seed of prompt words, lengths and arrival times.
        lora: every request asks for this LoRA adapter of the repository ``repo`` (its ``lora_adapters.json``).
        lora_mix: ``a:0.5,b:0.3,base:0.2`` — each request asks for an adapter drawn with these weights (``base``: none).
        repo: the deployed repository listing the adapters (None: ``tokenizer`` when that is one).
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
    prefix_tokens: int | None = None
    num_prefixes: int | None = None
    turns: int | None = None
    metrics_url: str | None = None
    num_draft_tokens: int | None = None
    lookahead: LookaheadSizes | None = None
    perf_metrics: bool | None = None
    lora: str | None = None
    lora_mix: str | None = None
    repo: Path | None = None

    @property
    def adapter_repo(self) -> Path | None:
        """Where the adapters are listed: ``repo``, else ``tokenizer`` when it holds ``lora_adapters.json``."""
        from yitrt.triton.lora_client import ADAPTERS_FILE

        if self.repo is not None:
            return self.repo
        return self.tokenizer if self.tokenizer is not None and (self.tokenizer / ADAPTERS_FILE).is_file() else None

    @property
    def multiturn(self) -> str | None:
        """``synthetic`` or the sessions file of a multi-turn run; None otherwise."""
        return self.dataset[len(MULTITURN):] if self.dataset.startswith(MULTITURN) else None


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
    problems += _workload_problems(req)
    problems += acceptance.option_problems(req.num_draft_tokens, req.lookahead, req.model)
    problems += _lora_problems(req)
    from yitrt.triton.client import parse_url

    try:
        parse_url(req.url)
    except UsageError as exc:
        problems.append(exc.message)
    if problems:
        raise UsageError("; ".join(problems), "fix the options named")


def _lora_problems(req: BenchRequest) -> list[str]:
    """--lora / --lora-mix against the rest of the options and the repository's adapters."""
    from yitrt.triton import lora_client

    if req.lora is None and req.lora_mix is None:
        return []
    if req.lora is not None and req.lora_mix is not None:
        return ["--lora and --lora-mix cannot be combined: --lora NAME is --lora-mix NAME:1"]
    if req.multiturn is not None:
        return ["--lora/--lora-mix run over prompts, not multi-turn sessions: use --dataset synthetic or a prompts file"]
    if req.num_draft_tokens or req.lookahead is not None:
        return ["--lora/--lora-mix are not combined with speculative decoding (the draft has no adapter)"]
    if req.adapter_repo is None:
        return ["--lora/--lora-mix need the deployed repository that lists the adapters: pass --repo REPO"]
    try:
        adapters = lora_client.read_adapters(req.adapter_repo)
        if req.lora is not None:
            lora_client.pick(adapters, req.lora)
        else:
            lora_client.parse_mix(req.lora_mix, set(adapters))
    except UsageError as exc:
        return [exc.message]
    return []


def lora_plan(req: BenchRequest) -> tuple[dict[str, float], dict]:
    """(adapter name or ``base`` → weight, the repository's adapters) of a LoRA run ({} , {} without one)."""
    from yitrt.triton import lora_client

    if req.lora is None and req.lora_mix is None:
        return {}, {}
    adapters = lora_client.read_adapters(req.adapter_repo)
    mix = {req.lora: 1.0} if req.lora is not None else lora_client.parse_mix(req.lora_mix, set(adapters))
    return mix, adapters


def _with_adapters(items: list, mix: dict[str, float], sender, seed: int) -> list:
    """The prepared requests, each with its adapter's ``lora_task_id`` (drawn from the mix; ``base``: none)."""
    from dataclasses import replace

    from yitrt.triton import lora_client

    names = lora_client.assign(mix, len(items), seed)
    ids = {name: sender.id_tensor(name) for name in set(names) if name is not None}
    return [item if name is None else replace(item, tensors=item.tensors + [ids[name]], adapter=name)
            for item, name in zip(items, names, strict=True)]


def _workload_problems(req: BenchRequest) -> list[str]:
    """What is wrong with the dataset, prefix, multi-turn and metrics options (each problem names its fix)."""
    from yitrt.userfiles import check_readable_file

    problems = []
    multiturn = req.multiturn
    file = multiturn if multiturn is not None else req.dataset
    if file == "":
        problems.append("--dataset multiturn: needs a source: multiturn:synthetic or multiturn:FILE")
    elif file != "synthetic":
        try:
            check_readable_file(Path(file), "dataset")
        except UsageError as exc:
            problems.append(f"{exc.message} (pass --dataset synthetic, multiturn:synthetic or a JSONL file)")
    if req.prefix_tokens is not None:
        if req.prefix_tokens < 1:
            problems.append(f"--prefix-tokens must be >= 1, got {req.prefix_tokens}")
        if req.dataset != "synthetic":
            problems.append("--prefix-tokens applies to --dataset synthetic prompts: drop it or the --dataset")
    if req.num_prefixes is not None:
        if req.prefix_tokens is None:
            problems.append("--num-prefixes needs --prefix-tokens N (the length of each shared prefix)")
        if req.num_prefixes < 1:
            problems.append(f"--num-prefixes must be >= 1, got {req.num_prefixes}")
    if req.turns is not None:
        if multiturn != "synthetic":
            problems.append("--turns applies to --dataset multiturn:synthetic (a sessions file sets its own turns)")
        if req.turns < 1:
            problems.append(f"--turns must be >= 1, got {req.turns}")
    if multiturn is not None and any(load.kind != "concurrency" for load in req.loads):
        problems.append("multi-turn sessions run at a concurrency (sessions in flight): pass --concurrency, not --request-rate")
    if req.metrics_url is not None and req.metrics_url != NO_METRICS:
        problem = kvmetrics.check_metrics_url(req.metrics_url)
        if problem:
            problems.append(f"{problem}, or {NO_METRICS}")
    return problems


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
        if req.prefix_tokens is not None:
            return prefix_prompts(factory, total, req.prefix_tokens, req.num_prefixes or 1, req.isl, req.osl)
        return synthetic_prompts(factory, total, req.isl, req.osl)
    if factory is None:
        return dataset
    return [replace(p, input_tokens=factory.count(p.text)) if p.text else p for p in dataset]


def _sessions(req: BenchRequest, factory: PromptFactory | None, counts: list[int | None],
              loaded: list[Session] | None) -> list[Session]:
    """The run's sessions: the file's, or enough synthetic ones that no point (warmup included) repeats one."""
    if loaded is not None:
        return loaded
    if factory is None:
        raise UsageError("synthetic sessions need the model's tokenizer to control their lengths",
                         "pass --tokenizer REPO (the folder yitrt deploy wrote, or the HF model folder)")
    turns = req.turns or DEFAULT_TURNS
    per_point = [math.ceil((n if n is not None else DURATION_POOL) / turns) + math.ceil(req.warmup / turns) for n in counts]
    return synthetic_sessions(factory, sum(per_point), turns, req.isl, req.osl)


class _Scraper:
    """Reads Triton's metrics around each measured window; a failed scrape is a warning, never a failed run."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.failures: list[str] = []

    def __call__(self) -> kvmetrics.Snapshot | None:
        try:
            return kvmetrics.scrape(self.url)
        except kvmetrics.MetricsError as exc:
            self.failures.append(exc.message)
            return None


def _metrics_scraper(req: BenchRequest, warnings: list[str]) -> _Scraper | None:
    """The scraper of the run, after one probe: an explicit URL must answer; the default one may not (warned)."""
    if req.metrics_url == NO_METRICS:
        return None
    url = req.metrics_url or kvmetrics.default_metrics_url(req.url)
    try:
        kvmetrics.scrape(url)
    except kvmetrics.MetricsError as exc:
        if req.metrics_url is not None:
            raise
        warnings.append(f"{exc.message} (the default): the kv_cache figures are None; pass --metrics-url "
                        "http://HOST:METRICS_PORT/metrics (yitrt serve --metrics-port), or none")
        return None
    return _Scraper(url)


def run_bench(req: BenchRequest, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run the benchmark and write its report folder.

    Raises:
        UsageError: bad options, or a dataset/model mismatch (nothing is sent).
        YitrtError: the server cannot be reached; MetricsError: an explicit ``metrics_url`` does not answer.
        ArtifactError: ``out`` is a folder yitrt did not make.
    """
    from yitrt.manifest import ArtifactWriter, check_output_folder

    check_request(req)
    check_output_folder(req.out, "bench")
    # the dataset is read and checked whole before connecting to anything (its token counts come with the tokenizer)
    multiturn = req.multiturn
    dataset = None if req.dataset == "synthetic" or multiturn is not None else load_dataset(Path(req.dataset), req.osl, req.seed)
    loaded = None if multiturn in (None, "synthetic") else load_sessions(Path(multiturn), req.osl, req.seed)
    say = progress or (lambda line: None)
    target = loadgen.resolve_target(req.url, req.model)
    extra, warnings = acceptance.request_inputs(req.num_draft_tokens, req.lookahead, req.perf_metrics, target.inputs, target.model)
    mix, adapters = lora_plan(req)
    sender = None
    if mix:
        from yitrt.triton import lora_client

        used = {name: adapters[name] for name in mix if name != lora_client.BASE}
        sender = lora_client.LoraSender(require("tritonclient.grpc", "bench"), target.inputs, used, target.model)
        for name in used:
            sender.weight_tensors(name)  # built (and their dtype checked) before the load starts
    scraper = _metrics_scraper(req, warnings)
    tok_dir, add_special = _tokenizer(req, target)
    factory = None
    if tok_dir is not None:
        from yitrt.reference.verify import load_tokenizer

        factory = PromptFactory(load_tokenizer(tok_dir), add_special, req.seed)
    codec = _codec(factory) if target.entry == "tokens" and factory is not None else None
    loadgen.check_codec(target, codec)
    counts = [requests_per_point(req, load) for load in req.loads]
    sessions: list[Session] | None = None
    if multiturn is not None:
        sessions = _sessions(req, factory, counts, loaded)
        loadgen.check_end_id(target, req.ignore_eos)
        prompts, items = [], []
    else:
        total = sum((n if n is not None else DURATION_POOL) + req.warmup for n in counts)
        prompts = _prompts(req, factory, total, dataset)
        items = loadgen.prepare(target, prompts, req.ignore_eos, extra, codec)
        if sender is not None:
            items = _with_adapters(items, mix, sender, req.seed)
    count_tokens = (lambda text: len(factory.tokenizer(text, add_special_tokens=False)["input_ids"])) if factory else None
    runs: list[PointRun] = []
    offset = 0
    for load, n in zip(req.loads, counts, strict=True):
        say(f"{load.label}: {n if n is not None else 'up to ' + format(req.duration, 'g') + ' s of'} requests"
            + (f" after {req.warmup} warmup" if req.warmup else ""))
        if sessions is not None:
            rotated_sessions = sessions[offset:] + sessions[:offset]  # every point starts on sessions it has not run
            run = asyncio.run(loadgen.run_point(target, load, [], num_requests=n, duration=req.duration, warmup=req.warmup,
                                                timeout=req.timeout, seed=req.seed, count_tokens=count_tokens,
                                                sessions=rotated_sessions, ignore_eos=req.ignore_eos,
                                                count_input=factory.count if factory else None, scrape=scraper,
                                                extra=extra, codec=codec))
            offset = (offset + len({r.session for r in run.records})) % len(sessions)
        else:
            rotated = items[offset:] + items[:offset]  # every point starts on prompts it has not sent yet
            run = asyncio.run(loadgen.run_point(target, load, rotated, num_requests=n, duration=req.duration, warmup=req.warmup,
                                                timeout=req.timeout, seed=req.seed, count_tokens=count_tokens, scrape=scraper,
                                                codec=codec, lora=sender))
            offset = (offset + len(run.records)) % len(items)
        runs.append(run)
    ran = sum(len({r.session for r in run.records}) for run in runs) if sessions is not None else 0
    if sessions is not None and ran > len(sessions):
        warnings.append(f"the run went through {ran} sessions and the dataset has {len(sessions)}: repeated sessions "
                        "get prefix hits from their earlier copies (add sessions, or send fewer --num-requests)")
    if scraper is not None and scraper.failures:
        warnings.append(f"{len(scraper.failures)} metrics scrapes failed (first: {scraper.failures[0]}): those points' "
                        "kv_cache figures are None")
    report = build_report(req, target, runs, prompts, tok_dir, scraper.url if scraper else None, sessions, warnings, extra,
                          (mix, adapters) if mix else None)
    with ArtifactWriter(req.out, "bench", {"url": req.url, "model": target.model}, {}) as art:
        from yitrt.bench.plots import write_plots

        plots = write_plots(art.path, report)
        report["plots"] = plots
        (art.path / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    return BenchResult(report, req.out, plots)


def _codec(factory: PromptFactory) -> TokenCodec:
    """Prompt text → ids as the deployment's preprocessing encodes it; ids → text as its postprocessing decodes."""
    tokenizer, special = factory.tokenizer, factory.add_special_tokens
    return TokenCodec(lambda text: list(tokenizer(text, add_special_tokens=special)["input_ids"]),
                      lambda ids: tokenizer.decode(ids, skip_special_tokens=True))


def build_report(req: BenchRequest, target: Target, runs: list[PointRun], prompts: list[Prompt],
                 tokenizer: Path | None, metrics_url: str | None = None, sessions: list[Session] | None = None,
                 warnings: list[str] | None = None, extra: dict[str, Any] | None = None,
                 lora: tuple[dict[str, float], dict] | None = None) -> dict[str, Any]:
    """bench.json's content: settings, the workload, every point (metrics, KV-cache reuse, speculation, client and
    server measurements, requests; with LoRA the metrics per adapter), the best point and the warnings; ``extra``: the
    speculation inputs sent; ``lora``: the adapter mix and the repository's adapters."""
    from yitrt.triton import lora_client

    points, warnings = [], list(warnings or [])
    for run in runs:
        before, after = run.scraped or (None, None)
        kv = kvmetrics.kv_point(before, after, metrics_url if before is not None and after is not None else None)
        point = {"load": run.load.to_json(), "model": target.model, **metrics.summarize(run.records, req.slo),
                 "kv_cache": kv, "speculation": acceptance.point_figures(run.records), "client": run.client,
                 "server_counts": run.server_counts}
        if sessions is not None:
            point["sessions"] = session_summary(run.records)
        if lora is not None:  # the point's figures per adapter ("base": the requests without one)
            point["adapters"] = {name: metrics.summarize([r for r in run.records if (r.adapter or lora_client.BASE) == name], req.slo)
                                 for name in lora[0]}
            resent = sum(1 for r in run.records if r.lora_resent)
            if resent:
                warnings.append(f"{run.load.label}: {resent} requests were refused as 'not found in cache' and sent again with "
                                "their weights (the server evicted adapters: raise lora_cache_* or use fewer adapters)")
        warnings += point_warnings(req, run.load, point)
        warnings += acceptance.point_warnings(run.load.label, point["speculation"])
        point["requests"] = [r.to_json() for r in run.records]
        points.append(point)
    warnings += kv_warnings(points)
    best = metrics.best_point(points)
    if req.slo.given and best is None:
        warnings.append("no load point met the SLO: lower the load, or relax --slo-ttft/--slo-tpot")
    lengths = [p.input_tokens for p in prompts if p.input_tokens is not None]
    return {
        "kind": REPORT_KIND, "format": 1, "yitrt": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": target.to_json(), "mode": req.loads[0].kind,
        "workload": {"dataset": req.dataset, "isl": req.isl.to_json(), "osl": req.osl.to_json(), "ignore_eos": req.ignore_eos,
                     "prompts": len(prompts), "prompt_tokens": metrics.distribution([float(n) for n in lengths], scale=1.0),
                     "tokenizer": None if tokenizer is None else str(tokenizer),
                     "prefix": None if req.prefix_tokens is None else {
                         "tokens": req.prefix_tokens, "count": req.num_prefixes or 1,
                         "assignment": "prompt i of the run's pool uses prefix i mod count"},
                     "multiturn": None if sessions is None else {
                         "source": req.multiturn, "sessions": len(sessions),
                         "turns": sorted({len(s.turns) for s in sessions}),
                         "rendering": f"turn k+1's text_input = turn k's text_input + its answer + {TURN_SEPARATOR!r} + "
                                      f"the new user turn + {TURN_SEPARATOR!r}"}},
        "metrics_url": metrics_url,
        "speculation": {"num_draft_tokens": req.num_draft_tokens,
                        "lookahead": None if req.lookahead is None else [req.lookahead.window, req.lookahead.ngram,
                                                                         req.lookahead.verification_set],
                        "inputs": dict(extra or {}),
                        "requested": bool(extra) or req.perf_metrics is not None},
        "settings": {"num_requests": req.num_requests, "duration_s": req.duration, "warmup": req.warmup,
                     "timeout_s": req.timeout, "seed": req.seed},
        "slo": req.slo.to_json() if req.slo.given else None,
        "lora": None if lora is None else {
            "repo": str(req.adapter_repo), "mix": lora[0],
            "adapters": {name: lora_client.describe(lora[1][name]) for name in lora[0] if name != lora_client.BASE},
            "weights": "sent with a task's requests until the server answered one, and again after 'not found in cache'"},
        "points": points, "best": best, "warnings": warnings, "plots": [],
    }


def session_summary(records: list) -> dict[str, Any]:
    """A multi-turn point's sessions: how many ran (measured), how many ended early on a failed turn, and TTFT p50
    per turn number (later turns resend more, and reuse is what keeps their TTFT down)."""
    measured = [r for r in records if not r.warmup]
    by_session: dict[int, list] = {}
    for r in measured:
        by_session.setdefault(r.session, []).append(r)
    by_turn: dict[int, list[float]] = {}
    for r in measured:
        if r.ok and r.ttft is not None:
            by_turn.setdefault(r.turn, []).append(r.ttft)
    return {"count": len(by_session), "ended_early": sum(1 for rs in by_session.values() if not rs[-1].ok),
            "ttft_ms_p50_by_turn": {str(t): metrics.distribution(v)["p50"] for t, v in sorted(by_turn.items())}}


def kv_warnings(points: list[dict[str, Any]]) -> list[str]:
    """Once per run: what the metrics endpoint lacks, so that the missing figures are explained, not guessed."""
    missing = sorted({m for p in points for m in p["kv_cache"]["missing"]})
    if not missing:
        return []
    if kvmetrics.KV_FAMILY in missing:
        return [f"the metrics endpoint exports no {kvmetrics.KV_FAMILY} (a tensorrt_llm model without KV-cache metrics): "
                "no KV reuse figures"]
    counters = [m for m in missing if m.split("=")[-1] in kvmetrics.KV_COUNTERS]
    if counters:
        return [f"the metrics endpoint lacks {', '.join(counters)} (an older TensorRT-LLM backend): "
                "the figures that need them, the hit rate among them, are None"]
    return [f"the metrics endpoint lacks {', '.join(missing)}: those kv_cache figures are None"]


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
