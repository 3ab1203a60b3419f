"""The process behind the CPU reference engine slot: the reference runtime (#3) serving generation requests.

``yitrt deploy --engine reference`` writes a ``tensorrt_llm`` Python-backend model (``model_src/reference_engine.py``)
that starts this module with yitrt's own interpreter (Triton's Python stub embeds another Python, one without
torch) and talks to it over stdin/stdout, one JSON object per line:

    request  {"id": str, "input_ids": [int], "max_new": int, "end_ids": [int], "stop_sequences": [[int]],
              "sampling": {"greedy": bool, "temperature": float, "top_k": int, "top_p": float, "seed": int}}
    answer   {"ready": true, "tp": int}                                   once, after the checkpoint loaded
             {"id": str, "token": int, "finish": null|"end_id"|"stop_words"|"length"}   one per generated token
             {"id": str, "error": str}                                    the request failed

Requests that wait while a batch runs form the next batch (up to ``--max-batch-size``, same sampling settings):
static batching, not TensorRT-LLM's in-flight batching — this slot exists for tests and the demo on machines
without a GPU, not for speed.
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


def _read(stream: IO[str], inbox: _Inbox, out: _Writer) -> None:
    for line in stream:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or "id" not in request:
                raise ValueError("a request is a JSON object with an id")
        except ValueError as exc:
            out.send({"id": None, "error": f"unreadable request: {exc}"})
            continue
        inbox.put(request)
    inbox.put(None)


class _Writer:
    """Protocol lines, written by whichever thread has one (a lock keeps lines whole)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream, self._lock = stream, threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._stream.write(json.dumps(message) + "\n")
            self._stream.flush()


def _run_batch(runtime, batch: list[dict[str, Any]], out: _Writer) -> None:
    from yitrt.reference.runtime import StopRule

    prompts = [list(map(int, r["input_ids"])) for r in batch]
    rules = [StopRule(int(r["max_new"]), tuple(map(int, r.get("end_ids") or ())),
                      tuple(tuple(map(int, s)) for s in r.get("stop_sequences") or () if s)) for r in batch]
    sampling = _sampling(batch[0])
    for events in runtime.generate_stream(prompts, rules, sampling):
        for request, event in zip(batch, events, strict=True):
            if event is not None:
                out.send({"id": request["id"], "token": event[0], "finish": event[1]})


def serve(checkpoint: Path, max_batch_size: int, device: str, compute_dtype: str, stdin: IO[str], stdout: IO[str]) -> None:
    """Load the checkpoint, then answer requests from ``stdin`` on ``stdout`` until stdin closes."""
    from yitrt.reference.runtime import ReferenceRuntime

    out = _Writer(stdout)
    with ReferenceRuntime(checkpoint, device, compute_dtype) as runtime:
        out.send({"ready": True, "tp": runtime.spec.tp})
        inbox = _Inbox()
        threading.Thread(target=_read, args=(stdin, inbox, out), daemon=True).start()
        while batch := inbox.take_batch(max_batch_size):
            try:
                bad = [r for r in batch if not r.get("input_ids") or int(r.get("max_new", 0)) < 1]
                for r in bad:
                    out.send({"id": r["id"], "error": "empty prompt or max_new < 1"})
                batch = [r for r in batch if r not in bad]
                if batch:
                    _run_batch(runtime, batch, out)
            except Exception as exc:  # noqa: BLE001 - reported per request; the worker keeps serving
                for r in batch:
                    out.send({"id": r["id"], "error": f"{type(exc).__name__}: {exc}"})


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
