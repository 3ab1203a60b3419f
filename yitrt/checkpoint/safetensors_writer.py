"""Header-first safetensors writing: the tensor table is known in advance, bytes land at their offsets.

``StreamingWriter`` writes the header at once, then takes tensor bytes in any order (whole tensors, row chunks,
kernel-side copies from a source file), hashes each finished prefix of the file while it is still in the page
cache and, in the same pass, proves every floating-point tensor region free of NaN/Inf (``yitrt.checkpoint.finite``:
bytes copied inside the kernel are seen here for the first and only time, so the check costs no extra read).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yitrt.checkpoint.finite import can_hold_nonfinite, first_nonfinite
from yitrt.checkpoint.safetensors_io import CODES, DTYPES, show_name
from yitrt.errors import CheckpointError

_HASH_WINDOW = 256 << 20  # bytes mapped at a time while hashing (bounds the resident set)
_CHECK_SLICE = 4 << 20  # hashed and checked together, so the check reads bytes the hasher just brought into cache


class NonFiniteTensor(CheckpointError):
    """A tensor written to an output file holds NaN or Inf. The converter catches it and names the source
    tensor and file (or the narrowing cast that overflowed); on its own it names the output tensor.

    Attributes:
        file: the output file.
        tensor: the tensor's name in it.
        element: index of the first non-finite element.
    """

    def __init__(self, file: Path, tensor: str, element: int) -> None:
        super().__init__(f"{file}: tensor {show_name(tensor)} holds NaN or Inf (element {element})",
                         "the weights are damaged: download them again, or pass --allow-nonfinite to keep them")
        self.file, self.tensor, self.element = Path(file), tensor, element


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


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int, label: str = "a source file") -> None:
    """Copy bytes between files inside the kernel (``copy_file_range``, as ``cp`` does), with a read/write fallback
    where the kernel or filesystem refuses it.

    Raises:
        CheckpointError: the source ended early (``label`` names it).
    """
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
        except OSError:
            n = 0
        if n <= 0:  # unsupported or cross-device: copy through user space
            chunk = os.pread(src_fd, min(nbytes - done, 16 << 20), src_offset + done)
            if not chunk:
                raise CheckpointError(f"{label}: ended early at byte {src_offset + done} (the file shrank while it was read)",
                                      "make sure nothing writes the model folder, then run again")
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

    While hashing, every floating-point tensor is checked for NaN/Inf: the first one found raises
    ``NonFiniteTensor`` (from ``close``, or from the queue at the producer's next call), unless
    ``allow_nonfinite``, in which case ``nonfinite`` records each such tensor and its first bad element.
    """

    def __init__(
        self, path: Path, plan: list[PlannedTensor], metadata: dict[str, str] | None = None, queue: WriteQueue | None = None,
        allow_nonfinite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.plan = plan
        self._queue = queue
        self._allow_nonfinite = allow_nonfinite
        self.nonfinite: dict[str, int] = {}
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
        self._hashed = 0  # bytes of the file hashed (and checked) so far: a finished prefix, at an element boundary
        # floating-point tensor regions in file order: (start, end, dtype code, name)
        self._floats = [(self._start[i.name], self._start[i.name] + i.nbytes, i.dtype, i.name)
                        for i in plan if can_hold_nonfinite(i.dtype) and i.nbytes]
        self._float_starts = [r[0] for r in self._floats]

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
            end = self._element_boundary(min(offset, start + _HASH_WINDOW))
            found = None
            with mmap.mmap(self._fd, end - start, offset=start, access=mmap.ACCESS_READ) as window:
                with memoryview(window) as view:
                    pos = self._hashed
                    while pos < end and found is None:  # hash a slice, then check it while it is in the CPU cache
                        stop = self._element_boundary(min(end, pos + _CHECK_SLICE))
                        with view[pos - start : stop - start] as piece:
                            self._hasher.update(piece)
                            found = self._check_finite(piece, pos, stop)
                        pos = stop
            if found is not None:  # raised once the map is closed (no view of it may outlive it)
                raise NonFiniteTensor(self.path, *found)
            self._hashed = end

    def _float_region(self, offset: int) -> int:
        """Index of the last floating-point region starting at or before ``offset`` (-1: none)."""
        return bisect.bisect_right(self._float_starts, offset) - 1

    def _element_boundary(self, offset: int) -> int:
        """``offset``, moved down to an element boundary when it falls inside a floating-point tensor."""
        k = self._float_region(offset)
        if k >= 0:
            begin, end, code, _ = self._floats[k]
            if begin < offset < end:
                return offset - (offset - begin) % DTYPES[code][1]
        return offset

    def _check_finite(self, piece: memoryview, begin: int, end: int) -> tuple[str, int] | None:
        """Check the floating-point tensor bytes of file range [begin, end), held by ``piece``; return the first
        (tensor, element) holding NaN/Inf unless ``allow_nonfinite`` (then each is recorded in ``nonfinite``)."""
        k = max(self._float_region(begin), 0)
        while k < len(self._floats) and self._floats[k][0] < end:
            start, stop, code, name = self._floats[k]
            lo, hi = max(begin, start), min(end, stop)
            k += 1
            if lo >= hi or name in self.nonfinite:
                continue
            with piece[lo - begin : hi - begin] as part:
                element = first_nonfinite(part, code)
            if element is not None:
                element += (lo - start) // DTYPES[code][1]
                if not self._allow_nonfinite:
                    return name, element
                self.nonfinite[name] = element
        return None

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

    def copy_at(self, name: str, rel: int, src_fd: int, src_offset: int, nbytes: int, label: str = "a source file") -> None:
        """Copy ``nbytes`` from a source file (``label`` names it in errors) into tensor ``name`` at byte ``rel``
        (kernel-side, synchronous)."""
        copy_range(src_fd, src_offset, self._fd, self._claim(name, rel, nbytes), nbytes, label)

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
