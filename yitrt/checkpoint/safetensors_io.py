"""Streaming safetensors I/O without memory maps, and the one validator of a safetensors header.

Reading uses plain positioned reads into fresh buffers, so only the block being converted is resident: a memory
map would keep every touched page of a 12-68 GB model in the process's resident set. Writing is header-first:
the full tensor table (names, dtypes, shapes, offsets) is known from the conversion plan, so the header is
written at once and tensor bytes land at their offsets — copied inside the kernel where they pass through
unchanged (``copy_file_range``, as ``cp`` does), written from user space where they are transformed.

Format (huggingface/safetensors docs): 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` (padded with spaces to
a multiple of 8), then the data section; offsets are relative to the data section.

Every path of yitrt that opens a safetensors file (convert, quantize, verify, inspect, fetch, generate, deploy)
goes through ``read_header``/``SafetensorsReader``, which prove the header tells the truth about the file
before a byte of tensor data is used: see ``validate_header``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

from yitrt.errors import CheckpointError
from yitrt.userfiles import StrictJsonError, loads_strict, show_name  # noqa: F401 (re-exported)

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

#: safetensors' own cap on the header (MAX_HEADER_SIZE = 100_000_000 in safetensors/src/tensor.rs)
MAX_HEADER_BYTES = 100_000_000
#: no tensor of a transformer checkpoint has more dimensions; a longer shape is damage or a forgery
MAX_RANK = 8
_MAX_DIM = (1 << 63) - 1  # dims are usize in safetensors and int64 in torch
_ENTRY_KEYS = ("data_offsets", "dtype", "shape")
#: O_NONBLOCK: a FIFO or device named *.safetensors must not block the open (refused as not a regular file);
#: reads of regular files ignore the flag
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
_FIX = "the file is damaged or was not written by a safetensors writer: download or write it again"


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


class _Refused(Exception):
    """A header problem found while parsing (turned into a CheckpointError naming the file)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _name_problem(name: str) -> str | None:
    if not name:
        return "an empty tensor name"
    if any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in name):
        return f"tensor name {show_name(name)!r} holds control characters or unpaired surrogates"
    return None


