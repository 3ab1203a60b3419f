"""The reference slot's batch manager without a model: block accounting, the prefix tree, and the scheduler's
decisions per iteration (the tokens fed back are arbitrary; what is checked is who runs when, with what blocks)."""

from __future__ import annotations

import pytest

from yitrt.errors import UsageError
from yitrt.reference.engine.kv_pool import BlockManager, NoFreeBlock
from yitrt.reference.engine.scheduler import EngineConfig, Scheduler, Sequence
from yitrt.reference.runtime import Sampling, StopRule


def _seq(key: str, prompt: list[int], max_new: int) -> Sequence:
    return Sequence(key, prompt, StopRule(max_new), Sampling(), 0)


def _run(sched: Scheduler, arrivals: dict[int, list[Sequence]] | None = None, limit: int = 500) -> dict[str, list[int]]:
    """Drive the scheduler to the end, adding ``arrivals[i]`` before iteration i; every sampled token is 7."""
    arrivals, out, step = arrivals or {}, {}, 0
    while step < limit and (not sched.idle or any(k >= step for k in arrivals)):
        for seq in arrivals.get(step, []):
            sched.add(seq)
        plan = sched.plan()
        if plan is not None:
            for key, token, _ in sched.finish({s.key: [7] for s in plan.segments if s.sample}):
                out.setdefault(key, []).append(token)
        step += 1
    assert sched.idle, "the scheduler did not finish"
    return out


def test_requests_join_and_leave_at_iteration_boundaries():
    sched = Scheduler(EngineConfig(max_batch_size=4, max_num_tokens=64, tokens_per_block=4, primary_blocks=64))
    out = _run(sched, {0: [_seq("a", list(range(10)), 5)], 2: [_seq("b", list(range(20, 26)), 2)]})
    assert out == {"a": [7] * 5, "b": [7] * 2}
    steps = [{key: (n, phase) for key, n, phase in r.segments} for r in sched.records]
    assert steps[0] == {"a": (10, "context")}
    assert steps[1] == {"a": (1, "generation")}
    assert steps[2] == {"a": (1, "generation"), "b": (6, "context")}  # joins the running batch at once
    assert steps[3] == {"a": (1, "generation"), "b": (1, "generation")}
    assert steps[4] == {"a": (1, "generation")}  # b left after its 2 tokens, a goes on
    assert sched.blocks.used_blocks() == 0  # everything released


