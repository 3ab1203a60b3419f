"""Iteration-level scheduling, as TensorRT-LLM's batch manager does it (reference/triton-repository.md §1.5,
trtllm-serving-features.md §3).

Each iteration (one forward of the model over a packed batch):

1. **Capacity** — waiting requests (paused ones first, then new ones in arrival order) join the running set while it
   has fewer than ``max_batch_size`` requests and the policy lets them:
   ``guaranteed_no_evict`` admits a request only if the free KV blocks, less what the running requests still need to
   reach their longest possible length, hold the new one's longest possible length (so nothing is ever evicted);
   ``max_utilization`` admits it if the blocks of its first step are free, and when a running request later needs a
   block that is not there, pauses the most recently admitted requests (their blocks are released; with reuse on,
   their full blocks stay cached) and resumes them later by recomputing their context — prompt and the tokens they
   have generated so far.
2. **Micro-batch** — requests in generation take one token each, then requests in their context phase take their
   remaining prompt, in admission order, within ``max_num_tokens`` tokens per iteration. With
   ``enable_chunked_context`` a prompt that does not fit is cut into chunks of whole blocks; without it the prompt
   waits for an iteration with room (a prompt longer than ``max_num_tokens`` is refused on arrival, as the engine
   refuses it). A resumed request's recomputed context is chunked either way.
3. **Blocks** — every scheduled request gets the blocks its new tokens need; cached blocks of a shared prefix are
   referenced instead of recomputed when reuse is on (blocks of the same LoRA task only: ``prefix_tree``).

A LoRA request (``Sequence.adapter``, a task id) is admitted only when its adapter is on the device cache or can be
put there (``adapters.AdapterCache.admit``: least recently used adapters that no running request uses are evicted);
otherwise it waits at the head of the queue, as TensorRT-LLM's capacity scheduler holds back a request whose PEFT
pages do not fit (trtllm-serving-features.md §2.5).

``Scheduler.plan()`` returns the iteration's ``StepPlan`` (what every rank computes); ``Scheduler.finish()`` takes the
sampled tokens back. ``records`` keeps what each iteration scheduled, for tests and the metrics.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from yitrt.errors import UsageError
from yitrt.reference.engine.kv_pool import BlockManager, Copy, NoFreeBlock, blocks_for
from yitrt.reference.engine.prefix_tree import Node

#: batch_scheduler_policy values (reference/triton-repository.md §1.5); this module imports no torch, so deploy can use it
POLICIES = ("guaranteed_no_evict", "max_utilization")


@dataclass(frozen=True)
class EngineConfig:
    """The batch manager's settings: the ``tensorrt_llm`` model's parameters (and the engine limits they stand for).

    Attributes:
        max_batch_size: requests in the running set.
        max_num_tokens: tokens per iteration (context chunks and generation tokens together).
        tokens_per_block: tokens per KV block.
        primary_blocks / host_blocks: KV pool sizes (host 0: no secondary pool).
        policy: ``guaranteed_no_evict`` or ``max_utilization``.
        reuse: KV-cache block reuse (``enable_kv_cache_reuse``).
        chunked_context: ``enable_chunked_context``.
        max_draft_len: draft-target — the most draft tokens a request may carry (the engine's ``--max_draft_len``;
            0: the model takes none).
        lookahead: lookahead decoding's model-level (W, N, G) (``decoding_mode: lookahead``), or None.
    """

    max_batch_size: int = 8
    max_num_tokens: int = 8192
    tokens_per_block: int = 32
    primary_blocks: int = 1024
    host_blocks: int = 0
    policy: str = "guaranteed_no_evict"
    reuse: bool = True
    chunked_context: bool = False
    max_draft_len: int = 0
    lookahead: Any = None  # LookaheadSizes
    lora: Any = None  # adapters.LoraCacheConfig: LoRA requests are served (None: refused)

    @property
    def scratch_tokens(self) -> int:
        """KV slots outside the pool for the rows of lookahead's tree (every running request's, at most)."""
        return self.max_batch_size * (self.lookahead.decoding_tokens - 1) if self.lookahead else 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_batch_size", "max_num_tokens", "tokens_per_block", "primary_blocks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        tpb = self.tokens_per_block
        if isinstance(tpb, int) and (tpb < 2 or tpb & (tpb - 1)):
            problems.append(f"tokens_per_block must be a power of two greater than 1, got {tpb}")  # §3 (KV-doc)
        if not isinstance(self.host_blocks, int) or self.host_blocks < 0:
            problems.append(f"host_blocks must be >= 0, got {self.host_blocks!r}")
        if not isinstance(self.max_draft_len, int) or self.max_draft_len < 0:
            problems.append(f"max_draft_len must be >= 0, got {self.max_draft_len!r}")
        if self.lookahead is not None and self.max_draft_len:
            problems.append("a model is either draft-target (max_draft_len) or lookahead, not both")
        if self.policy not in POLICIES:
            problems.append(f"batch_scheduler_policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if problems:
            raise UsageError("; ".join(problems), "fix the tensorrt_llm model's parameters in config.pbtxt")


@dataclass
class Sequence:
    """One request's state in the batch manager."""

    key: str
    prompt: list[int]
    rule: Any  # StopRule
    sampling: Any  # Sampling
    order: int
    generator: Any = None  # a sampled request's own torch.Generator
    new: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)  # primary blocks, in token order
    nodes: list[Node] = field(default_factory=list)  # cached nodes of the table's first full blocks
    computed: int = 0  # tokens whose keys and values are in the table
    context_end: int = 0  # the context phase ends here (prompt, or prompt + generated for a resumed request)
    admitted: int = -1  # admission counter (the most recent is paused first)
    resumed: bool = False
    draft: Any = None  # DraftTokens: a draft-target verification request (one step over prompt + draft, then it ends)
    lookahead: Any = None  # LookaheadState: a lookahead request
    partial: list = field(default_factory=list)  # a verification request's logits results from earlier chunks
    rows: list = field(default_factory=list)  # this iteration's lookahead tree rows (token, parent)
    candidates: list = field(default_factory=list)  # ... and the verification candidates among them
    want_logits: bool = False  # return_generation_logits: the rank returns its logits rows
    accepted: int = 0  # draft tokens accepted so far
    drafted: int = 0  # draft tokens offered so far
    adapter: int | None = None  # LoRA task id (None: the base model)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.new

    @property
    def feed(self) -> list[int]:
        """The tokens whose keys and values this sequence computes: its tokens, then a verification request's draft."""
        return self.prompt + self.new + list(self.draft.tokens) if self.draft else self.prompt + self.new

    @property
    def logits_from(self) -> int:
        """The first position whose logits this sequence needs (a verification request: its last prompt position)."""
        return len(self.feed) - 1 - (len(self.draft.tokens) if self.draft else 0)

    @property
    def final_len(self) -> int:
        """The most tokens this sequence can ever hold in the cache (the last generated one is never fed back)."""
        return max(len(self.prompt) + self.rule.max_new - 1, len(self.feed))

    @property
    def in_context(self) -> bool:
        return self.computed < self.context_end


