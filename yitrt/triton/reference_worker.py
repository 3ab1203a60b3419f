"""The process behind the CPU reference engine slot: the reference runtime's engine loop serving generation requests.

``yitrt deploy --engine reference`` writes a ``tensorrt_llm`` Python-backend model (``model_src/reference_engine.py``)
that starts this module with yitrt's own interpreter (Triton's Python stub embeds another Python, one without
torch) and talks to it over stdin/stdout, one JSON object per line:

    request  {"id": str, "input_ids": [int], "max_new": int, "min_new": int, "end_ids": [int], "stop_sequences": [[int]],
              "sampling": {"greedy": bool, "temperature": float, "top_k": int, "top_p": float, "seed": int},
              optional: "draft": [int] (draft_input_ids: one verification step), "draft_logits": base64 float32 [K, vocab],
              "draft_threshold": float, "lookahead": [w, n, g], "return_logits": bool (generation logits),
              "lora_task_id": int, "lora_weights": base64 [rows, L] of "lora_dtype" (float16/float32; bfloat16 as the
              float32 of its values), "lora_shape": [rows, L], "lora_config": [[module_id, layer, rank]]}
             {"cancel": str}                                              stop that request (TensorRT-LLM's `stop`)
    answer   {"ready": true, "tp": int, "engine": {...}, "warnings": [str], "stats": {...}}  once, after the checkpoint loaded
             {"id": str, "token": int, "finish": null|"end_id"|"stop_words"|"length"}   one per generated token
             {"id": str, "tokens": [int], "finish": ..., "accepted": int, "drafted": int}  a speculative step's tokens
             ... with "logits": base64 float32 [vocab] on a token event of a return_logits request
             {"id": str, "token": null, "finish": "cancelled"}           the request was stopped (no more tokens)
             {"id": str, "error": str}                                    the request failed
             {"stats": {...}}                                             the batch manager's numbers (EngineLoop.stats)

The batch manager is ``yitrt.reference.engine`` (in-flight batching, paged KV, block reuse), configured from the
``tensorrt_llm`` model's parameters (``--engine-params``, a JSON object of their strings). Every request is checked
on arrival (token ids inside the vocab, room in the context, in the KV pool and — without chunked context — in
``max_num_tokens``), so one bad request gets its own error and never disturbs the others. A cancelled request
leaves the batch at the next iteration and releases its KV blocks. This slot exists for tests and the demo on
machines without a GPU, not for speed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any


def _read(stream: IO[str], inbox: queue.Queue, out: _Writer) -> None:
    """Read protocol lines into ``inbox`` (None once stdin closes); a line that is not a request is answered here."""
    for line in stream:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("id", request.get("cancel")), str):
                raise ValueError("a request is a JSON object with an id (or a cancel)")
        except ValueError as exc:
            out.send({"id": None, "error": f"unreadable request: {exc}"})
            continue
        inbox.put(request)
    inbox.put(None)


def _message(exc: Exception) -> str:
    """A request's error text: yitrt's own message and its fix, else the exception's type and text."""
    from yitrt.errors import YitrtError

    if isinstance(exc, YitrtError):
        return f"{exc.message}: {exc.hint}" if exc.hint else exc.message
    return f"{type(exc).__name__}: {exc}"


class _Writer:
    """Protocol lines, written by whichever thread has one (a lock keeps lines whole)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream, self._lock = stream, threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._stream.write(json.dumps(message) + "\n")
            self._stream.flush()


def _add(loop, request: dict[str, Any]) -> None:
    """Queue one request on the engine loop (raises on a bad one)."""
    from yitrt.reference.runtime import Sampling, StopRule

    prompt, max_new = request.get("input_ids"), request.get("max_new")
    if not isinstance(prompt, list) or not prompt or not isinstance(max_new, int) or max_new < 1:
        raise ValueError("empty prompt or max_new < 1")
    rule = StopRule(max_new, tuple(map(int, request.get("end_ids") or ())),
                    tuple(tuple(map(int, s)) for s in request.get("stop_sequences") or () if s), int(request.get("min_new") or 0))
    draft = lookahead = None
    if request.get("draft"):
        import numpy as np
        import torch

        from yitrt.reference.engine.speculative import DraftTokens

        tokens = tuple(int(t) for t in request["draft"])
        logits = None
        if request.get("draft_logits"):
            flat = np.frombuffer(base64.b64decode(request["draft_logits"]), dtype=np.float32)
            if flat.size % max(len(tokens), 1):
                raise ValueError(f"draft_logits holds {flat.size} values, not a multiple of the {len(tokens)} draft tokens")
            logits = torch.from_numpy(flat.copy()).reshape(len(tokens), -1)
        threshold = request.get("draft_threshold")
        draft = DraftTokens(tokens, logits, None if threshold is None else float(threshold))
    if request.get("lookahead"):
        from yitrt.speculation import LookaheadSizes

        lookahead = LookaheadSizes(*(int(v) for v in request["lookahead"]))
    task, weights, config = _lora(request)
    loop.add(request["id"], list(prompt), rule, Sampling(**(request.get("sampling") or {})), draft=draft,
             lookahead=lookahead, return_logits=bool(request.get("return_logits")), adapter=task,
             lora_weights=weights, lora_config=config)  # add() checks the ids and the adapter


def _lora(request: dict[str, Any]) -> tuple[int | None, Any, Any]:
    """The request's LoRA task id and arrays (None where absent), the weights in the dtype they were sent in: a
    bfloat16 tensor for bf16 (numpy has none), so the adapter cache's dtype check sees what the client sent."""
    task = request.get("lora_task_id")
    weights = config = None
    if request.get("lora_weights") is not None:
        import numpy as np

        dtype = request.get("lora_dtype", "float32")
        if dtype not in ("float16", "float32", "bfloat16"):
            raise ValueError(f"lora_weights dtype {dtype} is not float16, bfloat16 or float32")
        flat = np.frombuffer(base64.b64decode(request["lora_weights"]), dtype=np.float16 if dtype == "float16" else np.float32)
        weights = flat.reshape([int(n) for n in request["lora_shape"]]).copy()
        if dtype == "bfloat16":
            import torch

            weights = torch.from_numpy(weights).to(torch.bfloat16)  # exact: the values are bf16 values
    if request.get("lora_config") is not None:
        import numpy as np

        config = np.asarray(request["lora_config"], dtype=np.int64)
        if config.size and (config.min() < np.iinfo(np.int32).min or config.max() > np.iinfo(np.int32).max):
            raise ValueError("lora_config holds values outside int32")
        config = config.astype(np.int32)  # its shape as sent: the cache's checks name a wrong one
    return (None if task is None else int(task)), weights, config


