"""A draft-target pair on the same GPUs: two engines, two KV pools (reference trtllm-serving-features.md §1.1).

Each GPU of the pair holds the target's rank and (on the first ``draft.tp`` GPUs) the draft's: both engines'
weights, activations and runtime buffers, then two KV pools carved from what is left. The pools are sized so the
pair reaches one batch: the draft's pool is exactly what ``max_batch_size`` sequences need in the draft (its
blocks for ISL + OSL), the target gets the rest of the ``kv_fraction`` share of the free memory (its sequences
hold ISL + OSL + K tokens: the K draft tokens each verification step writes).

TensorRT-LLM takes a model's ``kv_cache_free_gpu_mem_fraction`` of the memory free *when that model's executor is
created*, so with one fraction each the split would depend on which model Triton loads first (DTM's 0.5 each gives
the second model half of what the first left). The plan therefore gives each model both a token cap
(``max_tokens_in_paged_kv_cache``, the smaller of the two wins) and a fraction large enough to reach it when the
other model was created first: target ``P_t / (F − P_d)``, draft ``P_d / (F − P_t)`` (F: the free memory once
both engines are loaded; P: the pools). In either order each pool then ends at its cap. The shares of F the two
pools take (``kv_share_of_free``) sum to the workload's ``kv_fraction`` (≤ 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from yitrt.plan.memory import MAX_BATCH_SIZE_CAP, MemoryPlan, PlanRequest, plan_memory

#: decimals of the fractions written to config.pbtxt (the target's rounded down, the draft's up: its token cap binds)
FRACTION_DECIMALS = 4


def pair_problems(target: PlanRequest, draft: PlanRequest) -> list[str]:
    """Why a (target, draft) pair cannot be planned on the same GPUs (empty: it can)."""
    problems = []
    if target.gpu.name != draft.gpu.name:
        problems.append(f"the draft is planned for {draft.gpu.name}, the target for {target.gpu.name}: a pair shares its GPUs")
    if target.max_draft_len < 1:
        problems.append("the target of a draft-target pair needs max_draft_len K >= 1")
    if draft.max_draft_len:
        problems.append("the draft is an ordinary engine (no max_draft_len of its own)")
    if target.pp != 1 or draft.pp != 1:
        problems.append(f"a draft-target pair is planned with pp 1 (target pp {target.pp}, draft pp {draft.pp}): "
                        "TensorRT-LLM's draft-target support matrix lists tensor parallelism only")
    if draft.tp > target.tp:
        problems.append(f"the draft's tp {draft.tp} exceeds the target's {target.tp}: the draft runs on the target's GPUs")
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        problems.append(f"the draft's vocabulary ({draft.cfg.vocab_size}) differs from the target's ({target.cfg.vocab_size}): "
                        "a draft must share the target's tokenizer")
    return problems


def _fixed_bytes(plan: MemoryPlan) -> int:
    """Weights + activations + runtime of the engine's heaviest rank (what it holds before its KV pool)."""
    worst = max(plan.ranks, key=lambda r: r.weight_bytes + r.activations + r.overhead)
    return worst.weight_bytes + worst.activations + worst.overhead


def _with(req: PlanRequest, batch: int, fraction: float | None = None, reserved: int = 0, max_seq_len: int | None = None) -> PlanRequest:
    w = req.workload
    workload = replace(w, max_batch_size=batch, kv_fraction=w.kv_fraction if fraction is None else fraction,
                       max_seq_len=max_seq_len or w.max_seq_len)
    return replace(req, workload=workload, reserved_bytes=reserved)


@dataclass
class _Split:
    """One batch size's arithmetic."""

    batch: int
    target_fixed: int
    draft_fixed: int
    free: int
    pool: int
    draft_pool: int
    target_pool: int
    concurrent: int


