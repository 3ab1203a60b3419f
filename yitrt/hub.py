"""Fetch: Hugging Face repo id (+ revision) or local folder → a checked model folder.

Only what a conversion needs is downloaded: ``config.json``, ``generation_config.json``, safetensors weights and
their index, and tokenizer files. Pickle weights (``*.bin``) are fetched only when the repo has no safetensors and
the caller opts in (``allow_pickle``); remote code (``*.py``) never is. Whether a repo can be fetched is decided
from its file listing *before* any weight is downloaded.

Two destinations:

- ``out=None``: the Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``), shared with transformers; the snapshot
  folder is returned.
- ``out=DIR``: a yitrt artifact. Files are downloaded into ``<DIR>.partial-<pid>``, checked, listed in
  ``yitrt-manifest.json`` (the commit sha is the input digest) and renamed into place, so a failed or interrupted
  fetch leaves no ``DIR``. A second fetch of the same commit reuses ``DIR`` without downloading.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` when ``huggingface_hub.constants`` is
first imported and ``HF_TOKEN`` on every request, so this module imports it lazily and never reads the environment
itself. Its errors are mapped by type to :class:`yitrt.errors.HubError` with a one-line message and a hint.
"""

from __future__ import annotations

import errno
import hashlib
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from yitrt.checkpoint.source import INDEX_NAME, PICKLE_INDEX_NAME, PICKLE_WEIGHTS_GLOB
from yitrt.errors import CheckpointError, HubError, UsageError, YitrtError, os_error
from yitrt.manifest import ArtifactWriter, artifact_key, check_output_folder, find_reusable, read_manifest

ProgressCallback = Callable[[int, int], None]

STAGE = "fetch"
SAFETENSORS_INDEX = INDEX_NAME
PICKLE_INDEX = PICKLE_INDEX_NAME
#: Non-weight files a conversion or a Triton tokenizer may read (top level of the repo only).
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
#: What ``resolve_model(metadata_only=True)`` downloads: enough to describe a model, no weights.
METADATA_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json", SAFETENSORS_INDEX)
#: Pickle weights in the transformers layout; fetched only with ``allow_pickle`` and no safetensors present.
PICKLE_WEIGHT_PATTERN = PICKLE_WEIGHTS_GLOB
#: Other pickle suffixes, named in errors when a repo holds only those.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")

# Hub repo ids: "owner/name", each part starting alphanumeric, made of [A-Za-z0-9_.-], at most 96 characters
# (huggingface_hub's validate_repo_id rules; "--" and ".." are reserved there too).
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


