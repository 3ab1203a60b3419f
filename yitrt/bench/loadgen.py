"""The load generator: asyncio over tritonclient's gRPC streaming API (``tritonclient.grpc.aio``).

Each request gets its own bidirectional stream on a shared channel, so every response (and every error) belongs to
exactly one request and a failed request can never be mistaken for another. A request is complete at the response
Triton flags final (``triton_final_response``, set by the BLS model) or when its stream ends (the ensemble, whose
engine closes with an empty final response that Triton does not forward unless asked). Two load shapes:
- fixed concurrency (closed loop): N workers, each sends its next request as soon as its previous one completed;
- request rate (open loop): arrivals at exponential intervals (a Poisson process) from a seeded generator,
  sent whatever is still in flight;
- multi-turn sessions (closed loop over sessions): N workers, each runs one session at a time, turn after turn
  (turn k+1 is built from turn k's answer and sent when it completed), so N sessions are in flight.
The client measures itself while it runs: how late the event loop wakes (every timestamp can be that late), how late
each request went out against its schedule, and the process's CPU time against the wall clock.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from yitrt.bench import acceptance
from yitrt.bench.metrics import RequestRecord, distribution
from yitrt.bench.workload import Prompt, Session, continue_history, render_turn
from yitrt.errors import UsageError, require
from yitrt.triton import client as triton_client
from yitrt.triton import lora_client

#: In-flight streams per gRPC channel (HTTP/2 servers commonly cap concurrent streams per connection at 100).
STREAMS_PER_CHANNEL = 32
#: How often the event-loop lag probe wakes.
LAG_PROBE_S = 0.005
#: The inputs of a text entry model and of a token entry model (``tensorrt_llm``: ids in, ids out).
TEXT_INPUTS = ("text_input", "max_tokens")
TOKEN_INPUTS = ("input_ids", "input_lengths", "request_output_len")


@dataclass(frozen=True)
class Load:
    """One load point: ``concurrency`` (requests kept in flight) or ``rate`` (mean arrivals per second)."""

    kind: str
    value: float

    @property
    def label(self) -> str:
        return f"c={self.value:g}" if self.kind == "concurrency" else f"{self.value:g} req/s"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "label": self.label}


@dataclass(frozen=True)
class Target:
    """The model a benchmark asks, as the server declares it."""

    url: str
    model: str
    inputs: dict[str, str]
    decoupled: bool

    @property
    def reports_counts(self) -> bool:
        return "return_num_output_tokens" in self.inputs

    @property
    def entry(self) -> str:
        """``text`` (text_input/max_tokens: the BLS, the ensemble) or ``tokens`` (input_ids/input_lengths/
        request_output_len: the ``tensorrt_llm`` model itself, asked directly)."""
        return "tokens" if not set(TEXT_INPUTS) <= set(self.inputs) and set(TOKEN_INPUTS) <= set(self.inputs) else "text"

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model, "decoupled": self.decoupled, "reports_token_counts": self.reports_counts,
                "entry": self.entry}


@dataclass(frozen=True)
class TokenCodec:
    """Text ↔ token ids for a ``tokens`` entry model: ``encode`` as the deployment's preprocessing would (special
    tokens included or not, as it is configured), ``decode`` for the record's text."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]


@dataclass(frozen=True)
class Prepared:
    """A prompt with its request tensors, built before the load starts."""

    prompt: Prompt
    tensors: list
    adapter: str | None = None  # the LoRA adapter it asks for (its lora_task_id is among the tensors)


def resolve_target(url: str, model: str | None) -> Target:
    """Connect and find the model to ask (default: the deployment's BLS entry model).

    Raises:
        YitrtError: no server at ``url``. UsageError: no such model, or not a text entry point.
    """
    grpc = require("tritonclient.grpc", "bench")
    client = triton_client.connect(grpc, url)
    name = model or triton_client.entry_model(client)
    inputs, decoupled = triton_client.model_info(client, name)
    target = Target(url, name, inputs, decoupled)
    if target.entry == "text":
        triton_client.check_text_entry(inputs, name)
    return target


