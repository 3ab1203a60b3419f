"""How yitrt runs tritonserver (or mpirun): ``python -m yitrt.triton.launcher --parent PID [--remove DIR] -- ARGV…``.

A process yitrt starts must die with it, however yitrt ends. tritonserver alone does not ensure that: its Python
backend stubs and the reference workers they start outlive a SIGKILLed tritonserver, and nothing stops tritonserver
when yitrt is SIGKILLed. This launcher sits between yitrt and tritonserver and closes that at one place:

* it is a *child subreaper* (``PR_SET_CHILD_SUBREAPER``), so every orphaned descendant (a stub whose tritonserver
  died, a worker whose stub died) is reparented to it instead of init, and it can find and kill them;
* tritonserver gets ``PR_SET_PDEATHSIG SIGKILL``: it dies when the launcher is SIGKILLed;
* it watches its own parent by polling ``getppid()`` (PDEATHSIG is not used for the launcher itself: it fires when
  the parent *thread* that forked exits, and yitrt may start servers from any thread); when yitrt is gone it
  SIGTERMs tritonserver, waits ``--grace`` seconds, then SIGKILLs every descendant left;
* SIGTERM/SIGINT are forwarded to tritonserver (its graceful stop, bounded by its ``--exit-timeout-secs``);
* once tritonserver has exited, every remaining descendant is SIGKILLed and reaped, ``--remove`` folders are
  deleted, and the launcher exits with tritonserver's exit code (128+N when signal N killed it).

Only the standard library is imported here (it starts before anything heavy is needed), and the /proc helpers are
shared with ``server.Server.stop``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
#: how often the launcher looks at its parent and reaps children (seconds)
POLL_S = 0.25
#: how long tritonserver gets to stop when yitrt is gone (nobody waits for its answers any more)
ORPHAN_GRACE_S = 3.0


def _prctl():
    """libc's prctl, or None where there is none (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(expected_parent: int, prctl=None):
    """A ``preexec_fn`` that makes the child get SIGKILL when its parent dies (``PR_SET_PDEATHSIG``).

    The parent may die between fork and prctl, in which case the signal would never come: the child then checks
    that its parent is still ``expected_parent`` and kills itself otherwise. ``prctl`` is looked up before the fork
    (loading a library between fork and exec is not safe)."""
    prctl = prctl or _prctl()

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != expected_parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def read_processes() -> dict[int, tuple[int, int, str]]:
    """Every process of this machine from /proc: pid → (parent pid, process group, state letter)."""
    table: dict[int, tuple[int, int, str]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:  # no procfs (not Linux): nothing can be found, so nothing is killed by pid
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:  # exited while we read
            continue
        # the command name (field 2) is in parentheses and may hold spaces or ')': split after the last one
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) >= 3:
            table[int(name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def descendants(root: int, table: dict[int, tuple[int, int, str]] | None = None) -> list[int]:
    """The live (non-zombie) processes whose parent chain leads to ``root`` (``root`` excluded)."""
    table = read_processes() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return [pid for pid in found if table[pid][2] != "Z"]


def alive(pids: Iterable[int], table: dict[int, tuple[int, int, str]] | None = None) -> list[int]:
    """Those of ``pids`` that still exist and are not zombies."""
    table = read_processes() if table is None else table
    return [pid for pid in pids if pid in table and table[pid][2] != "Z"]


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Launcher:
    """One supervised command (see the module docstring)."""

    def __init__(self, argv: list[str], parent: int, remove: list[str], grace: float = ORPHAN_GRACE_S) -> None:
        self.argv, self.parent, self.remove, self.grace = argv, parent, remove, grace
        self.child: int | None = None
        self.proc: subprocess.Popen | None = None  # kept referenced: a collected Popen would try to reap our child
        self.code: int | None = None  # the child's exit code once reaped
        self.pid = os.getpid()

    def _reap(self) -> None:
        """Collect every exited child (tritonserver, and orphans reparented to us); note tritonserver's code."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child:
                code = os.waitstatus_to_exitcode(status)
                self.code = code if code >= 0 else 128 - code
                if self.proc is not None:
                    self.proc.returncode = code  # reaped here, not by Popen

    def _forward(self, signum, frame) -> None:
        if self.child is not None and self.code is None:
            _kill(self.child, signum)

    def kill_descendants(self, timeout: float = 10.0) -> None:
        """SIGKILL every descendant until none is left (a dying parent's children reparent to us, so repeat)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = descendants(self.pid)
            if not left:
                break
            for pid in left:
                _kill(pid, signal.SIGKILL)
            time.sleep(0.05)
            self._reap()
        self._reap()

    def run(self) -> int:
        """Start the command, supervise it, clean up; the command's exit code."""
        prctl = _prctl()
        if prctl is not None:
            prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._forward)
        try:
            if os.getppid() != self.parent:  # yitrt died before we got here
                return 1
            try:
                # no new session: tritonserver stays in our process group, which yitrt signals as a whole
                self.proc = subprocess.Popen(self.argv, preexec_fn=die_with_parent(self.pid, prctl))
            except OSError as exc:
                sys.stderr.write(f"yitrt launcher: cannot start {self.argv[0]}: {exc}\n")
                return 127
            self.child = self.proc.pid
            orphaned_at: float | None = None
            while self.code is None:
                time.sleep(POLL_S)
                self._reap()
                if self.code is not None:
                    break
                if orphaned_at is None and os.getppid() != self.parent:
                    orphaned_at = time.monotonic()  # yitrt is gone: nobody can stop the server any more
                    _kill(self.child, signal.SIGTERM)
                elif orphaned_at is not None and time.monotonic() - orphaned_at > self.grace:
                    _kill(self.child, signal.SIGKILL)
            return self.code
        finally:
            self.kill_descendants()
            for folder in self.remove:
                shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point (``python -m yitrt.triton.launcher``)."""
    parser = argparse.ArgumentParser(prog="python -m yitrt.triton.launcher", description=__doc__.splitlines()[0])
    parser.add_argument("--parent", type=int, required=True, help="pid of the process this command must not outlive")
    parser.add_argument("--remove", action="append", default=[], help="folder to delete when the command has exited")
    parser.add_argument("--grace", type=float, default=ORPHAN_GRACE_S, help="seconds the command gets when the parent is gone")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- ARGV…")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    sys.exit(Launcher(command, args.parent, args.remove, args.grace).run())


if __name__ == "__main__":
    main()
