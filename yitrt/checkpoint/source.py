"""A Hugging Face model folder as a lazily-read set of named tensors, checked against its index.

Checks done on open (no tensor data is read): every safetensors file parses and is long enough for its
header; when ``model.safetensors.index.json`` exists, every file it names exists, every tensor it lists is in
the file it names, and no shard holds tensors the index does not list. Pickle weights (``.bin``/``.pt``) are
refused unless the caller opts in; then they are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from yitrt.checkpoint.safetensors_io import DTYPES, SafetensorsReader
from yitrt.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
#: Pickle weight files transformers writes; other pickles in a repo (training_args.bin, optimizer.pt) are not weights.
PICKLE_WEIGHTS_GLOB = "pytorch_model*.bin"


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


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of a safetensors/pickle index: tensor name → file name, every file inside the folder
    (an index naming ``../x.safetensors`` or an absolute path is refused: yitrt.userfiles.check_inside_name).

    Raises:
        CheckpointError: unreadable, not a JSON object, no weight_map mapping of strings, or a file outside.
    """
    from yitrt.userfiles import check_inside_name, read_json

    data = read_json(index_path, index_path.name, error=CheckpointError, fix="re-download the model")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: no weight_map of tensor name → file name", "re-download the model")
    for name in sorted(set(weight_map.values())):
        check_inside_name(name, index_path.parent, f"{index_path}: weight_map", CheckpointError)
    return weight_map


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
        if os.path.lexists(index_path):
            weight_map = read_weight_map(index_path)
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
            pickles = sorted(set(read_weight_map(index).values()))
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
                code = {v[0]: k for k, v in DTYPES.items()}[str(tensor.dtype).removeprefix("torch.")]
                self.tensors[name] = SourceTensor(name, fname, code, tuple(tensor.shape))

    # -- reading -------------------------------------------------------------------------------------------
    @property
    def files(self) -> list[str]:
        """Weight files, by name."""
        return sorted(set(self._readers) | set(self._pickles))

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

    def close(self) -> None:
        """Release file handles."""
        for reader in self._readers.values():
            reader.close()
        self._pickles.clear()

    def __enter__(self) -> SourceCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
