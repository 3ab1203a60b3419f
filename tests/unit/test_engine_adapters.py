"""The reference slot's LoRA adapter cache (``yitrt.reference.engine.adapters``) and KV reuse keyed per LoRA task,
without a model: page geometry, hit / miss / eviction / full / unknown id, who may be evicted when, and the prefix
tree never sharing blocks between adapters (or an adapter and the base model)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from yitrt.errors import LoraError, UsageError
from yitrt.lora.format import pack
from yitrt.reference.engine.adapters import AdapterCache, LoraCacheConfig, geometry
from yitrt.reference.engine.kv_pool import BlockManager
from yitrt.reference.engine.parameters import lora_cache_config
from yitrt.reference.engine.scheduler import EngineConfig, Scheduler, Sequence
from yitrt.reference.runtime import Sampling, StopRule

#: a tiny Llama: hidden 64, 4 heads of 16, 2 KV heads, intermediate 128, 2 layers
SPEC = SimpleNamespace(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_size=16, num_layers=2,
                       tp=1, dtype="float32")


def _adapter(rank: int, modules=("attn_q", "attn_v"), layers=(0, 1), seed: int = 0):
    """Request arrays of an adapter of ``rank`` on ``modules`` of ``layers``."""
    from yitrt.lora.modules import by_trtllm

    rng = np.random.default_rng(seed)
    mats = {}
    for layer in layers:
        for name in modules:
            m = by_trtllm(name)
            mats[(layer, name)] = (rng.normal(size=(rank, m.in_dim(SPEC))), rng.normal(size=(m.out_dim(SPEC), rank)))
    return pack(mats, "float32")


class Ranks:
    """Stands in for the ranks: which task ids they hold, and the order of loads and drops."""

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.log: list[tuple[str, int]] = []

    def load(self, task, weights, config) -> None:
        self.held.add(task)
        self.log.append(("load", task))

    def drop(self, task) -> None:
        self.held.discard(task)
        self.log.append(("drop", task))


def _cache(**kw) -> tuple[AdapterCache, Ranks]:
    ranks = Ranks()
    return AdapterCache(LoraCacheConfig(**kw), SPEC, ranks.load, ranks.drop), ranks


def test_page_geometry_follows_the_peft_cache():
    g = geometry(LoraCacheConfig(optimal_adapter_size=8, max_adapter_size=16, max_lora_rank=16), SPEC, 4)
    # per-rank in + out: q 64+64, k/v 64+32, dense 64+64, fc/gate 64+128, proj 128+64 → the page width is the smallest
    assert g.page_width == 96
    assert g.module_width == {1: 128, 2: 96, 3: 96, 4: 128, 5: 192, 6: 192, 7: 192}
    # a page holds one optimal-size (8) adapter on every module and layer: 2 layers × 8 × Σ ceil(w / 96)
    assert g.slots_per_page == 2 * 8 * (2 + 1 + 1 + 2 + 2 + 2 + 2)
    # an adapter of the optimal size on every module fits one page; twice the rank takes two
    assert g.pages([(m, layer, 8) for layer in (0, 1) for m in (1, 2, 3, 4, 5, 6, 7)]) == 1
    assert g.pages([(m, layer, 16) for layer in (0, 1) for m in (1, 2, 3, 4, 5, 6, 7)]) == 2
    # the optimal and max sizes are clamped to max_lora_rank, and a tier must hold one max-sized adapter
    assert geometry(LoraCacheConfig(optimal_adapter_size=64, max_lora_rank=8), SPEC, 4).slots_per_page == 2 * 8 * 12
    with pytest.raises(UsageError, match="Not enough space allocated to host LoRA cache to hold 1 max sized LoRA"):
        geometry(LoraCacheConfig(host_bytes=1000), SPEC, 4)
    with pytest.raises(UsageError, match="device LoRA cache"):
        geometry(LoraCacheConfig(device_bytes=1000), SPEC, 4)


def test_first_request_brings_the_weights_later_ones_the_id_and_unknown_ids_are_refused():
    cache, ranks = _cache()
    with pytest.raises(LoraError, match=r"^LoRA task 3 not found in cache\. Please send LoRA weights with request$"):
        cache.put(3)
    w, c = _adapter(4)
    cache.put(3, w, c)
    assert cache.cached(3) and not cache.on_device(3) and not ranks.held  # loaded on the ranks when it runs
    cache.put(3)  # the id alone: a hit
    cache.use("a", 3)
    assert cache.admit("a", 3) and ranks.log == [("load", 3)]
    cache.use("b", 3)
    assert cache.admit("b", 3) and ranks.log == [("load", 3)]  # a hit on the device too: loaded once
    with pytest.raises(LoraError, match="must be sent together"):
        cache.put(4, w, None)


def test_weights_resent_for_a_cached_id_are_ignored_the_cached_adapter_stays():
    cache, ranks = _cache()
    w1, c1 = _adapter(4, seed=1)
    w2, c2 = _adapter(4, seed=2)
    cache.put(5, w1, c1)
    cache.put(5, w2, c2)  # TensorRT-LLM's LoraCache::put returns early for a known id
    cache.use("a", 5)
    cache.admit("a", 5)
    assert cache._entries[5].weights is w1


def test_invalid_arrays_are_refused_with_the_engines_message_and_nothing_is_cached():
    cache, _ = _cache(max_lora_rank=8, target_modules=("attn_q",))
    w, c = _adapter(4, modules=("attn_v",))
    with pytest.raises(LoraError, match="lora module attn_v not enabled for this model"):
        cache.put(1, w, c)
    w, c = _adapter(16, modules=("attn_q",))
    with pytest.raises(LoraError, match="low_rank must be smaller than mMaxLowRank"):
        cache.put(1, w, c)
    w, c = _adapter(4, modules=("attn_q",))
    with pytest.raises(LoraError, match="Expected lora weights to be the same data type as base model"):
        cache.put(1, w.astype(np.float16), c)
    with pytest.raises(LoraError, match="lora_config has no rows"):  # an adapter of nothing is never cached as one
        cache.put(1, np.zeros((1, 0, 0), np.float32), np.zeros((1, 0, 3), np.int32))
    w, c = _adapter(4, modules=("attn_q",))
    w[0, 0, 3] = np.nan  # valid shapes and dtype, but every token of the request would be NaN
    with pytest.raises(LoraError, match="lora_weights hold NaN or Inf"):
        cache.put(1, w, c)
    assert not cache.cached(1)
    import torch  # the worker hands bf16 weights over as a torch tensor (numpy has no bfloat16)

    bf16 = AdapterCache(LoraCacheConfig(max_lora_rank=8, target_modules=("attn_q",)), SimpleNamespace(**{**vars(SPEC), "dtype": "bfloat16"}),
                        Ranks().load, Ranks().drop)
    w, c = _adapter(4, modules=("attn_q",))
    bf16.put(2, torch.from_numpy(w).to(torch.bfloat16), c)
    assert bf16.cached(2)
    w[0, 0, 3] = np.inf
    with pytest.raises(LoraError, match="lora_weights hold NaN or Inf"):
        bf16.put(3, torch.from_numpy(w).to(torch.bfloat16), c)


def _sized(host_pages: int, device_pages: int, **kw) -> tuple[AdapterCache, Ranks]:
    """A cache whose tiers hold exactly these many pages (pages of the default geometry at 4-byte elements)."""
    g = geometry(LoraCacheConfig(**kw), SPEC, 4)
    page = g.slots_per_page * g.page_width * 4
    return _cache(host_bytes=host_pages * page, device_bytes=device_pages * page, **kw)


def test_device_tier_evicts_the_least_recently_used_idle_adapter_and_waits_when_all_run():
    cache, ranks = _sized(host_pages=8, device_pages=2, max_adapter_size=8)
    for task in (1, 2, 3):
        cache.put(task, *_adapter(4, seed=task))  # one page each
    for key, task in (("a", 1), ("b", 2)):
        cache.use(key, task)
        assert cache.admit(key, task)
    cache.use("c", 3)
    assert not cache.admit("c", 3)  # both device pages hold adapters of running requests: c waits
    assert ranks.held == {1, 2}
    cache.leave("a", 1)  # a ends: adapter 1 is idle (still cached on both tiers)
    assert cache.on_device(1) and cache.cached(1)
    assert cache.admit("c", 3)
    assert ranks.log[-2:] == [("drop", 1), ("load", 3)] and ranks.held == {2, 3}
    assert cache.cached(1)  # still on the host: a later request needs no weights
    cache.use("d", 1)
    cache.leave("b", 2)
    cache.leave("c", 3)
    assert cache.admit("d", 1)
    assert ranks.log[-2:] == [("drop", 2), ("load", 1)]  # 2 was used less recently than 3


def test_host_tier_evicts_lru_idle_adapters_and_is_full_when_all_are_in_use():
    cache, ranks = _sized(host_pages=2, device_pages=2, max_adapter_size=8)
    cache.put(1, *_adapter(4, seed=1))
    cache.put(2, *_adapter(4, seed=2))
    cache.use("a", 1)
    cache.use("b", 2)
    with pytest.raises(LoraError, match=r"^PEFT Cache is full\. Could not store taskId=3$"):
        cache.put(3, *_adapter(4, seed=3))
    assert not cache.cached(3)
    cache.admit("b", 2)
    cache.leave("b", 2)  # 2 idle: evictable from the host, and dropped from the ranks with it
    cache.put(3, *_adapter(4, seed=3))
    assert cache.cached(3) and not cache.cached(2) and ranks.log[-1] == ("drop", 2)
    with pytest.raises(LoraError, match="LoRA task 2 not found in cache"):
        cache.put(2)  # evicted: it must be sent again
    cache.put(1)  # in use, kept


def test_a_paused_request_keeps_its_adapter_on_the_host_not_on_the_device():
    cache, _ = _sized(host_pages=1, device_pages=1, max_adapter_size=8)
    cache.put(1, *_adapter(4, seed=1))
    cache.use("a", 1)
    cache.admit("a", 1)
    cache.pause("a", 1)
    with pytest.raises(LoraError, match="PEFT Cache is full"):
        cache.put(2, *_adapter(4, seed=2))  # a paused request still holds its host pages
    cache.leave("a", 1)
    cache.put(2, *_adapter(4, seed=2))


def test_an_adapter_larger_than_a_tier_is_refused_on_arrival():
    cache, _ = _sized(host_pages=4, device_pages=1, max_adapter_size=8)
    with pytest.raises(LoraError, match="needs 2 cache pages, the cache holds 1"):
        cache.put(1, *_adapter(16, modules=("attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate")))
    assert not cache.cached(1)


def test_lora_cache_parameters_are_read_as_the_backend_reads_them():
    assert lora_cache_config({"lora_cache_host_memory_bytes": "1000"}) is None  # no LoRA limits: no LoRA plugin
    config = lora_cache_config({"lora_cache_optimal_adapter_size": "4", "lora_cache_max_adapter_size": "${x}",
                                "lora_cache_gpu_memory_fraction": "0.5", "yitrt_lora_free_memory_bytes": "1000",
                                "lora_cache_host_memory_bytes": "", "yitrt_lora_target_modules": "attn_q, attn_v"})
    assert config.optimal_adapter_size == 4 and config.max_adapter_size == 64  # a placeholder is unset: the default
    assert config.device_bytes == 500 and config.host_bytes == 1 << 30
    assert config.target_modules == ("attn_q", "attn_v") and config.max_lora_rank == 64
    with pytest.raises(UsageError, match="lora_cache_gpu_memory_fraction"):
        lora_cache_config({"lora_cache_gpu_memory_fraction": "1.5", "yitrt_max_lora_rank": "8"})


# ---- KV reuse keyed per LoRA task ----


def test_prefix_tree_never_shares_blocks_across_adapters_or_with_the_base_model():
    manager = BlockManager(16, 0, 4, reuse=True)
    tokens = list(range(9))
    tables = {}
    for adapter in (None, 1, 2):
        assert manager.match(tokens, adapter=adapter) == []  # nothing of another task matches
        parent = None
        table = []
        for i in range(2):
            block = manager.allocate([])
            parent = manager.commit(parent, tuple(tokens[4 * i : 4 * i + 4]), block, adapter)
            table.append(block)
        tables[adapter] = table
    for adapter in (None, 1, 2):  # each finds its own chain, and only its own
        assert [n.block for n in manager.match(tokens, adapter=adapter)] == tables[adapter]
    assert len({b for t in tables.values() for b in t}) == 6
    assert manager.match(tokens, adapter=3) == []


def test_scheduler_reuses_blocks_only_within_one_adapter():
    cache, _ = _cache()
    for task in (1, 2):
        cache.put(task, *_adapter(4, seed=task))
    sched = Scheduler(EngineConfig(max_batch_size=4, max_num_tokens=64, tokens_per_block=4, primary_blocks=64), cache)
    prompt = list(range(13))

    def run(key, adapter):
        seq = Sequence(key, list(prompt), StopRule(2), Sampling(), 0, adapter=adapter)
        sched.add(seq)
        if adapter is not None:
            cache.use(key, adapter)
        before = sched.blocks.counters.reused
        adapters = set()
        while not sched.idle:
            plan = sched.plan()
            adapters |= {s.adapter for s in plan.segments}
            sched.finish({s.key: [7] for s in plan.segments if s.sample})
        return sched.blocks.counters.reused - before, adapters

    assert run("a", 1) == (0, {1})  # segments carry the task id to the ranks
    assert run("b", 1) == (3, {1})  # same adapter, same prompt: its 3 full blocks are reused
    assert run("c", 2) == (0, {2})  # another adapter: nothing reused
    assert run("d", None) == (0, {None})  # the base model: nothing of the adapters' blocks
    assert run("e", None) == (3, {None})
    assert not cache._entries[1].running and not cache._entries[1].users  # finished requests let go of it


def test_prefetch_dir_loads_numeric_task_folders_and_skips_others(tmp_path):
    for name, seed in (("3", 3), ("7", 7), ("notes", 1)):
        folder = tmp_path / name
        folder.mkdir()
        w, c = _adapter(4, seed=seed)
        np.save(folder / "model.lora_weights.npy", w)
        np.save(folder / "model.lora_config.npy", c)
    (tmp_path / "12").write_text("a file, not a task folder")
    cache, ranks = _cache()
    assert cache.prefetch(str(tmp_path)) == [3, 7]
    assert cache.cached(3) and cache.cached(7) and not ranks.held  # on the host; the ranks get them when they run
    cache.put(7)  # the id alone from the first request
    assert cache.prefetch(str(tmp_path / "missing")) == []  # a missing folder is skipped, as the engine skips it
    bad = tmp_path / "bad" / "5"
    bad.mkdir(parents=True)
    np.save(bad / "model.lora_weights.npy", np.array([object()], dtype=object), allow_pickle=True)
    np.save(bad / "model.lora_config.npy", np.zeros((1, 1, 3), dtype=np.int32))
    with pytest.raises(LoraError, match="lora_prefetch_dir task 5"):
        cache.prefetch(str(tmp_path / "bad"))
