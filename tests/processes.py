"""Process trees read from /proc, for the tests that prove nothing yitrt started outlives it (independent of
yitrt's own /proc reading in ``yitrt.triton.launcher``)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a process, None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return int(fields[1]), fields[0]


def tree(root: int) -> set[int]:
    """``root`` and every process whose parent chain leads to it, now."""
    links = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) is not None:
            links[int(name)] = stat[0]
    found, todo = {root}, [root]
    while todo:
        parent = todo.pop()
        for pid, ppid in links.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


def living(pids: set[int]) -> set[int]:
    """Those of ``pids`` that exist and are not zombies."""
    return {pid for pid in pids if (stat := _stat(pid)) is not None and stat[1] != "Z"}


def wait_gone(pids: set[int], timeout: float = 20.0) -> set[int]:
    """Poll until none of ``pids`` lives (at most ``timeout`` s); those still alive then."""
    deadline = time.monotonic() + timeout
    while (left := living(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def cmdlines(pids: set[int]) -> dict[int, str]:
    """pid → command line, for assertion messages."""
    out = {}
    for pid in pids:
        try:
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            out[pid] = "?"
    return out


def kill_all(pids: set[int]) -> None:
    """SIGKILL whatever of ``pids`` is left (a failed test must not leave processes on the machine)."""
    import signal

    for pid in living(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
