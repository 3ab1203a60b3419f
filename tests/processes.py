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


class TreeWatch:
    """Samples, in a thread, the process tree under ``root`` (and under every process seen in it since, so that a
    process reparented away or started late is still known) until ``stop``. ``seen``: every pid ever in it."""

    def __init__(self, root: int, every: float = 0.05) -> None:
        import threading

        self.root, self.every = root, every
        self.seen: set[int] = {root}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def sample(self) -> set[int]:
        """Add what is in the tree now; ``seen``."""
        with self._lock:
            roots = living(self.seen) | {self.root}
            found: set[int] = set()
            for pid in roots:
                if pid not in found:
                    found |= tree(pid)
            self.seen |= found
            return set(self.seen)

    def find(self, needle: str) -> list[int]:
        """Seen processes alive now whose command line contains ``needle``."""
        return [pid for pid, cmd in cmdlines(living(self.sample())).items() if needle in cmd]

    def wait_for(self, needle: str, timeout: float = 120.0) -> int:
        """The first process whose command line contains ``needle`` (polling ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := self.find(needle):
                return found[0]
            time.sleep(self.every)
        raise AssertionError(f"no process {needle!r} appeared in {timeout:.0f} s")

    def wait_gone(self, timeout: float = 20.0) -> set[int]:
        """Poll (still sampling) until no seen process lives, at most ``timeout`` s; then stop. Those left."""
        deadline = time.monotonic() + timeout
        while (left := living(self.sample())) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.stop()
        return left

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
