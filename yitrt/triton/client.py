"""`yitrt chat`: one chat turn against a deployed repository over gRPC (tritonclient), streamed when the model is
decoupled, with token counts and timings; with a LoRA adapter of the repository (``lora_client``) when asked."""

from __future__ import annotations

import json
import queue
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from yitrt.errors import RequestFailedError, UsageError, YitrtError, require


@dataclass(frozen=True)
class ChatRequest:
    """One chat turn.

    Attributes:
        url: gRPC endpoint (``host:port``).
        model: model to ask (None: the deployment's BLS entry model, found on the server; or ``ensemble``).
        message: the user's message.
        system: optional system message.
        max_tokens: generation limit.
        stop_words: strings that end the answer.
        stream: stream when the model is decoupled (None: whenever it is).
        temperature / top_k / top_p / seed: sampling (default greedy).
        num_draft_tokens: draft-target speculation through yitrt's BLS: draft tokens per round (None: the
            deployment's default; 0: off).
        timeout: seconds to wait for the whole answer.
        lora: the name of a LoRA adapter of the deployed repository ``repo`` (its ``lora_adapters.json``).
        lora_weights: send the adapter's weights with the request (False: its task id alone — the server must hold
            it; when it answers "not found in cache" the request is sent once more, with the weights).
    """

    url: str
    message: str
    model: str | None = None
    system: str | None = None
    max_tokens: int = 256
    stop_words: tuple[str, ...] = ()
    stream: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    num_draft_tokens: int | None = None
    timeout: float = 300.0
    lora: str | None = None
    repo: Path | None = None
    lora_weights: bool = True


#: what a speculative answer reports (TensorRT-LLM's perf-metric outputs, yitrt's BLS per-step counts)
SPEC_OUTPUTS = ("accepted_draft_tokens", "total_accepted_draft_tokens", "total_draft_tokens")


@dataclass
class ChatResult:
    """The answer and how it arrived."""

    text: str
    model: str
    streamed: bool
    chunks: list[str] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None
    ttft_s: float | None = None
    total_s: float = 0.0
    steps: list[int] = field(default_factory=list)  # draft tokens accepted per target step (speculative answers)
    accepted: int | None = None
    drafted: int | None = None
    adapter: dict[str, Any] | None = None  # the LoRA adapter asked for (name, task id, dtype)
    lora_weights_sent: bool = False
    lora_resent: bool = False  # the server did not hold the adapter: the request went again with its weights

    @property
    def speculation(self) -> dict[str, Any] | None:
        """Acceptance of a speculative answer (None: no draft tokens were offered)."""
        if not self.drafted:
            return None
        return {"target_steps": len(self.steps), "accepted_draft_tokens": self.accepted, "draft_tokens": self.drafted,
                "acceptance_rate": round(self.accepted / self.drafted, 4),
                "accepted_per_step": round(self.accepted / len(self.steps), 3) if self.steps else None}

    def to_json(self) -> dict[str, Any]:
        """JSON summary (the chunks counted, not repeated)."""
        tps = self.output_tokens / self.total_s if self.output_tokens and self.total_s else None
        return {"text": self.text, "model": self.model, "streamed": self.streamed, "chunks": len(self.chunks),
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 1), "total_ms": round(self.total_s * 1000, 1),
                "output_tokens_per_s": None if tps is None else round(tps, 1), "speculation": self.speculation,
                "adapter": self.adapter, "lora_weights_sent": self.lora_weights_sent, "lora_resent": self.lora_resent}


def model_info(client, model: str) -> tuple[dict[str, str], bool]:
    """(input name → tritonclient dtype, decoupled) of a model as the server declares it; an ensemble is decoupled
    when one of its steps is."""
    try:
        config = client.get_model_config(model, as_json=True)["config"]
    except Exception as exc:  # noqa: BLE001 - tritonclient raises its own exception types
        raise UsageError(f"the server has no ready model {model!r} ({reason(exc)})", "pass --model (yitrt deploy prints the entry model)") from None
    decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled"))
    for step in config.get("ensemble_scheduling", {}).get("step", []):
        decoupled = decoupled or model_info(client, step["model_name"])[1]
    inputs = {i["name"]: i["data_type"].removeprefix("TYPE_").replace("STRING", "BYTES") for i in config.get("input", [])}
    return inputs, decoupled


def entry_model(client) -> str:
    """The ready model that takes chat ``messages`` besides the pipeline's own (a yitrt BLS model, whatever its name)."""
    ready = [m["name"] for m in client.get_model_repository_index(as_json=True).get("models", []) if m.get("state") == "READY"]
    if "tensorrt_llm_bls" in ready:
        return "tensorrt_llm_bls"
    from yitrt.triton.contract import model_names

    for name in sorted(set(ready) - set(model_names())):
        if "messages" in model_info(client, name)[0]:
            return name
    if "ensemble" in ready:
        return "ensemble"
    raise UsageError(f"no chat model among the server's ready models ({', '.join(ready) or 'none'})", "pass --model NAME")


