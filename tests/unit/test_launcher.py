"""The launcher yitrt runs tritonserver under, with a TEST DOUBLE of the server's process tree (no tritonserver):
its parent SIGKILLed → the server gets SIGTERM, then the server and its stub (in a session of its own) are killed;
SIGTERM to the launcher → forwarded to the server, the stub killed, the launcher exits with the server's code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.doubles.server_tree import EXIT_ON_SIGTERM
from tests.processes import cmdlines, kill_all, living, tree, wait_gone

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
DOUBLE = REPO_ROOT / "tests" / "doubles" / "server_tree.py"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}


def _launcher_argv(parent: str, state: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "yitrt.triton.launcher", "--parent", parent, *extra, "--", sys.executable, str(DOUBLE), str(state)]


def _pids(state: Path, proc: subprocess.Popen, timeout: float = 30.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (state / "pids.json").is_file():
            return json.loads((state / "pids.json").read_text())
        assert proc.poll() is None, f"exited with {proc.returncode} before the double started"
        time.sleep(0.05)
    raise AssertionError("the double did not start")


def test_parent_sigkilled_the_launcher_stops_the_server_and_kills_every_descendant(tmp_path):
    state, scratch = tmp_path / "state", tmp_path / "scratch"
    state.mkdir()
    scratch.mkdir()
    # an intermediate process stands in for yitrt: it starts the launcher and waits; the test SIGKILLs it
    script = ("import os, subprocess, sys; argv = sys.argv[1:]; argv[argv.index('PARENT')] = str(os.getpid()); "
              "subprocess.Popen(argv).wait()")
    parent = subprocess.Popen([sys.executable, "-c", script, *_launcher_argv("PARENT", state, "--remove", str(scratch))], env=_env())
    everything: set[int] = set()
    try:
        pids = _pids(state, parent)
        everything = tree(parent.pid)
        assert {pids["server"], pids["stub"]} < everything and len(everything) == 4  # parent, launcher, server, stub
        parent.kill()
        parent.wait(10)
        left = wait_gone(everything)
        assert not left, f"still running after the parent died: {cmdlines(left)}"
        assert (state / "sigterm").is_file()  # the server was asked to stop before anything was killed
        assert not scratch.exists()  # --remove: the temporary folder went with the server
    finally:
        parent.kill()
        kill_all(everything)


def test_sigterm_is_forwarded_the_stub_killed_and_the_servers_exit_code_returned(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    launcher = subprocess.Popen(_launcher_argv(str(os.getpid()), state), env=_env())
    everything: set[int] = set()
    try:
        pids = _pids(state, launcher)
        everything = tree(launcher.pid)
        assert living({pids["stub"]})
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(20) == EXIT_ON_SIGTERM  # the server's own exit code
        assert (state / "sigterm").is_file()  # forwarded, not a kill
        left = wait_gone(everything)  # the stub left the group and was orphaned: found by the tree, killed
        assert not left, f"still running after the launcher exited: {cmdlines(left)}"
    finally:
        launcher.kill()
        kill_all(everything)


def test_a_launcher_whose_parent_is_already_gone_starts_nothing(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    done = subprocess.run(_launcher_argv("1", state), env=_env(), timeout=30, capture_output=True, text=True)
    assert done.returncode != 0 and not (state / "pids.json").exists()


def test_a_server_that_cannot_start_is_reported_with_its_name(tmp_path):
    argv = [sys.executable, "-m", "yitrt.triton.launcher", "--parent", str(os.getpid()), "--", str(tmp_path / "no-such-tritonserver")]
    done = subprocess.run(argv, env=_env(), timeout=30, capture_output=True, text=True)
    assert done.returncode == 127 and "no-such-tritonserver" in done.stderr and "Traceback" not in done.stderr
