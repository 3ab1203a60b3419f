"""A Hugging Face model folder as a lazily-read set of named tensors, checked against its index.

Checks done on open (no tensor data is read): every safetensors header tells the truth about its file
(``safetensors_io.validate_header``); when ``model.safetensors.index.json`` exists, it is a JSON object whose
``weight_map`` maps tensor names to plain file names of this folder, every file it names exists, every tensor it
lists is in the file it names, and no shard holds tensors the index does not list. Pickle weights
(``.bin``/``.pt``) are refused unless the caller opts in; then they are loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from yitrt.checkpoint.finite import first_nonfinite
from yitrt.checkpoint.safetensors_io import (
    CODES,
    DTYPES,
    SafetensorsReader,
    StrictJsonError,
    loads_strict,
    show_name,
)
from yitrt.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
#: Pickle weight files transformers writes; other pickles in a repo (training_args.bin, optimizer.pt) are not weights.
PICKLE_WEIGHTS_GLOB = "pytorch_model*.bin"
_REFETCH = "the index is damaged or forged; fetch the model again"
NONFINITE_HINT = "the weights are damaged: download them again, or pass --allow-nonfinite to keep them"


def read_index(path: Path, suffix: str) -> dict[str, str]:
    """The ``weight_map`` of a sharded-weights index, proven: a JSON object (strict JSON, no duplicate keys)
    whose ``weight_map`` is an object of tensor name → the plain name of a ``*{suffix}`` file in the same folder
    (no folder part, no ``..``, not absolute).

    Raises:
        CheckpointError: unreadable, not JSON, the wrong shape, or a file name that leaves the folder.
    """
    from yitrt.userfiles import CONFIG_CAP, read_text

    text = read_text(Path(path), Path(path).name, CONFIG_CAP, CheckpointError, _REFETCH)  # regular, capped, UTF-8
    try:
        index = loads_strict(text)
    except StrictJsonError as exc:
        raise CheckpointError(f"{path}: {exc}", _REFETCH) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: not an index (no 'weight_map' object)", _REFETCH)
    for name, file in weight_map.items():
        if not isinstance(file, str) or not _plain_file_name(file, suffix):
            shown = show_name(file) if isinstance(file, str) else repr(file)[:40]
            raise CheckpointError(f"{path}: tensor {show_name(name)} is mapped to {shown!r}, not a *{suffix} file of this folder", _REFETCH)
    return weight_map


def _plain_file_name(name: str, suffix: str) -> bool:
    """A bare file name: no separators, not '.'/'..', no control characters, with the expected suffix."""
    return (name.endswith(suffix) and len(name) > len(suffix) and "/" not in name and "\\" not in name
            and name not in (".", "..") and not any(ord(c) < 0x20 for c in name))


@dataclass(frozen=True)
class SourceTensor:
    """Where one HF tensor lives and what it is."""

    name: str
    file: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]


def pickle_refusal_reason(exc: Exception) -> str:
    """One line of torch's refusal: it spans paragraphs (the weights_only default change, the advice to turn it
    off — which yitrt never does —, the global it refused, a link); the line naming what was refused says why."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line.lower() or "Unsupported" in line]
    if named:
        return f"it would run code: {named[0][:200]}"
    return (lines[0][:200] if lines else type(exc).__name__)