#: host:port of a gRPC endpoint: a host name or IPv4 address, or an IPv6 address in brackets, then the port
_URL = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]+)$")


def parse_url(url: str) -> tuple[str, int]:
    """(host, port) of a ``HOST:PORT`` endpoint, the port in 1..65535: the one check of every URL chat and bench take.

    Raises:
        UsageError: a scheme (``grpc://``), a path, no port, or a port out of range.
    """
    text = url.strip() if isinstance(url, str) else ""
    match = _URL.match(text)
    if match is None:
        raise UsageError(f"{url!r} is not a gRPC endpoint HOST:PORT", "e.g. localhost:8001 (the gRPC port `yitrt serve` prints; no scheme or path)")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise UsageError(f"port {match['port']} of {url!r} is not a TCP port (1-65535)", "e.g. localhost:8001")
    return match["host"], port


def connect(grpc, url: str):
    """A tritonclient gRPC client of a server that answers ready.

    Raises:
        UsageError: ``url`` is not HOST:PORT (see :func:`parse_url`).
        YitrtError: nothing answers at ``url``, or the server is not ready.
    """
    parse_url(url)
    client = grpc.InferenceServerClient(url)
    try:
        if not client.is_server_ready():
            raise YitrtError(f"the server at {url} is not ready", "wait for `yitrt serve` to print its endpoints")
    except YitrtError:
        raise
    except Exception as exc:  # noqa: BLE001 - tritonclient raises its own exception types
        raise YitrtError(f"cannot reach a Triton server at {url} ({reason(exc)})", "start it with yitrt serve REPO; pass the gRPC port") from None
    return client


def reason(exc: Exception) -> str:
    """The text of a tritonclient exception (the server's own message where it has one)."""
    message = getattr(exc, "message", None)  # tritonclient's exceptions carry the server's text in message()
    return message() if callable(message) else str(exc)


def check_text_entry(inputs: dict[str, str], model: str) -> None:
    """Raises UsageError unless the model takes ``text_input`` and ``max_tokens`` (the BLS model, the ensemble)."""
    if not {"text_input", "max_tokens"} <= set(inputs):
        raise UsageError(f"model {model} takes no text_input/max_tokens: it is not a text entry point", "ask the BLS model or the ensemble")


def build_inputs(grpc, inputs: dict[str, str], req: ChatRequest, stream: bool, model: str) -> list:
    """The request tensors, typed as the server declares the model's inputs: chat turns in ``messages`` when the
    model takes them, else the raw text.

    Raises:
        UsageError: an option whose input the model does not have (never dropped silently).
    """
    check_text_entry(inputs, model)
    turns = ([{"role": "system", "content": req.system}] if req.system else []) + [{"role": "user", "content": req.message}]
    values: dict[str, Any] = {"max_tokens": req.max_tokens}
    if "messages" in inputs:
        values.update(text_input="", messages=json.dumps(turns))
    elif req.system:
        raise UsageError(f"model {model} takes no chat messages, so --system cannot be sent", "ask the yitrt BLS model, or drop --system")
    else:
        values["text_input"] = req.message
    asked = {"temperature": req.temperature, "top_k": req.top_k, "top_p": req.top_p, "seed": req.seed,
             "stop_words": list(req.stop_words) or None, "num_draft_tokens": req.num_draft_tokens}
    missing = [name for name, value in asked.items() if value is not None and name not in inputs]
    if missing:
        raise UsageError(f"model {model} has no input {', '.join(missing)}", "drop those options, or ask a model that takes them")
    values.update({name: value for name, value in asked.items() if value is not None})
    for name, value in (("stream", stream), ("return_num_input_tokens", True), ("return_num_output_tokens", True)):
        if name in inputs:  # optional features: sent where the model has them
            values[name] = value
    return make_tensors(grpc, inputs, values)


def make_tensors(grpc, declared: dict[str, str], values: dict[str, Any]) -> list:
    """One request's tensors (batch 1), each typed as the server declares that input; a list value is one row of
    several elements, a string is sent as BYTES."""
    from tritonclient.utils import triton_to_np_dtype

    tensors = []
    for name, value in values.items():
        dtype = declared[name]
        items = value if isinstance(value, list) else [value]
        array = np.array([[v.encode() if isinstance(v, str) else v for v in items]],
                         dtype=object if dtype == "BYTES" else triton_to_np_dtype(dtype))
        tensor = grpc.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def response_text(result) -> str:
    """The ``text_output`` of one response ("" when it has none)."""
    value = result.as_numpy("text_output")
    if value is None or value.size == 0:
        return ""
    return "".join(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.reshape(-1))


