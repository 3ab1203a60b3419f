"""Output: rich tables and progress for people, one JSON object for machines.

Human output goes to stdout; logs, warnings, progress and errors go to stderr. With ``--json`` stdout carries
exactly one JSON object and no progress bar is drawn.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from yitrt.errors import YitrtError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def emit_json(data: dict[str, Any]) -> None:
    """Write one JSON object on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """A warning line on stderr."""
    err.print(f"[yellow]warning:[/yellow] {message}", markup=True, highlight=False)


def error_line(exc: YitrtError) -> str:
    """The single line an error is reported as."""
    line = f"error: {exc.message}"
    if exc.hint:
        line += f" (fix: {exc.hint})"
    return line


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
