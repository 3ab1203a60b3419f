"""Output: rich tables and progress for people, one JSON object for machines.

Human output goes to stdout; logs, warnings, progress and errors go to stderr. With ``--json`` stdout carries
exactly one JSON object and no progress bar is drawn.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from yitrt.errors import YitrtError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


#: Where ``emit_json`` writes while ``json_stdout`` holds stdout for the JSON object (None: sys.stdout).
_json_stream = None


def emit_json(data: dict[str, Any]) -> None:
    """Write one JSON object on stdout (NaN/Inf, which JSON cannot hold, become null)."""
    stream = _json_stream or sys.stdout
    stream.write(json.dumps(_json_safe(data), indent=2, default=str, allow_nan=False) + "\n")
    stream.flush()


@contextlib.contextmanager
def json_stdout() -> Iterator[None]:
    """For ``--json``: within the block stdout holds nothing but what ``emit_json`` writes; anything else written
    to it goes to stderr — yitrt's own prints, libraries' (ModelOpt prints on stdout while it builds its CUDA
    extension) and, when stdout is the process's file descriptor 1, child processes' and C code's too."""
    global _json_stream
    original = sys.stdout
    try:
        fd = original.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. captured in tests): Python level only
        fd = None
    saved = None
    original.flush()
    if fd == 1:
        saved = os.dup(1)
        os.dup2(2, 1)
        _json_stream = os.fdopen(os.dup(saved), "w")
    else:
        _json_stream = original
        sys.stdout = sys.stderr
    try:
        yield
    finally:
        stream, _json_stream = _json_stream, None
        if saved is not None:
            sys.stdout.flush()
            stream.close()
            os.dup2(saved, 1)
            os.close(saved)
        else:
            sys.stdout = original


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def warn(message: str) -> None:
    """A warning line on stderr."""
    err.print(f"[yellow]warning:[/yellow] {message}", markup=True, highlight=False)


def error_line(exc: YitrtError) -> str:
    """The single line an error is reported as."""
    line = f"error: {exc.message}"
    if exc.hint:
        line += f" (fix: {exc.hint})"
    # one line whatever a message quotes (a path or value holding a newline stays visible, escaped)
    return line.replace("\r", "\\r").replace("\n", "\\n")


def report_error(exc: YitrtError, as_json: bool) -> None:
    """Report a user error: one line on stderr, plus a JSON object on stdout with ``--json``."""
    sys.stderr.write(error_line(exc) + "\n")
    if as_json:
        emit_json({"ok": False, "error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint,
                                          "problems": getattr(exc, "problems", [exc.message])}})


def human_bytes(n: float) -> str:
    """Decimal units (GB = 1e9 bytes), as GPU memory is usually quoted."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A simple rich table."""
    t = Table(title=title, title_justify="left", show_header=True, header_style="bold")
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*[str(c) for c in row])
    return t


def print_wide(renderable: Any, min_width: int = 132) -> None:
    """Print on stdout at least ``min_width`` columns wide when stdout is not a terminal (logs, CI), where rich would
    otherwise squeeze a wide table into 80 columns."""
    console = out if out.is_terminal or out.width >= min_width else Console(highlight=False, width=min_width, file=out.file)
    console.print(renderable)


