"""Tensor- and pipeline-parallel sharding: which TP/PP sizes are valid, and what each rank holds.

Rules (reference/trtllm-checkpoint-and-build.md §2):
- rank = pp_rank·tp + tp_rank (mapping.py, no context parallelism);
- q heads split evenly; KV heads split evenly when tp ≤ n_kv (needs n_kv % tp == 0), else each KV head is
  repeated tp/n_kv times consecutively (needs tp % n_kv == 0) so rank r holds KV head r·n_kv // tp;
  ``num_key_value_heads`` in the checkpoint config keeps the original value (§2.3);
- column weights split dim 0, row weights dim 1, row biases replicated (§2.2);
- vocab rows zero-padded to ceil(V/tp)·tp then split (lm_head always; the embedding too, with parallel
  embedding on dim 0) (§2.4);
- pipeline stages hold contiguous layer blocks; L % pp == 0 is required because TensorRT-LLM ~0.9–0.11 silently
  dropped the remainder while 1.x gives it to the first stages (§2.6).
"""

from __future__ import annotations

from dataclasses import dataclass

from yitrt.models.config import ModelConfig
from yitrt.models.llama import ResolvedTensor, Scope, Split


def tp_problems(cfg: ModelConfig, tp: int) -> list[str]:
    """Reasons a tensor-parallel size cannot work for this model (empty list: valid)."""
    if tp < 1:
        return [f"tp must be >= 1, got {tp}"]
    problems = []
    if cfg.num_heads % tp:
        problems.append(f"tp {tp} does not divide the {cfg.num_heads} attention heads")
    kv = cfg.num_kv_heads
    if tp <= kv and kv % tp:
        problems.append(f"tp {tp} does not divide the {kv} KV heads")
    if tp > kv and tp % kv:
        problems.append(f"tp {tp} > {kv} KV heads needs tp to be a multiple of {kv} (each KV head is repeated tp/{kv} times)")
    if cfg.intermediate_size % tp:
        problems.append(f"tp {tp} does not divide intermediate_size {cfg.intermediate_size}")
    return problems