@dataclass(frozen=True)
class Segment:
    """One sequence's part of an iteration: ``tokens`` at positions ``past .. past+len-1`` with the block table that
    holds (after the forward) all ``past + len`` cached tokens; ``sample``: its last ``logits`` positions' logits are
    returned (1: the next token; a verification request: the last prompt position and every draft position).

    ``forks``: lookahead's tree rows after the last token, ``(token, parent)`` with parent −1 for the last token, else an
    earlier fork; fork *i* keeps its keys and values in scratch slot ``scratch + i`` and attends to the sequence's
    cached tokens and its own chain of parents; each returns its logits. ``ban_rows``: ``banned`` applies to the first
    this many returned rows (end ids under ``min_tokens``)."""

    key: str
    tokens: tuple[int, ...]
    past: int
    table: tuple[int, ...]
    context: bool
    sample: bool
    banned: tuple[int, ...] = ()  # token ids masked before choosing (end ids under min_tokens)
    greedy: bool = True
    logits: int = 1
    forks: tuple[tuple[int, int], ...] = ()
    scratch: int = 0
    ban_rows: int = 1
    adapter: int | None = None  # LoRA task id whose adapter the ranks apply to these rows (None: the base model)


@dataclass(frozen=True)
class StepPlan:
    """What every rank computes in one iteration: block copies between the pools first, then the segments."""

    segments: tuple[Segment, ...]
    copies: tuple[Copy, ...] = ()