def _split(target: PlanRequest, draft: PlanRequest, batch: int) -> _Split:
    t = plan_memory(_with(target, batch))
    d = plan_memory(_with(draft, batch, max_seq_len=t.limits.max_seq_len))
    tf, df = _fixed_bytes(t), _fixed_bytes(d)
    free = max(0, target.gpu.memory_bytes - tf - df)
    pool = int(free * target.workload.kv_fraction)
    tpb = target.workload.tokens_per_block
    draft_pool = batch * d.blocks_per_sequence * tpb * d.ranks[0].kv_bytes_per_token
    target_pool = pool - draft_pool
    per_token = t.ranks[0].kv_bytes_per_token
    concurrent = max(0, target_pool) // per_token // tpb // t.blocks_per_sequence
    return _Split(batch, tf, df, free, pool, draft_pool, target_pool, concurrent)


@dataclass
class PairPlan:
    """A draft-target pair planned on the same GPUs.

    Attributes:
        target / draft: each engine's plan, with the other engine's memory reserved and its own fraction.
        max_draft_len: K, draft tokens per verification step.
        free_bytes: per shared GPU, after both engines' weights, activations and runtime.
        target_pool_bytes / draft_pool_bytes: the KV pools the split gives each (the draft's is its batch's need).
        target_fraction / draft_fraction: each model's ``kv_cache_free_gpu_mem_fraction`` (see the module docstring).
    """

    target: MemoryPlan
    draft: MemoryPlan
    max_draft_len: int
    free_bytes: int
    target_pool_bytes: int
    draft_pool_bytes: int
    target_fraction: float
    draft_fraction: float
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def max_batch_size(self) -> int:
        """The batch both engines are built for."""
        return self.target.limits.max_batch_size

    @property
    def max_concurrent(self) -> int:
        """Sequences the pair serves at once: each needs its blocks in both pools."""
        return min(self.target.max_concurrent, self.draft.max_concurrent)

    @property
    def fits(self) -> bool:
        """Both engines fit with at least one sequence in both pools."""
        return not self.problems and self.target.fits and self.draft.fits and self.max_concurrent >= 1

    def triton(self) -> dict[str, dict[str, Any]]:
        """The KV parameters of the two Triton models (``tensorrt_llm`` = target, ``tensorrt_llm_draft``)."""
        return {"tensorrt_llm": {"kv_cache_free_gpu_mem_fraction": self.target_fraction,
                                 "max_tokens_in_paged_kv_cache": self.target.max_tokens_in_paged_kv_cache},
                "tensorrt_llm_draft": {"kv_cache_free_gpu_mem_fraction": self.draft_fraction,
                                       "max_tokens_in_paged_kv_cache": self.draft.max_tokens_in_paged_kv_cache}}

    def to_json(self) -> dict[str, Any]:
        """JSON object (the draft's whole plan included; the target's is the report's candidate)."""
        t, d = self.target, self.draft

        def worst(plan: MemoryPlan, what: str) -> int:
            return max(getattr(r, what) if what != "weight_bytes" else r.weight_bytes for r in plan.ranks)

        weights = {"target": worst(t, "weight_bytes"), "draft": worst(d, "weight_bytes")}
        activations = {"target": worst(t, "activations"), "draft": worst(d, "activations")}
        runtime = {"target": worst(t, "overhead"), "draft": worst(d, "overhead")}
        share = {"target": self.target_pool_bytes / self.free_bytes if self.free_bytes else 0.0,
                 "draft": self.draft_pool_bytes / self.free_bytes if self.free_bytes else 0.0}
        return {
            "mode": "draft-target", "max_draft_len": self.max_draft_len, "fits": self.fits, "problems": self.problems,
            "notes": self.notes, "gpus": t.request.tp, "shared_gpus": d.request.tp,
            "max_batch_size": self.max_batch_size, "max_concurrent_sequences": self.max_concurrent,
            "weight_bytes_per_gpu": {**weights, "total": sum(weights.values())},
            "activation_bytes_per_gpu": {**activations, "total": sum(activations.values())},
            "runtime_bytes_per_gpu": {**runtime, "total": sum(runtime.values())},
            "free_bytes_per_gpu": self.free_bytes,
            "kv_pool_bytes": {"target": self.target_pool_bytes, "draft": self.draft_pool_bytes},
            "kv_share_of_free": {k: round(v, 6) for k, v in share.items()},
            "kv_tokens": {"target": t.kv_tokens, "draft": d.max_tokens_in_paged_kv_cache},
            "kv_bytes_per_token": {"target": t.ranks[0].kv_bytes_per_token, "draft": d.ranks[0].kv_bytes_per_token},
            "triton": self.triton(),
            "draft": d.to_json(),
        }