class SourceCheckpoint:
    """The weights of an HF folder, by tensor name, read on demand."""

    def __init__(self, folder: Path, allow_pickle: bool = False) -> None:
        self.folder = Path(folder)
        self.tensors: dict[str, SourceTensor] = {}
        self.header_bytes: dict[str, bytes] = {}
        self._readers: dict[str, SafetensorsReader] = {}
        self._pickles: dict[str, dict] = {}
        files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if files:
            self._open_safetensors(files)
        else:
            self._open_pickles(allow_pickle)

    # -- opening -------------------------------------------------------------------------------------------
    def _open_safetensors(self, files: list[str]) -> None:
        index_path = self.folder / INDEX_NAME
        weight_map: dict[str, str] | None = None
        if os.path.lexists(index_path):  # a folder or FIFO of that name is refused by the reader, not skipped
            weight_map = read_index(index_path, ".safetensors")
            listed = sorted(set(weight_map.values()))
            missing = [f for f in listed if not (self.folder / f).is_file()]
            if missing:
                raise CheckpointError(
                    f"{self.folder}: {len(missing)} shard(s) named by the index are missing: {', '.join(missing[:4])}",
                    "the download is incomplete; run `yitrt fetch` again",
                )
            files = listed
        for fname in files:
            reader = SafetensorsReader(self.folder / fname)
            self._readers[fname] = reader
            self.header_bytes[fname] = reader.header_bytes
            for name, info in reader.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"{self.folder}: tensor {name} is stored twice ({self.tensors[name].file} and {fname})",
                        "remove the stray shard",
                    )
                self.tensors[name] = SourceTensor(name, fname, info.dtype, info.shape)
        if weight_map is not None:
            absent = [n for n, f in weight_map.items() if n not in self._readers[f].tensors]
            if absent:
                raise CheckpointError(
                    f"{self.folder}: {len(absent)} tensor(s) listed in the index are not in their shard, e.g. {absent[0]} in {weight_map[absent[0]]}",
                    "a shard is stale or truncated; fetch the model again",
                )
            unlisted = [n for n in self.tensors if n not in weight_map]
            if unlisted:
                raise CheckpointError(
                    f"{self.folder}: {len(unlisted)} tensor(s) in the shards are not in the index, e.g. {unlisted[0]}",
                    "the index and shards come from different revisions; fetch the model again",
                )

    def _open_pickles(self, allow_pickle: bool) -> None:
        index = self.folder / PICKLE_INDEX_NAME
        if os.path.lexists(index):
            pickles = sorted(set(read_index(index, ".bin").values()))
        else:
            pickles = sorted(p.name for p in self.folder.glob(PICKLE_WEIGHTS_GLOB) if p.is_file())
        if not pickles:
            raise CheckpointError(f"{self.folder}: no weight files (*.safetensors)", "point to a complete model folder or `yitrt fetch` it")
        if not allow_pickle:
            raise CheckpointError(
                f"{self.folder}: weights are pickle files ({pickles[0]}), which can run code when loaded",
                "prefer a safetensors revision; or pass --allow-pickle to load them with torch.load(weights_only=True)",
            )
        import torch

        for fname in pickles:
            try:
                state = torch.load(self.folder / fname, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for bad pickles
                raise CheckpointError(f"{self.folder / fname}: cannot be loaded safely ({pickle_refusal_reason(exc)})",
                                      "use a safetensors revision (weights_only=True refuses pickles that run code)") from exc
            if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
                raise CheckpointError(f"{self.folder / fname}: not a state dict of named tensors", "use a safetensors revision")
            self._pickles[fname] = state
            for name, tensor in state.items():
                code = CODES.get(str(tensor.dtype).removeprefix("torch."))
                if code is None:
                    raise CheckpointError(f"{self.folder / fname}: tensor {show_name(name)} has dtype {tensor.dtype}, which yitrt does not read",
                                          "use a safetensors revision")
                self.tensors[name] = SourceTensor(name, fname, code, tuple(tensor.shape))

    # -- reading -------------------------------------------------------------------------------------------
    @property
    def files(self) -> list[str]:
        """Weight files, by name."""
        return sorted(set(self._readers) | set(self._pickles))

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data over all weight files."""
        return sum(math.prod(t.shape) * DTYPES[t.dtype][1] for t in self.tensors.values())

    def read(self, name: str, rows: tuple[int, int] | None = None):
        """Read a tensor, or rows ``[start, stop)`` of its first dimension, into a fresh CPU tensor."""
        src = self.tensors[name]
        if src.file in self._readers:
            return self._readers[src.file].read(name, rows)
        tensor = self._pickles[src.file][name]
        return (tensor if rows is None else tensor[rows[0] : rows[1]]).clone()

    def location(self, name: str) -> tuple[int, int] | None:
        """(open file descriptor, absolute byte offset) of a tensor's data in a safetensors file; None for pickles.

        Lets the converter copy unchanged bytes inside the kernel instead of through Python.
        """
        src = self.tensors[name]
        reader = self._readers.get(src.file)
        if reader is None:
            return None
        return reader.fileno(), reader.tensors[name].begin

    def check_unchanged(self) -> None:
        """Refuse when a weight file changed (size, modification time, identity) since it was validated.

        Raises:
            CheckpointError: naming the file.
        """
        for reader in self._readers.values():
            reader.check_unchanged()

    def first_nonfinite(self, name: str) -> int | None:
        """Index of the first NaN/Inf element of a source tensor, or None (reads it in row blocks)."""
        code = self.tensors[name].dtype
        for first, block in self._blocks(name):
            element = first_nonfinite(block.contiguous().reshape(-1).view(_uint8()).numpy(), code)
            if element is not None:
                return first + element
        return None

    def _blocks(self, name: str, block_bytes: int = 32 << 20):
        """(index of the block's first element, block) over a tensor, in row blocks of about ``block_bytes``."""
        info = self.tensors[name]
        if not info.shape:
            yield 0, self.read(name)
            return
        row = math.prod(info.shape[1:])
        step = max(1, block_bytes // max(1, row * DTYPES[info.dtype][1]))
        for start in range(0, info.shape[0], step):
            yield start * row, self.read(name, (start, min(start + step, info.shape[0])))

    def nonfinite_error(self, names: list[str], target_dtype: str) -> CheckpointError | None:
        """Explain NaN/Inf that appeared in an output made from source tensors ``names`` cast to
        ``target_dtype``: the source tensor that holds them, else the one whose values overflow the target
        dtype. None when neither is found (reads the tensors again: meant for the failure path only).
        """
        import torch

        for name in names:
            element = self.first_nonfinite(name)
            if element is not None:
                return CheckpointError(f"{self.folder / self.tensors[name].file}: tensor {show_name(name)} holds NaN or Inf "
                                       f"(element {element})", NONFINITE_HINT)
        limit = torch.finfo(getattr(torch, target_dtype)).max if target_dtype in ("float16", "bfloat16", "float32") else None
        for name in names:
            peak = max((float(b.float().abs().max()) for _, b in self._blocks(name) if b.numel()), default=0.0)
            if limit is not None and peak > limit:
                return CheckpointError(
                    f"{self.folder / self.tensors[name].file}: tensor {show_name(name)} has values up to {peak:.4g}, which become "
                    f"Inf in {target_dtype} (largest {limit:.4g})",
                    "convert with --dtype bfloat16 (the range of float32), or pass --allow-nonfinite to keep the Inf values")
        return None

    def close(self) -> None:
        """Release file handles."""
        for reader in self._readers.values():
            reader.close()
        self._pickles.clear()

    def __enter__(self) -> SourceCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _uint8():
    import torch

    return torch.uint8
