"""The engine loop's adapter cache on a real reference runtime (tiny model): requests of two adapters and of the base
model, with a device cache that holds one adapter — the answers equal each adapter's requests decoded alone, a second
adapter waits until the first one's requests are done (then the first is evicted from the ranks, and loaded again for
its later requests from the host cache, without weights), and KV blocks are reused within an adapter only."""

from __future__ import annotations

import numpy as np
import pytest

from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.errors import LoraError
from yitrt.lora.format import pack
from yitrt.lora.modules import by_trtllm
from yitrt.reference.engine.adapters import LoraCacheConfig, geometry
from yitrt.reference.engine.loop import EngineLoop
from yitrt.reference.engine.scheduler import EngineConfig
from yitrt.reference.runtime import ReferenceRuntime, Sampling, StopRule
from yitrt.synthetic import SyntheticSpec, write_synthetic_model

pytestmark = pytest.mark.integration


def _adapter(spec, seed: int, modules: tuple[str, ...]):
    rng = np.random.default_rng(seed)
    mats = {}
    for layer in range(spec.num_layers):
        for name in modules:
            m = by_trtllm(name)
            mats[(layer, name)] = (rng.normal(0, 0.05, (4, m.in_dim(spec))), rng.normal(0, 0.3, (m.out_dim(spec), 4)))
    return pack(mats, spec.dtype)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-lora")
    hf = write_synthetic_model(root / "hf", SyntheticSpec(seed=9, dtype="float32", layers=2, head_std=0.2))
    convert(ConvertRequest(hf, root / "ckpt"))
    with ReferenceRuntime(root / "ckpt", device="cpu") as rt:
        yield rt


def test_one_adapter_at_a_time_on_the_device_every_answer_as_alone(runtime):
    spec = runtime.spec
    arrays = {1: _adapter(spec, 1, ("attn_q", "attn_v", "mlp_4h_to_h")), 2: _adapter(spec, 2, ("attn_k", "mlp_gate", "attn_dense"))}
    base = LoraCacheConfig(max_adapter_size=4, optimal_adapter_size=4)
    size = {"float32": 4}.get(spec.dtype, 2)  # the cache counts elements of the engine dtype
    g = geometry(base, spec, size)
    page = g.slots_per_page * g.page_width * size
    config = EngineConfig(max_batch_size=4, max_num_tokens=256, tokens_per_block=8, primary_blocks=64,
                          lora=LoraCacheConfig(max_adapter_size=4, optimal_adapter_size=4, host_bytes=4 * page, device_bytes=page))
    loop = EngineLoop(runtime, config)
    rng = np.random.default_rng(0)
    shared = [int(t) for t in rng.integers(3, 500, 24)]
    plan = [("a", 1), ("b", 2), ("c", None), ("d", 1), ("e", 2), ("f", 1)]
    prompts = {key: shared + [int(t) for t in rng.integers(3, 500, 3)] for key, _ in plan}
    sent = set()
    for key, task in plan:
        weights = config_rows = None
        if task is not None and task not in sent:
            weights, config_rows = arrays[task]
            sent.add(task)
        loop.add(key, prompts[key], StopRule(6), Sampling(), adapter=task, lora_weights=weights, lora_config=config_rows)
    out = {key: [] for key, _ in plan}
    together = []
    while not loop.idle:
        for key, token, _ in loop.step():
            out[key].append(token)
        running = {dict(plan)[k] for k, _, _ in loop.records[-1].segments} - {None}
        together.append(running)
        assert loop.adapters.stats()["device_tasks"] <= 1
    assert all(len(v) <= 1 for v in together)  # never two adapters in one iteration: the device holds one
    stats = loop.adapters.stats()
    assert stats["loaded"] >= 3 and stats["evicted_device"] >= 2  # 1, then 2 (1 evicted), then 1 again (2 evicted)
    assert stats["host_tasks"] == 2
    # each answer as the request alone with its adapter (loaded directly under other ids)
    for task, (w, c) in arrays.items():
        runtime.load_adapter(100 + task, w, c)
    try:
        for key, task in plan:
            alone = runtime.generate([prompts[key]], 6, adapter=None if task is None else 100 + task)[0]
            assert out[key] == alone, key
    finally:
        for task in arrays:
            runtime.drop_adapter(100 + task)
    assert len({tuple(out[k]) for k in ("a", "b", "c")}) == 3
    # blocks of the shared prefix were reused by d and f (adapter 1 after a) but never across adapters
    assert loop.scheduler.blocks.counters.reused > 0
    with pytest.raises(LoraError, match="LoRA task 7 not found in cache"):
        loop.add("g", prompts["a"], StopRule(2), Sampling(), adapter=7)


def test_tensor_parallel_ranks_serve_adapters_from_the_cache(runtime, tmp_path):
    """At tp 2 every rank takes its slices of the cached arrays: the loop's answers equal the tp-1 runtime's."""
    hf = write_synthetic_model(tmp_path / "hf", SyntheticSpec(seed=9, dtype="float32", layers=2, head_std=0.2))
    convert(ConvertRequest(hf, tmp_path / "tp2", tp=2))
    spec = runtime.spec
    weights, config_rows = _adapter(spec, 5, ("attn_q", "attn_k", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h"))
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 500, 20)]
    runtime.load_adapter(200, weights, config_rows)
    try:
        want = runtime.generate([prompt], 6, adapter=200)[0]
    finally:
        runtime.drop_adapter(200)
    with ReferenceRuntime(tmp_path / "tp2", device="cpu") as tp2:
        loop = EngineLoop(tp2, EngineConfig(max_batch_size=2, max_num_tokens=128, tokens_per_block=8, primary_blocks=16,
                                            lora=LoraCacheConfig(max_adapter_size=4, optimal_adapter_size=4)))
        loop.add("a", prompt, StopRule(6), Sampling(), adapter=3, lora_weights=weights, lora_config=config_rows)
        loop.add("b", prompt, StopRule(6), Sampling(), adapter=3)
        out = {"a": [], "b": []}
        while not loop.idle:
            for key, token, _ in loop.step():
                out[key].append(token)
    assert out == {"a": want, "b": want}
    assert want != runtime.generate([prompt], 6)[0]  # the adapter changed the answer
