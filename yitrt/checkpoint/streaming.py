"""Moving rank pieces from the source files into the rank files, with memory bounded by a few row blocks.

A tensor's piece for a rank is a list of segments (``sharding.rank_segments``). Two ways to move them:

- ``copy_pieces``: bytes that pass through unchanged (same dtype, no quantization) never enter Python: row
  ranges are copied inside the kernel, and row-parallel column blocks are scattered straight into per-rank
  buffers by ``preadv``;
- ``stream_pieces``: bytes that are transformed (dtype cast, FP8) are read in blocks of at most ``CHUNK_BYTES``
  and handed to the encoder. Row-parallel weights are read once per row block and every rank takes its column
  block from it; replicated tensors are read once for all ranks. Per rank, chunks come in row order.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Iterator

from yitrt.checkpoint.safetensors_io import DTYPES
from yitrt.checkpoint.sharding import rank_segments
from yitrt.checkpoint.source import SourceCheckpoint
from yitrt.errors import CheckpointError
from yitrt.models.config import ModelConfig
from yitrt.models.llama import ResolvedTensor, Split

CHUNK_BYTES = 32 << 20


def keep_freed_memory_for_reuse() -> None:
    """Ask glibc to recycle freed chunk buffers instead of returning them to the kernel (for ``stream_pieces``).

    Every chunk is a fresh allocation of up to a few tens of MB; glibc serves those with mmap and unmaps them on
    free, so each new chunk pays page faults that cost more than the copy itself (measured: 0.37 GB/s into fresh
    buffers vs 1.4 GB/s into reused ones). Raising the mmap and trim thresholds keeps the pages in the heap.
    A no-op where glibc is not the allocator.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from malloc.h
    libc.mallopt(m_mmap_threshold, 256 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


def _row_blocks(rows: tuple[int, int], row_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    for start in range(rows[0], rows[1], step):
        yield start, min(start + step, rows[1])


def stream_pieces(cfg: ModelConfig, tensor: ResolvedTensor, tp: int, source: SourceCheckpoint) -> Iterator[tuple[int, object]]:
    """Yield ``(tp_rank, chunk)`` pairs that, concatenated per rank along dim 0, form each rank's piece."""
    import torch

    part = tensor.parts[0]
    info = source.tensors[part.name]
    row_bytes = math.prod(info.shape[1:]) * _element_size(info.dtype)
    split = tensor.rule.split
    if split is Split.REPLICATE or (split is Split.ROW and len(part.shape) == 2):
        segments = [rank_segments(cfg, tensor, tp, r)[0] for r in range(tp)]
        for block in _row_blocks((0, part.shape[0]), row_bytes):
            rows = source.read(part.name, block)
            for tp_rank, seg in enumerate(segments):
                yield tp_rank, (rows[:, seg.cols[0] : seg.cols[1]] if seg.cols else rows)
        return
    for tp_rank in range(tp):
        for seg in rank_segments(cfg, tensor, tp, tp_rank):
            if seg.source is None:
                width = info.shape[1:]
                for start, stop in _row_blocks((0, seg.num_rows), row_bytes):
                    yield tp_rank, torch.zeros((stop - start, *width), dtype=_torch_dtype(info.dtype))
                continue
            for block in _row_blocks(seg.rows, row_bytes):
                yield tp_rank, source.read(seg.source, block)


def _torch_dtype(code: str):
    import torch

    return getattr(torch, DTYPES[code][0])


_IOV_MAX = 1024  # Linux's limit on buffers per preadv call


def copy_pieces(cfg: ModelConfig, tensor: ResolvedTensor, tp: int, source: SourceCheckpoint, writers: list, name: str) -> int:
    """Write every rank's piece of a tensor whose bytes pass through unchanged; return the bytes written.

    Row ranges are copied inside the kernel (``copy_file_range``); row-parallel weights, whose rank pieces are
    column blocks, are read once per row block with ``preadv`` scattering each row's column blocks straight
    into per-rank buffers, so no user-space gather pass is needed.

    Args:
        writers: the StreamingWriter of each TP rank's file, in rank order.
        name: the tensor's name in the rank files.
    """
    import numpy as np

    part = tensor.parts[0]
    info = source.tensors[part.name]
    elem = _element_size(info.dtype)
    row_bytes = math.prod(info.shape[1:]) * elem
    if tensor.rule.split is Split.ROW and len(part.shape) == 2:
        fd, base = source.location(part.name)
        width = part.shape[1] // tp * elem
        rows_total = part.shape[0]
        for start, stop in _row_blocks((0, rows_total), row_bytes):
            count = stop - start
            buffers = [np.empty(count * width, dtype=np.uint8) for _ in range(tp)]
            views = [memoryview(b) for b in buffers]
            iov = [views[r][j * width : (j + 1) * width] for j in range(count) for r in range(tp)]
            offset = base + start * row_bytes
            for k in range(0, len(iov), _IOV_MAX):
                batch = iov[k : k + _IOV_MAX]
                want = len(batch) * width
                if os.preadv(fd, batch, offset) != want:
                    raise CheckpointError(f"{source.folder / info.file}: ended early reading tensor {part.name} (the file shrank)",
                                          "make sure nothing writes the model folder, then run again")
                offset += want
            for tp_rank, writer in enumerate(writers):
                writer.write_at(name, start * width, buffers[tp_rank])
        return rows_total * row_bytes
    written = 0
    for tp_rank, writer in enumerate(writers):
        rel = 0
        for seg in rank_segments(cfg, tensor, tp, tp_rank):
            nbytes = seg.num_rows * row_bytes
            if seg.source is None:
                writer.write_at(name, rel, bytes(nbytes))
            else:
                fd, base = source.location(seg.source)
                label = str(source.folder / source.tensors[seg.source].file)
                writer.copy_at(name, rel, fd, base + seg.rows[0] * row_bytes, nbytes, label)
            rel += nbytes
        written += rel
    return written


def _element_size(code: str) -> int:
    return DTYPES[code][1]
