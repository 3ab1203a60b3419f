"""Shared checks of the hostile-input and fault suites (tests/integration/test_hostile_*.py).

yitrt's promise for bad input: a non-zero exit that is not 70 (70 means a bug in yitrt), exactly one line on stderr,
no traceback, nothing left behind in the output's parent folder, and every earlier artifact byte-identical.
``Tree`` snapshots a folder (every path and the hash of every file) so a test can prove "nothing changed".
Disk-full and read-only destinations are real mounts (tmpfs, read-only bind), which need root; the fixtures skip
with the reason where mounting is not allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

INTERNAL_ERROR_EXIT = 70


def tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: relative path → sha256 of a file, ``"dir"``, ``"link:<target>"`` or
    ``"special:<mode>"`` (a FIFO or device, never read)."""
    folder = Path(folder)
    out: dict[str, str] = {}
    if not folder.exists():
        return out
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[rel] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "dir"
        elif not path.is_file():  # a FIFO or device: reading it would block or never end
            out[rel] = f"special:{path.stat().st_mode:o}"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_refused(result: subprocess.CompletedProcess, *, parent: Path | None = None, before: dict[str, str] | None = None,
                   code: int | None = None, says: str | None = None) -> str:
    """Assert a clean refusal; return the one stderr line.

    Args:
        result: the finished command (``run_cli`` or the in-process ``cli`` fixture).
        parent: the folder that must be unchanged (the output's parent), compared with ``before``.
        before: ``tree(parent)`` taken before the command ran.
        code: the exit status expected (default: anything but 0 and 70).
        says: a fragment the error line must contain (case-insensitive).
    """
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, f"exit 0 for a refused input; stdout={result.stdout[-500:]!r} stderr={result.stderr[-500:]!r}"
    assert result.returncode != INTERNAL_ERROR_EXIT, f"internal error (exit 70) for a user's input: {result.stderr[-800:]}"
    if code is not None:
        assert result.returncode == code, f"exit {result.returncode}, expected {code}: {result.stderr[-500:]}"
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}: {lines[:8]}"
    if says is not None:
        assert says.lower() in lines[0].lower(), f"{says!r} not in {lines[0]!r}"
    if parent is not None:
        assert before is not None
        after = tree(parent)
        assert after == before, f"{parent} changed: added {sorted(set(after) - set(before))[:8]}, removed " \
                                f"{sorted(set(before) - set(after))[:8]}, altered {sorted(k for k in before if k in after and before[k] != after[k])[:8]}"
    return lines[0]


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def small_disk(base: Path, size: str = "256k") -> Iterator[Path]:
    """A real tmpfs of ``size`` under ``base`` (writes past it fail with ENOSPC); skips without mount rights."""
    mnt = Path(base) / f"small-disk-{uuid.uuid4().hex[:8]}"
    mnt.mkdir(parents=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)):
        mnt.rmdir()
        pytest.skip("cannot mount a tmpfs here (needs root): no disk-full test")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        with contextlib.suppress(OSError):
            mnt.rmdir()


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """Make ``folder`` read-only with a read-only bind mount of itself (root bypasses chmod); skips without rights."""
    folder = Path(folder)
    if not (_mount("--bind", str(folder), str(folder)) and _mount("-o", "remount,bind,ro", str(folder))):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        pytest.skip("cannot bind-mount read-only here (needs root): no read-only destination test")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