def pp_problems(cfg: ModelConfig, pp: int) -> list[str]:
    """Reasons a pipeline-parallel size cannot work for this model (empty list: valid)."""
    if pp < 1:
        return [f"pp must be >= 1, got {pp}"]
    if cfg.num_layers % pp:
        return [f"pp {pp} does not divide the {cfg.num_layers} layers (uneven stages are split differently by TensorRT-LLM versions)"]
    return []


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    """KV heads each TP rank holds: ceil(n_kv / tp) (1 when heads are duplicated)."""
    return -(-cfg.num_kv_heads // tp)


def padded_rows(rows: int, tp: int) -> int:
    """Rows per rank after zero-padding ``rows`` to a multiple of tp."""
    return -(-rows // tp)


@dataclass(frozen=True)
class Mapping:
    """A TP × PP layout."""

    tp: int
    pp: int

    @property
    def world_size(self) -> int:
        """Number of ranks (= rank files)."""
        return self.tp * self.pp

    def ranks(self) -> list[tuple[int, int, int]]:
        """(rank, pp_rank, tp_rank) for every rank, in rank order."""
        return [(pp_rank * self.tp + tp_rank, pp_rank, tp_rank) for pp_rank in range(self.pp) for tp_rank in range(self.tp)]

    def stage_of(self, cfg: ModelConfig, layer: int) -> tuple[int, int]:
        """(pp_rank, local layer index) of a global layer."""
        per = cfg.num_layers // self.pp
        return layer // per, layer % per

    def stages_holding(self, cfg: ModelConfig, tensor: ResolvedTensor) -> list[int]:
        """Pipeline stages that hold a resolved tensor."""
        scope = tensor.rule.scope
        if scope is Scope.FIRST:
            return [0]
        if scope is Scope.LAST:
            return [self.pp - 1]
        return [self.stage_of(cfg, tensor.layer)[0]]

    def local_name(self, cfg: ModelConfig, tensor: ResolvedTensor) -> str:
        """The tensor's name inside a rank file (layer renumbered from 0 on its stage)."""
        if tensor.layer is None:
            return tensor.target
        return tensor.rule.target.format(i=self.stage_of(cfg, tensor.layer)[1])


def _head_rows(cfg: ModelConfig, role: str, tp: int, tp_rank: int) -> tuple[int, int]:
    """Row range of q, k or v that a TP rank holds (in source rows)."""
    d = cfg.head_dim
    if role == "q":
        per = cfg.num_heads // tp
        return tp_rank * per * d, (tp_rank + 1) * per * d
    kv = cfg.num_kv_heads
    if tp <= kv:
        per = kv // tp
        return tp_rank * per * d, (tp_rank + 1) * per * d
    head = tp_rank * kv // tp  # duplicated: consecutive ranks share a head
    return head * d, (head + 1) * d


def local_shape(cfg: ModelConfig, tensor: ResolvedTensor, tp: int) -> tuple[int, ...]:
    """Shape of a resolved tensor on one TP rank."""
    split = tensor.rule.split
    first = tensor.parts[0].shape
    if split is Split.REPLICATE:
        return first
    if split is Split.COLUMN:
        return (first[0] // tp, *first[1:])
    if split is Split.ROW:
        return (first[0], first[1] // tp) if len(first) == 2 else first
    if split is Split.VOCAB:
        return (padded_rows(first[0], tp), *first[1:])
    rows = sum(stop - start for start, stop in (_head_rows(cfg, p.role, tp, 0) for p in tensor.parts))
    return (rows, *first[1:])


@dataclass(frozen=True)
class Segment:
    """A block of a rank's piece: source rows ``[rows)`` (and columns ``[cols)``), or zero rows.

    A rank's piece of a tensor is the vertical concatenation of its segments. Segments are pure data, so the
    converter can stream them in row chunks and the tests can check them without reading weights.
    """

    source: str | None  # HF tensor name; None = zero padding
    rows: tuple[int, int]  # [start, stop) in source rows (for padding: only the count matters)
    cols: tuple[int, int] | None = None  # [start, stop) of dim 1 for row-parallel weights; None = whole rows

    @property
    def num_rows(self) -> int:
        """Rows this segment contributes."""
        return self.rows[1] - self.rows[0]


def rank_segments(cfg: ModelConfig, tensor: ResolvedTensor, tp: int, tp_rank: int) -> list[Segment]:
    """The segments making up one TP rank's piece of a resolved tensor."""
    split = tensor.rule.split
    part = tensor.parts[0]
    rows = part.shape[0]
    if split is Split.REPLICATE or (split is Split.ROW and len(part.shape) == 1):
        return [Segment(part.name, (0, rows))]
    if split is Split.ROW:
        width = part.shape[1] // tp
        return [Segment(part.name, (0, rows), (tp_rank * width, (tp_rank + 1) * width))]
    if split is Split.COLUMN:
        per = rows // tp
        return [Segment(part.name, (tp_rank * per, (tp_rank + 1) * per))]
    if split is Split.VOCAB:
        per = padded_rows(rows, tp)
        start, stop = min(tp_rank * per, rows), min((tp_rank + 1) * per, rows)
        segments = [Segment(part.name, (start, stop))] if stop > start else []
        if stop - start < per:  # TensorRT-LLM expects the padding rows to be zeros
            segments.append(Segment(None, (0, per - (stop - start))))
        return segments
    return [Segment(p.name, _head_rows(cfg, p.role, tp, tp_rank)) for p in tensor.parts]


def shard(cfg: ModelConfig, tensor: ResolvedTensor, tp: int, read) -> list:
    """Materialise every TP rank's piece of a resolved tensor (whole tensors in memory; for tests and tools).

    Args:
        cfg: model config.
        tensor: the resolved tensor.
        tp: tensor-parallel size.
        read: ``read(name, rows=None)`` returning a CPU (or meta) tensor; rows = a dim-0 range.

    Returns:
        One tensor per TP rank, in rank order.
    """
    import torch

    pieces = []
    for tp_rank in range(tp):
        blocks = []
        for seg in rank_segments(cfg, tensor, tp, tp_rank):
            if seg.source is None:
                like = blocks[-1] if blocks else read(tensor.parts[0].name, (0, 1))
                blocks.append(torch.zeros((seg.num_rows, *like.shape[1:]), dtype=like.dtype, device=like.device))
                continue
            block = read(seg.source, seg.rows)
            blocks.append(block[:, seg.cols[0] : seg.cols[1]] if seg.cols else block)
        pieces.append(blocks[0].contiguous() if len(blocks) == 1 else torch.cat(blocks))
    return pieces
