"""The process behind the CPU reference engine slot: the reference runtime (#3) serving generation requests.

``yitrt deploy --engine reference`` writes a ``tensorrt_llm`` Python-backend model (``model_src/reference_engine.py``)
that starts this module with yitrt's own interpreter (Triton's Python stub embeds another Python, one without
torch) and talks to it over stdin/stdout, one JSON object per line:

    request  {"id": str, "input_ids": [int], "max_new": int, "min_new": int, "end_ids": [int], "stop_sequences": [[int]],
              "sampling": {"greedy": bool, "temperature": float, "top_k": int, "top_p": float, "seed": int}}
             {"cancel": str}                                              stop that request (TensorRT-LLM's `stop`)
    answer   {"ready": true, "tp": int}                                   once, after the checkpoint loaded
             {"id": str, "token": int, "finish": null|"end_id"|"stop_words"|"length"}   one per generated token
             {"id": str, "token": null, "finish": "cancelled"}           the request was stopped (no more tokens)
             {"id": str, "error": str}                                    the request failed

Every request is checked on arrival (token ids inside the vocab, room in the context), so one bad request gets
its own error and never fails the batch it would have joined. Requests that wait while a batch runs form the next
batch (up to ``--max-batch-size``, same sampling settings): static batching, not TensorRT-LLM's in-flight batching —
this slot exists for tests and the demo on machines without a GPU, not for speed. A cancelled request of a running
batch gets no more tokens at once; its rows finish computing with the batch (the ranks step a batch to its end).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any


def _sampling(request: dict[str, Any]):
    """The request's ``Sampling`` (frozen, so it is also the key that groups requests into a batch)."""
    from yitrt.reference.runtime import Sampling

    return Sampling(**(request.get("sampling") or {}))


class _Inbox:
    """Requests read by a thread; the main loop takes batches of compatible ones in arrival order."""

    def __init__(self) -> None:
        self._items: collections.deque[dict[str, Any]] = collections.deque()
        self._cond = threading.Condition()
        self.closed = False

    def put(self, item: dict[str, Any] | None) -> None:
        with self._cond:
            if item is None:
                self.closed = True
            else:
                self._items.append(item)
            self._cond.notify()

    def cancel(self, key: str) -> bool:
        """Remove a waiting request; False when it is not waiting (running, finished or unknown)."""
        with self._cond:
            kept = collections.deque(item for item in self._items if item["id"] != key)
            found = len(kept) != len(self._items)
            self._items = kept
            return found

    def take_batch(self, limit: int) -> list[dict[str, Any]]:
        """Wait for a request, then take it and every waiting request with the same sampling (up to ``limit``)."""
        with self._cond:
            while not self._items and not self.closed:
                self._cond.wait()
            if not self._items:
                return []
            first = self._items.popleft()
            batch, keep = [first], collections.deque()
            key = _sampling(first)
            while self._items:
                item = self._items.popleft()
                (batch if len(batch) < limit and _sampling(item) == key else keep).append(item)
            self._items = keep
            return batch


def _read(stream: IO[str], inbox: _Inbox, out: _Writer, cancelled: set[str], check) -> None:
    """Read protocol lines: requests (checked with ``check``, which raises on a bad one) go to the inbox; a cancel
    removes a waiting request at once or marks a running one in ``cancelled`` for ``_run_batch``."""
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
        if "cancel" in request:
            key = request["cancel"]
            if inbox.cancel(key):
                out.send({"id": key, "token": None, "finish": "cancelled"})
            else:
                cancelled.add(key)  # running (or already finished: then nothing refers to it again)
            continue
        try:
            check(request)
        except Exception as exc:  # noqa: BLE001 - this request's error; the others go on
            out.send({"id": request["id"], "error": _message(exc)})
            continue
        inbox.put(request)
    inbox.put(None)


def _message(exc: Exception) -> str:
    """A request's error text: yitrt's own message (it names the fix), else the exception's type and text."""
    from yitrt.errors import YitrtError

    return exc.message if isinstance(exc, YitrtError) else f"{type(exc).__name__}: {exc}"


class _Writer:
    """Protocol lines, written by whichever thread has one (a lock keeps lines whole)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream, self._lock = stream, threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._stream.write(json.dumps(message) + "\n")
            self._stream.flush()


def _run_batch(runtime, batch: list[dict[str, Any]], out: _Writer, cancelled: set[str]) -> None:
    from yitrt.reference.runtime import StopRule

    prompts = [list(map(int, r["input_ids"])) for r in batch]
    rules = [StopRule(int(r["max_new"]), tuple(map(int, r.get("end_ids") or ())),
                      tuple(tuple(map(int, s)) for s in r.get("stop_sequences") or () if s), int(r.get("min_new") or 0)) for r in batch]
    sampling = _sampling(batch[0])
    finished: set[str] = set()
    for events in runtime.generate_stream(prompts, rules, sampling):
        for request, event in zip(batch, events, strict=True):
            key = request["id"]
            if key in finished:
                continue
            if key in cancelled:
                out.send({"id": key, "token": None, "finish": "cancelled"})
                finished.add(key)
            elif event is not None:
                out.send({"id": key, "token": event[0], "finish": event[1]})
                if event[1] is not None:
                    finished.add(key)
    cancelled.difference_update(r["id"] for r in batch)


def serve(checkpoint: Path, max_batch_size: int, device: str, compute_dtype: str, stdin: IO[str], stdout: IO[str]) -> None:
    """Load the checkpoint, then answer requests from ``stdin`` on ``stdout`` until stdin closes."""
    from yitrt.reference.runtime import ReferenceRuntime

    out = _Writer(stdout)
    with ReferenceRuntime(checkpoint, device, compute_dtype) as runtime:
        out.send({"ready": True, "tp": runtime.spec.tp})

        def check(request: dict[str, Any]) -> None:
            prompt, max_new = request.get("input_ids"), request.get("max_new")
            if not isinstance(prompt, list) or not prompt or not isinstance(max_new, int) or max_new < 1:
                raise ValueError("empty prompt or max_new < 1")
            runtime.check_tokens([prompt], max_new)

        inbox, cancelled = _Inbox(), set()
        threading.Thread(target=_read, args=(stdin, inbox, out, cancelled, check), daemon=True).start()
        while batch := inbox.take_batch(max_batch_size):
            try:
                _run_batch(runtime, batch, out, cancelled)
            except Exception as exc:  # noqa: BLE001 - reported per request; the worker keeps serving
                for r in batch:
                    out.send({"id": r["id"], "error": _message(exc)})


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
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compute-dtype", default="float32")
    args = parser.parse_args(argv)
    _exit_with_parent()
    # The protocol owns the real stdout; anything else printed (warnings, libraries) goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        serve(args.checkpoint, args.max_batch_size, args.device, args.compute_dtype, sys.stdin, protocol)
    except Exception as exc:  # noqa: BLE001 - the slot shows this line as its load error
        protocol.write(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        protocol.flush()
        sys.exit(1)


if __name__ == "__main__":
    main()