def _handle(loop, message: dict[str, Any], out: _Writer) -> None:
    if "cancel" in message:
        if loop.cancel(message["cancel"]):
            out.send({"id": message["cancel"], "token": None, "finish": "cancelled"})
        return  # unknown: it finished already, nothing refers to it again
    try:
        _add(loop, message)
    except Exception as exc:  # noqa: BLE001 - this request's error; the others go on
        out.send({"id": message["id"], "error": _message(exc)})


def serve(checkpoint: Path, params: dict[str, Any], device: str, compute_dtype: str, stdin: IO[str], stdout: IO[str]) -> None:
    """Load the checkpoint, then answer requests from ``stdin`` on ``stdout`` until stdin closes."""
    from dataclasses import asdict

    from yitrt.reference.engine.loop import EngineLoop
    from yitrt.reference.engine.parameters import engine_config
    from yitrt.reference.runtime import TORCH_DTYPES, ReferenceRuntime

    out = _Writer(stdout)
    with ReferenceRuntime(checkpoint, device, compute_dtype) as runtime:
        config, warnings = engine_config(params, runtime.spec, TORCH_DTYPES[compute_dtype].itemsize)
        loop = runtime.engine(config)
        out.send({"ready": True, "tp": runtime.spec.tp, "engine": asdict(config), "warnings": warnings, "stats": loop.stats()})
        inbox: queue.Queue = queue.Queue()
        threading.Thread(target=_read, args=(stdin, inbox, out), daemon=True).start()
        open_ = True
        while open_:
            messages = [inbox.get()] if loop.idle else []  # idle: wait for work; busy: take what arrived meanwhile
            while True:
                try:
                    messages.append(inbox.get_nowait())
                except queue.Empty:
                    break
            for message in messages:
                if message is None:
                    open_ = False
                else:
                    _handle(loop, message, out)
            if loop.idle:
                out.send({"stats": loop.stats()})
                continue
            try:
                events = loop.step()
                # the numbers first: a client that has its answer sees metrics that include its request
                out.send({"stats": loop.stats()})
                _send_events(loop, events, out)
            except Exception as exc:  # noqa: BLE001 - reported per request; a fresh loop serves what comes next
                for seq in list(loop.scheduler.running) + list(loop.scheduler.waiting):
                    out.send({"id": seq.key, "error": _message(exc)})
                loop = EngineLoop(runtime, config, loop.adapters)  # cached adapters stay (they are on the ranks)


def _send_events(loop, events: list[tuple[str, int, str | None]], out: _Writer) -> None:
    """One step's tokens: one line per token, or one line per request for a speculative step (its accepted run)."""
    grouped: dict[str, list[tuple[int, str | None]]] = {}
    for key, token, finish in events:
        grouped.setdefault(key, []).append((token, finish))
    for key, items in grouped.items():
        if key in loop.speculation:
            accepted, drafted = loop.speculation[key]
            out.send({"id": key, "tokens": [t for t, _ in items], "finish": items[-1][1], "accepted": accepted, "drafted": drafted})
            continue
        for token, finish in items:
            message = {"id": key, "token": token, "finish": finish}
            if key in loop.logits:
                message["logits"] = base64.b64encode(loop.logits[key].float().numpy().tobytes()).decode()
            out.send(message)


def _exit_with_parent(poll_s: float = 0.5) -> None:
    """Watchdog thread: exit at once when the process that started us (the Python stub) is gone. Its pipes may stay
    open in an orphaned grandchild, so stdin closing is not a reliable sign; a changed ``getppid()`` is."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m yitrt.triton.reference_worker CHECKPOINT [--max-batch-size N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--engine-params", type=json.loads, default={},
                        help="the tensorrt_llm model's parameters (JSON object of strings) that configure the batch manager")
    parser.add_argument("--max-batch-size", type=int, default=None, help="overrides the parameter max_batch_size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compute-dtype", default="float32")
    args = parser.parse_args(argv)
    _exit_with_parent()
    # The protocol owns the real stdout; anything else printed (warnings, libraries) goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        params = dict(args.engine_params)
        if args.max_batch_size is not None:
            params["max_batch_size"] = str(args.max_batch_size)
        serve(args.checkpoint, params, args.device, args.compute_dtype, sys.stdin, protocol)
    except Exception as exc:  # noqa: BLE001 - the slot shows this line as its load error
        protocol.write(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        protocol.flush()
        sys.exit(1)


if __name__ == "__main__":
    main()
