"""The LoRA adapter cache in the memory plan (trtllm-serving-features.md §2.5).

TensorRT-LLM's executor sizes its KV pool first (``kv_cache_free_gpu_mem_fraction`` of the memory free after the
engine loads), then gives the PEFT (adapter) cache ``lora_cache_gpu_memory_fraction`` of what is *still* free —
"fraction of memory left after engine and KV cache" (§2.5). So the adapter cache does not shrink the KV pool: it
comes out of the ``1 − kv_fraction`` share the pool leaves, and a KV fraction near 1 leaves it nothing. The plan
therefore keeps the pool as it is and checks that its leftover share, times the LoRA fraction, holds at least one
max-sized adapter on every rank — the executor refuses to start otherwise ("Not enough space allocated to
host/device LoRA cache to hold 1 max sized LoRA"). The leftover is computed from the fraction-derived pool, the
largest the pool can be (``max_tokens_in_paged_kv_cache`` only ever makes it smaller and the leftover larger), so
the check errs on the safe side.

One max-sized adapter on one rank: Σ over the rank's layers and the engine's target modules of
``(in_local + out_local) × max_adapter_size × bytes(engine dtype)``, where a column-parallel module's out dim and a
row-parallel module's in dim are split by tp (§2.2) — the cache holds each rank's slices. The host cache
(``lora_cache_host_memory_bytes``, one per rank process) must hold the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from yitrt.errors import UsageError
from yitrt.lora import (
    DEFAULT_GPU_MEMORY_FRACTION,
    DEFAULT_HOST_MEMORY_BYTES,
    DEFAULT_MAX_ADAPTER_SIZE,
    DEFAULT_OPTIMAL_ADAPTER_SIZE,
)


@dataclass(frozen=True)
class LoraCacheRequest:
    """The adapter cache an engine is deployed with.

    Attributes:
        modules: the engine's ``--lora_target_modules`` (TensorRT-LLM names).
        max_rank: the engine's ``--max_lora_rank``.
        optimal_adapter_size / max_adapter_size: ``lora_cache_optimal_adapter_size`` / ``lora_cache_max_adapter_size``
            as configured (the executor clamps both to ``max_rank``).
        gpu_memory_fraction: ``lora_cache_gpu_memory_fraction``.
        host_memory_bytes: ``lora_cache_host_memory_bytes``.
    """

    modules: tuple[str, ...]
    max_rank: int
    optimal_adapter_size: int = DEFAULT_OPTIMAL_ADAPTER_SIZE
    max_adapter_size: int = DEFAULT_MAX_ADAPTER_SIZE
    gpu_memory_fraction: float = DEFAULT_GPU_MEMORY_FRACTION
    host_memory_bytes: int = DEFAULT_HOST_MEMORY_BYTES

    def __post_init__(self) -> None:
        """Refuse sizes no cache can be planned for.

        Raises:
            UsageError: every problem at once.
        """
        problems = []
        for name in ("max_rank", "optimal_adapter_size", "max_adapter_size", "host_memory_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.gpu_memory_fraction, (int, float)) and 0 < self.gpu_memory_fraction <= 1):
            problems.append(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction!r}")
        if not self.modules:
            problems.append("no target module: the engine would adapt nothing")
        if problems:
            raise UsageError("LoRA cache: " + "; ".join(problems), "fix the lora section (lora.cache, lora.max_rank)")

    @property
    def effective_max_adapter_size(self) -> int:
        """``max_adapter_size`` as the executor uses it: clamped to ``max_rank``."""
        return min(self.max_adapter_size, self.max_rank)

    @property
    def effective_optimal_adapter_size(self) -> int:
        """``optimal_adapter_size`` clamped to ``max_rank``."""
        return min(self.optimal_adapter_size, self.max_rank)


def max_adapter_bytes(cfg: Any, tp: int, layers: int, modules: tuple[str, ...], adapter_size: int, dtype_bytes: int) -> int:
    """Bytes one adapter of rank ``adapter_size`` over ``modules`` takes on one rank holding ``layers`` layers."""
    from yitrt.lora.modules import by_trtllm

    per_layer = 0
    for name in modules:
        module = by_trtllm(name)
        if module is None:
            raise UsageError(f"unknown LoRA module {name!r}", "use TensorRT-LLM module names (attn_q, attn_k, attn_v, attn_dense, "
                             "mlp_h_to_4h, mlp_gate, mlp_4h_to_h)")
        inp, out = module.in_dim(cfg, tp), module.out_dim(cfg, tp)
        if module.split == "column":
            out = -(-out // tp)
        else:
            inp = -(-inp // tp)
        per_layer += inp + out
    return layers * per_layer * adapter_size * dtype_bytes


def cache_plan(lora: LoraCacheRequest, cfg: Any, tp: int, dtype_bytes: int, ranks: list[Any]) -> tuple[dict[str, Any], list[str]]:
    """The adapter cache of every pipeline stage (``ranks``: the plan's RankMemory rows, ``lora_cache`` filled) and why
    it cannot start (empty: it can). Returns (JSON object, problems)."""
    size = lora.effective_max_adapter_size
    stages = []
    problems = []
    for rank in ranks:
        if rank.tp_rank:
            continue  # the TP ranks of a stage hold the same
        need = max_adapter_bytes(cfg, tp, rank.layers, lora.modules, size, dtype_bytes)
        fits_device = rank.lora_cache // need if need else 0
        fits_host = lora.host_memory_bytes // need if need else 0
        stages.append({"rank": rank.rank, "pp_rank": rank.pp_rank, "layers": rank.layers, "max_adapter_bytes": need,
                       "device_cache_bytes": rank.lora_cache, "host_cache_bytes": lora.host_memory_bytes,
                       "max_adapters_on_device": fits_device, "max_adapters_on_host": fits_host})
        if fits_device < 1 and not any("device LoRA cache" in p for p in problems):
            problems.append(
                f"the device LoRA cache of rank {rank.rank} is {rank.lora_cache / 2**20:.1f} MiB (lora_cache_gpu_memory_fraction "
                f"{lora.gpu_memory_fraction:g} of the memory the KV pool leaves), less than one max-sized adapter (rank {size} over "
                f"{', '.join(lora.modules)}: {need / 2**20:.1f} MiB); TensorRT-LLM refuses to start (\"Not enough space allocated to "
                "device LoRA cache to hold 1 max sized LoRA\"): raise lora.cache.gpu_memory_fraction (--lora-cache-fraction), lower "
                "serve.kv_fraction (--kv-fraction), or lower lora.cache.max_adapter_size (--lora-max-adapter-size)")
        if fits_host < 1 and not any("host LoRA cache" in p for p in problems):
            problems.append(
                f"the host LoRA cache (lora_cache_host_memory_bytes {lora.host_memory_bytes:,}) is less than one max-sized adapter "
                f"(rank {size} over {', '.join(lora.modules)}: {need:,} bytes per rank); TensorRT-LLM refuses to start (\"Not enough "
                "space allocated to host LoRA cache to hold 1 max sized LoRA\"): raise lora.cache.host_memory_bytes (--lora-host-cache) "
                "or lower lora.cache.max_adapter_size (--lora-max-adapter-size)")
    out = {"modules": list(lora.modules), "max_rank": lora.max_rank, "max_adapter_size": size,
           "optimal_adapter_size": lora.effective_optimal_adapter_size, "gpu_memory_fraction": lora.gpu_memory_fraction,
           "host_memory_bytes": lora.host_memory_bytes, "stages": stages, "fits": not problems,
           "triton": {"lora_cache_optimal_adapter_size": lora.effective_optimal_adapter_size, "lora_cache_max_adapter_size": size,
                      "lora_cache_gpu_memory_fraction": lora.gpu_memory_fraction, "lora_cache_host_memory_bytes": lora.host_memory_bytes}}
    return out, problems
