"""The engine loop: a ``Scheduler`` deciding iterations and a ``ReferenceRuntime``'s ranks computing them.

``EngineLoop.add`` queues a request (checked at once: token ids, context length, what the pool and the token budget
can ever hold), ``step`` runs one iteration and returns the tokens it produced, ``stats`` gives the numbers the C++
backend reports as ``nv_trt_llm_*`` metrics.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from yitrt.reference.engine.scheduler import EngineConfig, Scheduler, Sequence


class EngineLoop:
    """In-flight batching over a runtime's paged KV cache (one loop per runtime at a time: it owns the cache)."""

    def __init__(self, runtime, config: EngineConfig) -> None:
        self.runtime, self.config = runtime, config
        self.scheduler = Scheduler(config)
        runtime._call("init_pool", config.primary_blocks, config.host_blocks, config.tokens_per_block)
        self.iterations = 0
        self.last: dict[str, Any] = {}

    @property
    def records(self):
        """What each iteration scheduled (``StepRecord``)."""
        return self.scheduler.records

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    def add(self, key: str, prompt: list[int], rule, sampling) -> None:
        """Queue a request.

        Raises:
            UsageError: a token id outside the vocab, more than the context, more KV blocks than the pool holds, or a
                prompt over ``max_num_tokens`` without chunked context.
        """
        self.runtime.check_tokens([prompt], rule.max_new)
        generator = None if sampling.greedy else torch.Generator().manual_seed(sampling.seed)
        self.scheduler.add(Sequence(key, list(prompt), rule, sampling, 0, generator))

    def cancel(self, key: str) -> bool:
        """Stop a request (waiting or running); False when it is not known (finished or never added)."""
        return self.scheduler.cancel(key)

    def step(self) -> list[tuple[str, int, str | None]]:
        """One iteration. Returns (key, token, finish reason or None) for every sequence that got a token."""
        from yitrt.reference.runtime import pick_tokens

        plan = self.scheduler.plan()
        if plan is None:
            return []
        results = self.runtime._call("run_step", plan)
        sampled: dict[str, int] = {}
        seqs = {s.key: s for s in self.scheduler.running}
        for seg, result in zip((s for s in plan.segments if s.sample), results, strict=True):
            if isinstance(result, int):
                sampled[seg.key] = result
            else:
                seq = seqs[seg.key]
                sampled[seg.key] = int(pick_tokens(result[None], seq.sampling, seq.generator)[0])
        events = self.scheduler.finish(sampled)
        self.iterations += 1
        record = self.scheduler.records[-1]
        self.last = {"context_tokens": sum(n for _, n, phase in record.segments if phase == "context"),
                     "generation_requests": sum(1 for _, _, phase in record.segments if phase == "generation"),
                     "scheduled": len(record.segments),
                     "context_requests": sum(1 for _, _, phase in record.segments if phase == "context"),
                     "paused": len(record.paused)}
        return events

    def stats(self) -> dict[str, Any]:
        """The batch manager's numbers under the C++ backend's metric labels (reference §3 Metrics)."""
        s, blocks, c = self.scheduler, self.scheduler.blocks, self.config
        free = blocks.free_blocks()
        counters = blocks.counters
        return {
            "kv_cache_block": {"max": c.primary_blocks, "free": free, "used": c.primary_blocks - free,
                               "tokens_per": c.tokens_per_block, "alloc_total": counters.alloc_total,
                               "alloc_new": counters.alloc_new, "reused": counters.reused,
                               "fraction": (c.primary_blocks - free) / c.primary_blocks},
            "request": {"active": len(s.running), "max": c.max_batch_size, "scheduled": self.last.get("scheduled", 0),
                        "context": self.last.get("context_requests", 0), "waiting": len(s.waiting), "completed": s.completed},
            "inflight_batcher": {"total_context_tokens": self.last.get("context_tokens", 0),
                                 "generation_requests": self.last.get("generation_requests", 0), "micro_batch_id": 0,
                                 "paused_requests": self.last.get("paused", 0)},
            "general": {"iteration_counter": self.iterations, "timestamp": int(time.time() * 1e6)},
        }