def test_max_num_tokens_and_max_batch_size_hold_at_every_iteration():
    cfg = EngineConfig(max_batch_size=3, max_num_tokens=24, tokens_per_block=8, primary_blocks=256, chunked_context=True)
    sched = Scheduler(cfg)
    seqs = [_seq(str(i), list(range(i, i + 5 + 7 * i)), 3 + i % 4) for i in range(10)]
    arrivals: dict[int, list[Sequence]] = {}
    for i, seq in enumerate(seqs):
        arrivals.setdefault(i // 2 + i % 2, []).append(seq)  # staggered: most iterations see a newcomer
    out = _run(sched, arrivals)
    assert sorted(out) == sorted(s.key for s in seqs)
    assert all(r.tokens <= cfg.max_num_tokens for r in sched.records)
    assert all(len(r.segments) <= cfg.max_batch_size and r.running <= cfg.max_batch_size for r in sched.records)
    assert max(r.tokens for r in sched.records) == cfg.max_num_tokens  # the budget is used, not just respected
    # chunked context: a long prompt is cut into chunks of whole blocks
    chunks = [n for r in sched.records for key, n, phase in r.segments if key == "9" and phase == "context"]
    assert sum(chunks) == len(seqs[9].prompt) and len(chunks) > 1 and all(n % 8 == 0 for n in chunks[:-1])


def test_without_chunked_context_a_prompt_waits_for_room_and_an_oversized_one_is_refused():
    sched = Scheduler(EngineConfig(max_batch_size=4, max_num_tokens=16, tokens_per_block=4, primary_blocks=64))
    with pytest.raises(UsageError, match="max_num_tokens 16 without chunked context"):
        sched.add(_seq("big", list(range(17)), 2))
    _run(sched, {0: [_seq("a", list(range(10)), 3), _seq("b", list(range(12)), 3)]})
    first = {key: n for key, n, _ in sched.records[0].segments}
    assert first == {"a": 10}  # b's 12 tokens do not fit beside a's 10: b waits a whole iteration
    assert {key: n for key, n, _ in sched.records[1].segments} == {"a": 1, "b": 12}


def test_a_request_the_pool_can_never_hold_is_refused_on_arrival():
    sched = Scheduler(EngineConfig(tokens_per_block=4, primary_blocks=3))
    sched.add(_seq("fits", list(range(8)), 5))  # 12 cached tokens at most = 3 blocks
    with pytest.raises(UsageError, match="needs 4 KV blocks"):
        sched.add(_seq("too-long", list(range(8)), 6))


def test_guaranteed_no_evict_queues_what_cannot_finish_and_never_pauses():
    # each request may grow to 8 + 8 - 1 = 15 tokens = 4 blocks; the pool holds 6: only one at a time
    sched = Scheduler(EngineConfig(max_batch_size=4, tokens_per_block=4, primary_blocks=6))
    out = _run(sched, {0: [_seq(k, list(range(i * 10, i * 10 + 8)), 8) for i, k in enumerate("abc")]})
    assert all(len(v) == 8 for v in out.values())
    assert all(not r.paused for r in sched.records)
    assert max(r.running for r in sched.records) == 1 and max(r.waiting for r in sched.records) == 2
    assert all(r.used_blocks <= 6 for r in sched.records)


def test_max_utilization_admits_greedily_pauses_the_newest_and_resumes_it():
    sched = Scheduler(EngineConfig(max_batch_size=4, tokens_per_block=4, primary_blocks=6, policy="max_utilization", reuse=False))
    out = _run(sched, {0: [_seq(k, list(range(i * 10, i * 10 + 8)), 8) for i, k in enumerate("abc")]})
    assert all(len(v) == 8 for v in out.values())  # every request completes, paused or not
    paused = [key for r in sched.records for key in r.paused]
    assert paused and paused[0] == "c"  # the most recently admitted goes first
    assert max(r.running for r in sched.records) >= 2  # admitted beyond what no-evict would
    # a paused request comes back with its context recomputed: prompt + what it had generated
    resumed = [(i, n) for i, r in enumerate(sched.records) for key, n, phase in r.segments if key == "c" and phase == "context"]
    assert len(resumed) >= 2 and resumed[-1][1] > 8


def test_reuse_hits_a_shared_prefix_and_misses_one_token_off_in_the_first_block():
    cfg = EngineConfig(max_batch_size=4, tokens_per_block=4, primary_blocks=64, reuse=True)
    sched = Scheduler(cfg)
    system = list(range(100, 112))  # three full blocks
    _run(sched, {0: [_seq("a", system + [1, 2], 2)]})
    assert sched.blocks.counters.reused == 0
    _run(sched, {0: [_seq("b", system + [3], 2)]})
    assert sched.blocks.counters.reused == 3  # all three system-prompt blocks
    b_context = [n for r in sched.records for key, n, phase in r.segments if key == "b" and phase == "context"]
    assert b_context == [1]  # only the token after the reused prefix is computed
    off = list(system)
    off[2] += 1  # one token different inside the first block
    _run(sched, {0: [_seq("c", off + [3], 2)]})
    assert sched.blocks.counters.reused == 3  # no new hit: the chain breaks at the first block
    # the whole prompt cached: the last token is still computed (its logits pick the first new token)
    _run(sched, {0: [_seq("d", system, 2)]})
    assert sched.blocks.counters.reused == 5  # blocks 1-2; block 3 holds the last token


def test_reuse_off_never_hits():
    sched = Scheduler(EngineConfig(tokens_per_block=4, primary_blocks=64, reuse=False))
    _run(sched, {0: [_seq("a", list(range(12)) + [1], 2)], 5: [_seq("b", list(range(12)) + [1], 2)]})
    assert sched.blocks.counters.reused == 0 and sched.blocks.tree.size == 0


def _chain(manager: BlockManager, tokens: list[int]) -> list[int]:
    """Allocate and cache full blocks for ``tokens`` as one sequence would, then release them (idle, cached)."""
    copies, table, parent = [], [], None
    b = manager.tokens_per_block
    for i in range(len(tokens) // b):
        block = manager.allocate(copies)
        table.append(block)
        parent = manager.commit(parent, tuple(tokens[i * b : (i + 1) * b]), block)
    manager.release(table)
    return table


def test_lru_eviction_takes_the_least_recently_used_leaf_first():
    manager = BlockManager(6, 0, 2, reuse=True)
    a = _chain(manager, [1, 2, 3, 4])  # blocks a0 → a1
    b = _chain(manager, [5, 6, 7, 8])
    manager.release(manager.acquire(manager.match([1, 2, 3, 4, 9]), []))  # a used again: b is now the older
    c = _chain(manager, [9, 9])  # takes the two never-used blocks... and one more
    assert len(set(a + b + c)) == 5
    copies: list = []
    taken = [manager.allocate(copies) for _ in range(3)]
    # the free block first, then b's leaf (oldest leaf), then b's root (a leaf now); a's chain stays
    assert taken[1:] == [b[1], b[0]]
    assert [n.key for n in manager.match([1, 2, 3, 4, 0])] == [(1, 2), (3, 4)]
    assert manager.match([5, 6, 7, 8, 0]) == []
    with pytest.raises(NoFreeBlock):
        while True:
            manager.allocate(copies)


def test_only_leaves_are_evicted():
    manager = BlockManager(3, 0, 2, reuse=True)
    _chain(manager, [1, 2, 3, 4])  # root block then leaf block
    copies: list = []
    manager.allocate(copies)
    manager.allocate(copies)  # the leaf (3, 4) goes before its parent even though the parent is as old
    assert [n.key for n in manager.match([1, 2, 3, 4, 0])] == [(1, 2)]


def test_host_pool_keeps_evicted_blocks_reusable_and_onboards_them():
    manager = BlockManager(2, 4, 2, reuse=True)
    _chain(manager, [1, 2, 3, 4])
    copies: list = []
    fresh = [manager.allocate(copies), manager.allocate(copies)]  # both cached blocks are pushed to the host pool
    assert [kind for kind, _, _ in copies] == ["offload", "offload"]
    manager.release(fresh)
    nodes = manager.match([1, 2, 3, 4, 0])
    assert [n.key for n in nodes] == [(1, 2), (3, 4)] and all(n.on_host for n in nodes)
    copies = []
    table = manager.acquire(nodes, copies)
    assert [kind for kind, _, _ in copies].count("onboard") == 2 and not any(n.on_host for n in nodes)
    assert sorted(table) == [0, 1] and manager.counters.reused == 2


def test_engine_config_refuses_impossible_settings():
    with pytest.raises(UsageError, match="power of two"):
        EngineConfig(tokens_per_block=24)
    with pytest.raises(UsageError, match="batch_scheduler_policy"):
        EngineConfig(policy="guaranteed_completion")
    with pytest.raises(UsageError, match="max_num_tokens must be a positive integer"):
        EngineConfig(max_num_tokens=0)