def plan_pair(target: PlanRequest, draft: PlanRequest) -> PairPlan:
    """Plan a draft-target pair on the same GPUs (module docstring).

    Args:
        target: the target's request, ``max_draft_len`` = K; its workload's ``max_batch_size`` (None: the most
            the pair holds) and ``kv_fraction`` (the share of the free memory both pools take) apply to the pair.
        draft: the draft's request (same GPU, tp ≤ the target's, pp 1); its workload is replaced by the target's.

    Returns:
        The pair's plan; ``problems`` says why it does not fit. Structural problems (``pair_problems``) are the
        caller's to refuse first.
    """
    w = target.workload
    draft = replace(draft, workload=w)
    batch = w.max_batch_size or 256
    split = _split(target, draft, batch)
    if not w.max_batch_size:
        for _ in range(4):  # batch → buffers → pools → batch, as plan_memory solves it
            new = max(1, min(MAX_BATCH_SIZE_CAP, split.concurrent))
            if new == batch:
                break
            batch, split = new, _split(target, draft, new)
    t_plan = d_plan = None
    for _ in range(8):  # rounding of the fractions can cost the last sequence: then one fewer
        t_plan, d_plan, ft, fd = _final(target, draft, split)
        if w.max_batch_size or batch == 1 or min(t_plan.max_concurrent, d_plan.max_concurrent) >= batch:
            break
        batch -= 1
        split = _split(target, draft, batch)
    problems, notes = [], []
    if split.target_pool <= 0 and split.free > 0:
        problems.append(f"the draft's KV pool for {batch} sequences ({split.draft_pool / 1e9:.2f} GB) takes all of the "
                        f"{split.pool / 1e9:.2f} GB the pair may use on each GPU: lower max_batch_size")
    if split.free <= 0:
        problems.append(f"target ({split.target_fixed / 1e9:.2f} GB) and draft ({split.draft_fixed / 1e9:.2f} GB) weights, "
                        f"activations and runtime exceed {target.gpu.name}'s {target.gpu.memory_gb:.2f} GB per GPU")
    problems += [f"target: {p}" for p in t_plan.problems] + [f"draft: {p}" for p in d_plan.problems]
    if w.max_batch_size and min(t_plan.max_concurrent, d_plan.max_concurrent) < w.max_batch_size and not problems:
        notes.append(f"max_batch_size {w.max_batch_size} exceeds the {min(t_plan.max_concurrent, d_plan.max_concurrent)} "
                     "sequences the two pools hold")
    if draft.tp < target.tp:
        notes.append(f"the draft spans {draft.tp} of the target's {target.tp} GPUs; every target rank is planned beside a "
                     "draft rank (the shared GPUs bind: all ranks take the smallest pool)")
    notes.append("set both Triton models' KV parameters as planned (fraction and max_tokens_in_paged_kv_cache): each pool "
                 "then ends at its size whichever model loads first (DTM's 0.5 each would give the second one a quarter)")
    return PairPlan(t_plan, d_plan, target.max_draft_len, split.free, max(0, split.target_pool), split.draft_pool,
                    ft, fd, problems, notes)


def _final(target: PlanRequest, draft: PlanRequest, split: _Split) -> tuple[MemoryPlan, MemoryPlan, float, float]:
    """Both engines' plans for a split: each with the other's fixed memory and pool reserved and its own fraction."""
    scale = 10 ** FRACTION_DECIMALS
    free, p_t, p_d = split.free, max(0, split.target_pool), split.draft_pool
    ft = math.floor(p_t / (free - p_d) * scale) / scale if free > p_d and p_t > 0 else 1 / scale
    fd = min(1.0, math.ceil(p_d / (free - p_t) * scale) / scale) if free > p_t else 1.0
    ft = max(ft, 1 / scale)
    t_plan = plan_memory(_with(target, split.batch, ft, reserved=split.draft_fixed + p_d))
    d_plan = plan_memory(_with(draft, split.batch, fd, reserved=split.target_fixed + p_t,
                               max_seq_len=t_plan.limits.max_seq_len))
    return t_plan, d_plan, ft, fd