@dataclass(frozen=True)
class StepRecord:
    """What one iteration scheduled: (key, tokens, phase) per segment, and the pool after it."""

    step: int
    segments: tuple[tuple[str, int, str], ...]
    running: int
    waiting: int
    paused: tuple[str, ...]
    used_blocks: int

    @property
    def tokens(self) -> int:
        return sum(n for _, n, _ in self.segments)


class Scheduler:
    """The batch manager's decisions, one iteration at a time (no tensors: ranks compute the plans)."""

    def __init__(self, config: EngineConfig, adapters: Any = None) -> None:
        self.config = config
        #: the LoRA adapter cache (``adapters.AdapterCache``; None: no LoRA) — told who uses which adapter
        self.adapters = adapters
        self.blocks = BlockManager(config.primary_blocks, config.host_blocks, config.tokens_per_block, config.reuse)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.records: list[StepRecord] = []
        self.completed = 0
        self.paused_total = 0
        self._orders = 0
        self._admissions = 0
        self._step = 0
        self._last: tuple[list[tuple[Sequence, int]], list[Sequence]] | None = None

    # ---- requests ----
    def check(self, prompt_len: int, max_new: int) -> None:
        """Refuse on arrival what could never be scheduled.

        Raises:
            UsageError: the request needs more KV blocks than the pool has, or (without chunked context) a prompt
                longer than ``max_num_tokens``.
        """
        c = self.config
        need = blocks_for(prompt_len + max_new - 1, c.tokens_per_block)
        if need > c.primary_blocks:
            raise UsageError(f"the request needs {need} KV blocks ({prompt_len} prompt + {max_new} new tokens), the pool holds "
                             f"{c.primary_blocks} of {c.tokens_per_block} tokens",
                             "raise max_tokens_in_paged_kv_cache (or yitrt_kv_cache_bytes) in the tensorrt_llm config, or ask for fewer tokens")
        if not c.chunked_context and prompt_len > c.max_num_tokens:
            raise UsageError(f"the prompt has {prompt_len} tokens, more than max_num_tokens {c.max_num_tokens} without chunked context",
                             "enable_chunked_context true, raise max_num_tokens, or shorten the prompt")

    def add(self, seq: Sequence) -> None:
        """Queue a checked request."""
        self.check(len(seq.prompt), seq.rule.max_new)
        if seq.draft is not None:
            self.check(len(seq.feed), 1)
        seq.order = self._orders
        self._orders += 1
        seq.context_end = len(seq.feed)
        self.waiting.append(seq)

    def cancel(self, key: str) -> bool:
        """Drop a waiting or running request (its blocks are released at once); False when it is unknown."""
        for seq in self.waiting:
            if seq.key == key:
                self.waiting.remove(seq)
                self._leave(seq)
                return True
        for seq in self.running:
            if seq.key == key:
                self._release(seq)
                self.running.remove(seq)
                self._leave(seq)
                return True
        return False

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # ---- one iteration ----
    def plan(self) -> StepPlan | None:
        """Decide the next iteration (None: nothing can run)."""
        copies: list[Copy] = []
        self._admit(copies)
        chosen = self._micro_batch()
        paused = self._allocate(chosen, copies)
        self._step += 1
        if not chosen:
            self._last = None
            return None
        segments, scratch = [], 0
        for seq, n in chosen:
            segments.append(self._segment(seq, n, scratch))
            scratch += len(seq.rows)
        segments = tuple(segments)
        self._last = (chosen, paused)
        return StepPlan(segments, tuple(copies))

    def finish(self, emitted: dict[str, list[int]]) -> list[tuple[str, int, str | None]]:
        """Apply the iteration's results: the tokens each sequence whose segment sampled emits (one; a speculative
        step's accepted run). Returns (key, token, finish reason) events, in segment order — a run is cut at its first
        finishing token; finished requests (and verification requests, after their one step) leave the running set and
        release their blocks."""
        assert self._last is not None, "finish() without a plan"
        chosen, paused = self._last
        self._last = None
        events = []
        for seq, n in chosen:
            seq.computed += n
            self._commit(seq)
            if seq.computed < len(seq.feed):
                continue  # a context chunk: no token yet
            reason = None
            for token in emitted[seq.key]:
                seq.new.append(token)
                reason = seq.rule.finish_reason(seq.new)
                if reason is None and seq.draft is not None and len(seq.new) == len(emitted[seq.key]):
                    reason = "length"  # a verification request answers its one step
                events.append((seq.key, token, reason))
                if reason is not None:
                    break
            if reason is not None:
                self._release(seq)
                self.running.remove(seq)
                self._leave(seq)
                self.completed += 1
        c = self.blocks
        self.records.append(StepRecord(self._step, tuple((s.key, n, "context" if s.computed - n < s.context_end else "generation")
                                                         for s, n in chosen),
                                       len(self.running), len(self.waiting), tuple(s.key for s in paused), c.used_blocks()))
        return events

    # ---- internals ----
    def _admit(self, copies: list[Copy]) -> None:
        c = self.config
        while self.waiting and len(self.running) < c.max_batch_size:
            seq = self.waiting[0]
            nodes = self.blocks.match(seq.feed, seq.logits_from, seq.adapter)
            resident, idle = self.blocks.resident_idle(nodes)
            free = self.blocks.free_blocks() - idle  # idle matched blocks stop being free once referenced
            if c.policy == "guaranteed_no_evict":
                reserved = sum(blocks_for(s.final_len, c.tokens_per_block) - len(s.table) for s in self.running)
                fits = blocks_for(seq.final_len, c.tokens_per_block) - resident <= free - reserved
            else:
                first = min(len(seq.tokens), len(nodes) * c.tokens_per_block + c.max_num_tokens)
                fits = blocks_for(first, c.tokens_per_block) - resident <= free
            if not fits:
                break  # first come, first served: nothing overtakes the head of the queue
            if seq.adapter is not None and self.adapters is not None and not self.adapters.admit(seq.key, seq.adapter):
                break  # its adapter does not fit the device cache until a running request using another one ends
            self.waiting.popleft()
            seq.table = self.blocks.acquire(nodes, copies)
            seq.nodes = list(nodes)
            seq.computed = len(nodes) * c.tokens_per_block
            seq.context_end = len(seq.feed)
            seq.admitted = self._admissions
            self._admissions += 1
            self.running.append(seq)

    def _micro_batch(self) -> list[tuple[Sequence, int]]:
        c = self.config
        budget, chosen = c.max_num_tokens, []
        for seq in self.running:  # lookahead rows are this iteration's only (a paused and resumed request has none)
            seq.rows, seq.candidates = [], []
        generation = [s for s in self.running if not s.in_context]
        context = [s for s in self.running if s.in_context]
        for seq in generation:
            n = len(seq.tokens) - seq.computed  # 1, or a lookahead step's accepted run fed back
            if budget < n:
                break
            if seq.lookahead is not None and seq.sampling.greedy and not seq.want_logits and len(seq.new) >= seq.rule.min_new:
                seq.rows, seq.candidates = seq.lookahead.rows(seq.tokens[-1], budget - n)
            chosen.append((seq, n))
            budget -= n + len(seq.rows)
        for seq in context:
            remaining = len(seq.feed) - seq.computed
            if remaining <= budget:
                n = remaining
            elif c.chunked_context or seq.resumed:
                n = budget // c.tokens_per_block * c.tokens_per_block  # chunks end on block boundaries
            else:
                break  # the prompt waits for an iteration with room for all of it
            if n < 1:
                break
            chosen.append((seq, n))
            budget -= n
        return chosen

    def _allocate(self, chosen: list[tuple[Sequence, int]], copies: list[Copy]) -> list[Sequence]:
        """Blocks for every scheduled segment; under max_utilization pause the newest requests when none is left."""
        paused: list[Sequence] = []
        i = 0
        while i < len(chosen):
            seq, n = chosen[i]
            try:
                while len(seq.table) < blocks_for(seq.computed + n, self.config.tokens_per_block):
                    seq.table.append(self.blocks.allocate(copies))
                i += 1
            except NoFreeBlock:
                if self.config.policy == "guaranteed_no_evict":
                    raise AssertionError("guaranteed_no_evict ran out of KV blocks") from None
                victim = max(self.running, key=lambda s: s.admitted)
                self._pause(victim)
                paused.append(victim)
                at = next((j for j, (s, _) in enumerate(chosen) if s is victim), None)
                if at is not None:
                    del chosen[at]
                    if at < i:
                        i -= 1
        return paused

    def _pause(self, seq: Sequence) -> None:
        self._release(seq)
        self.running.remove(seq)
        if seq.adapter is not None and self.adapters is not None:
            self.adapters.pause(seq.key, seq.adapter)  # off the device cache's users; still the host cache's
        seq.computed, seq.resumed = 0, True
        self.waiting.appendleft(seq)
        self.paused_total += 1

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq.table)
        seq.table, seq.nodes = [], []

    def _leave(self, seq: Sequence) -> None:
        """The request is gone (finished or cancelled): its adapter loses a user."""
        if seq.adapter is not None and self.adapters is not None:
            self.adapters.leave(seq.key, seq.adapter)

    def _commit(self, seq: Sequence) -> None:
        """Cache the sequence's blocks that became full (a verification request's draft included: a block's keys and
        values are those of its tokens, whether or not the draft is accepted)."""
        if not self.config.reuse:
            return
        b = self.config.tokens_per_block
        tokens = seq.feed
        while len(seq.nodes) < seq.computed // b:
            i = len(seq.nodes)
            parent = seq.nodes[-1] if seq.nodes else None
            seq.nodes.append(self.blocks.commit(parent, tuple(tokens[i * b : (i + 1) * b]), seq.table[i], seq.adapter))

    def _segment(self, seq: Sequence, n: int, scratch: int) -> Segment:
        feed, end = seq.feed, seq.computed + n
        rule = seq.rule
        if seq.draft is not None:  # logits of the last prompt position and every draft position
            first = seq.logits_from
            logits = end - max(seq.computed, first) if end > first else 0
        else:
            logits = 1 if end == len(feed) else 0
        done = sum(len(rows) for rows in seq.partial)  # rows an earlier chunk returned
        ban_rows = max(0, rule.min_new - len(seq.new) - done) if seq.draft is not None else 1
        banned = tuple(rule.end_ids) if logits and len(seq.new) < rule.min_new else ()
        return Segment(seq.key, tuple(feed[seq.computed:end]), seq.computed, tuple(seq.table), seq.in_context, logits > 0,
                       banned, seq.sampling.greedy and not seq.want_logits, max(logits, 1), tuple(seq.rows), scratch, ban_rows,
                       seq.adapter)