@dataclass
class FetchResult:
    """What a fetch produced.

    Attributes:
        path: the model folder (the artifact ``out`` or the HF cache snapshot folder).
        repo_id: the Hub repo.
        revision: the commit sha the files come from.
        reused: nothing was downloaded (a matching artifact or complete cache snapshot already existed).
        files: repo-relative names of the model files in ``path``.
        bytes: their total size.
        seconds: wall time of the call.
    """

    path: Path
    repo_id: str
    revision: str
    reused: bool
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON object for ``--json``."""
        return {
            "path": str(self.path),
            "repo_id": self.repo_id,
            "revision": self.revision,
            "reused": self.reused,
            "files": list(self.files),
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class ResolvedModel:
    """A model folder on disk and where it came from.

    Attributes:
        path: the folder holding ``config.json`` (and weights unless resolved ``metadata_only``).
        repo_id: the Hub repo, or None for a local folder that was not made by ``yitrt fetch``.
        revision: the commit sha when the files come from the Hub, else None.
    """

    path: Path
    repo_id: str | None
    revision: str | None


# -- public API --------------------------------------------------------------------------------------------------


def is_repo_id(ref: str) -> bool:
    """True when ``ref`` has the form of a Hugging Face repo id (``owner/name``)."""
    return bool(_REPO_ID.match(ref)) and "--" not in ref and ".." not in ref


def select_files(names: Iterable[str], allow_pickle: bool = False) -> list[str]:
    """The files of a repo listing that a fetch downloads.

    Safetensors weights win: when a repo has both, its pickles are never fetched (they would double the download
    and are never read). Pickle weights are chosen only with ``allow_pickle`` and no safetensors. Sub-folders
    (other formats, original checkpoints) are ignored.

    Args:
        names: repo-relative file names.
        allow_pickle: accept ``pytorch_model*.bin`` when there are no safetensors.

    Returns:
        Sorted names; no weights in it means the repo cannot be fetched (see :func:`fetch_model`).
    """
    top = sorted(n for n in set(names) if "/" not in n)
    weights = [n for n in top if n.endswith(".safetensors")]
    if weights:
        weights += [n for n in top if n == SAFETENSORS_INDEX]
    elif allow_pickle:
        weights = [n for n in top if fnmatch(n, PICKLE_WEIGHT_PATTERN) or n == PICKLE_INDEX]
    wanted = set(CONFIG_FILES) | set(TOKENIZER_FILES)
    return sorted(set(weights) | {n for n in top if n in wanted})


def fetch_model(
    repo_id: str,
    *,
    revision: str | None = None,
    out: Path | None = None,
    allow_pickle: bool = False,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> FetchResult:
    """Download a model's config, weights and tokenizer from the Hub and check the weights.

    The revision is resolved to a commit sha and the file listing is checked first, so a repo without usable
    weights fails before anything is downloaded. After the download the safetensors shards are checked against
    their index (every file parses, no truncation, every listed tensor present) and LFS files against the Hub's
    sha256. When the Hub cannot be reached (``HF_HUB_OFFLINE=1`` or no connection), an earlier fetch is reused:
    the artifact ``out`` if it holds this repo, else the HF cache snapshot of ``revision``.

    Args:
        repo_id: ``owner/name`` on the Hub (``HF_ENDPOINT`` selects another Hub; ``HF_TOKEN`` authenticates).
        revision: branch, tag or commit sha; the default branch when None.
        out: artifact folder to create; None downloads into the Hugging Face cache.
        allow_pickle: fetch ``pytorch_model*.bin`` weights when the repo has no safetensors.
        force: download again even if a matching artifact or cache snapshot exists.
        progress: ``progress(done_bytes, total_bytes)``, called from download threads as bytes arrive.

    Returns:
        The fetched folder, its commit sha, files and size, and whether it was reused.

    Raises:
        UsageError: ``repo_id`` is not of the form ``owner/name``.
        HubError: repo, revision or file not found, gated, unreachable, offline and not fetched before, corrupt download.
        CheckpointError: no config.json, no safetensors (pickles only and no ``allow_pickle``), shards inconsistent.
        ArtifactError: ``out`` exists and was not made by yitrt.
    """
    _check_repo_id(repo_id)
    if out is not None:
        out = Path(out)
        check_output_folder(out, STAGE)  # before any network call: an unusable --out is the user's to fix first
    start = time.monotonic()
    hf = _hf()
    with _hub_errors(repo_id, revision):
        try:
            info = hf.HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        except Exception as exc:
            if not _is_unreachable(exc):
                raise
            return _fetch_offline(repo_id, revision, out, allow_pickle, force, start, exc)
        siblings = {s.rfilename: s for s in info.siblings or []}
        files = _plan_files(repo_id, info.sha, list(siblings), allow_pickle)
        sizes = {f: siblings[f].size or 0 for f in files}
        # LFS files carry a sha256 in the listing; huggingface_hub checks only sizes, so yitrt checks the hash.
        lfs_sha = {f: siblings[f].lfs.sha256 for f in files if siblings[f].lfs is not None}
        plan = _Plan(repo_id, revision, info.sha, files, sizes, lfs_sha, allow_pickle)
        if out is None:
            return _fetch_to_cache(plan, force, progress, start)
        return _fetch_to_folder(plan, out, force, progress, start)


def resolve_model(
    ref: str,
    *,
    revision: str | None = None,
    metadata_only: bool = False,
    tokenizer: bool = False,
    allow_pickle: bool = False,
    progress: ProgressCallback | None = None,
) -> ResolvedModel:
    """Turn a model reference (local folder or Hub repo id) into a folder on disk.

    Args:
        ref: an existing folder, or ``owner/name`` on the Hub.
        revision: branch, tag or commit sha for a Hub repo (ignored for a folder).
        metadata_only: for a Hub repo, download only config, generation config, tokenizer config and the
            safetensors index (missing optional files are fine) — enough to describe the model, no weights.
        tokenizer: with ``metadata_only``, the tokenizer files too (``TOKENIZER_FILES``: what comparing two
            models' tokenizers reads, e.g. ``yitrt inspect --draft``).
        allow_pickle: see :func:`fetch_model`.
        progress: see :func:`fetch_model`.

    Returns:
        The folder, and the repo id and commit sha when known (a folder made by ``yitrt fetch`` knows them).

    Raises:
        UsageError: ``ref`` is neither a folder nor a repo id.
        HubError, CheckpointError: as :func:`fetch_model`.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        manifest = read_manifest(path)
        if manifest is not None and manifest.stage == STAGE:
            return ResolvedModel(path, manifest.parameters.get("repo_id"), manifest.parameters.get("revision"))
        return ResolvedModel(path, None, None)
    if path.exists():
        raise UsageError(f"{ref} is a file, not a model folder", "give the folder that holds config.json")
    if not is_repo_id(ref):
        raise UsageError(
            f"{ref}: not a folder and not a Hugging Face repo id",
            "give an existing model folder or a repo id such as 01-ai/Yi-1.5-6B-Chat",
        )
    if metadata_only:
        return _resolve_metadata(ref, revision, TOKENIZER_FILES if tokenizer else ())
    result = fetch_model(ref, revision=revision, allow_pickle=allow_pickle, progress=progress)
    return ResolvedModel(result.path, ref, result.revision)


#: The files of a PEFT LoRA adapter repo (``save_pretrained``): config and weights; pickles only with allow_pickle.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"


def resolve_adapter(ref: str, *, revision: str | None = None, allow_pickle: bool = False) -> ResolvedModel:
    """Turn a PEFT adapter reference (local folder or Hub repo id) into a folder holding its files.

    A Hub adapter is downloaded into the Hugging Face cache (``adapter_config.json`` and
    ``adapter_model.safetensors``; ``adapter_model.bin`` only when there is no safetensors file and
    ``allow_pickle``), LFS files checked against the Hub's sha256, as :func:`fetch_model` does for models.
    When the Hub cannot be reached an earlier download of the same revision is used.

    Args:
        ref: an existing folder, or ``owner/name`` on the Hub.
        revision: branch, tag or commit sha for a Hub repo (ignored for a folder).
        allow_pickle: accept ``adapter_model.bin`` when the repo has no safetensors.

    Returns:
        The folder, and the repo id and commit sha for a Hub adapter.

    Raises:
        UsageError: ``ref`` is neither a folder nor a repo id.
        HubError: not found, gated, unreachable and not downloaded before, corrupt download.
        CheckpointError: the repo has no adapter_config.json, or only pickle weights without ``allow_pickle``.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return ResolvedModel(path, None, None)
    if path.exists():
        raise UsageError(f"{ref} is a file, not an adapter folder", "give the folder that holds adapter_config.json")
    if not is_repo_id(ref):
        raise UsageError(f"{ref}: not a folder and not a Hugging Face repo id",
                         "give a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) or a Hub repo id")
    hf = _hf()
    silent = _ByteProgress(None, 0).tqdm_class()
    with _hub_errors(ref, revision):
        try:
            info = hf.HfApi().model_info(ref, revision=revision, files_metadata=True)
        except Exception as exc:
            if not _is_unreachable(exc):
                raise
            snapshot = Path(hf.snapshot_download(ref, revision=revision, local_files_only=True,
                                                 allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_PICKLE]))
            return ResolvedModel(snapshot, ref, snapshot.name)
        siblings = {s.rfilename: s for s in info.siblings or []}
        at = f"{ref}@{info.sha[:12]}"
        if ADAPTER_CONFIG not in siblings:
            raise CheckpointError(f"{at} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter", "check the repo id and --revision")
        if ADAPTER_WEIGHTS in siblings:
            files = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
        elif ADAPTER_PICKLE in siblings and allow_pickle:
            files = [ADAPTER_CONFIG, ADAPTER_PICKLE]
        elif ADAPTER_PICKLE in siblings:
            raise CheckpointError(f"{at} has only pickle weights ({ADAPTER_PICKLE}), which can run code when loaded",
                                  "pass --allow-pickle to load them with torch.load(weights_only=True), or use a safetensors revision")
        else:
            raise CheckpointError(f"{at} has no {ADAPTER_WEIGHTS}", "use a revision with safetensors adapter weights")
        lfs_sha = {f: siblings[f].lfs.sha256 for f in files if siblings[f].lfs is not None}
        snapshot = Path(hf.snapshot_download(ref, revision=info.sha, allow_patterns=files, tqdm_class=silent))
    _verify_lfs_hashes(snapshot, lfs_sha)
    return ResolvedModel(snapshot, ref, info.sha)


# -- fetching ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    repo_id: str
    requested: str | None  # the revision as the user gave it
    sha: str
    files: list[str]
    sizes: dict[str, int]
    lfs_sha: dict[str, str]
    allow_pickle: bool

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def parameters(self) -> dict[str, Any]:
        return _artifact_parameters(self.repo_id, self.sha, self.allow_pickle)


def _artifact_parameters(repo_id: str, sha: str, allow_pickle: bool) -> dict[str, Any]:
    """What decides a fetch artifact's content: the commit pins the bytes, allow_pickle the file choice."""
    return {"repo_id": repo_id, "revision": sha, "allow_pickle": allow_pickle}


def _plan_files(repo_id: str, sha: str, names: list[str], allow_pickle: bool) -> list[str]:
    """Choose the files to fetch, refusing repos that cannot be converted (before downloading anything)."""
    at = f"{repo_id}@{sha[:12]}"
    if "config.json" not in names:
        raise CheckpointError(f"{at} has no config.json, so it is not a transformers model", "check the repo id and --revision")
    files = select_files(names, allow_pickle)
    if any(f.endswith(".safetensors") or fnmatch(f, PICKLE_WEIGHT_PATTERN) for f in files):
        return files
    pickles = sorted(n for n in names if "/" not in n and n.endswith(PICKLE_SUFFIXES))
    if pickles and not allow_pickle and any(fnmatch(p, PICKLE_WEIGHT_PATTERN) for p in pickles):
        raise CheckpointError(
            f"{at} has only pickle weights ({pickles[0]}), which can run code when loaded",
            "pass --allow-pickle to fetch them and load them with torch.load(weights_only=True), or use a safetensors revision",
        )
    raise CheckpointError(
        f"{at} has no weights yitrt can read (no *.safetensors" + (f"; found {pickles[0]}" if pickles else "") + ")",
        "use a revision with safetensors weights",
    )


def _fetch_to_cache(plan: _Plan, force: bool, progress: ProgressCallback | None, start: float) -> FetchResult:
    hf = _hf()
    cached = [hf.try_to_load_from_cache(plan.repo_id, f, revision=plan.sha) for f in plan.files]
    reused = not force and all(isinstance(c, str) for c in cached)
    tracker = _ByteProgress(None if reused else progress, plan.total)
    # The user's revision (not the sha) is passed so huggingface_hub records refs/<branch> in the cache, which
    # is what lets a later offline run resolve "owner/name" without a revision.
    snapshot = Path(
        hf.snapshot_download(
            plan.repo_id,
            revision=plan.requested,
            allow_patterns=plan.files,
            force_download=force,
            tqdm_class=tracker.tqdm_class(),
        )
    )
    if snapshot.name != plan.sha:
        # The branch moved between the listing and the download: the files are those of the newer commit.
        plan = _Plan(plan.repo_id, plan.requested, snapshot.name, plan.files, plan.sizes, {}, plan.allow_pickle)
    if not reused:
        _verify_lfs_hashes(snapshot, plan.lfs_sha)
    _check_folder(snapshot, plan.allow_pickle)
    tracker.finish()
    return FetchResult(snapshot, plan.repo_id, plan.sha, reused, plan.files, plan.total, time.monotonic() - start)


def _fetch_to_folder(plan: _Plan, out: Path, force: bool, progress: ProgressCallback | None, start: float) -> FetchResult:
    hf = _hf()
    inputs = {"commit": plan.sha}
    key = artifact_key(STAGE, plan.parameters, inputs)
    if not force and (manifest := find_reusable(out, STAGE, key)) is not None:
        return _reused_result(out, plan.repo_id, plan.sha, manifest, start)
    tracker = _ByteProgress(progress, plan.total)
    with ArtifactWriter(out, STAGE, plan.parameters, inputs, {"huggingface_hub": hf.__version__}) as art:
        art.extra = {"ref": plan.requested or "main", "endpoint": hf.constants.ENDPOINT}
        # revision=sha pins every file to the listed commit; local_dir is the partial folder, so nothing of a
        # failed download can be mistaken for the artifact.
        hf.snapshot_download(
            plan.repo_id, revision=plan.sha, local_dir=art.path, allow_patterns=plan.files, tqdm_class=tracker.tqdm_class()
        )
        # huggingface_hub's bookkeeping for local_dir downloads; the yitrt manifest replaces it.
        shutil.rmtree(art.path / ".cache", ignore_errors=True)
        _verify_lfs_hashes(art.path, plan.lfs_sha)
        _check_folder(art.path, plan.allow_pickle)
    tracker.finish()
    return FetchResult(out, plan.repo_id, plan.sha, False, plan.files, plan.total, time.monotonic() - start)


def _fetch_offline(
    repo_id: str, revision: str | None, out: Path | None, allow_pickle: bool, force: bool, start: float, cause: Exception
) -> FetchResult:
    """The Hub cannot be reached: reuse an earlier fetch of this repo and revision, or fail with the cause."""
    if force:
        raise cause
    hf = _hf()
    if out is not None:
        manifest = read_manifest(out)
        params = manifest.parameters if manifest is not None else {}
        sha = params.get("revision", "")
        # The artifact answers for this request only if it holds this repo at the asked revision: its commit sha,
        # or the branch/tag it was fetched from (no revision is the default branch, as huggingface_hub has it).
        asked = manifest is not None and (revision or "main") in (sha, (manifest.extra or {}).get("ref"))
        if manifest is not None and manifest.stage == STAGE and params.get("repo_id") == repo_id and asked:
            key = artifact_key(STAGE, _artifact_parameters(repo_id, sha, allow_pickle), {"commit": sha})
            if (found := find_reusable(out, STAGE, key)) is not None:
                return _reused_result(out, repo_id, sha, found, start)
        raise cause
    # Only config.json is required here: huggingface_hub's completeness check compares the cached snapshot with
    # the file listing of the original fetch, which may hold files this fetch skipped; the weights are checked below.
    snapshot = Path(hf.snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=["config.json"]))
    if not any(p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES for p in snapshot.iterdir()):
        raise cause  # only metadata was fetched before (resolve_model(metadata_only=True)): not usable offline
    _check_folder(snapshot, allow_pickle)
    files = select_files((p.name for p in snapshot.iterdir() if p.is_file()), allow_pickle)
    size = sum((snapshot / f).stat().st_size for f in files)
    return FetchResult(snapshot, repo_id, snapshot.name, True, files, size, time.monotonic() - start)


