"""GPU memory = concurrency: what each rank holds, how many KV tokens are left, how many sequences fit.

Per rank (reference/trtllm-checkpoint-and-build.md §2, §5, §6):

- **weights**: the rank's slice of every decoder linear at the scheme's width, its scale tensors (the
  scheme's ``scales`` table), biases and norms in the model dtype, the embedding on the first pipeline stage
  (``ceil(V/tp)`` rows with parallel embedding), ``lm_head`` (``ceil(V/tp)`` rows) and the final norm on the last.
  Every scheme leaves embedding, lm_head and norms in the model dtype.
- **KV bytes per token**: ``2 × local layers × ceil(n_kv / tp) × head_dim × bytes(kv dtype)`` (kvCacheManager).
- **activations**: fixed at build time by TensorRT from the largest profile shapes. yitrt estimates them from
  ``max_num_tokens`` (packed input): TensorRT reuses buffers across layers, so the peak is one layer's live set
  per token — residual, normed input and output (3 × hidden) plus the larger of the attention set (qkv + context
  rows of the rank) and the MLP set (gate, up and their product: 3 × intermediate / tp) — in the model dtype,
  plus the float32 logits of one token per sequence (``max_batch_size × ceil(V/tp)``), times
  ``ACTIVATION_MARGIN`` for TensorRT's tactic scratch space. The real figure is the engine's
  ``device_memory_size``; this estimate is meant to err high.
- **runtime overhead**: CUDA context, cuBLAS/TensorRT workspaces and the executor's fixed buffers
  (``RUNTIME_BASE_BYTES``), NCCL/all-reduce buffers when tp > 1, and per-sequence decoder buffers (sampling
  logits, output ids) that grow with ``max_batch_size``.
- **KV pool**: ``(memory − weights − activations − overhead) × kv_cache_free_gpu_mem_fraction`` (default 0.9),
  in blocks of ``tokens_per_block``; every rank uses the smallest rank's block count.
- **concurrency**: ``blocks // ceil((ISL + OSL) / tokens_per_block)`` sequences at once.
- **speculative decoding** (``max_draft_len`` D > 0: a draft-target target's K, lookahead's D; reference §4.3 and
  trtllm-serving-features.md §1): trtllm-build adds D to ``max_seq_len`` and raises ``max_num_tokens`` to at
  least ``max_batch_size × (D + 1)`` (every sequence feeds D + 1 tokens per step); the plan mirrors both, sizes the
  activations for the raised ``max_num_tokens`` and each sequence's KV blocks for ISL + OSL + D (the draft tokens
  a step writes beyond the sequence).
- **LoRA adapter cache** (``lora``): ``lora_cache_gpu_memory_fraction`` of the memory the KV pool leaves, which must
  hold one max-sized adapter per rank, as the host cache must (``yitrt.plan.lora`` says why the pool is unchanged).
- **another engine on the same GPUs** (``reserved_bytes``: a draft beside its target): its weights, activations,
  runtime and KV pool are taken from the memory before this engine's free memory is computed — the free memory
  this engine's executor sees when it is created after the other (``yitrt.plan.speculative``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from yitrt.checkpoint.sharding import kv_heads_per_rank
from yitrt.errors import UsageError
from yitrt.models.config import ModelConfig
from yitrt.plan.gpus import MIB, Gpu
from yitrt.plan.lora import LoraCacheRequest
from yitrt.quant.schemes import KV_BYTES_FP16, KvCacheFormat, Scheme
from yitrt.verdict import measured

#: CUDA context (~0.5 GiB with lazy module loading), cuBLAS/TensorRT workspaces and the executor's fixed buffers.
RUNTIME_BASE_BYTES = 1536 * MIB
#: NCCL communicators and the custom all-reduce IPC buffers of a tp > 1 engine.
MULTI_GPU_BYTES = 512 * MIB
#: Scratch space TensorRT's tactics take beyond the live tensors (a margin, chosen to err high).
ACTIVATION_MARGIN = 2.0
#: TensorRT-LLM defaults (reference §4.1, §4.3, §6).
DEFAULT_KV_FRACTION = 0.9
DEFAULT_TOKENS_PER_BLOCK = 32
DEFAULT_MAX_NUM_TOKENS = 8192
MAX_BATCH_SIZE_CAP = 2048  # trtllm-build's default max_batch_size: a larger value buys nothing the scheduler uses
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class Workload:
    """The requests an engine serves and the limits asked for (None: yitrt chooses).

    Attributes:
        isl / osl: typical input and output tokens per request.
        max_seq_len, max_batch_size, max_num_tokens: build limits.
        kv_fraction: ``kv_cache_free_gpu_mem_fraction``.
        tokens_per_block: KV page size.
        prefix_tokens: length of a shared system prompt, for the prefix-cache capacity the plan reports.
    """

    isl: int = 1024
    osl: int = 512
    max_seq_len: int | None = None
    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    kv_fraction: float = DEFAULT_KV_FRACTION
    tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK
    prefix_tokens: int = 256

    def __post_init__(self) -> None:
        """Refuse a workload no plan can be computed for (a zero, negative or NaN size would size the KV pool
        in negative or NaN tokens).

        Raises:
            UsageError: every problem at once.
        """
        problems = []
        for name in ("isl", "osl", "tokens_per_block", "max_seq_len", "max_batch_size", "max_num_tokens", "prefix_tokens"):
            value = getattr(self, name)
            if value is None and name.startswith("max_"):
                continue
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not (measured(self.kv_fraction) and 0 < self.kv_fraction <= 1):
            problems.append(f"kv_fraction must be a number in (0, 1], got {self.kv_fraction!r}")
        if problems:
            raise UsageError("; ".join(problems), "pass positive sizes and a KV fraction such as 0.9")

    def with_hints(self, hints: dict[str, int]) -> Workload:
        """The limits this workload leaves open, filled from ``hints`` (a plugin profile's)."""
        return replace(self, **{k: v for k, v in hints.items() if getattr(self, k) is None})


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: a model at a scheme and layout on a GPU, for a workload.

    Attributes:
        cfg: the model's dims.
        dtype: model dtype (activations, unquantized weights).
        scheme / kv: weight scheme and KV-cache format (None: model dtype).
        tp / pp: tensor / pipeline parallel sizes.
        gpu: the target GPU.
        workload: requests and limits.
        parallel_embedding: embedding rows split across TP ranks.
        group_size: AWQ group size (None: the scheme's).
        max_draft_len: the engine's speculative ``--max_draft_len`` (draft-target K, lookahead D; 0: none).
        reserved_bytes: bytes per GPU another engine on the same GPUs holds (weights, activations, runtime, KV pool).
        lora: the LoRA adapter cache the engine is served with (None: no LoRA plugin).
    """

    cfg: ModelConfig
    dtype: str
    scheme: Scheme
    kv: KvCacheFormat | None
    tp: int
    pp: int
    gpu: Gpu
    workload: Workload = Workload()
    parallel_embedding: bool = True
    group_size: int | None = None
    max_draft_len: int = 0
    reserved_bytes: int = 0
    lora: LoraCacheRequest | None = None

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of the model dtype."""
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes(self) -> int:
        """Bytes per KV-cache element."""
        return self.kv.bytes_per_element if self.kv else KV_BYTES_FP16

    @property
    def context_length(self) -> int:
        """The longest sequence the model supports: max_position_embeddings × rotary factor (the build's
        default max_seq_len; the factor is ignored for llama3-type scaling, reference §4.3)."""
        from yitrt.models.config import context_length

        return context_length(self.cfg.max_position_embeddings, self.cfg.rope_scaling)


@dataclass
class RankMemory:
    """One GPU rank's budget, bytes."""

    rank: int
    tp_rank: int
    pp_rank: int
    layers: int
    weights: dict[str, int]
    kv_bytes_per_token: int
    activations: int
    overhead: int
    kv_pool: int
    kv_tokens: int
    kv_blocks: int
    lora_cache: int = 0  # the device LoRA cache: its fraction of what the KV pool leaves (0 without LoRA)

    @property
    def weight_bytes(self) -> int:
        """All weights of the rank."""
        return sum(self.weights.values())

    def to_json(self) -> dict[str, Any]:
        """JSON row."""
        return {"rank": self.rank, "tp_rank": self.tp_rank, "pp_rank": self.pp_rank, "layers": self.layers,
                "weight_bytes": self.weight_bytes, "weights": self.weights, "kv_bytes_per_token": self.kv_bytes_per_token,
                "activation_bytes": self.activations, "overhead_bytes": self.overhead, "kv_pool_bytes": self.kv_pool,
                "kv_tokens": self.kv_tokens, "kv_blocks": self.kv_blocks, "lora_cache_bytes": self.lora_cache}


@dataclass
class BuildLimits:
    """Recommended ``trtllm-build`` limits."""

    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    max_input_len: int

    def to_json(self) -> dict[str, int]:
        """JSON object."""
        return {"max_batch_size": self.max_batch_size, "max_num_tokens": self.max_num_tokens,
                "max_seq_len": self.max_seq_len, "max_input_len": self.max_input_len}

    def engine(self, max_draft_len: int) -> dict[str, int]:
        """The limits the engine's ``build_config`` will hold when built with these (``--max_seq_len`` etc.) and a
        speculative ``max_draft_len``: trtllm-build adds it to ``max_seq_len`` and raises ``max_num_tokens`` to
        ``max_batch_size × (max_draft_len + 1)`` (reference §4.3; ``builder.py`` ``build()``)."""
        out = self.to_json()
        if max_draft_len > 0:
            out["max_seq_len"] += max_draft_len
            out["max_num_tokens"] = max(out["max_num_tokens"], self.max_batch_size * (max_draft_len + 1))
        out["max_draft_len"] = max_draft_len
        return out


@dataclass
class MemoryPlan:
    """The result of ``plan_memory``."""

    request: PlanRequest
    ranks: list[RankMemory]
    limits: BuildLimits
    kv_tokens: int  # tokens the pool holds on every rank (min blocks × tokens_per_block)
    kv_blocks: int
    blocks_per_sequence: int
    max_concurrent: int
    max_tokens_in_paged_kv_cache: int
    problems: list[str] = field(default_factory=list)  # why it does not fit (empty: fits)
    notes: list[str] = field(default_factory=list)
    weights_fit: bool = True  # weights, activations and runtime leave room for a KV pool on every rank
    lora: dict[str, Any] | None = None  # the adapter cache per stage (yitrt.plan.lora.cache_plan), None without LoRA

    @property
    def fits(self) -> bool:
        """Whether the model, its buffers and at least one ISL+OSL sequence fit every rank (never on a plan
        that holds no KV token or no sequence, whatever ``problems`` says)."""
        return not self.problems and self.kv_tokens > 0 and self.max_concurrent >= 1

    def prefix_cache(self) -> dict[str, Any]:
        """What KV-cache reuse can keep beside a full running batch: the blocks the pool has left once
        ``max_batch_size`` sequences of ISL+OSL tokens hold theirs, and how many copies of a ``prefix_tokens``-token
        system prompt (its full blocks: only those are reused) fit there — in the whole pool, and within
        ``max_tokens_in_paged_kv_cache`` as the plan sets it. Reuse needs paged context FMHA in the build
        (reference trtllm-serving-features.md §3)."""
        w = self.request.workload
        tpb, batch = w.tokens_per_block, self.limits.max_batch_size
        running = batch * self.blocks_per_sequence
        per_prefix = w.prefix_tokens // tpb
        spare = max(0, self.kv_blocks - running)
        capped = max(0, self.max_tokens_in_paged_kv_cache // tpb - running)
        return {"prefix_tokens": w.prefix_tokens, "blocks_per_prefix": per_prefix, "pool_blocks": self.kv_blocks,
                "pool_tokens": self.kv_blocks * tpb, "running_batch_blocks": running, "spare_blocks": spare,
                "resident_prefixes": spare // per_prefix if per_prefix else None,
                "spare_blocks_within_max_tokens": capped,
                "resident_prefixes_within_max_tokens": capped // per_prefix if per_prefix else None,
                "needs": "use_paged_context_fmha enable (and enable_kv_cache_reuse true)"}

    def speculative(self) -> dict[str, Any] | None:
        """What speculative decoding adds to this engine's plan (None without it): the tokens each sequence feeds a
        step, the extra KV each sequence's blocks hold, and the limits the engine will hold after trtllm-build's
        own adjustments."""
        d = self.request.max_draft_len
        if d <= 0:
            return None
        return {"max_draft_len": d, "tokens_per_sequence_step": d + 1, "kv_tokens_per_sequence": self.request.workload.isl
                + self.request.workload.osl + d, "engine_limits": self.limits.engine(d)}

    def to_json(self) -> dict[str, Any]:
        """JSON object of the plan."""
        r, w = self.request, self.request.workload
        return {
            "gpu": r.gpu.to_json(), "scheme": r.scheme.name, "quant_algo": r.scheme.quant_algo,
            "kv_cache": r.kv.name if r.kv else r.dtype, "dtype": r.dtype, "tp": r.tp, "pp": r.pp,
            "gpus": r.tp * r.pp, "isl": w.isl, "osl": w.osl, "kv_fraction": w.kv_fraction,
            "tokens_per_block": w.tokens_per_block, "fits": self.fits, "problems": self.problems, "notes": self.notes,
            "ranks": [m.to_json() for m in self.ranks], "kv_tokens": self.kv_tokens, "kv_blocks": self.kv_blocks,
            "blocks_per_sequence": self.blocks_per_sequence, "max_concurrent_sequences": self.max_concurrent,
            "build_limits": self.limits.to_json(), "prefix_cache": self.prefix_cache(),
            "speculative": self.speculative(), "reserved_bytes": r.reserved_bytes, "lora": self.lora,
            "triton": {"kv_cache_free_gpu_mem_fraction": w.kv_fraction,
                       "max_tokens_in_paged_kv_cache": self.max_tokens_in_paged_kv_cache},
        }


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> int:
    """Layers on a pipeline stage: contiguous blocks, the first L % pp stages one longer (reference §2.6)."""
    base, extra = divmod(num_layers, pp)
    return base + (1 if pp_rank < extra else 0)


def kv_bytes_per_token(cfg: ModelConfig, tp: int, layers: int, element_bytes: int) -> int:
    """KV-cache bytes one token takes on one rank: 2 (K, V) × layers × ceil(n_kv/tp) × head_dim × bytes."""
    return 2 * layers * kv_heads_per_rank(cfg, tp) * cfg.head_dim * element_bytes


def _linear_shapes(cfg: ModelConfig, tp: int) -> list[tuple[int, int]]:
    """(out, in) of one layer's linears on one rank: qkv, dense, fc, gate, proj."""
    q_local = cfg.q_size // tp
    kv_rows = kv_heads_per_rank(cfg, tp) * cfg.head_dim
    inter = cfg.intermediate_size // tp
    h = cfg.hidden_size
    return [(q_local + 2 * kv_rows, h), (h, q_local), (inter, h), (inter, h), (h, inter)]


def _scale_bytes(scheme: Scheme, out: int, inp: int, group: int | None, dtype_bytes: int) -> int:
    elements = {"out": out, "in": inp, "1": 1, "groups": out * (inp // group if group else 0)}
    return sum(elements[what] * (4 if kind == "float32" else dtype_bytes) for what, kind in scheme.scales)


def layer_weight_bytes(req: PlanRequest) -> dict[str, int]:
    """Bytes of one decoder layer on one rank: quantized linears, their scales, biases and norms."""
    cfg, tp, b = req.cfg, req.tp, req.dtype_bytes
    group = req.group_size or req.scheme.group_size
    shapes = _linear_shapes(cfg, tp)
    linear = sum(o * i for o, i in shapes) * req.scheme.weight_bits // 8 if req.scheme.quant_algo else sum(o * i for o, i in shapes) * b
    scales = sum(_scale_bytes(req.scheme, o, i, group, b) for o, i in shapes) if req.scheme.quant_algo else 0
    bias = 0
    if cfg.attention_bias:
        bias += (shapes[0][0] + cfg.hidden_size) * b
    if cfg.mlp_bias:
        bias += (2 * shapes[2][0] + cfg.hidden_size) * b
    return {"linear": linear, "scales": scales, "bias": bias, "norms": 2 * cfg.hidden_size * b}


def rank_weight_bytes(req: PlanRequest, pp_rank: int) -> dict[str, int]:
    """Weight bytes on one rank of a pipeline stage, by part."""
    cfg, tp, b = req.cfg, req.tp, req.dtype_bytes
    layers = stage_layers(cfg.num_layers, req.pp, pp_rank)
    per_layer = layer_weight_bytes(req)
    out = {k: v * layers for k, v in per_layer.items()}
    vocab_rows = -(-cfg.vocab_size // tp)
    first, last = pp_rank == 0, pp_rank == req.pp - 1
    # the build shares lm_head with a tied embedding only when both have the same shape on every rank (§2.4)
    shared = cfg.tie_word_embeddings and req.pp == 1 and (tp == 1 or (req.parallel_embedding and cfg.vocab_size % tp == 0))
    out["embedding"] = (vocab_rows if req.parallel_embedding else cfg.vocab_size) * cfg.hidden_size * b if first else 0
    out["lm_head"] = vocab_rows * cfg.hidden_size * b if last and not shared else 0
    out["norms"] += cfg.hidden_size * b if last else 0
    return out


def activation_bytes(req: PlanRequest, max_num_tokens: int, max_batch_size: int) -> int:
    """Estimated activation memory of one rank (module docstring)."""
    cfg, tp = req.cfg, req.tp
    shapes = _linear_shapes(cfg, tp)
    attention = shapes[0][0] + cfg.q_size // tp
    mlp = 3 * (cfg.intermediate_size // tp)
    per_token = (3 * cfg.hidden_size + max(attention, mlp)) * req.dtype_bytes
    logits = max_batch_size * -(-cfg.vocab_size // tp) * 4
    return int((max_num_tokens * per_token + logits) * ACTIVATION_MARGIN)


def overhead_bytes(req: PlanRequest, max_batch_size: int, max_seq_len: int) -> int:
    """Runtime memory outside the engine and the KV pool (module docstring)."""
    per_sequence = -(-req.cfg.vocab_size // req.tp) * 4 * 2 + max_seq_len * 4 * 2  # sampling logits, output ids
    return RUNTIME_BASE_BYTES + (MULTI_GPU_BYTES if req.tp > 1 else 0) + max_batch_size * per_sequence


def speculative_num_tokens(max_batch_size: int, max_draft_len: int) -> int:
    """The least ``max_num_tokens`` of a speculative engine: ``max_batch_size × (max_draft_len + 1)`` (trtllm-build
    raises a smaller value to it, reference §4.3); 0 without speculation."""
    return max_batch_size * (max_draft_len + 1) if max_draft_len > 0 else 0


def _round_down(value: int, multiple: int) -> int:
    return value // multiple * multiple


def _budget(req: PlanRequest, max_batch: int, max_num_tokens: int, max_seq_len: int) -> list[RankMemory]:
    ranks = []
    for pp_rank in range(req.pp):
        layers = stage_layers(req.cfg.num_layers, req.pp, pp_rank)
        weights = rank_weight_bytes(req, pp_rank)
        per_token = kv_bytes_per_token(req.cfg, req.tp, layers, req.kv_bytes)
        act = activation_bytes(req, max_num_tokens, max_batch)
        over = overhead_bytes(req, max_batch, max_seq_len)
        free = req.gpu.memory_bytes - sum(weights.values()) - act - over - req.reserved_bytes
        pool = max(0, int(free * req.workload.kv_fraction))
        tokens = pool // per_token
        blocks = tokens // req.workload.tokens_per_block  # whole blocks only: a partial block cannot be allocated
        # the executor gives the adapter cache its fraction of what is free once the KV pool is allocated (§2.5), so
        # LoRA leaves the pool as it is and lives in the (1 − kv_fraction) share (yitrt.plan.lora)
        lora_cache = int(max(0, free - pool) * req.lora.gpu_memory_fraction) if req.lora is not None else 0
        for tp_rank in range(req.tp):
            ranks.append(RankMemory(pp_rank * req.tp + tp_rank, tp_rank, pp_rank, layers, weights, per_token, act, over,
                                    pool, tokens, blocks, lora_cache))
    return ranks


def plan_memory(req: PlanRequest) -> MemoryPlan:
    """Size one configuration: per-rank budgets, KV capacity, concurrency and the build limits that follow.

    Limits the request leaves open are chosen here: ``max_seq_len`` = the model's context, shortened (to a
    multiple of ``tokens_per_block``, never below ISL+OSL) when one such sequence would not fit the KV pool;
    ``max_batch_size`` = the sequences of ISL+OSL the pool holds (capped at 2048); ``max_num_tokens`` = 8192
    (TensorRT-LLM's default) capped at max_batch_size × max_seq_len; ``max_input_len`` = max_seq_len − 1.
    The activation and overhead estimates depend on the batch size, so the batch is solved in two passes.

    Args:
        req: the configuration and workload.

    Returns:
        The plan; ``problems`` says why it does not fit (empty when it does).
    """
    if req.gpu.memory_mib <= 0:  # an anonymous smNN target names an architecture, not a memory size
        raise UsageError(f"{req.gpu.name} names an architecture only; a memory plan needs the GPU's memory",
                         "pass a GPU from the table (`yitrt gpus`), e.g. --gpu L40S")
    w = req.workload
    tpb = w.tokens_per_block
    draft = req.max_draft_len
    seq = w.isl + w.osl
    blocks_per_seq = -(-(seq + draft) // tpb)
    max_seq_len = w.max_seq_len or req.context_length
    max_num_tokens = w.max_num_tokens or DEFAULT_MAX_NUM_TOKENS
    batch = w.max_batch_size or 256
    notes: list[str] = []
    ranks: list[RankMemory] = []
    for _ in range(3):  # batch → buffers → capacity → batch; converges in two passes, a third confirms
        tokens_cap = max(max_num_tokens if w.max_num_tokens else min(max_num_tokens, batch * max_seq_len), tpb)
        tokens_cap = max(tokens_cap, speculative_num_tokens(batch, draft))
        ranks = _budget(req, batch, tokens_cap, max_seq_len)
        blocks = min(r.kv_blocks for r in ranks)
        concurrent = blocks // blocks_per_seq
        if w.max_batch_size:
            break
        new_batch = max(1, min(MAX_BATCH_SIZE_CAP, concurrent))
        if new_batch == batch:
            break
        batch = new_batch
    blocks = min(r.kv_blocks for r in ranks)
    kv_tokens = blocks * tpb
    concurrent = blocks // blocks_per_seq
    problems: list[str] = []
    worst = max(ranks, key=lambda r: r.weight_bytes + r.activations + r.overhead)
    need = worst.weight_bytes + worst.activations + worst.overhead
    if need + req.reserved_bytes >= req.gpu.memory_bytes:
        beside = f" beside the other engine's {req.reserved_bytes / 1e9:.2f} GB" if req.reserved_bytes else ""
        problems.append(
            f"rank {worst.rank} needs {need / 1e9:.2f} GB before any KV cache (weights {worst.weight_bytes / 1e9:.2f} GB, "
            f"activations {worst.activations / 1e9:.2f} GB, runtime {worst.overhead / 1e9:.2f} GB){beside}; "
            f"{req.gpu.name} has {req.gpu.memory_gb:.2f} GB"
        )
    elif concurrent < 1:
        what = f"{seq}-token sequence (ISL {w.isl} + OSL {w.osl})" if not draft else \
            f"{seq + draft}-token sequence (ISL {w.isl} + OSL {w.osl} + {draft} draft tokens)"
        problems.append(f"the KV pool holds {kv_tokens} tokens per rank, less than one {what}")
    if seq > max_seq_len:
        problems.append(f"ISL {w.isl} + OSL {w.osl} = {seq} exceeds max_seq_len {max_seq_len}")
    if not problems and kv_tokens < max_seq_len + draft:
        if w.max_seq_len:
            notes.append(f"one max_seq_len ({max_seq_len}) sequence needs more KV than the pool's {kv_tokens} tokens; "
                         "the runtime will cap its attention window")
        else:
            shorter = max(_round_down(kv_tokens - draft, tpb), seq)
            notes.append(f"max_seq_len shortened from the model's {max_seq_len} to {shorter}: a longer sequence would not fit the KV pool")
            max_seq_len = shorter
    max_num_tokens = max(min(max_num_tokens, batch * max_seq_len), tpb)
    if (raised := speculative_num_tokens(batch, draft)) > max_num_tokens:
        notes.append(f"max_num_tokens raised from {max_num_tokens} to max_batch_size × (max_draft_len + 1) = {batch} × {draft + 1} "
                     f"= {raised}: every sequence feeds {draft + 1} tokens per step (trtllm-build raises it the same way)")
        max_num_tokens = raised
    if draft:
        notes.append(f"the engine will hold max_seq_len {max_seq_len} + {draft} = {max_seq_len + draft}: trtllm-build adds "
                     f"max_draft_len to --max_seq_len {max_seq_len} (the longest answer stays the same)")
    if w.isl > max_num_tokens:
        notes.append(f"prompts of {w.isl} tokens exceed max_num_tokens {max_num_tokens}: serve with chunked context "
                     "(the long-context plugin profile) or raise --max-num-tokens")
    if w.max_batch_size and concurrent < w.max_batch_size and not problems:
        notes.append(f"max_batch_size {w.max_batch_size} exceeds the {concurrent} sequences of {seq + draft} tokens the KV pool holds")
    limits = BuildLimits(max_batch_size=batch, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
                         max_input_len=max(1, max_seq_len - 1))
    max_tokens = min(kv_tokens, batch * blocks_per_seq * tpb)
    lora = None
    if req.lora is not None:
        from yitrt.plan.lora import cache_plan

        lora, lora_problems = cache_plan(req.lora, req.cfg, req.tp, req.dtype_bytes, ranks)
        # a model that does not fit at all says only that; "only_problem": the cache is all that keeps the plan from fitting
        lora = {**lora, "only_problem": bool(lora_problems) and not problems}
        if not problems:
            problems += lora_problems
    return MemoryPlan(req, ranks, limits, kv_tokens, blocks, blocks_per_seq, concurrent, max_tokens, problems, notes,
                      weights_fit=need + req.reserved_bytes < req.gpu.memory_bytes, lora=lora)

