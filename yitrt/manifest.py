"""Artifact folders: atomic creation, ``yitrt-manifest.json``, digests and cache checks.

Every stage writes one artifact folder. It is built in ``<out>.partial-<pid>`` beside the target and renamed
into place only when complete, so an interrupted or failed stage leaves nothing that looks complete, and a
previous good artifact at ``<out>`` stays untouched until the new one is whole.

The manifest records the stage, yitrt version, resolved parameters, input digests, tool versions and every file
with its size and BLAKE3 hash. Its ``key`` (a digest of stage + version + parameters + inputs) decides whether a
stage can be skipped.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import mmap
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yitrt import __version__
from yitrt.errors import ArtifactError

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
        return Manifest.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError):
        return None


def artifact_digest(folder: Path) -> str | None:
    """Identity of an artifact's content: a digest of its manifest's file hashes (None without a manifest)."""
    manifest = read_manifest(folder)
    if manifest is None or not manifest.files:
        return None
    return digest_json(sorted((f["path"], f["blake3"]) for f in manifest.files if f["path"] != RECIPE_NAME))


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

    Complete means every listed file exists with its recorded size.
    """
    manifest = read_manifest(out)
    if manifest is None or manifest.stage != stage or manifest.key != key:
        return None
    for entry in manifest.files:
        path = Path(out) / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return None
    return manifest


def check_output_folder(out: Path, stage: str | None = None) -> None:
    """Refuse to replace a folder yitrt did not make, or an artifact of another stage.

    Raises:
        ArtifactError: ``out`` is a file, or a non-empty folder without a yitrt manifest, or (when ``stage`` is
            given) the artifact of a different stage.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a folder", "choose another --out")
    manifest = read_manifest(out)
    if manifest is None and any(out.iterdir()):
        raise ArtifactError(
            f"{out} exists, is not empty and was not made by yitrt",
            "choose another --out, or remove that folder yourself",
        )
    if manifest is not None and stage is not None and manifest.stage != stage:
        raise ArtifactError(f"{out} holds a yitrt {manifest.stage} artifact, not a {stage} one", "choose another --out")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """Remove ``<out>.partial-<pid>`` folders left by processes that no longer run."""
    for sibling in out.parent.glob(out.name + ".partial-*"):
        suffix = sibling.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and not _pid_alive(int(suffix)):
            shutil.rmtree(sibling, ignore_errors=True)


class ArtifactWriter:
    """Context manager that builds an artifact in a temporary sibling folder and publishes it atomically.

    Usage::

        with ArtifactWriter(out, "convert", params, inputs, tools) as art:
            write files under art.path
        # here `out` holds the complete artifact with its manifest

    On any exception the temporary folder is deleted and ``out`` is left as it was.
    """

    def __init__(
        self,
        out: Path,
        stage: str,
        parameters: dict[str, Any],
        inputs: dict[str, str],
        tools: dict[str, str] | None = None,
    ) -> None:
        self.out = Path(out).absolute()
        self.stage = stage
        self.parameters = parameters
        self.inputs = inputs
        self.tools = tools or {}
        self.key = artifact_key(stage, parameters, inputs)
        self.path = self.out.parent / f"{self.out.name}.partial-{os.getpid()}"
        self.extra: dict[str, Any] = {}
        self.manifest: Manifest | None = None
        self._hashed: dict[str, tuple[int, str]] = {}

    def record_file(self, relative: str, size: int, digest: str) -> None:
        """Register a file whose BLAKE3 digest was computed while it was written (so it is not read again)."""
        self._hashed[relative] = (size, digest)

    def __enter__(self) -> ArtifactWriter:
        check_output_folder(self.out, self.stage)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(self.out)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir()
        return self

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
            shutil.rmtree(self.path, ignore_errors=True)
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
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def _publish(self) -> None:
        """Swap the finished folder into place, keeping the old artifact until the swap succeeded."""
        old = None
        if self.out.exists():
            old = self.out.parent / f"{self.out.name}.old-{os.getpid()}"
            os.rename(self.out, old)
        try:
            os.rename(self.path, self.out)
        except BaseException:
            if old is not None:
                os.rename(old, self.out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