def _reused_result(out: Path, repo_id: str, sha: str, manifest: Any, start: float) -> FetchResult:
    files = [f["path"] for f in manifest.files]
    return FetchResult(out, repo_id, sha, True, files, sum(f["size"] for f in manifest.files), time.monotonic() - start)


def _resolve_metadata(repo_id: str, revision: str | None, extra: tuple[str, ...] = ()) -> ResolvedModel:
    hf = _hf()
    silent = _ByteProgress(None, 0).tqdm_class()
    with _hub_errors(repo_id, revision):
        # config.json is required; its cache path names the commit (…/snapshots/<sha>/config.json). Offline,
        # huggingface_hub resolves the revision through the cache's refs/ folder.
        config = Path(hf.hf_hub_download(repo_id, "config.json", revision=revision, tqdm_class=silent))
        sha = config.parent.name
        for name in dict.fromkeys((*METADATA_FILES[1:], *extra)):
            try:
                hf.hf_hub_download(repo_id, name, revision=sha, tqdm_class=silent)
            except hf.errors.EntryNotFoundError as exc:
                # Absent from the repo (or, offline, never fetched): optional. A network failure is not.
                if isinstance(exc, hf.errors.LocalEntryNotFoundError) and not hf.constants.HF_HUB_OFFLINE:
                    raise
    return ResolvedModel(config.parent, repo_id, sha)


