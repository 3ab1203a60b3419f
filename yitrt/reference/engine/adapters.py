"""The reference slot's LoRA adapter cache: TensorRT-LLM's PEFT cache, keyed by ``lora_task_id``.

What is modelled (trtllm-serving-features.md §2.3, §2.5; the PEFT cache manager and its page manager, as read in
``peftCacheManager.cpp`` / ``loraCache.cpp``):

- **Two tiers.** The *host* cache (``lora_cache_host_memory_bytes``) keeps every adapter a request brought — here
  the request's ``lora_weights``/``lora_config`` arrays, kept by the engine loop's process. The *device* cache
  (``lora_cache_gpu_memory_fraction`` of the memory left after the engine and the KV cache) holds the adapters of
  the running requests — here the slices each tensor-parallel rank keeps (``load_adapter`` / ``drop_adapter``).
- **Pages.** Both tiers are counted in pages of one geometry: a *slot* is ``page_width`` values, the smallest
  per-rank ``in + out`` of the enabled modules; one layer-module row of rank r takes ``ceil(r · (in + out) / page_width)``
  slots; a page holds ``max(layers · Σ_modules optimal_adapter_size · ceil((in + out) / page_width),
  ceil(max_adapter_size · max(in + out) / page_width))`` slots — an adapter of ``lora_cache_optimal_adapter_size`` on
  every module fits exactly one page. An adapter takes its rows' slots packed page by page (a row never spans two
  pages). Each tier must hold one adapter of ``lora_cache_max_adapter_size`` on every module and layer, else the
  model does not load ("Not enough space allocated to … LoRA cache to hold 1 max sized LoRA"). Both sizes are
  clamped to the engine's ``max_lora_rank``.
- **Requests.** The first request of a task carries weights and config (validated as the engine validates them:
  ``yitrt.lora.format.unpack``); later ones the id alone; an id the host cache does not hold is refused with the
  engine's message "LoRA task N not found in cache. Please send LoRA weights with request". Weights re-sent for an
  id already cached are ignored: the cached adapter stays (``LoraCache::put`` returns early for a known id), so a
  task id must never be re-used for another adapter while it is cached (§2.6).
- **Eviction.** A tier that needs pages evicts the least recently used adapters no request uses (host: no waiting,
  paused or running request; device: no running one). When even that is not enough: on the host the request is
  refused ("PEFT Cache is full. Could not store taskId=N"); on the device the request waits in the queue until a
  running request of another adapter ends (the capacity scheduler's PEFT-page check). An adapter larger than a
  whole tier is refused on arrival. Evicting an adapter from the host also drops it from the device.

Not modelled: the cache's copy streams and worker pools (loading is synchronous here), ``numPutWorkers``,
``maxPagesPerBlock*`` (they split allocations, not capacity), FP8 adapters, and the executor's per-iteration PEFT
statistics. The slot has no GPU: "the memory left after the engine and the KV cache" is the slot parameter
``yitrt_lora_free_memory_bytes`` (default 1 GiB).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from yitrt.errors import LoraError, UsageError
from yitrt.lora import (
    CONFIG_NAME,
    DEFAULT_GPU_MEMORY_FRACTION,
    DEFAULT_HOST_MEMORY_BYTES,
    DEFAULT_MAX_ADAPTER_SIZE,
    DEFAULT_MAX_LORA_RANK,
    DEFAULT_OPTIMAL_ADAPTER_SIZE,
    WEIGHTS_NAME,
)
from yitrt.plan.memory import DTYPE_BYTES

#: the backend's defaults for unset lora_cache_* parameters (§2.5), and trtllm-build's default max_lora_rank
DEFAULT_FREE_MEMORY_BYTES = 1 << 30


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LoraCacheConfig:
    """The LoRA cache's settings: the ``tensorrt_llm`` model's ``lora_cache_*`` parameters and the engine's LoRA build
    limits (``max_lora_rank``, ``lora_target_modules``), which the slot takes as parameters.

    Attributes:
        optimal_adapter_size / max_adapter_size: ``lora_cache_optimal_adapter_size`` / ``lora_cache_max_adapter_size``.
        device_bytes: the device cache's bytes (the GPU fraction of the memory left after engine and KV cache).
        host_bytes: ``lora_cache_host_memory_bytes``.
        max_lora_rank: the engine's ``--max_lora_rank``.
        target_modules: the engine's ``--lora_target_modules`` (TensorRT-LLM names; None: every Yi module).
        prefetch_dir: ``lora_prefetch_dir`` (task-id folders loaded at start), or None.
    """

    optimal_adapter_size: int = DEFAULT_OPTIMAL_ADAPTER_SIZE
    max_adapter_size: int = DEFAULT_MAX_ADAPTER_SIZE
    device_bytes: int = int(DEFAULT_GPU_MEMORY_FRACTION * DEFAULT_FREE_MEMORY_BYTES)
    host_bytes: int = DEFAULT_HOST_MEMORY_BYTES
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    target_modules: tuple[str, ...] | None = None
    prefetch_dir: str | None = None


@dataclass(frozen=True)
class PageGeometry:
    """How the PEFT cache cuts its memory: ``page_width`` values per slot, ``slots_per_page`` slots per page, the
    slots of each module per rank unit, and each tier's pages."""

    page_width: int
    slots_per_page: int
    module_width: dict[int, int]  # module id → per-rank in + out
    host_pages: int
    device_pages: int

    def pages(self, config_rows: list[tuple[int, int, int]]) -> int:
        """Pages an adapter with these ``lora_config`` rows takes (rows packed in order, none across two pages)."""
        page, used = 0, 0
        for module_id, _layer, rank in config_rows:
            slots = _ceil(rank * self.module_width[module_id], self.page_width)
            if used + slots > self.slots_per_page:
                page, used = page + 1, 0
            used += slots
        return page + 1


