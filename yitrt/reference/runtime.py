"""The reference runtime: score and generate with a TensorRT-LLM checkpoint, one process per TP rank.

``ReferenceRuntime`` checks the checkpoint against its config, then runs a ``RankEngine`` per tensor-parallel
rank — in this process when tp = 1, else in tp spawned processes joined by a gloo process group, each loading
only its own rank files (every pipeline stage of its TP slice, run in order). Scoring runs batches of equal-length
sequences; generation runs on the engine loop (``yitrt.reference.engine``: packed iterations over a paged KV cache),
whose plans every rank computes alike; rank 0 returns the chosen tokens (or a sampled row's logits), so every rank
feeds the same ids.

Rank processes are forked from a ``forkserver`` process that has imported torch and this module (``spawn`` where
forkserver does not exist); the calling process is never forked, since a forked torch process is not safe. A script
that creates a multi-rank runtime should still guard its entry point with ``if __name__ == "__main__":`` (``spawn``
re-imports it) — the CLI does.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from yitrt import errors
from yitrt.errors import UsageError, YitrtError
from yitrt.reference import COMPUTE_DTYPES, DEVICES
from yitrt.reference.comm import Comm, GlooComm, LocalComm
from yitrt.reference.layout import check_checkpoint
from yitrt.reference.model import RankModel
from yitrt.reference.spec import CheckpointSpec, emulation_notes, load_spec

TORCH_DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}
_SCORE_TOKEN_BUDGET = 2048  # tokens per forward while scoring: bounds the [B, T, vocab] logits block
_READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    Attributes:
        greedy: argmax (the other fields are ignored).
        temperature, top_k, top_p: sampling filters (top_k 0 and top_p 1.0 disable them).
        seed: seed of the sampling generator (runs are reproducible).
    """

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class StopRule:
    """When one sequence of a batch stops (the checks TensorRT-LLM's executor makes per request).

    Attributes:
        max_new: at most this many new tokens.
        end_ids: a token that ends the sequence (the request's end id, extra eos ids).
        stop_sequences: token sequences that end it once the output ends with one of them.
        min_new: no end id is chosen before this many new tokens (their logits are masked, as TensorRT-LLM's
            ``min_tokens`` does; stop sequences still stop).
    """

    max_new: int
    end_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    min_new: int = 0

    def finish_reason(self, new: list[int]) -> str | None:
        """``end_id``, ``stop_words`` or ``length`` when ``new`` (the output so far) is finished, else None."""
        if new and new[-1] in self.end_ids:
            return "end_id"
        if any(seq and tuple(new[-len(seq):]) == seq for seq in self.stop_sequences):
            return "stop_words"
        return "length" if len(new) >= self.max_new else None


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU.

    Raises:
        UsageError: an unknown device, or CUDA asked for where there is none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}", "use one of: " + ", ".join(DEVICES))
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch sees no CUDA device", "use --device cpu (or auto)")
    return torch.device(device)