# -- checks ------------------------------------------------------------------------------------------------------


def _check_repo_id(repo_id: str) -> None:
    if not is_repo_id(repo_id):
        raise UsageError(f"{repo_id!r} is not a Hugging Face repo id", "use the form owner/name, e.g. 01-ai/Yi-1.5-6B-Chat")


def _check_folder(folder: Path, allow_pickle: bool) -> None:
    """config.json present and weights consistent (index vs shards, headers, sizes); no tensor data is read."""
    from yitrt.checkpoint.source import SourceCheckpoint

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json", "fetch the model again")
    SourceCheckpoint(folder, allow_pickle=allow_pickle).close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_lfs_hashes(folder: Path, expected: dict[str, str]) -> None:
    """Hash downloaded LFS files and compare with the sha256 the Hub lists (huggingface_hub checks sizes only)."""
    for name, want in sorted(expected.items()):
        got = _sha256(folder / name)
        if got != want:
            raise HubError(
                f"{name}: the downloaded bytes do not match the Hub's sha256 ({got[:12]} ≠ {want[:12]})",
                "the download was corrupted on the way; run the fetch again",
            )


# -- progress ----------------------------------------------------------------------------------------------------


class _ByteProgress:
    """Feeds ``callback(done, total)`` from the tqdm bars huggingface_hub creates, and silences them.

    ``snapshot_download(tqdm_class=...)`` builds a files bar and, in huggingface_hub ≥ 1.x, byte bars (unit "B")
    that every file download updates. Byte bars all count the same bytes (network and written), so the largest
    count is reported. Where a huggingface_hub version reports no bytes, only the start and the end are reported.
    """

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.done = 0
        self._lock = threading.Lock()
        if callback is not None:
            callback(0, total)

    def _seen(self, count: int) -> None:
        with self._lock:
            if count <= self.done:
                return
            self.done = count
        if self.callback is not None:
            self.callback(min(count, self.total), self.total)

    def finish(self) -> None:
        if self.callback is not None:
            self.callback(self.total, self.total)

    def tqdm_class(self) -> type:
        from tqdm.std import tqdm as std_tqdm

        tracker = self

        class _Bar(std_tqdm):
            # disable=True: huggingface_hub must not draw on stderr; the CLI draws from the callback.
            monitor_interval = 0  # no tqdm monitor thread for bars that never draw
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.pop("name", None)
                kwargs["disable"] = True
                self._yitrt_bytes = kwargs.get("unit") == "B"
                self._yitrt_count = int(kwargs.get("initial") or 0)
                super().__init__(*args, **kwargs)

            def update(self, n: float | None = 1) -> bool | None:
                if self._yitrt_bytes and n:
                    with tracker._lock:
                        self._yitrt_count += int(n)
                        count = self._yitrt_count
                    tracker._seen(count)
                return super().update(n)

        return _Bar