def response_count(result, name: str) -> int | None:
    """A token-count output (``num_input_tokens``/``num_output_tokens``) of one response, None when absent."""
    value = result.as_numpy(name)
    return None if value is None or value.size == 0 else int(value.reshape(-1)[0])


def chat(req: ChatRequest, on_text: Callable[[str], None] | None = None) -> ChatResult:
    """Send one chat turn; stream the answer into ``on_text`` as it arrives.

    Raises:
        UsageError: no such model, or options the model cannot take.
        YitrtError: the server is unreachable. RequestFailedError: it answered with an error.
    """
    from yitrt.triton import lora_client

    parse_url(req.url)  # before importing the client: a bad endpoint is the user's to fix first
    adapter = None
    if req.lora is not None:  # the repository's adapters are read before anything is sent
        if req.repo is None:
            raise UsageError("--lora needs the deployed repository that lists the adapters", "pass --repo REPO (the folder yitrt deploy wrote)")
        adapter = lora_client.pick(lora_client.read_adapters(req.repo), req.lora)
    grpc = require("tritonclient.grpc", "serve")
    if req.max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {req.max_tokens}", "pass a positive number")
    client = connect(grpc, req.url)
    model = req.model or entry_model(client)
    names, decoupled = model_info(client, model)
    stream = decoupled if req.stream is None else req.stream and decoupled
    outputs = [grpc.InferRequestedOutput(n) for n in ("text_output", "num_input_tokens", "num_output_tokens") if n == "text_output" or f"return_{n}" in names]
    if "num_draft_tokens" in names:  # the BLS of a draft-target deployment reports acceptance
        outputs += [grpc.InferRequestedOutput(n) for n in SPEC_OUTPUTS]
    inputs = build_inputs(grpc, names, req, stream, model)
    result = ChatResult("", model, stream, adapter=lora_client.describe(adapter))
    sender = None
    if adapter is not None:
        sender = lora_client.LoraSender(grpc, names, {adapter.name: adapter}, model)
        inputs.append(sender.id_tensor(adapter.name))
        if req.lora_weights:
            inputs += sender.weight_tensors(adapter.name)
            result.lora_weights_sent = True
    start = time.perf_counter()
    try:
        _ask(client, model, req.timeout, inputs, outputs, result, start, on_text, decoupled)
    except RequestFailedError as exc:
        if sender is None or result.lora_weights_sent or not lora_client.not_cached(exc.message):
            raise
        # the server no longer holds the adapter (or never did): once more, with its weights
        result.chunks, result.ttft_s, result.lora_resent = [], None, True
        result.lora_weights_sent = True
        _ask(client, model, req.timeout, inputs + sender.weight_tensors(adapter.name), outputs, result, time.perf_counter(),
             on_text, decoupled)
    result.total_s = time.perf_counter() - start
    result.text = "".join(result.chunks)
    return result


def _ask(client, model: str, timeout: float, inputs, outputs, result: ChatResult, start: float, on_text, decoupled: bool) -> None:
    """One request: the whole answer at once, or streamed from a decoupled model."""
    if not decoupled:
        try:
            answer = client.infer(model, inputs, outputs=outputs, client_timeout=timeout)
        except Exception as exc:  # noqa: BLE001
            raise _failed(exc) from None
        _take(result, answer, start, on_text)
    else:
        _stream(client, model, timeout, inputs, outputs, result, start, on_text)


def _take(result: ChatResult, answer, start: float, on_text) -> None:
    piece = response_text(answer)
    if piece:
        if result.ttft_s is None:
            result.ttft_s = time.perf_counter() - start
        result.chunks.append(piece)
        if on_text is not None:
            on_text(piece)
    for name, attr in (("num_input_tokens", "input_tokens"), ("num_output_tokens", "output_tokens"),
                       ("total_accepted_draft_tokens", "accepted"), ("total_draft_tokens", "drafted")):
        value = response_count(answer, name)
        if value is not None:
            setattr(result, attr, value)
    steps = answer.as_numpy("accepted_draft_tokens")
    if steps is not None:
        result.steps += [int(v) for v in steps.reshape(-1)]


def _stream(client, model: str, timeout: float, inputs, outputs, result: ChatResult, start: float, on_text) -> None:
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, outputs=outputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                answer, error = events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise YitrtError(f"no complete answer within {timeout:.0f} s", "raise --timeout or lower --max-tokens") from None
            if error is not None:
                raise _failed(error)
            _take(result, answer, start, on_text)
            final = answer.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return
    finally:
        client.stop_stream()


def _failed(exc: Exception) -> RequestFailedError:
    return RequestFailedError(f"the server refused the request: {reason(exc)}", "fix the request as the message says")
