"""Artifact folders: atomic creation, ``yitrt-manifest.json``, digests and cache checks.

Every stage writes one artifact folder. It is built in ``<out>.partial-<pid>`` beside the target and renamed
into place only when complete, so an interrupted or failed stage leaves nothing that looks complete, and a
previous good artifact at ``<out>`` stays untouched until the new one is whole.

A writer holds an exclusive ``flock`` on its partial folder for as long as it runs (the kernel drops it when the
process dies, even by SIGKILL), so a partial folder whose lock is free is stale whatever its PID suffix says (a
reused PID cannot keep it "alive"). The previous artifact is replaced by an atomic exchange (Linux
``renameat2(RENAME_EXCHANGE)``), so ``out`` is never missing; where the file system cannot exchange, ``out`` is
moved to ``<out>.old-<pid>`` (locked) and the new one moved in, and a kill between the two leaves ``.old-<pid>``,
which :func:`settle_output` renames back. Every stage's path calls :func:`settle_output` (through
:func:`check_output_folder`, :func:`find_reusable` and :class:`ArtifactWriter`), so stale partials are removed and a
killed replacement is repaired on a fresh output, a replacement and a cache hit alike.

Every ``OSError`` met while writing an artifact (disk full, read-only, a parent that is a file, a name too long)
becomes an ``ArtifactError`` naming the path and the fix (:func:`yitrt.errors.os_error`).

The manifest records the stage, yitrt version, resolved parameters, input digests, tool versions and every file
with its size and BLAKE3 hash. Its ``key`` (a digest of stage + version + parameters + inputs) decides whether a
stage can be skipped.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yitrt import __version__
from yitrt.errors import ArtifactError, YitrtError, os_error
from yitrt.userfiles import read_json

MANIFEST_NAME = "yitrt-manifest.json"
#: The resolved recipe that made an artifact (written by `yitrt run`; not part of the cache key).
RECIPE_NAME = "yitrt-recipe.yaml"
_RECIPE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("yitrt_recipe", default=None)
MANIFEST_FORMAT = 1
_HASH_WINDOW = 256 << 20  # a multiple of the page size


def hash_file(path: Path) -> str:
    """BLAKE3 of a file's bytes: the hash recorded in manifests.

    BLAKE3 is a cryptographic hash about twice as fast as sha256 here and multi-threaded; the file is hashed
    through memory-mapped windows (no copy out of the page cache), one window mapped at a time so the
    resident set stays bounded.
    """
    import blake3

    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        for offset in range(0, size, _HASH_WINDOW):
            length = min(_HASH_WINDOW, size - offset)
            with mmap.mmap(fh.fileno(), length, offset=offset, access=mmap.ACCESS_READ) as window:
                digest.update(window)
    return digest.hexdigest()


def digest_json(value: Any) -> str:
    """Stable sha256 of a JSON-serialisable value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_files(root: Path, names: Iterable[str], header_bytes: dict[str, bytes] | None = None) -> str:
    """A cheap digest of input files: name, size and modification time, plus optional header bytes.

    Hashing tens of GB of weights on every run would cost more than the conversion, so inputs are identified by
    (size, mtime_ns) and, for safetensors files, by their JSON header (names, dtypes, shapes, offsets).
    A file rewritten in place with the same size and mtime is not detected; ``--force`` redoes the work.
    """
    items = []
    for name in sorted(names):
        st = (root / name).stat()
        entry = [name, st.st_size, st.st_mtime_ns]
        if header_bytes and name in header_bytes:
            entry.append(hashlib.sha256(header_bytes[name]).hexdigest())
        items.append(entry)
    return digest_json(items)