@contextlib.contextmanager
def byte_progress(description: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar fed by ``callback(done_bytes, total_bytes)``; None when disabled or not a TTY."""
    if not enabled or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=err, transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextlib.contextmanager
def stage_progress(enabled: bool) -> Iterator[Callable[[str, int | None, int | None], None] | None]:
    """A rich bar fed by ``callback(phase, done, total)``: a count of steps (calibration batches), or a spinner
    when ``total`` is None (loading, export); None when disabled or not a TTY."""
    if not enabled or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True,
    ) as bar:
        task = bar.add_task("starting", total=None)

        def update(phase: str, done: int | None, total: int | None) -> None:
            bar.update(task, description=phase, completed=done or 0, total=total)

        yield update


def inspect_report(data: dict) -> None:
    """Print `yitrt inspect`'s tables from its JSON object."""
    yi = data["yi"]
    match = yi["repo_id"] or (f"{yi['shape']} shape: " + ", ".join(yi["candidates"]) if yi["candidates"] else "not a known Yi checkpoint")
    rows = [
        ["architecture", data["architecture"] + (" (legacy Yi layout)" if data["legacy_yi_layout"] else "")],
        ["Yi registry", match if yi["matched_by"] == "none" else f"{match} (matched by {yi['matched_by']})"],
        ["parameters", f"{data['params']:,}"],
        ["layers / hidden / intermediate", f"{data['num_layers']} / {data['hidden_size']} / {data['intermediate_size']}"],
        ["heads / KV heads / head dim", f"{data['num_heads']} / {data['num_kv_heads']} / {data['head_dim']}"],
        ["vocab", data["vocab_size"]],
        ["context length", f"{data['context_length']:,}"],
        ["rope base / scaling", f"{data['rope_theta']:g} / {data['rope_scaling'] or 'none'}"],
        ["chat end id", f"{data['chat_end_id']} (from {data['chat_end_id_source']})"],
    ]
    out.print(table(f"Model {data['source']}", ["", ""], rows))
    out.print(table(
        "Weight bytes (decoder linears in the dtype; embedding, lm_head, norms 16-bit)",
        list(data["weight_bytes"]), [[human_bytes(v) for v in data["weight_bytes"].values()]],
    ))
    kv = data["kv_bytes_per_token"]
    tps = list(next(iter(kv.values())))
    kv_rows = [[tp, *[f"{kv[d][tp]:,}" for d in kv], data["kv_head_duplication"].get(tp, "")] for tp in tps]
    out.print(table("KV-cache bytes per token per GPU (pp 1)", ["tp", *[f"{d} KV" for d in kv], "KV head copies"], kv_rows))
    out.print(f"valid tp: {data['valid_tp']}   valid pp: {data['valid_pp']}")
    for tp, reasons in data["invalid_tp"].items():
        if int(tp) <= 8:
            out.print(f"  tp {tp}: " + "; ".join(reasons))
    for pp, reasons in data["invalid_pp"].items():
        out.print(f"  pp {pp}: " + "; ".join(reasons))
    for pit in data["pitfalls"]:
        out.print(f"pitfall: {pit['text']} [{pit['source']}]")
    if yi.get("draft_candidates"):
        out.print(f"drafts (speculative decoding, same tokenizer): {', '.join(yi['draft_candidates'])}")


def draft_pair_report(pair: dict) -> None:
    """Print the draft pairing of `yitrt inspect --draft` from its JSON object."""
    sizes = pair.get("sizes") or {}

    def params(n: int) -> str:
        return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"

    size = (f" ({params(sizes['draft']['params'])} parameters, {sizes['draft']['num_layers']} layers, for the target's "
            f"{params(sizes['target']['params'])}, {sizes['target']['num_layers']} layers)") if sizes else ""
    verdict = "ok: it can draft for the target" if pair["ok"] else f"refused: {len(pair['problems'])} difference(s)"
    out.print(f"draft {pair['draft']}{size}: {verdict}", markup=False, highlight=False)
    for problem in pair["problems"]:
        out.print(f"  ✗ {problem}", markup=False, highlight=False)
    for item in pair["checked"]:
        out.print(f"  ✓ {item}", markup=False, highlight=False)
    for note in pair["notes"]:
        out.print(f"  note: {note}", markup=False, highlight=False)


@contextlib.contextmanager
def phase_status(enabled: bool) -> Iterator[Callable[[str], None] | None]:
    """A spinner on stderr whose text ``callback(description)`` replaces; None when disabled or not a TTY."""
    if not enabled or not err.is_terminal:
        yield None
        return
    with err.status("starting") as status:
        yield status.update


def _calibrated_algos() -> set[str]:
    from yitrt.quant.schemes import SCHEMES

    return {s.quant_algo for s in SCHEMES.values() if s.calibrated}


def verify_report(data: dict[str, Any]) -> None:
    """Print `yitrt verify`'s result from its JSON object."""
    t = data["thresholds"]

    def limit(key: str, fmt: str) -> str:
        return "-" if t.get(key) is None else fmt.format(t[key])

    rows = [
        ["top-1 agreement", f"{data['top1_agreement']:.4f} over {data['positions_compared']} positions", limit("min_top1", ">= {}")],
        ["max |Δlogit|", f"{data['max_abs_logit_diff']:.4g} ({data['max_rel_logit_diff']:.3g} of max |logit| {data['logit_scale']:.3g})",
         limit("max_logit_diff_rel", "<= {} of max")],
        ["mean |Δlogit|", f"{data['mean_abs_logit_diff']:.4g}", "-"],
        ["perplexity original / checkpoint", f"{data['ppl_reference']:.4f} / {data['ppl_checkpoint']:.4f} ({data['eval_tokens']} tokens)", "-"],
        ["perplexity delta", f"{data['ppl_delta_pct']:+.3f}%", limit("max_ppl_delta_pct", "within ±{}%")],
        ["greedy tokens matched", f"{data['greedy_match_frac']:.3f} (" + ", ".join(f"{g['matched']}/{g['generated']}" for g in data["greedy_match"]) + ")",
         limit("min_greedy", ">= {}")],
    ]
    pipe = data.get("pipeline") or {}
    if pipe.get("ran"):
        pt = pipe["thresholds"]
        rows += [
            ["pipeline: top-1 vs calibrated model (weights only)", f"{pipe['top1_agreement']:.4f} over {pipe['positions']} positions", f">= {pt['min_top1']}"],
            ["pipeline: perplexity calibrated / checkpoint", f"{pipe['ppl_recorded']:.4f} / {pipe['ppl_checkpoint']:.4f} ({pipe['ppl_delta_pct']:+.3f}%)",
             f"within ±{pt['max_ppl_delta_pct']}%"],
            ["pipeline: activation/KV scales as calibrated", f"{pipe['scales_checked']} checked", "equal"],
        ]
    algo = data["quant_algo"] or "none"
    title = f"verify {data['checkpoint']} against {data['model']} (quant {algo}, KV {data['kv_cache_quant_algo'] or 'model dtype'}, tp {data['tp_size']} × pp {data['pp_size']})"
    lora = data.get("lora")
    if lora:
        title += f" with LoRA adapter {lora['name']} (r {lora['max_rank']}, alpha {lora['alpha']}, {lora['dtype']})"
    out.print(table(title, ["metric", "value", "threshold"], rows))
    if lora:
        out.print(f"adapter: the converted arrays in {lora['dir']} ({', '.join(lora['modules'] or [])}) against {lora['compared_with']}")
    pids = ", ".join(str(r["pid"]) for r in data["ranks"])
    out.print(f"ranks ran in processes {pids}; {data['seconds']:.1f}s")
    if pipe.get("ran"):
        out.print("pipeline rows: the checkpoint vs the calibrated model it was exported from (they fail verify); "
                  "the rows above them: the quantization loss vs the original (warnings)")
    elif pipe.get("reason") and data["quant_algo"] in _calibrated_algos():  # a calibrated format made elsewhere
        out.print(f"pipeline check not run: {pipe['reason']}")
    for w in data["warnings"]:
        warn(w)
    if data["passed"]:
        out.print("PASS")
    else:
        out.print("FAIL: " + "; ".join(data["failures"]))