def _entry(name: str, entry: Any, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field proven; raises _Refused."""
    if not isinstance(entry, dict):
        raise _Refused(f"entry is a JSON {_json_type(entry)}, not an object")
    if tuple(sorted(entry)) != _ENTRY_KEYS:
        raise _Refused(f"entry has keys {sorted(map(show_name, entry))}, expected exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        shown = show_name(dtype) if isinstance(dtype, str) else json.dumps(dtype)[:40]
        raise _Refused(f"dtype {shown} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape):
        raise _Refused(f"shape {json.dumps(shape)[:80]} is not a list of at most {MAX_RANK} non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) for x in offsets):
        raise _Refused(f"data_offsets {json.dumps(offsets)[:80]} is not a pair of integers")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise _Refused(f"data_offsets [{begin}, {end}] is not a range (negative or reversed)")
    if end > data_size:
        raise _Refused(f"bytes [{begin}, {end}) lie beyond the data section's {data_size} bytes: the file is truncated")
    count = math.prod(shape)
    if count * DTYPES[dtype][1] != end - begin:
        raise _Refused(f"holds {end - begin} bytes, but {dtype} {shape} needs {count * DTYPES[dtype][1]}")
    return dtype, tuple(shape), begin, end


def _json_type(value: Any) -> str:
    kinds = ((dict, "object"), (list, "array"), (str, "string"), (bool, "boolean"), (int, "number"), (float, "number"))
    return next((label for kind, label in kinds if isinstance(value, kind)), "null")


def validate_header(path: Path, raw: bytes, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Prove that a safetensors header tells the truth about its file.

    Checked: the header is UTF-8 (decoded explicitly: ``json.loads`` of bytes would accept UTF-16/32) JSON text
    starting with ``{``, without NaN/Infinity literals or duplicate keys; it is an object of tensor entries plus
    an optional ``__metadata__`` object of string → string; every entry has exactly ``dtype``/``shape``/
    ``data_offsets`` with the right JSON types (integers that are not booleans, a known dtype, a shape of
    non-negative integers, a non-negative non-reversed range); every range lies inside the data section and holds
    shape × dtype-size bytes; and the ranges, in order, tile the data section exactly (no overlap, no gap, no
    trailing bytes) — the rules of the reference implementation (safetensors ``Metadata::validate``).

    Args:
        path: the file (for messages).
        raw: the N header bytes after the 8-byte length.
        file_size: the file's size in bytes.

    Returns:
        (tensors by name with absolute offsets, metadata).

    Raises:
        CheckpointError: naming the file, the tensor and what is wrong, with the fix.
    """
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    name: str | None = None
    try:
        if not raw:
            raise _Refused("the header is empty (length 0): not a safetensors file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Refused(f"the header is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {8 + exc.start})") from None
        try:
            header = loads_strict(text)
        except StrictJsonError as exc:
            raise _Refused(f"the header is {exc}" if str(exc).startswith("not ") else f"the header: {exc}") from None
        if not isinstance(header, dict):
            raise _Refused(f"the header is a JSON {_json_type(header)}, not an object of tensors")
        if not raw.startswith(b"{"):  # the reference reader requires it (no leading whitespace or BOM)
            raise _Refused(f"the header does not start with '{{' (first byte 0x{raw[0]:02x})")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _Refused("__metadata__ must be an object of string → string")
        spans = []
        for name, entry in header.items():
            if (problem := _name_problem(name)) is not None:
                raise _Refused(problem)
            spans.append((*_entry(name, entry, data_size), name))
        name = None
        cursor, previous = 0, None
        for _, _, begin, end, name in sorted(spans, key=lambda s: (s[2], s[3])):
            if begin < cursor:
                raise _Refused(f"bytes [{begin}, {end}) overlap tensor {show_name(previous)} (which ends at {cursor})")
            if begin > cursor:
                raise _Refused(f"starts at byte {begin}, leaving a gap of {begin - cursor} bytes after "
                               + (f"tensor {show_name(previous)}" if previous is not None else "the header"))
            cursor, previous = end, name
        name = None
        if cursor != data_size:
            raise _Refused(f"{data_size - cursor} bytes follow the last tensor's data (the ranges do not cover the data section)")
    except _Refused as exc:
        where = f"{path}: tensor {show_name(name)}: " if name is not None else f"{path}: "
        raise CheckpointError(where + str(exc), _FIX) from None
    tensors = {n: TensorInfo(n, dtype, shape, data_start + b, data_start + e) for dtype, shape, b, e, n in spans}
    return tensors, metadata


def _pread_exact(fd: int, nbytes: int, offset: int) -> bytes:
    chunks, done = [], 0
    while done < nbytes:
        chunk = os.pread(fd, min(nbytes - done, 64 << 20), offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def read_header_fd(path: Path, fd: int) -> tuple[dict[str, TensorInfo], dict[str, str], bytes, os.stat_result]:
    """``read_header`` on an open file descriptor; also returns the ``fstat`` the checks were made against.

    Raises:
        CheckpointError: see ``validate_header``; also a length field that does not fit the file.
    """
    try:
        stat = os.fstat(fd)
        if not S_ISREG(stat.st_mode):
            raise CheckpointError(f"{path}: not a regular file", "point at a folder of safetensors files")
        head = _pread_exact(fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({len(head)} bytes, no header)", "re-download this file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {length} exceeds the safetensors limit of {MAX_HEADER_BYTES} bytes", _FIX)
        if 8 + length > stat.st_size:
            raise CheckpointError(f"{path}: truncated inside its header ({stat.st_size} bytes on disk, the header needs {8 + length})", "re-download this file")
        raw = _pread_exact(fd, length, 8)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})", "check the file and its permissions") from None
    if len(raw) < length:
        raise CheckpointError(f"{path}: shrank while its header was read", "make sure nothing writes the file, then run again")
    tensors, metadata = validate_header(path, raw, stat.st_size)
    return tensors, metadata, raw, stat


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], bytes]:
    """Parse and validate a safetensors header (``validate_header``) without reading tensor data.

    Returns:
        (tensors by name, ``__metadata__``, raw header bytes).

    Raises:
        CheckpointError: unreadable, malformed, lying or truncated file.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})", "check the file and its permissions") from None
    try:
        tensors, metadata, raw, _ = read_header_fd(Path(path), fd)
    finally:
        os.close(fd)
    return tensors, metadata, raw


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns)


class SafetensorsReader:
    """Read whole tensors or row ranges of one validated safetensors file with positioned reads.

    The header is validated on the descriptor the reads use, and the file's identity, size and modification time
    are kept: a file replaced, grown or shrunk afterwards is refused (``check_unchanged``, and on reopening).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            fd = os.open(self.path, _OPEN_FLAGS)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot be read ({exc.strerror})", "check the file and its permissions") from None
        try:
            self.tensors, self.metadata, self.header_bytes, self._stat = read_header_fd(self.path, fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    def fileno(self) -> int:
        """The file descriptor reads use (reopened after ``close``; the file must be the one validated)."""
        if self._fd is None:
            try:
                fd = os.open(self.path, _OPEN_FLAGS)
            except OSError as exc:
                raise CheckpointError(f"{self.path}: cannot be read ({exc.strerror})", "check the file and its permissions") from None
            self._fd = fd
            self.check_unchanged()
        return self._fd

    def check_unchanged(self) -> None:
        """Refuse a file that changed since its header was validated (size, modification time, identity).

        Raises:
            CheckpointError: it changed.
        """
        if self._fd is None:
            return
        if not _same_file(os.fstat(self._fd), self._stat):
            raise CheckpointError(f"{self.path}: changed while yitrt was reading it", "make sure nothing writes the model folder, then run again")

    def read(self, name: str, rows: tuple[int, int] | None = None):
        """Return a tensor (a fresh CPU buffer) or rows ``[start, stop)`` of its first dimension.

        Rows beyond the tensor's end are not allowed; callers pad themselves.

        Raises:
            CheckpointError: the file ended early (it shrank after validation).
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
                raise CheckpointError(f"{self.path}: ended early reading tensor {show_name(name)} (the file shrank)", "make sure nothing writes the file, then run again")
            done += n
        return buf.view(getattr(torch, DTYPES[info.dtype][0])).reshape(shape)

    def read_all(self) -> dict[str, Any]:
        """Every tensor of the file, by name (fresh CPU buffers), then ``check_unchanged``."""
        tensors = {name: self.read(name) for name in self.tensors}
        self.check_unchanged()
        return tensors

    def close(self) -> None:
        """Close the file descriptor (reads reopen it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_safetensors(path: Path) -> dict[str, Any]:
    """All tensors of a safetensors file, validated first (the replacement of ``safetensors.torch.load_file``).

    Raises:
        CheckpointError: see ``validate_header``.
    """
    with SafetensorsReader(path) as reader:
        return reader.read_all()
