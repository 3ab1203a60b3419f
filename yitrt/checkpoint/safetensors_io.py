"""Streaming safetensors I/O without memory maps.

Reading uses plain positioned reads into fresh buffers, so only the block being converted is resident: a memory
map would keep every touched page of a 12-68 GB model in the process's resident set. Writing is header-first:
the full tensor table (names, dtypes, shapes, offsets) is known from the conversion plan, so the header is
written at once and tensor bytes land at their offsets — copied inside the kernel where they pass through
unchanged (``copy_file_range``, as ``cp`` does), written from user space where they are transformed.

Format (huggingface/safetensors docs): 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` (padded with spaces to
a multiple of 8), then the data section; offsets are relative to the data section.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yitrt.errors import CheckpointError

#: safetensors dtype code → (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "BF16": ("bfloat16", 2),
    "F16": ("float16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "I16": ("int16", 2),
    "I32": ("int32", 4),
    "I64": ("int64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "BOOL": ("bool", 1),
}
#: torch dtype name → safetensors code
CODES: dict[str, str] = {name: code for code, (name, _) in DTYPES.items()}

_MAX_HEADER = 100 << 20  # the safetensors spec caps headers at 100 MB
_HASH_WINDOW = 256 << 20  # bytes mapped at a time while hashing (bounds the resident set)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are and what they are."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], bytes]:
    """Parse a safetensors header and check the file is long enough for every tensor.

    Returns:
        (tensors by name, ``__metadata__``, raw header bytes).

    Raises:
        CheckpointError: unreadable, malformed or truncated file.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)", "re-download this shard")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER:
                raise CheckpointError(f"{path}: corrupt safetensors header length {length}", "re-download this shard")
            if 8 + length > size:
                raise CheckpointError(f"{path}: truncated inside its header ({size} bytes on disk)", "re-download this shard")
            raw = fh.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})", "check the file and its permissions") from exc
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON", "re-download this shard") from exc
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: damaged header entry for tensor {name}", "re-download this shard") from exc
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}", "convert the shard to safetensors with a standard dtype")
        if end - begin != math.prod(shape) * DTYPES[dtype][1]:
            raise CheckpointError(f"{path}: tensor {name} byte range does not match its shape {list(shape)}", "re-download this shard")
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
        data_end = max(data_end, end)
    if data_start + data_end > size:
        raise CheckpointError(
            f"{path}: truncated: {size} bytes on disk, the header needs {data_start + data_end}",
            "the download was interrupted; fetch the model again",
        )
    return tensors, metadata, raw


class SafetensorsReader:
    """Read whole tensors or row ranges of one safetensors file with positioned reads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tensors, self.metadata, self.header_bytes = read_header(self.path)
        self._fd: int | None = None

    def fileno(self) -> int:
        """The file descriptor reads use (opened on first use)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read(self, name: str, rows: tuple[int, int] | None = None):
        """Return a tensor (a fresh CPU buffer) or rows ``[start, stop)`` of its first dimension.

        Rows beyond the tensor's end are not allowed; callers pad themselves.
        """
        import torch

        info = self.tensors[name]
        shape = list(info.shape)
        begin, nbytes = info.begin, info.nbytes
        if rows is not None:
            start, stop = rows
            if not 0 <= start <= stop <= shape[0]:
                raise ValueError(f"rows {rows} outside {name} of {shape[0]} rows")
            row_bytes = info.nbytes // shape[0] if shape[0] else 0
            begin += start * row_bytes
            nbytes = (stop - start) * row_bytes
            shape[0] = stop - start
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        fd = self.fileno()
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], begin + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file reading {name}", "re-download this shard")
            done += n
        return buf.view(getattr(torch, DTYPES[info.dtype][0])).reshape(shape)

    def close(self) -> None:
        """Close the file descriptor (reads reopen it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor a writer will receive: name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of data."""
        return math.prod(self.shape) * DTYPES[self.dtype][1]