def prepare(target: Target, prompts: Sequence[Prompt], ignore_eos: bool, extra: dict[str, Any] | None = None,
            codec: TokenCodec | None = None) -> list[Prepared]:
    """Request tensors for each prompt: streamed when the model is decoupled, token counts asked for where the
    model can return them, and ``end_id`` -1 when ``ignore_eos`` (generation then runs to ``max_tokens``); ``extra``
    inputs on every request (the speculation inputs, already checked against the model's); a ``tokens`` entry model
    gets the prompt's ids from ``codec``.

    Raises:
        UsageError: chat prompts for a model without ``messages``, ``ignore_eos`` for one without ``end_id``, or a
            token entry model without a codec.
    """
    if any(p.messages for p in prompts) and "messages" not in target.inputs:
        raise UsageError(f"the dataset has chat messages but model {target.model} takes no messages input",
                         "ask the yitrt BLS model (--model tensorrt_llm_bls) or use plain prompts")
    check_end_id(target, ignore_eos)
    return [prepare_one(target, prompt, ignore_eos, extra, codec) for prompt in prompts]


def check_end_id(target: Target, ignore_eos: bool) -> None:
    """Raises UsageError when ``ignore_eos`` asks for ``end_id`` -1 and the model has no such input."""
    if ignore_eos and "end_id" not in target.inputs:
        raise UsageError(f"model {target.model} has no end_id input, so the end token cannot be ignored",
                         "pass --respect-eos (outputs may then stop before --osl)")


def check_codec(target: Target, codec: TokenCodec | None) -> None:
    """Raises UsageError when the model takes token ids and there is no tokenizer to make them."""
    if target.entry == "tokens" and codec is None:
        raise UsageError(f"model {target.model} takes token ids (input_ids), so the bench needs the model's tokenizer",
                         "pass --tokenizer REPO (the folder yitrt deploy wrote, or the HF model folder)")


def prepare_one(target: Target, prompt: Prompt, ignore_eos: bool, extra: dict[str, Any] | None = None,
                codec: TokenCodec | None = None) -> Prepared:
    """One prompt's request tensors (see :func:`prepare`; multi-turn sessions build each turn's when it is due)."""
    grpc = require("tritonclient.grpc", "bench")
    if target.entry == "tokens":
        check_codec(target, codec)
        ids = codec.encode(prompt.text)
        values: dict[str, Any] = {"input_ids": ids, "input_lengths": len(ids), "request_output_len": prompt.max_tokens}
    else:
        values = {"text_input": prompt.text, "max_tokens": prompt.max_tokens}
    if prompt.messages:
        values["messages"] = json.dumps(list(prompt.messages))
    optional = {"stream": target.decoupled, "streaming": target.decoupled, "end_id": -1 if ignore_eos else None,
                "exclude_input_in_output": True, "return_num_input_tokens": True, "return_num_output_tokens": True}
    values.update({k: v for k, v in optional.items() if v is not None and k in target.inputs})
    values.update(extra or {})
    return Prepared(prompt, triton_client.make_tensors(grpc, target.inputs, values))


@dataclass
class PointRun:
    """What one load point produced: every request's record and the client's own measurements."""

    load: Load
    records: list[RequestRecord]
    client: dict[str, Any]
    server_counts: dict[str, int] | None
    scraped: tuple[Any, Any] | None = None  # what ``scrape`` returned just before and just after the measured window