def filtered_scores(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """float32 logits [B, V] → the scores a sampled request draws from (temperature, then top-k, then top-p; removed
    tokens −inf), on CPU. Greedy: the logits with everything but each row's argmax removed (a one-hot distribution)."""
    scores = logits.to(torch.float32).cpu()
    if sampling.greedy:
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.argmax(dim=-1, keepdim=True), True)
        return scores.masked_fill(~keep, float("-inf"))
    scores = scores / max(sampling.temperature, 1e-6)
    if sampling.top_k > 0:
        kth = scores.topk(min(sampling.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > sampling.top_p  # keep the smallest prefix reaching top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return scores


def pick_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Next token per row of float32 logits [B, V]."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    scores = filtered_scores(logits, sampling)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1).to(logits.device)


class RankEngine:
    """Scoring and generation on one TP rank (collectives keep the ranks in step)."""

    def __init__(self, spec: CheckpointSpec, tp_rank: int, comm: Comm, device: torch.device, compute: torch.dtype) -> None:
        self.comm, self.device = comm, device
        self.model = RankModel(spec, tp_rank, comm, device, compute)
        self.tp_rank = tp_rank

    def info(self) -> dict[str, Any]:
        """Which process and device this rank runs in."""
        return {"tp_rank": self.tp_rank, "pid": os.getpid(), "device": str(self.device), "layers": len(self.model.layers)}

    def score(self, sequences: list[list[int]], decode_tail: int = 0, weights_only: bool = False,
              adapter: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """Logits of every position of every sequence.

        The first ``len - decode_tail`` tokens of a sequence go through one context pass; the last
        ``decode_tail`` are fed one step at a time through the KV cache (teacher forcing), as generation would
        read them — the path where a quantized KV cache acts. ``weights_only`` runs the stored weights with
        unquantized activations and K/V (``DecodedWeight.weights_only``; LoRA deltas are unquantized either way).
        ``adapter``: the LoRA task id (``load_adapter``) every sequence runs with.

        Returns:
            (float32 logits [sum of lengths, vocab] on CPU, the lengths).
        """
        if adapter is not None:
            self.model.adapter(adapter)  # an unknown task id is refused before anything runs
        self.model.weights_only = weights_only
        try:
            return self._score(sequences, decode_tail, adapter)
        finally:
            self.model.weights_only = False

    def load_adapter(self, task_id: int, weights, config, max_lora_rank: int | None = None, enabled: set[str] | None = None,
                     engine_dtype: str | None = None) -> None:
        """Validate a LoRA adapter's request tensors against the checkpoint (``yitrt.lora.format.unpack``: TensorRT-LLM's
        checks and messages) and keep this rank's slices under ``task_id``, replacing any adapter loaded under it.

        Args:
            task_id: the request's ``lora_task_id``.
            weights: ``lora_weights`` [rows, max_row_len] or [1, rows, max_row_len] (numpy or torch; bf16 allowed).
            config: ``lora_config`` [rows, 3] or [1, rows, 3] int32.
            max_lora_rank, enabled, engine_dtype: the engine's limits, checked when given (None: not checked).

        Raises:
            LoraError: the tensors do not fit this checkpoint.
        """
        from yitrt.reference.lora import RankAdapter

        m = self.model
        m.adapters[task_id] = RankAdapter.load(m.spec, self.tp_rank, weights, config, self.device, max_lora_rank, enabled, engine_dtype)

    def drop_adapter(self, task_id: int) -> bool:
        """Forget the adapter of ``task_id``; False when none was loaded under it."""
        return self.model.adapters.pop(task_id, None) is not None

    def _score(self, sequences: list[list[int]], decode_tail: int, adapter: int | None = None) -> tuple[torch.Tensor, list[int]]:
        out: dict[int, torch.Tensor] = {}
        by_length: dict[int, list[int]] = {}
        for i, seq in enumerate(sequences):
            by_length.setdefault(len(seq), []).append(i)
        for length, members in by_length.items():
            tail = min(decode_tail, length - 1)
            per_batch = max(1, _SCORE_TOKEN_BUDGET // length)
            for start in range(0, len(members), per_batch):
                batch = members[start : start + per_batch]
                for i, logits in zip(batch, self._score_equal([sequences[i] for i in batch], length - tail, adapter), strict=True):
                    out[i] = logits
        return torch.cat([out[i] for i in range(len(sequences))]), [len(s) for s in sequences]

    def _score_equal(self, seqs: list[list[int]], context: int, adapter: int | None = None) -> list[torch.Tensor]:
        model, dev = self.model, self.device
        ids = torch.tensor(seqs, dtype=torch.long, device=dev)
        b, n = ids.shape
        cache = model.new_cache()
        positions = torch.arange(n, device=dev).expand(b, n)
        valid = torch.ones(b, n, dtype=torch.bool, device=dev)
        parts = [model.forward(ids[:, :context], positions[:, :context], valid[:, :context], cache, adapter=adapter).cpu()]
        for t in range(context, n):
            parts.append(model.forward(ids[:, t : t + 1], positions[:, t : t + 1], valid[:, : t + 1], cache, adapter=adapter).cpu())
        logits = torch.cat(parts, dim=1)
        return list(logits.unbind(0))

    # ---- the engine loop's rank side (yitrt/reference/engine) ----
    def init_pool(self, primary_blocks: int, host_blocks: int, tokens_per_block: int, scratch_tokens: int = 0) -> None:
        """Allocate this rank's paged KV cache (its KV heads), replacing any earlier one; ``scratch_tokens`` slots past
        the pool hold lookahead's tree rows."""
        from yitrt.reference.engine.kv_pool import KvStorage

        m = self.model
        self.kv = None
        self.kv = KvStorage(len(m.layers), primary_blocks, host_blocks, tokens_per_block, m.kv_heads, m.spec.head_size,
                            m.compute, self.device, scratch_tokens)
        self.scratch_base = primary_blocks * tokens_per_block

    def run_step(self, plan) -> list[list[int] | torch.Tensor]:
        """Compute one ``StepPlan``: block copies, then the packed forward. Returns, per sampling segment, its greedy
        tokens (one per returned row: its last ``logits`` positions, then its forks) or (sampled segments) their float32
        logits rows [logits, vocab] on CPU, banned ids already masked in the first ``ban_rows`` rows."""
        from yitrt.reference.model import PackedSegment, PackedStep

        kv, dev = self.kv, self.device
        kv.copy(list(plan.copies))
        tpb = kv.tokens_per_block
        ids, positions, seq_lens, segments, logit_rows, start = [], [], [], [], [], 0
        offsets = torch.arange(tpb)
        for seg in plan.segments:
            count, end = len(seg.tokens), seg.past + len(seg.tokens)
            slots = (torch.tensor(seg.table, dtype=torch.long)[:, None] * tpb + offsets).reshape(-1)[:end]
            ids.extend(seg.tokens)
            positions.extend(range(seg.past, end))
            seq_lens.extend([end] * count)
            adapter = getattr(seg, "adapter", None)  # the request's LoRA task id (its adapter is loaded on every rank)
            segments.append(PackedSegment(start, count, seg.past, slots.to(dev), seg.context, adapter))
            if seg.sample:
                logit_rows.extend(range(start + count - seg.logits, start + count))
            start += count
            chains: list[torch.Tensor] = []
            for i, (token, parent) in enumerate(seg.forks):  # lookahead's tree: one-token rows on their own chains
                own = torch.tensor([self.scratch_base + seg.scratch + i], dtype=torch.long)
                chain = torch.cat([slots if parent < 0 else chains[parent], own])
                chains.append(chain)
                ids.append(token)
                positions.append(chain.numel() - 1)
                seq_lens.append(chain.numel())
                segments.append(PackedSegment(start, 1, chain.numel() - 1, chain.to(dev), False, adapter))
                logit_rows.append(start)
                start += 1
        step = PackedStep(torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(positions, dtype=torch.long, device=dev),
                          torch.tensor(seq_lens), tuple(segments), torch.tensor(logit_rows, dtype=torch.long, device=dev))
        logits = self.model.forward_packed(step, kv)
        out: list[list[int] | torch.Tensor] = []
        at = 0
        for seg in (s for s in plan.segments if s.sample):
            rows = logits[at : at + seg.logits + len(seg.forks)]
            at += seg.logits + len(seg.forks)
            if seg.banned and seg.ban_rows:
                rows = rows.clone()
                rows[: seg.ban_rows, list(seg.banned)] = float("-inf")
            out.append([int(t) for t in rows.argmax(dim=-1)] if seg.greedy else rows.cpu())
        return out


def _exit_with_parent(watch) -> None:
    """Block on the parent's watch pipe; when it closes (the parent exited, however it died), exit at once."""
    try:
        watch.recv()
    except (EOFError, OSError):
        pass
    os._exit(1)


def _worker(folder: str, tp_rank: int, device: str, compute: str, init_file: str, commands, results, watch=None) -> None:
    """A TP rank's process: load its slice, then serve commands until told to stop (or until the parent is gone)."""
    if watch is not None:
        import threading

        threading.Thread(target=_exit_with_parent, args=(watch,), daemon=True, name="parent-watch").start()
    comm = None
    try:
        spec = load_spec(Path(folder))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.tp))
        comm = GlooComm(tp_rank, spec.tp, init_file)
        dev = torch.device(device)
        if dev.type == "cuda":
            dev = torch.device("cuda", tp_rank % torch.cuda.device_count())
        engine = RankEngine(spec, tp_rank, comm, dev, TORCH_DTYPES[compute])
        results.put(("ready", tp_rank, engine.info()))
        while (command := commands.get()) is not None:
            name, args = command
            value = getattr(engine, name)(*args)
            if tp_rank == 0:
                results.put(("ok", 0, value))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        hint = exc.hint if isinstance(exc, YitrtError) else ""
        results.put(("error", tp_rank, (type(exc).__name__, str(exc) if not isinstance(exc, YitrtError) else exc.message, hint, traceback.format_exc())))
    finally:
        if comm is not None:
            try:
                comm.close()
            except Exception:  # noqa: BLE001 - the group may already be broken
                pass


def check_tokens(spec: CheckpointSpec, sequences: list[list[int]], new_tokens: int | None = 0) -> None:
    """Refuse what no engine would take: token ids outside the vocab, and (unless ``new_tokens`` is None) sequences
    that with ``new_tokens`` more would exceed the checkpoint's context — max_position_embeddings × the rotary
    factor, what TensorRT-LLM's build makes its default max_seq_len (an engine refuses longer requests; a runtime
    asked for 10^11 new tokens would otherwise generate until memory is gone).

    Raises:
        UsageError: the first offending id or length, named.
    """
    from yitrt.models.config import context_length

    vocab, limit = spec.vocab_size, context_length(spec.max_position_embeddings, spec.rotary_scaling)
    for i, seq in enumerate(sequences):
        bad = next((t for t in seq if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab)), None)
        if bad is not None:
            raise UsageError(f"sequence {i} holds token id {bad!r}, outside the vocab of {vocab}", "encode with the model's own tokenizer")
        if new_tokens is not None and len(seq) + new_tokens > limit:
            what = f"{len(seq)} tokens" + (f" + {new_tokens} new" if new_tokens else "")
            raise UsageError(f"sequence {i} needs {what}, more than the checkpoint's context of {limit} tokens",
                             "shorten the prompt or ask for fewer new tokens")


class RemoteTraceback(Exception):
    """A rank process's traceback, attached as the cause of the error the parent raises."""


class ReferenceRuntime:
    """A TensorRT-LLM checkpoint, runnable on CPU (or CUDA) for verification.

    Args:
        checkpoint: folder with config.json + rank{r}.safetensors.
        device: ``auto``, ``cpu`` or ``cuda``.
        compute_dtype: dtype activations and GEMM accumulations are carried in; float32 (default) computes the
            checkpoint's exact values without adding rounding of its own; the model dtype comes closer to an
            engine's fp16/bf16 activations.

    Raises:
        CheckpointError / UnsupportedModelError: the checkpoint is malformed or uses a format that cannot be
            emulated faithfully (named in the message).
    """

    def __init__(self, checkpoint: Path, device: str = "auto", compute_dtype: str = "float32") -> None:
        if compute_dtype not in COMPUTE_DTYPES:
            raise UsageError(f"unknown compute dtype {compute_dtype!r}", "use one of: " + ", ".join(COMPUTE_DTYPES))
        self.spec = load_spec(Path(checkpoint))
        self.warnings = check_checkpoint(self.spec) + emulation_notes(self.spec)
        self.device = resolve_device(device)
        self._procs: list = []
        self._local: RankEngine | None = None
        self.ranks: list[dict[str, Any]] = []
        #: LoRA task ids loaded on the ranks (``load_adapter``)
        self.adapters: set[int] = set()
        if self.spec.tp == 1:
            self._local = RankEngine(self.spec, 0, LocalComm(), self.device, TORCH_DTYPES[compute_dtype])
            self.ranks = [self._local.info()]
        else:
            self._spawn(compute_dtype)

    def _spawn(self, compute_dtype: str) -> None:
        import torch.multiprocessing as mp

        # forkserver: one server process imports torch and this module once, then forks every rank from it (the
        # caller itself is never forked: a forked torch process is not safe). Later runtimes reuse the server.
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["yitrt.reference.runtime"])
        else:
            ctx = mp.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory(prefix="yitrt-tp-")
        init_file = os.path.join(self._tmp.name, "rendezvous")
        self._results = ctx.Queue()
        self._commands = [ctx.Queue() for _ in range(self.spec.tp)]
        # the ranks are the forkserver's children, not ours: neither daemon=True nor PDEATHSIG reaches them when this
        # process is SIGKILLed. Each rank watches the read end of a pipe only this process can write: EOF = we are gone.
        watch, self._watch = ctx.Pipe(duplex=False)
        for rank in range(self.spec.tp):
            proc = ctx.Process(
                target=_worker, daemon=True,
                args=(str(self.spec.path), rank, self.device.type, compute_dtype, init_file, self._commands[rank], self._results, watch),
            )
            proc.start()
            self._procs.append(proc)
        ready: dict[int, dict[str, Any]] = {}
        while len(ready) < self.spec.tp:
            kind, rank, value = self._receive(_READY_TIMEOUT_S)
            if kind == "ready":
                ready[rank] = value
        self.ranks = [ready[r] for r in range(self.spec.tp)]

    def _receive(self, timeout: float) -> tuple[str, int, Any]:
        import queue
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                kind, rank, value = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [i for i, p in enumerate(self._procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    what = f"rank {dead[0]} exited (code {self._procs[dead[0]].exitcode})" if dead else "ranks stopped responding"
                    self.close()
                    raise YitrtError(f"reference runtime: {what}", "rerun with YITRT_DEBUG=1; check memory (each rank loads its shards)") from None
                continue
            if kind == "error":
                self.close()
                name, message, hint, trace = value
                cause = RemoteTraceback(f"rank {rank}:\n{trace}")  # shown by YITRT_DEBUG=1 as the cause
                cls = getattr(errors, name, None)
                if isinstance(cls, type) and issubclass(cls, YitrtError) and cls is not errors.ValidationError:
                    raise cls(message, hint) from cause
                raise YitrtError(f"reference runtime rank {rank}: {name}: {message}", "rerun with YITRT_DEBUG=1 for the traceback") from cause
            return kind, rank, value

    def _call(self, name: str, *args: Any) -> Any:
        if self._local is not None:
            return getattr(self._local, name)(*args)
        if not self._procs:
            raise YitrtError("reference runtime is closed", "create a new ReferenceRuntime")
        for q in self._commands:
            q.put((name, args))
        return self._receive(float("inf"))[2]

    def check_tokens(self, sequences: list[list[int]], new_tokens: int | None = 0) -> None:
        """``check_tokens`` for this runtime's checkpoint."""
        check_tokens(self.spec, sequences, new_tokens)

    def score(self, sequences: list[list[int]], decode_tail: int = 0, weights_only: bool = False,
              adapter: int | None = None) -> list[torch.Tensor]:
        """float32 logits [len, vocab] of every position of each sequence (non-empty sequences); the last
        ``decode_tail`` tokens of each are fed one by one through the KV cache (see ``RankEngine.score``);
        ``adapter``: a LoRA task id loaded with ``load_adapter`` that every sequence runs with.

        Raises:
            UsageError: an empty sequence, a token outside the vocab, an adapter not loaded.
        """
        if not sequences or any(not s for s in sequences):
            raise UsageError("nothing to score (an empty token sequence)", "pass non-empty sequences")
        self.check_tokens(sequences, None)  # ids only: scoring past the context is how RoPE scaling is tested
        self._check_adapter(adapter)
        logits, lengths = self._call("score", sequences, decode_tail, weights_only, adapter)
        return list(logits.split(lengths))

    def load_adapter(self, task_id: int, weights, config, max_lora_rank: int | None = None, enabled: set[str] | None = None,
                     engine_dtype: str | None = None) -> None:
        """Load a LoRA adapter's request tensors (``lora_weights``, ``lora_config``: full unsplit matrices, B scaled)
        on every rank under ``task_id`` (see ``RankEngine.load_adapter``); a second load under the same id replaces it.

        Raises:
            UsageError: ``task_id`` is not a non-negative integer (a UINT64).
            LoraError: the tensors do not fit this checkpoint (TensorRT-LLM's request validation messages).
        """
        if not isinstance(task_id, int) or isinstance(task_id, bool) or task_id < 0:
            raise UsageError(f"LoRA task id must be a non-negative integer, got {task_id!r}", "pass the lora_task_id as an unsigned integer")
        if self._local is None:
            # validated here first: an error inside the rank processes would end them (and the runtime)
            from yitrt.reference.lora import unpack_for

            unpack_for(self.spec, weights, config, max_lora_rank, enabled, engine_dtype)
        self._call("load_adapter", task_id, weights, config, max_lora_rank, enabled, engine_dtype)
        self.adapters.add(task_id)

    def drop_adapter(self, task_id: int) -> bool:
        """Forget a LoRA adapter on every rank; False when none was loaded under ``task_id``."""
        if task_id not in self.adapters:
            return False
        self._call("drop_adapter", task_id)
        self.adapters.discard(task_id)
        return True

    def _check_adapter(self, adapter: int | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            raise UsageError(f"LoRA task {adapter} not found in cache. Please send LoRA weights with request",
                             "load the adapter first (ReferenceRuntime.load_adapter)")

    def engine(self, config):
        """An ``EngineLoop`` (in-flight batching, paged KV, reuse) on this runtime, with ``config`` (``EngineConfig``)."""
        from yitrt.reference.engine.loop import EngineLoop

        return EngineLoop(self, config)

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 32, sampling: Sampling | None = None, end_ids: tuple[int, ...] = (),
                 adapter: int | None = None) -> list[list[int]]:
        """New tokens for each prompt (the engine loop, every prompt admitted at once; ``adapter``: the LoRA task id
        every prompt runs with)."""
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}", "pass a positive number")
        new: list[list[int]] = [[] for _ in prompts]
        for events in self.generate_stream(prompts, [StopRule(max_new_tokens, tuple(end_ids))] * len(prompts), sampling, adapter):
            for b, event in enumerate(events):
                if event is not None:
                    new[b].append(event[0])
        return new

    def generate_stream(self, prompts: list[list[int]], rules: list[StopRule], sampling: Sampling | None = None,
                        adapter: int | None = None) -> Iterator[list[tuple[int, str | None] | None]]:
        """Decode the prompts together on an engine loop sized to hold them all, each under its own ``StopRule``
        (every prompt gets ``sampling``; a sampled prompt gets its own generator, seeded with ``sampling.seed``;
        ``adapter``: a loaded LoRA task id every prompt runs with).

        Yields:
            Per iteration, for each prompt: ``(token, finish_reason)`` (reason None while it goes on), or None when
            it got no token in that iteration. A token that ends a sequence is yielded with its reason.
        """
        from yitrt.reference.engine.kv_pool import blocks_for
        from yitrt.reference.engine.scheduler import EngineConfig

        if not prompts or any(not p for p in prompts) or len(rules) != len(prompts):
            raise UsageError("empty prompt or a stop rule missing", "give every prompt at least one token and a StopRule")
        if any(rule.max_new < 1 for rule in rules):
            raise UsageError("max_new must be >= 1", "pass a positive number of new tokens")
        for prompt, rule in zip(prompts, rules, strict=True):
            self.check_tokens([prompt], rule.max_new)
        self._check_adapter(adapter)
        tpb = 32
        blocks = sum(blocks_for(len(p) + r.max_new, tpb) for p, r in zip(prompts, rules, strict=True))
        config = EngineConfig(max_batch_size=len(prompts), max_num_tokens=sum(len(p) for p in prompts) + len(prompts),
                              tokens_per_block=tpb, primary_blocks=blocks, reuse=False)
        loop = self.engine(config)
        keys = [str(i) for i in range(len(prompts))]
        lora = {} if adapter is None else {"adapter": adapter}  # loaded on the ranks already: the loop needs no adapter cache
        for key, prompt, rule in zip(keys, prompts, rules, strict=True):
            loop.add(key, prompt, rule, sampling or Sampling(), **lora)
        while not loop.idle:
            events = {key: (token, reason) for key, token, reason in loop.step()}
            yield [events.get(key) for key in keys]

    def close(self) -> None:
        """Stop the rank processes (idempotent)."""
        procs, self._procs = self._procs, []
        for q in getattr(self, "_commands", []) if procs else []:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        if procs and hasattr(self, "_watch"):
            self._watch.close()  # after the joins: a rank still stopping is not cut short
        if procs and hasattr(self, "_tmp"):
            self._tmp.cleanup()

    def __enter__(self) -> ReferenceRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
