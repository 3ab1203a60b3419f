"""The engine loop: a ``Scheduler`` deciding iterations and a ``ReferenceRuntime``'s ranks computing them.

``EngineLoop.add`` queues a request (checked at once: token ids, context length, what the pool and the token budget
can ever hold, a draft or lookahead configuration the model takes), ``step`` runs one iteration and returns the tokens
it produced (several for a speculative step: ``speculative.py``), ``stats`` gives the numbers the C++ backend reports as
``nv_trt_llm_*`` metrics. A request may name a LoRA task (``adapter``): its weights come with it the first time and
are kept in the loop's adapter cache (``adapters.py``), which puts them on the ranks while requests using them run.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from yitrt.errors import UsageError
from yitrt.reference.engine.scheduler import EngineConfig, Scheduler, Sequence
from yitrt.reference.engine.speculative import DraftTokens, LookaheadState, accept_greedy, accept_sampled


class EngineLoop:
    """In-flight batching over a runtime's paged KV cache (one loop per runtime at a time: it owns the cache)."""

    def __init__(self, runtime, config: EngineConfig, adapters=None) -> None:
        """``adapters``: the adapter cache of an earlier loop on the same runtime to keep (its adapters stay on the
        ranks); default a new one when ``config.lora`` is set."""
        self.runtime, self.config = runtime, config
        if adapters is None and config.lora is not None:
            from yitrt.reference.engine.adapters import AdapterCache

            adapters = AdapterCache(config.lora, runtime.spec, lambda *a: runtime.load_adapter(*a), lambda t: runtime.drop_adapter(t))
            if config.lora.prefetch_dir:
                adapters.prefetch(config.lora.prefetch_dir)
        elif adapters is not None:
            adapters.reset_users()
        self.adapters = adapters
        self.scheduler = Scheduler(config, adapters)
        runtime._call("init_pool", config.primary_blocks, config.host_blocks, config.tokens_per_block, config.scratch_tokens)
        self.iterations = 0
        self.last: dict[str, Any] = {}
        #: the last step's speculation per request: key → (draft tokens accepted, draft tokens offered)
        self.speculation: dict[str, tuple[int, int]] = {}
        #: the last step's logits row (float32 [vocab]) per request that asked for generation logits
        self.logits: dict[str, torch.Tensor] = {}

    @property
    def records(self):
        """What each iteration scheduled (``StepRecord``)."""
        return self.scheduler.records

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    def add(self, key: str, prompt: list[int], rule, sampling, draft: DraftTokens | None = None, lookahead=None,
            return_logits: bool = False, adapter: int | None = None, lora_weights=None, lora_config=None) -> None:
        """Queue a request; ``draft``: a draft-target verification request (answered with one step), ``lookahead``:
        the request's own (w, n, g) (``LookaheadSizes``; default: the model's, on a lookahead model);
        ``return_logits``: keep each generated token's logits row (``logits``; a draft model's generation logits);
        ``adapter``: the LoRA task id to generate with, ``lora_weights``/``lora_config`` its arrays (the first request
        of a task; later ones send the id alone).

        Raises:
            UsageError: a token id outside the vocab, more than the context, more KV blocks than the pool holds, a
                prompt over ``max_num_tokens`` without chunked context, a draft longer than ``max_draft_len`` (or on a
                model built without draft tokens), lookahead sizes on a model without lookahead or above its own.
            LoraError: LoRA arrays without a task id, an unknown task id without weights, arrays the engine refuses,
                a full adapter cache (``AdapterCache.put``).
        """
        c = self.config
        if adapter is None and (lora_weights is not None or lora_config is not None):
            from yitrt.errors import LoraError

            raise LoraError("lora_weights/lora_config sent without lora_task_id", "send the adapter's lora_task_id with its arrays")
        if adapter is not None and self.adapters is None:
            # no adapter cache (a loop of ReferenceRuntime.generate): the caller loaded the adapter on the ranks itself
            from yitrt.errors import LoraError

            if lora_weights is not None or adapter not in getattr(self.runtime, "adapters", ()):
                raise LoraError(f"this model serves no LoRA adapters (lora_task_id {adapter} sent)",
                                "deploy with LoRA adapters (the recipe's lora: section), or send no lora_* inputs")

        if draft is not None:
            if len(draft.tokens) > c.max_draft_len:  # the executor's check (tensorrtllm_backend #473's message)
                raise UsageError(f"Number of draft tokens ({len(draft.tokens)}) is larger than maximum number of draft tokens ({c.max_draft_len})",
                                 "send at most max_draft_len draft tokens (the target is built/deployed with it)")
            if draft.logits is not None and tuple(draft.logits.shape) != (len(draft.tokens), self.runtime.spec.vocab_size):
                raise UsageError(f"draft_logits has shape {list(draft.logits.shape)}, expected [{len(draft.tokens)}, {self.runtime.spec.vocab_size}]",
                                 "send the draft model's generation_logits for exactly the draft tokens")
            if draft.logits is not None and bool((torch.isnan(draft.logits) | (draft.logits == float("inf"))).any()):
                # a NaN would fail the whole iteration (every request in it), not just this one: refused on arrival
                # (−inf is a masked token, as a draft under min_tokens returns its end ids)
                raise UsageError("draft_logits holds NaN or +inf values", "send the draft model's generation_logits as they came")
            t = draft.threshold
            if t is not None and not (isinstance(t, float) and 0.0 <= t <= 1.0):
                raise UsageError(f"draft_acceptance_threshold must be in [0, 1], got {t!r}", "send a probability, or leave it unset")
            self.runtime.check_tokens([list(prompt) + list(draft.tokens)], 1)
        if lookahead is not None:
            if c.lookahead is None:  # T-utils getLookaheadDecodingFromTensors
                raise UsageError("Cannot set the request lookahead decoding configuration when model instance lookahead parameters are not set",
                                 "deploy with decoding_mode lookahead (yitrt deploy --speculative lookahead) or drop the lookahead inputs")
            if not c.lookahead.covers(lookahead):
                raise UsageError(f"the request's lookahead ({lookahead.window}, {lookahead.ngram}, {lookahead.verification_set}) exceeds the model's "
                                 f"({c.lookahead.window}, {c.lookahead.ngram}, {c.lookahead.verification_set})", "send w <= W, n <= N, g <= G")
        self.runtime.check_tokens([prompt], rule.max_new)
        generator = None if sampling.greedy else torch.Generator().manual_seed(sampling.seed)
        if return_logits and draft is not None:
            raise UsageError("generation logits of a verification request are not returned", "ask the draft model for its generation logits")
        seq = Sequence(key, list(prompt), rule, sampling, 0, generator, draft=draft, want_logits=return_logits, adapter=adapter)
        sizes = lookahead or c.lookahead
        if sizes is not None and draft is None:
            seq.lookahead = LookaheadState.start(sizes, seq.prompt)
        self.scheduler.check(len(seq.prompt), rule.max_new)  # refusals of the request itself before its adapter is stored
        if adapter is not None and self.adapters is not None:
            self.adapters.put(adapter, lora_weights, lora_config)
        self.scheduler.add(seq)
        if adapter is not None and self.adapters is not None:
            self.adapters.use(key, adapter)

    def cancel(self, key: str) -> bool:
        """Stop a request (waiting or running); False when it is not known (finished or never added)."""
        return self.scheduler.cancel(key)

    def step(self) -> list[tuple[str, int, str | None]]:
        """One iteration. Returns (key, token, finish reason or None) for every sequence that got a token."""
        from yitrt.reference.runtime import pick_tokens

        plan = self.scheduler.plan()
        self.speculation, self.logits = {}, {}
        if plan is None:
            return []
        results = self.runtime._call("run_step", plan)
        emitted: dict[str, list[int]] = {}
        seqs = {s.key: s for s in self.scheduler.running}
        for seg, result in zip((s for s in plan.segments if s.sample), results, strict=True):
            seq = seqs[seg.key]
            if seq.draft is not None:
                seq.partial.append(result)
                if seg.past + len(seg.tokens) == len(seq.feed):
                    emitted[seq.key] = self._verify(seq)
            elif seq.rows and isinstance(result, list):
                tokens, accepted = seq.lookahead.advance(seq.tokens[-1], result[0], seq.rows, result[1:], seq.candidates)
                emitted[seq.key] = tokens
                self._count(seq, accepted, seq.lookahead.sizes.ngram - 1 if seq.candidates else 0)
            elif isinstance(result, list):
                emitted[seq.key] = result[:1]
            else:
                emitted[seq.key] = [int(pick_tokens(result, seq.sampling, seq.generator)[0])]
                if seq.want_logits:
                    self.logits[seq.key] = result[0]
        events = self.scheduler.finish(emitted)
        self.iterations += 1
        record = self.scheduler.records[-1]
        self.last = {"context_tokens": sum(n for _, n, phase in record.segments if phase == "context"),
                     "generation_requests": sum(1 for _, _, phase in record.segments if phase == "generation"),
                     "scheduled": len(record.segments),
                     "context_requests": sum(1 for _, _, phase in record.segments if phase == "context"),
                     "paused": len(record.paused)}
        return events

    def _verify(self, seq: Sequence) -> list[int]:
        """A verification request's tokens from its K + 1 rows (gathered over its chunks)."""
        if isinstance(seq.partial[0], list):
            tokens = accept_greedy([t for rows in seq.partial for t in rows], seq.draft.tokens)
        else:
            tokens = accept_sampled(torch.cat(seq.partial), seq.draft, seq.sampling, seq.generator)
        self._count(seq, len(tokens) - 1, len(seq.draft.tokens))
        return tokens

    def _count(self, seq: Sequence, accepted: int, offered: int) -> None:
        seq.accepted += accepted
        seq.drafted += offered
        self.speculation[seq.key] = (accepted, offered)

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
            **({"lora_cache": self.adapters.stats()} if self.adapters is not None else {}),
        }