@dataclass
class Manifest:
    """The parsed content of ``yitrt-manifest.json``."""

    stage: str
    key: str
    parameters: dict[str, Any]
    inputs: dict[str, str]
    tools: dict[str, str]
    files: list[dict[str, Any]]
    yitrt_version: str = __version__
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON object written to disk."""
        return {
            "format": MANIFEST_FORMAT,
            "stage": self.stage,
            "yitrt_version": self.yitrt_version,
            "created": self.created,
            "key": self.key,
            "parameters": self.parameters,
            "inputs": self.inputs,
            "tools": self.tools,
            "files": self.files,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """Parse a manifest JSON object."""
        return cls(
            stage=data["stage"],
            key=data["key"],
            parameters=data.get("parameters", {}),
            inputs=data.get("inputs", {}),
            tools=data.get("tools", {}),
            files=data.get("files", []),
            yitrt_version=data.get("yitrt_version", ""),
            created=data.get("created", ""),
            extra=data.get("extra", {}),
        )


def artifact_key(stage: str, parameters: dict[str, Any], inputs: dict[str, str]) -> str:
    """The cache key of a stage run: what must be equal for its artifact to be reused."""
    return digest_json({"stage": stage, "version": __version__, "parameters": parameters, "inputs": inputs})


def read_manifest(folder: Path) -> Manifest | None:
    """Return the folder's manifest, or None when it has none (or it is unreadable)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        return Manifest.from_json(read_json(path, MANIFEST_NAME))  # a regular, capped UTF-8 JSON object (never a FIFO)
    except (YitrtError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def artifact_digest(folder: Path) -> str | None:
    """Identity of an artifact's content: a digest of its manifest's file hashes (None without a manifest)."""
    manifest = read_manifest(folder)
    if manifest is None or not manifest.files:
        return None
    try:
        return digest_json(sorted((str(f["path"]), str(f["blake3"])) for f in manifest.files if f["path"] != RECIPE_NAME))
    except (KeyError, TypeError):  # a manifest edited by hand: no identity
        return None


@contextlib.contextmanager
def recipe_context(resolved: dict[str, Any]) -> Iterator[None]:
    """Within the block, every artifact written also gets ``yitrt-recipe.yaml``: the recipe that made it."""
    token = _RECIPE.set(resolved)
    try:
        yield
    finally:
        _RECIPE.reset(token)


def find_reusable(out: Path, stage: str, key: str) -> Manifest | None:
    """The manifest of ``out`` if it is a complete artifact of ``stage`` with this ``key``, else None.

    Complete means every listed file exists with its recorded size. Stale partial folders beside ``out`` are removed
    first, and a replacement killed half-way is repaired (:func:`settle_output`).
    """
    out = artifact_path(out)
    settle_output(out)
    manifest = read_manifest(out)
    if manifest is None or manifest.stage != stage or manifest.key != key:
        return None
    try:
        for entry in manifest.files:
            path = out / entry["path"]
            if not path.is_file() or path.stat().st_size != entry["size"]:
                return None
    except (KeyError, TypeError, OSError):  # a hand-edited manifest or an unreadable file: not reusable
        return None
    return manifest


def artifact_path(out: Path) -> Path:
    """``out`` as the absolute, normalised path an artifact is written at (``a/..`` and ``.`` parts resolved
    lexically, so the partial folder is a true sibling of the artifact)."""
    return Path(os.path.normpath(Path(out).absolute()))


def check_output_folder(out: Path, stage: str | None = None) -> None:
    """Refuse to replace a folder yitrt did not make, or an artifact of another stage.

    Raises:
        ArtifactError: ``out`` is a file or a symbolic link, or a non-empty folder without a yitrt manifest, or
            (when ``stage`` is given) the artifact of a different stage, or cannot be inspected (permissions ...).
    """
    out = artifact_path(out)
    settle_output(out)
    try:
        if out.is_symlink():
            raise ArtifactError(f"{out} is a symbolic link", "give the folder it points to (yitrt replaces an artifact as a whole)")
        if not out.exists():
            if os.path.lexists(out.parent) and not out.parent.is_dir():
                raise ArtifactError(f"cannot write {out}: its parent {out.parent} is a file, not a folder", "choose a path whose parents are folders")
            return
        if not out.is_dir():
            raise ArtifactError(f"{out} exists and is not a folder", "choose another --out")
        manifest = read_manifest(out)
        if manifest is None and any(out.iterdir()):
            raise ArtifactError(
                f"{out} exists, is not empty and was not made by yitrt",
                "choose another --out, or remove that folder yourself",
            )
    except OSError as exc:
        raise os_error(exc, out, "use") from None
    if manifest is not None and stage is not None and manifest.stage != stage:
        raise ArtifactError(f"{out} holds a yitrt {manifest.stage} artifact, not a {stage} one", "choose another --out")


# -- partial folders, locks and the atomic swap ---------------------------------------------------------------------

_PARTIAL = ".partial-"
_OLD = ".old-"


def _try_lock(path: Path) -> int | None:
    """An open descriptor of folder ``path`` holding its exclusive lock, or None when another process holds it
    (or it is not a folder we can open)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _NO_LOCKS and not _pid_alive(path.name.rsplit("-", 1)[-1]):
            return fd  # a file system without flock: fall back to the PID test of the suffix
        os.close(fd)
        return None
    return fd


#: flock errors of file systems that do not implement it (some FUSE and network mounts)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.EINVAL}


def _pid_alive(suffix: str) -> bool:
    if not suffix.isdecimal():
        return True
    try:
        os.kill(int(suffix), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _siblings(out: Path, marker: str) -> list[Path]:
    """``<out><marker><pid>`` folders beside ``out`` (listed, not globbed: a name may hold glob characters). Only a
    decimal PID suffix is ours: a user's ``ckpt.old-backup`` is never touched."""
    prefix = out.name + marker
    try:
        return sorted(out.parent / e.name for e in os.scandir(out.parent)
                      if e.name.startswith(prefix) and e.name[len(prefix):].isdecimal() and e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def settle_output(out: Path) -> None:
    """Repair what killed writers left beside ``out``; best effort, never an error of its own.

    - ``<out>.old-*`` whose lock is free is the previous artifact of a replacement killed between its two renames:
      renamed back to ``out`` when ``out`` is missing, else (the new one made it in) removed;
    - ``<out>.partial-*`` whose lock is free belongs to no live writer: removed.
    """
    out = artifact_path(out)
    for old in _siblings(out, _OLD):
        if read_manifest(old) is None:
            continue  # not an artifact yitrt moved aside: not ours to restore or remove
        fd = _try_lock(old)
        if fd is None:
            continue  # a live writer is between its renames
        try:
            if not os.path.lexists(out):
                os.rename(old, out)
            else:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)
    for partial in _siblings(out, _PARTIAL):
        fd = _try_lock(partial)
        if fd is None:
            continue  # its writer runs
        try:
            shutil.rmtree(partial, ignore_errors=True)
        finally:
            os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the kernel, C library or file
    system cannot (the caller falls back to two renames)."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        _renameat2 = getattr(libc, "renameat2", False)  # glibc >= 2.28
        if _renameat2:
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if not _renameat2:
        return False
    import ctypes

    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
        return False
    raise OSError(code, os.strerror(code), str(b))


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def as_os_error(exc: BaseException) -> OSError | None:
    """``exc`` as the OSError it is: itself, or the I/O error a Rust library (safetensors, tokenizers) reports as
    text ("I/O error: No space left on device (os error 28)") because it raises its own exception type."""
    if isinstance(exc, OSError):
        return exc if exc.errno is not None else None
    match = _RUST_OS_ERROR.search(str(exc))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code))