class _LagProbe:
    """Samples how late the event loop wakes a sleeper: the bound on every timestamp's lateness."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            due = time.perf_counter() + LAG_PROBE_S
            await asyncio.sleep(LAG_PROBE_S)
            self.samples.append(max(0.0, time.perf_counter() - due))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


class _Point:
    """The state of one load point while it runs."""

    def __init__(self, target: Target, items: Sequence[Prepared], timeout: float,
                 count_tokens: Callable[[str], int] | None, channels: int, codec: TokenCodec | None = None,
                 lora=None) -> None:
        aio = require("tritonclient.grpc.aio", "bench")
        self.target, self.items, self.timeout, self.count_tokens = target, items, timeout, count_tokens
        self.codec = codec
        self.lora = lora  # lora_client.LoraSender: which adapters still need their weights sent
        # a local subchannel pool per client, or gRPC would share one connection between them
        self.clients = [aio.InferenceServerClient(target.url, channel_args=[("grpc.use_local_subchannel_pool", 1)])
                        for _ in range(channels)]
        self.records: list[RequestRecord] = []
        self.origin = time.perf_counter()
        self._next = itertools.count()
        self._next_session = itertools.count()

    def new_record(self, warmup: bool, scheduled: float, item: Prepared | None = None) -> tuple[RequestRecord, Prepared]:
        """A record for the next request: of ``item``, or else of the next prepared prompt (cyclically)."""
        index = next(self._next)
        item = item if item is not None else self.items[index % len(self.items)]
        record = RequestRecord(index, uuid.uuid4().hex[:16], item.prompt.max_tokens, warmup=warmup, scheduled_at=scheduled)
        self.records.append(record)
        return record, item

    async def send(self, record: RequestRecord, item: Prepared) -> None:
        """Send one request and wait for all of it; every outcome lands in ``record`` (never raises)."""
        client = self.clients[record.index % len(self.clients)]
        tensors = item.tensors
        record.adapter = item.adapter
        if item.adapter is not None and self.lora.needs_weights(item.adapter):
            tensors = tensors + self.lora.weight_tensors(item.adapter)
            record.lora_weights_sent = True

        async def one_request():
            yield {"model_name": self.target.model, "inputs": tensors, "request_id": record.request_id}

        start = time.perf_counter()
        record.sent_at = start - self.origin
        tokens_entry = self.target.entry == "tokens"
        for attempt in range(2):
            pieces, ids = await self._attempt(client, one_request, record, start, tokens_entry)
            if attempt or item.adapter is None or record.lora_weights_sent or not lora_client.not_cached(record.error):
                break
            # the server does not hold the adapter (evicted): once more, with its weights (counted in this request's times)
            self.lora.forget(item.adapter)
            tensors = tensors + self.lora.weight_tensors(item.adapter)
            record.lora_weights_sent = record.lora_resent = True
            record.error, record.response_times = None, []
        if item.adapter is not None and record.error is None and record.response_times:
            self.lora.confirm(item.adapter)  # answered: the server holds it, later requests send the id alone
        record.e2e = time.perf_counter() - start
        record.ttft = record.response_times[0] if record.response_times else None
        if record.error is None and not record.response_times:
            record.error = "the stream ended without a response"
        if tokens_entry:
            record.text = self.codec.decode(ids) if self.codec is not None else ""
            if record.ok and record.output_tokens is None:
                record.output_tokens, record.token_source = len(ids), "output_ids"
        else:
            record.text = "".join(pieces)
        if record.ok and record.output_tokens is None:
            record.output_tokens, record.token_source = (
                (self.count_tokens(record.text), "tokenizer") if self.count_tokens else (len(record.response_times), "responses"))
        if record.input_tokens is None and item.prompt.input_tokens is not None:
            record.input_tokens = item.prompt.input_tokens

    async def _attempt(self, client, one_request, record: RequestRecord, start: float, tokens_entry: bool) -> tuple[list[str], list[int]]:
        """One stream of the request; its outcome lands in ``record``. Returns the text pieces and (token entry) ids."""
        pieces: list[str] = []
        ids: list[int] = []
        counted = 0  # the cumulative num_output_tokens of the responses so far (None once one came without it)
        stream = None
        try:
            async with asyncio.timeout(self.timeout):
                stream = client.stream_infer(one_request())
                async for result, error in stream:
                    now = time.perf_counter() - start
                    if error is not None:
                        record.error = triton_client.reason(error)
                        break
                    count = triton_client.response_count(result, "num_output_tokens")
                    if tokens_entry:
                        new_ids = _response_ids(result)
                        if new_ids is None:
                            record.error = f"{self.target.model} failed during the answer (sequence_length < 0: see the server log)"
                            break
                        ids += new_ids
                        piece, tokens = new_ids, len(new_ids)
                    else:
                        piece = triton_client.response_text(result)
                        tokens = None if count is None or counted is None else count - counted
                    counted = None if count is None or counted is None else count
                    _take_counts(record, result)
                    # a streamed tensorrt_llm answer is one target step per response
                    record.acceptance.take(_ints(result, acceptance.PER_STEP), _totals(result), tokens,
                                           one_step=tokens_entry and self.target.decoupled)
                    final = result.get_response().parameters.get("triton_final_response")
                    final = final is not None and final.bool_param
                    # an arrival is a response with output; an empty one counts only when nothing came before it
                    if piece or (final and not record.response_times):
                        record.response_times.append(now)
                        if not tokens_entry:
                            pieces.append(piece)
                    if final:
                        break
        except TimeoutError:
            record.error = f"no complete answer within {self.timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - a transport failure is this request's error, counted as one
            record.error = f"{type(exc).__name__}: {triton_client.reason(exc)}".strip()
        finally:
            if stream is not None:
                stream.cancel()  # a no-op once the stream has ended; frees it after an error or a timeout
        return pieces, ids

    async def closed_loop(self, concurrency: int, count: int | None, until: float | None, warmup: bool) -> None:
        """``concurrency`` workers sending back to back until ``count`` requests were sent or ``until`` passed."""
        sent = itertools.count()

        async def worker() -> None:
            free = time.perf_counter()
            while (count is None or next(sent) < count) and (until is None or time.perf_counter() < until):
                record, item = self.new_record(warmup, free - self.origin)
                await self.send(record, item)
                free = time.perf_counter()

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def session_loop(self, concurrency: int, sessions: Sequence[Session], count: int | None, until: float | None,
                           warmup: bool, build: Callable[[Prompt], Prepared],
                           count_input: Callable[[str], int] | None) -> None:
        """``concurrency`` workers, each running whole sessions one after another: a new session starts while fewer
        than ``count`` turns were planned (a started session runs all its turns) and ``until`` has not passed. A
        turn that fails ends its session: the next turn would need its answer. Sessions are taken in order and never
        twice in a point (warmup included), so no session gets hits from an earlier copy of itself."""
        planned = 0

        async def worker() -> None:
            nonlocal planned
            while (count is None or planned < count) and (until is None or time.perf_counter() < until):
                number = next(self._next_session)
                session = sessions[number % len(sessions)]
                planned += len(session.turns)
                history = ""
                for turn, (user, max_tokens) in enumerate(zip(session.turns, session.max_tokens, strict=True)):
                    text = render_turn(history, user)
                    prompt = Prompt(text, max_tokens, input_tokens=count_input(text) if count_input else None)
                    record, item = self.new_record(warmup, time.perf_counter() - self.origin, build(prompt))
                    record.session, record.turn = number, turn
                    await self.send(record, item)
                    if not record.ok:
                        break
                    history = continue_history(text, record.text)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def open_loop(self, rate: float, count: int | None, until: float | None, seed: int) -> None:
        """Poisson arrivals at ``rate`` per second until ``count`` requests were sent or ``until`` passed."""
        rng = random.Random(seed)
        tasks = []
        due = time.perf_counter()
        for sent in itertools.count():
            if count is not None and sent >= count:
                break
            due += rng.expovariate(rate)
            if until is not None and due >= until:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            record, item = self.new_record(False, due - self.origin)
            tasks.append(asyncio.get_running_loop().create_task(self.send(record, item)))
        await asyncio.gather(*tasks)

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


def _ints(result, name: str) -> list[int] | None:
    """An integer output of one response, flattened (None when the response has no such output)."""
    value = result.as_numpy(name)
    return None if value is None else [int(v) for v in value.reshape(-1)]


def _totals(result) -> dict[str, float | None]:
    """The perf-metric outputs of speculative decoding in one response (None where absent)."""
    out: dict[str, float | None] = {}
    for name in (acceptance.TOTAL_ACCEPTED, acceptance.TOTAL_DRAFT, acceptance.RATE):
        value = result.as_numpy(name)
        out[name] = None if value is None or value.size == 0 else float(value.reshape(-1)[0])
    return out


def _response_ids(result) -> list[int] | None:
    """The first beam's new token ids of a ``tensorrt_llm`` response (output_ids [batch, beam, tokens], cut to
    sequence_length); [] for the empty final response; None when sequence_length marks a failed stream (< 0)."""
    value = result.as_numpy("output_ids")
    if value is None or value.size == 0:
        return []
    beams = value.reshape(-1, value.shape[-1])
    lengths = result.as_numpy("sequence_length")
    length = int(lengths.reshape(-1)[0]) if lengths is not None and lengths.size else beams.shape[1]
    if length < 0:
        return None
    return [int(v) for v in beams[0][:length]]


def _take_counts(record: RequestRecord, result) -> None:
    for name, attr in (("num_input_tokens", "input_tokens"), ("num_output_tokens", "output_tokens")):
        value = triton_client.response_count(result, name)
        if value is not None:
            setattr(record, attr, value)


async def run_point(target: Target, load: Load, items: Sequence[Prepared], *, num_requests: int | None,
                    duration: float | None, warmup: int = 0, timeout: float = 600.0, seed: int = 0,
                    count_tokens: Callable[[str], int] | None = None, sessions: Sequence[Session] | None = None,
                    ignore_eos: bool = True, count_input: Callable[[str], int] | None = None,
                    scrape: Callable[[], Any] | None = None, extra: dict[str, Any] | None = None,
                    codec: TokenCodec | None = None, lora=None) -> PointRun:
    """Run one load point: ``warmup`` requests first (at the point's concurrency, or one at a time for a rate),
    then the measured ones until ``num_requests`` were sent or ``duration`` seconds passed; wait for every answer.

    Args:
        items: prepared requests, used in order and reused cyclically when the point sends more.
        count_tokens: counts output tokens from text when the server does not report them.
        sessions: multi-turn sessions instead of ``items`` (concurrency points only): ``num_requests`` and ``warmup``
            then count turns, rounded up to whole sessions; each turn's tensors are built when it is due
            (``ignore_eos`` as in :func:`prepare`; ``count_input`` counts a turn's prompt tokens).
        scrape: called just before and just after the measured window (the server's metrics); its results land
            in ``PointRun.scraped``.
        extra / codec: as in :func:`prepare`, for the turns of multi-turn sessions; ``codec`` also decodes the
            answers of a ``tokens`` entry model into the records' text.
        lora: the ``lora_client.LoraSender`` of items that ask for adapters: a task's weights go with its requests
            until the server answered one, and once more after a "not found in cache" refusal.

    Returns:
        Every record (warmup included, flagged) and the client's measurements of itself.
    """
    if sessions is not None and load.kind != "concurrency":
        raise UsageError("multi-turn sessions run at a concurrency (sessions in flight)", "pass --concurrency, not --request-rate")
    in_flight = int(load.value) if load.kind == "concurrency" else max(1, math.ceil(load.value * 2))
    point = _Point(target, items, timeout, count_tokens, channels=max(1, math.ceil(in_flight / STREAMS_PER_CHANNEL)),
                   codec=codec, lora=lora)

    def build(prompt: Prompt) -> Prepared:
        return prepare_one(target, prompt, ignore_eos, extra, codec)

    try:
        if warmup and sessions is not None:
            await point.session_loop(int(load.value), sessions, warmup, None, True, build, count_input)
        elif warmup:
            await point.closed_loop(int(load.value) if load.kind == "concurrency" else 1, warmup, None, warmup=True)
        scraped_before = scrape() if scrape else None
        before = server_counts(target)
        probe = _LagProbe()
        probe.start()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        until = wall0 + duration if duration else None
        if sessions is not None:
            await point.session_loop(int(load.value), sessions, num_requests, until, False, build, count_input)
        elif load.kind == "concurrency":
            await point.closed_loop(int(load.value), num_requests, until, warmup=False)
        else:
            await point.open_loop(load.value, num_requests, until, seed)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        await probe.stop()
    finally:
        await point.close()
    after = server_counts(target)
    scraped = (scraped_before, scrape()) if scrape else None
    measured = [r for r in point.records if not r.warmup]
    client = {"cpu_fraction": round(cpu / wall, 4) if wall > 0 else None,
              "loop_lag_ms": distribution(probe.samples),
              "send_lag_ms": distribution([max(0.0, r.sent_at - r.scheduled_at) for r in measured])}
    counts = None if before is None or after is None else {k: after[k] - before[k] for k in after}
    return PointRun(load, point.records, client, counts, scraped)


def server_counts(target: Target) -> dict[str, int] | None:
    """The server's own request counters for the model (Triton's statistics extension), or None if unavailable."""
    grpc = require("tritonclient.grpc", "bench")
    try:
        stats = grpc.InferenceServerClient(target.url).get_inference_statistics(target.model, as_json=True)
        model = stats["model_stats"][0]["inference_stats"]
        return {"success": int(model.get("success", {}).get("count", 0)), "fail": int(model.get("fail", {}).get("count", 0))}
    except Exception:  # noqa: BLE001 - statistics are a cross-check, never a reason to fail a benchmark
        return None