class WriteQueue:
    """One background thread that runs queued I/O tasks in order: writes of transformed chunks and the hashing
    of finished file regions overlap with the main thread's reading and kernel copies (both release the GIL).
    At most ``depth`` tasks wait at a time, which bounds the buffers they hold."""

    def __init__(self, depth: int = 3) -> None:
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="yitrt-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    fn, args = item
                    fn(*args)
            except BaseException as exc:  # surfaced to the producer at its next call
                self._error = exc
            finally:
                self._queue.task_done()

    def put(self, fn, *args) -> None:
        """Queue ``fn(*args)``; buffers among the args must not change afterwards."""
        self._raise()
        self._queue.put((fn, args))

    def flush(self) -> None:
        """Wait until every queued task is done; re-raise a task's error."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        """Stop the thread after the queued work."""
        self._queue.put(None)
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write a whole buffer at an absolute offset."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """Copy bytes between files inside the kernel (``copy_file_range``, as ``cp`` does), with a read/write fallback
    where the kernel or filesystem refuses it."""
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
        except OSError:
            n = 0
        if n <= 0:  # unsupported or cross-device: copy through user space
            chunk = os.pread(src_fd, min(nbytes - done, 16 << 20), src_offset + done)
            if not chunk:
                raise CheckpointError(f"unexpected end of a source file at offset {src_offset + done}", "re-download the model")
            pwrite_all(dst_fd, chunk, dst_offset + done)
            n = len(chunk)
        done += n


def new_hasher():
    """The content hash of artifact files: BLAKE3 (cryptographic, about twice sha256's speed here)."""
    import blake3

    return blake3.blake3()


class StreamingWriter:
    """Write a safetensors file whose tensor table is known in advance.

    The header is written first; tensor bytes then arrive either in order (``write``/``append``, whole tensors or
    row chunks) or at explicit offsets (``write_at``, ``copy_at`` for kernel-side copies from a source file). Every
    byte range is recorded, and ``close`` checks that each planned tensor was filled exactly once — so a file is
    complete and consistent with its header, or the conversion fails.
    """

    def __init__(
        self, path: Path, plan: list[PlannedTensor], metadata: dict[str, str] | None = None, queue: WriteQueue | None = None
    ) -> None:
        self.path = Path(path)
        self.plan = plan
        self._queue = queue
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for item in plan:
            header[item.name] = {"dtype": item.dtype, "shape": list(item.shape), "data_offsets": [offset, offset + item.nbytes]}
            offset += item.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as the reference writer does
        data_start = 8 + len(raw)
        self._items = {item.name: item for item in plan}
        self._start = {item.name: data_start + header[item.name]["data_offsets"][0] for item in plan}
        self._ranges: dict[str, list[tuple[int, int]]] = {item.name: [] for item in plan}
        self._appended: dict[str, int] = {}  # bytes appended so far per tensor (append/write)
        self.size = data_start + offset
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        pwrite_all(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self._fd, self.size)
        self._hasher = new_hasher()
        self._hashed = 0  # bytes of the file hashed so far (always a finished prefix)

    def end_of(self, name: str) -> int:
        """Absolute file offset just after planned tensor ``name``."""
        return self._start[name] + self._items[name].nbytes

    def hash_through(self, offset: int) -> None:
        """Hash the file up to ``offset``, which must be the end of a finished prefix (queued when there is a
        queue, so it runs after the writes queued before it). Tensors are written in plan order, so the prefix
        up to a finished tensor is final; hashing it now, while it is in the page cache, saves a pass at the end."""
        if self._queue is not None:
            self._queue.put(self._hash_now, offset)
        else:
            self._hash_now(offset)

    def _hash_now(self, offset: int) -> None:
        import mmap

        while self._hashed < offset:
            start = self._hashed - self._hashed % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be aligned
            length = min(_HASH_WINDOW, offset - start)
            with mmap.mmap(self._fd, length, offset=start, access=mmap.ACCESS_READ) as window:
                with memoryview(window) as view:
                    self._hasher.update(view[self._hashed - start :])
            self._hashed = start + length

    # -- random access ------------------------------------------------------------------------------------
    def _claim(self, name: str, rel: int, nbytes: int) -> int:
        item = self._items.get(name)
        if item is None:
            raise ValueError(f"{self.path.name}: {name} is not planned")
        if rel < 0 or rel + nbytes > item.nbytes:
            raise ValueError(f"{self.path.name}: bytes [{rel}, {rel + nbytes}) outside {name} ({item.nbytes} bytes)")
        self._ranges[name].append((rel, rel + nbytes))
        return self._start[name] + rel

    def write_at(self, name: str, rel: int, data) -> None:
        """Write raw bytes at byte ``rel`` of tensor ``name`` (queued when the writer has a queue)."""
        data = memoryview(data).cast("B")
        offset = self._claim(name, rel, len(data))
        if self._queue is not None:
            self._queue.put(pwrite_all, self._fd, data, offset)
        else:
            pwrite_all(self._fd, data, offset)

    def copy_at(self, name: str, rel: int, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Copy ``nbytes`` from a source file into tensor ``name`` at byte ``rel`` (kernel-side, synchronous)."""
        copy_range(src_fd, src_offset, self._fd, self._claim(name, rel, nbytes), nbytes)

    # -- whole tensors and row chunks --------------------------------------------------------------------
    def append(self, name: str, chunk) -> None:
        """Append rows to planned tensor ``name`` after the rows appended so far (a whole tensor is one chunk).

        Raises:
            ValueError: unplanned name, wrong dtype or trailing dims, or more rows than planned (a yitrt bug).
        """
        item = self._items.get(name)
        dtype = CODES.get(str(chunk.dtype).removeprefix("torch."))
        shape = tuple(chunk.shape)
        fits = item is not None and (shape == item.shape or (len(shape) == len(item.shape) > 0 and shape[1:] == item.shape[1:]))
        if item is None or item.dtype != dtype or not fits:
            planned = f"{item.dtype} {list(item.shape)}" if item else "nothing"
            raise ValueError(f"{self.path.name}: got {name} {dtype} {list(shape)}, planned {planned}")
        import torch

        data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
        position = self._appended.get(name, 0)
        self.write_at(name, position, data)
        self._appended[name] = position + data.nbytes

    def write(self, name: str, tensor) -> None:
        """Write planned tensor ``name`` whole (see ``append``)."""
        item = self._items.get(name)
        if item is not None and tuple(tensor.shape) != item.shape:
            raise ValueError(f"{self.path.name}: {name} has shape {list(tensor.shape)}, planned {list(item.shape)}")
        self.append(name, tensor)

    def close(self) -> tuple[int, str]:
        """Finish the file, check every planned tensor was filled exactly once; return (size, BLAKE3 hex digest).

        Raises:
            ValueError: a tensor has gaps or overlapping writes (a yitrt bug).
        """
        if self._queue is not None:
            self._queue.flush()
        self._hash_now(self.size)
        digest = self._hasher.hexdigest()
        os.close(self._fd)
        self._fd = -1
        for name, ranges in self._ranges.items():
            covered = 0
            for start, stop in sorted(ranges):
                if start != covered:
                    problem = "overlapping writes" if start < covered else f"a gap at byte {covered}"
                    raise ValueError(f"{self.path.name}: {name} has {problem}")
                covered = stop
            if covered != self._items[name].nbytes:
                raise ValueError(f"{self.path.name}: {name} was not fully written ({covered} of {self._items[name].nbytes} bytes)")
        return self.size, digest

    def abort(self) -> None:
        """Close without checks (the caller discards the file)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