# -- huggingface_hub and its errors ------------------------------------------------------------------------------


def _hf():
    """huggingface_hub, imported on first use so that its import-time reading of HF_* variables happens late."""
    import huggingface_hub
    import huggingface_hub.constants  # noqa: F401  (attribute access below)
    import huggingface_hub.errors  # noqa: F401

    return huggingface_hub


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection/timeout exception types of whichever HTTP client this huggingface_hub uses."""
    found: list[type[BaseException]] = [_hf().errors.OfflineModeIsEnabled]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)), ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(found)


def _is_unreachable(exc: BaseException) -> bool:
    return isinstance(exc, _transport_errors())


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _url_tail(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    url = str(getattr(response, "url", "") or "")
    return url.rsplit("/", 1)[-1].split("?")[0] if url else "a file"


def map_hub_error(exc: BaseException, repo_id: str, revision: str | None = None) -> YitrtError | None:
    """The yitrt error for a huggingface_hub/HTTP exception, or None when it is not a Hub problem (a bug).

    Args:
        exc: what huggingface_hub raised.
        repo_id: the repo being fetched (named in the message).
        revision: the revision asked for (named in the message).

    Returns:
        A HubError (or ArtifactError for a full disk) with a one-line message and a hint, or None.
    """
    hf = _hf()
    err, const = hf.errors, hf.constants
    endpoint = const.ENDPOINT
    offline = bool(const.HF_HUB_OFFLINE)
    if isinstance(exc, err.GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        why = "no Hugging Face token was sent" if _status(exc) == 401 else "the token has not been granted access"
        return HubError(
            f"{repo_id} is a gated repository and {why}",
            "accept the licence on the model page, then set HF_TOKEN to a read token of that account",
        )
    if isinstance(exc, err.RepositoryNotFoundError):
        return HubError(
            f"repository {repo_id} not found on {endpoint} (or it is private)",
            "check the repo id; private repos need HF_TOKEN",
        )
    if isinstance(exc, err.RevisionNotFoundError):
        return HubError(f"revision {revision!r} not found in {repo_id}", "check --revision: a branch, a tag or a full commit sha")
    if isinstance(exc, err.LocalEntryNotFoundError) and not offline and exc.__cause__ is not None:
        # huggingface_hub hides why the Hub could not be asked (5xx, bad endpoint, ...) behind "not in the cache".
        cause = map_hub_error(exc.__cause__, repo_id, revision)
        if cause is not None:
            return cause
    if isinstance(exc, (err.LocalEntryNotFoundError, err.OfflineModeIsEnabled)) or (offline and _is_unreachable(exc)):
        if offline:
            return HubError(
                f"{repo_id}" + (f"@{revision}" if revision else "") + " is not fetched locally and HF_HUB_OFFLINE is set",
                "unset HF_HUB_OFFLINE, or fetch the model once online",
            )
        return HubError(
            f"cannot reach the Hub at {endpoint} and {repo_id} is not fetched locally",
            "check the network and HF_ENDPOINT; HF_HUB_OFFLINE=1 uses earlier fetches only",
        )
    if isinstance(exc, err.EntryNotFoundError):
        return HubError(
            f"{_url_tail(exc)} is listed in {repo_id} but the Hub cannot serve it",
            "the repo may have changed during the fetch; run it again, or pin --revision to a commit",
        )
    if _is_unreachable(exc):
        return HubError(
            f"cannot reach the Hub at {endpoint} ({type(exc).__name__})",
            "check the network and HF_ENDPOINT; HF_HUB_OFFLINE=1 uses earlier fetches only",
        )
    if isinstance(exc, getattr(err, "FileMetadataError", ())):
        return HubError(f"{endpoint} does not answer like a Hugging Face Hub (no commit or ETag headers)", "check HF_ENDPOINT")
    if isinstance(exc, err.HfHubHTTPError):
        status = _status(exc)
        if status in (401, 403):
            return HubError(f"the Hub refused access to {repo_id} ({status})", "check that HF_TOKEN is valid and may read this repo")
        if status == 429:
            return HubError(f"the Hub rate-limited the download of {repo_id} (429)", "wait and retry; an HF_TOKEN gets higher limits")
        return HubError(f"the Hub answered {status} for {repo_id}", "retry later; check HF_ENDPOINT")
    if isinstance(exc, OSError) and exc.errno is not None:  # disk full, read-only cache, permissions: the environment's
        mapped = os_error(exc, exc.filename or "the Hugging Face cache", f"store {repo_id} at")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            mapped.hint = "free disk space, or point HF_HOME (or --out) at a larger disk"
        elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            mapped.hint = "point HF_HOME (or --out) at a writable folder"
        return mapped
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return HubError(f"a file of {repo_id} arrived incomplete", "the connection dropped; run the fetch again")
    return None


@contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub exceptions into one-line yitrt errors; anything unknown propagates (a bug to see).

    Its warnings are silenced (a library does not print): e.g. "Not enough free disk space", which it says once per
    file before the download fails with ENOSPC, and which the error says once."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="huggingface_hub")
            yield
    except YitrtError:
        raise
    except Exception as exc:
        mapped = map_hub_error(exc, repo_id, revision)
        if mapped is None:
            raise
        raise mapped from exc