class ArtifactWriter:
    """Context manager that builds an artifact in a temporary sibling folder and publishes it atomically.

    Usage::

        with ArtifactWriter(out, "convert", params, inputs, tools) as art:
            write files under art.path
        # here `out` holds the complete artifact with its manifest

    On any exception the temporary folder (and any parent folder the writer created) is deleted and ``out`` is
    left as it was; an ``OSError`` becomes an ``ArtifactError`` naming ``out`` and the fix.
    """

    def __init__(
        self,
        out: Path,
        stage: str,
        parameters: dict[str, Any],
        inputs: dict[str, str],
        tools: dict[str, str] | None = None,
    ) -> None:
        self.out = artifact_path(out)
        self.stage = stage
        self.parameters = parameters
        self.inputs = inputs
        self.tools = tools or {}
        self.key = artifact_key(stage, parameters, inputs)
        self.path = self.out.parent / f"{self.out.name}{_PARTIAL}{os.getpid()}"
        self.extra: dict[str, Any] = {}
        self.manifest: Manifest | None = None
        self._hashed: dict[str, tuple[int, str]] = {}
        self._lock: int | None = None
        self._created: list[Path] = []  # parent folders this writer made (removed again on failure)

    def record_file(self, relative: str, size: int, digest: str) -> None:
        """Register a file whose BLAKE3 digest was computed while it was written (so it is not read again)."""
        self._hashed[relative] = (size, digest)

    def __enter__(self) -> ArtifactWriter:
        check_output_folder(self.out, self.stage)
        try:
            self._make_parents()
            if os.path.lexists(self.path):  # ours by name: a dead process with our PID left it
                shutil.rmtree(self.path)
            self._make_partial()
        except BaseException as exc:
            self._discard()
            if isinstance(exc, OSError):
                raise os_error(exc, self.out, "write") from exc
            raise
        return self

    def _make_parents(self) -> None:
        missing = []
        folder = self.out.parent
        while not os.path.lexists(folder) and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for parent in reversed(missing):
            os.mkdir(parent)
            self._created.insert(0, parent)

    def _make_partial(self) -> None:
        """Create the partial folder holding its lock. A cleaner may remove a folder between our mkdir and our
        lock (it looked unlocked): then the lock is on a deleted folder, which the inode check sees; try again."""
        for _ in range(5):
            os.mkdir(self.path)
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    os.close(fd)
                    raise
                self._lock = fd  # no flock here: settle_output falls back to the PID suffix
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                self._lock = fd
                return
            os.close(fd)
        raise ArtifactError(f"{self.path} keeps disappearing while it is being created", "is another program removing it?")

    def _discard(self) -> None:
        """Remove the partial folder and the parents this writer made; release the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        for parent in self._created:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                os.rmdir(parent)
        self._created = []
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _collect_files(self) -> list[dict[str, Any]]:
        files = []
        for path in sorted(p for p in self.path.rglob("*") if p.is_file()):
            rel = path.relative_to(self.path).as_posix()
            if rel == MANIFEST_NAME:
                continue
            size = path.stat().st_size
            known = self._hashed.get(rel)
            digest = known[1] if known and known[0] == size else hash_file(path)
            files.append({"path": rel, "size": size, "blake3": digest})
        return files

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            if (refused := as_os_error(exc)) is not None:  # the environment refused a write (disk full ...), not a bug
                raise os_error(refused, self.out, "write") from exc
            return
        try:
            recipe = _RECIPE.get()
            if recipe is not None:
                import yaml

                (self.path / RECIPE_NAME).write_text(yaml.safe_dump(recipe, sort_keys=False))
            self.manifest = Manifest(
                stage=self.stage,
                key=self.key,
                parameters=self.parameters,
                inputs=self.inputs,
                tools=self.tools,
                files=self._collect_files(),
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                extra=self.extra,
            )
            (self.path / MANIFEST_NAME).write_text(json.dumps(self.manifest.to_json(), indent=2) + "\n")
            self._publish()
        except BaseException as err:
            self._discard()
            if isinstance(err, OSError):
                raise os_error(err, self.out, "write") from err
            raise
        self._release()

    def _publish(self) -> None:
        """Swap the finished folder into place, keeping the old artifact until the swap succeeded.

        With an atomic exchange, ``out`` is at every instant the old or the new artifact; the old one ends up under
        the partial's name (unlocked) and is removed — by us, or by the next :func:`settle_output` after a kill.
        Without it, the old artifact is locked and moved to ``.old-<pid>`` first; a kill before the second rename
        leaves it there for :func:`settle_output` to move back.
        """
        if not os.path.lexists(self.out):
            os.rename(self.path, self.out)
            return
        if _exchange(self.path, self.out):
            shutil.rmtree(self.path, ignore_errors=True)  # now the previous artifact
            return
        old = self.out.parent / f"{self.out.name}{_OLD}{os.getpid()}"
        guard = _try_lock(self.out)  # so that no settle_output "restores" it while we swap
        try:
            os.rename(self.out, old)
            try:
                os.rename(self.path, self.out)
            except BaseException:
                os.rename(old, self.out)
                raise
        finally:
            if guard is not None:
                os.close(guard)
        shutil.rmtree(old, ignore_errors=True)