def geometry(config: LoraCacheConfig, spec: Any, element_bytes: int) -> PageGeometry:
    """The page geometry of a cache for the checkpoint ``spec`` (dims, layers, tp), elements of ``element_bytes``.

    Raises:
        UsageError: a tier that cannot hold one adapter of ``max_adapter_size`` on every enabled module and layer
            (the engine's load error), or an unknown target module.
    """
    from yitrt.lora.modules import LORA_MODULES

    tp = spec.tp
    enabled = [m for m in LORA_MODULES if config.target_modules is None or m.trtllm in config.target_modules]
    unknown = set(config.target_modules or ()) - {m.trtllm for m in LORA_MODULES}
    if unknown or not enabled:
        raise UsageError(f"yitrt_lora_target_modules names {', '.join(sorted(unknown)) or 'no module'}",
                         "list TensorRT-LLM module names: " + ", ".join(m.trtllm for m in LORA_MODULES))
    width = {}
    for m in enabled:  # per-rank dims: column modules split B's rows (out), row modules A's columns (in) — §2.2
        n_in, n_out = m.in_dim(spec, tp), m.out_dim(spec, tp)
        width[m.module_id] = (n_in + n_out // tp) if m.split == "column" else (n_in // tp + n_out)
    optimal = min(config.optimal_adapter_size, config.max_lora_rank)
    largest = min(config.max_adapter_size, config.max_lora_rank)
    page_width = min(width.values())
    layers = spec.num_layers
    per_page = max(layers * sum(optimal * _ceil(w, page_width) for w in width.values()),
                   _ceil(largest * max(width.values()), page_width))
    need = _ceil(largest * sum(width.values()) * layers, page_width)
    slot_bytes = page_width * element_bytes
    tiers = {}
    for tier, budget in (("host", config.host_bytes), ("device", config.device_bytes)):
        slots = budget // slot_bytes
        if slots < need:  # PEFT getPageManagerConfig
            raise UsageError(f"Not enough space allocated to {tier} LoRA cache to hold 1 max sized LoRA {slots} < {need}",
                             "raise lora_cache_host_memory_bytes" if tier == "host" else
                             "raise lora_cache_gpu_memory_fraction (or yitrt_lora_free_memory_bytes), or lower lora_cache_max_adapter_size")
        tiers[tier] = _ceil(slots, per_page)
    return PageGeometry(page_width, per_page, width, tiers["host"], tiers["device"])


@dataclass
class _Entry:
    """One cached adapter: its request arrays, its pages, who uses it, and whether the ranks hold it."""

    weights: Any
    config: Any
    rows: list[tuple[int, int, int]]
    pages: int
    users: set[str] = field(default_factory=set)  # requests waiting, paused or running with it (host)
    running: set[str] = field(default_factory=set)  # requests running with it (device)
    on_device: bool = False


class AdapterCache:
    """Adapters by task id, in a host tier and a device tier of pages (module docstring).

    Args:
        config: the cache's settings.
        spec: the checkpoint (dims, layers, tp, dtype — the engine dtype the weights must have).
        load: ``load(task_id, weights, config)``, putting an adapter on every rank (``ReferenceRuntime.load_adapter``).
        drop: ``drop(task_id)``, taking it off every rank.
    """

    def __init__(self, config: LoraCacheConfig, spec: Any, load: Callable[[int, Any, Any], None],
                 drop: Callable[[int], None]) -> None:
        self.config, self.spec, self._load, self._drop = config, spec, load, drop
        self.dtype = spec.dtype
        self.geometry = geometry(config, spec, DTYPE_BYTES.get(spec.dtype, 2))
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()  # least recently used first
        self._device: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.counters = {"loaded": 0, "evicted_host": 0, "evicted_device": 0}

    # ---- what the engine loop asks ----
    def put(self, task: int, weights: Any = None, config: Any = None) -> None:
        """A request for ``task`` arrived, with its weights and config or (later requests) without.

        Raises:
            LoraError: an id not cached and no weights ("LoRA task N not found in cache…"), only one of the two
                arrays, arrays the engine would refuse (``unpack``'s messages), an adapter larger than a tier, or a
                host cache full of adapters in use ("PEFT Cache is full…").
        """
        if (weights is None) != (config is None):
            raise LoraError("lora_weights and lora_config must be sent together", "send both arrays of one conversion (or neither, with a cached lora_task_id)")
        entry = self._entries.get(task)
        if entry is not None:  # cached: any re-sent weights are ignored, the cached adapter stays (LoraCache::put)
            self._entries.move_to_end(task)
            return
        if weights is None:
            raise LoraError(f"LoRA task {task} not found in cache. Please send LoRA weights with request",
                            "send lora_weights and lora_config with the first request of a task (and after it was evicted)")
        import numpy as np

        from yitrt.lora.format import unpack

        c = self.config
        unpack(weights, config, self.spec, self.spec.tp, c.max_lora_rank, None if c.target_modules is None else set(c.target_modules),
               self.dtype, self.spec.num_layers)
        values = weights.float().numpy() if hasattr(weights, "float") else np.asarray(weights, dtype=np.float32)  # torch bf16 or numpy
        if not np.isfinite(values).all():  # like non-finite draft_logits: refused on arrival
            raise LoraError(f"LoRA task {task}: lora_weights hold NaN or Inf (every token of the request would be NaN)",
                            "send the arrays `yitrt lora convert` wrote (it refuses non-finite adapters)")
        rows = _rows(config)
        pages = self.geometry.pages(rows)
        if pages > min(self.geometry.host_pages, self.geometry.device_pages):
            raise LoraError(f"LoRA task {task} needs {pages} cache pages, the cache holds {min(self.geometry.host_pages, self.geometry.device_pages)}",
                            "raise lora_cache_max_adapter_size / the cache sizes, or use an adapter of lower rank")
        if not self._claim_host(pages):
            raise LoraError(f"PEFT Cache is full. Could not store taskId={task}",
                            "wait for requests of other adapters to finish, or raise lora_cache_host_memory_bytes")
        self._entries[task] = _Entry(weights, config, rows, pages)

    def use(self, key: str, task: int) -> None:
        """Request ``key`` (queued) uses ``task``: it cannot be evicted from the host while the request lives."""
        self._entries[task].users.add(key)

    def admit(self, key: str, task: int) -> bool:
        """Request ``key`` is about to run with ``task``: put it on the device (evicting idle adapters there), or
        False when it does not fit until a running request of another adapter ends."""
        entry = self._entries[task]
        if not entry.on_device:
            need = entry.pages - self._free_device()
            if need > 0:
                idle = [t for t in self._device if not self._entries[t].running]
                if sum(self._entries[t].pages for t in idle) < need:
                    return False
                for t in idle:  # least recently used first
                    if need <= 0:
                        break
                    need -= self._entries[t].pages
                    self._off_device(t)
                    self.counters["evicted_device"] += 1
            self._load(task, entry.weights, entry.config)
            entry.on_device = True
            self._device[task] = None
            self.counters["loaded"] += 1
        self._device.move_to_end(task)
        self._entries.move_to_end(task)
        entry.running.add(key)
        return True

    def pause(self, key: str, task: int) -> None:
        """Request ``key`` was paused: it no longer holds ``task`` on the device (it still does on the host)."""
        self._entries[task].running.discard(key)

    def leave(self, key: str, task: int) -> None:
        """Request ``key`` is gone (finished, cancelled, failed): it holds ``task`` nowhere."""
        entry = self._entries.get(task)
        if entry is not None:
            entry.running.discard(key)
            entry.users.discard(key)

    def reset_users(self) -> None:
        """Forget every user (the engine loop that had them is gone); the adapters stay cached."""
        for entry in self._entries.values():
            entry.users.clear()
            entry.running.clear()

    def cached(self, task: int) -> bool:
        """Whether the host cache holds ``task``."""
        return task in self._entries

    def on_device(self, task: int) -> bool:
        """Whether the ranks hold ``task``."""
        return task in self._device

    def stats(self) -> dict[str, int]:
        """Pages and adapters per tier (PeftCacheIterationStats' totals)."""
        g = self.geometry
        return {"host_pages_total": g.host_pages, "host_pages_available": g.host_pages - self._used_host(),
                "device_pages_total": g.device_pages, "device_pages_available": self._free_device(),
                "host_tasks": len(self._entries), "device_tasks": len(self._device), **self.counters}

    def prefetch(self, folder: str) -> list[int]:
        """Load ``lora_prefetch_dir``: every sub-folder with a numeric name holds ``model.lora_weights.npy`` and
        ``model.lora_config.npy`` for that task id (other names skipped, as the engine skips them). Returns the ids.

        Raises:
            LoraError: a folder whose arrays the engine would refuse, or files that are not plain ``.npy`` arrays.
        """
        import os

        import numpy as np

        loaded = []
        if not os.path.isdir(folder):
            return loaded  # the engine skips a missing folder (PEFT prefetchLoraWeights)
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if not (name.isascii() and name.isdigit() and os.path.isdir(path)):  # '²' and '١' are digits to str.isdigit
                continue
            try:  # allow_pickle=False: an object array is refused, never unpickled
                weights = np.load(os.path.join(path, WEIGHTS_NAME), allow_pickle=False)
                config = np.load(os.path.join(path, CONFIG_NAME), allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise LoraError(f"lora_prefetch_dir task {name}: {exc}", "each task folder holds model.lora_weights.npy and model.lora_config.npy") from None
            self.put(int(name), weights, config)
            loaded.append(int(name))
        return loaded

    # ---- internals ----
    def _used_host(self) -> int:
        return sum(e.pages for e in self._entries.values())

    def _free_device(self) -> int:
        return self.geometry.device_pages - sum(self._entries[t].pages for t in self._device)

    def _claim_host(self, pages: int) -> bool:
        need = pages - (self.geometry.host_pages - self._used_host())
        if need <= 0:
            return True
        idle = [t for t, e in self._entries.items() if not e.users]  # least recently used first
        if sum(self._entries[t].pages for t in idle) < need:
            return False
        for t in idle:
            if need <= 0:
                break
            need -= self._entries[t].pages
            if t in self._device:
                self._off_device(t)
            del self._entries[t]
            self.counters["evicted_host"] += 1
        return True

    def _off_device(self, task: int) -> None:
        self._drop(task)
        self._entries[task].on_device = False
        del self._device[task]


def _rows(config: Any) -> list[tuple[int, int, int]]:
    """``lora_config`` ([rows, 3] or [1, rows, 3]) as (module id, layer, rank) tuples."""
    import numpy as np

    array = np.asarray(config)
    return [(int(m), int(layer), int(r)) for m, layer, r in array.reshape(-1, 3).tolist()]
