"""Per-request records and the metrics of one load point (pure functions: no I/O, no clock).

Definitions (docs/bench.md compares them with genai-perf's and vLLM's):
- TTFT: from sending the request to its first response (the first streamed piece of output).
- E2E: from sending the request to its completion (the response flagged final, or the end of its stream).
- TPOT: per request, ``(E2E - TTFT) / (output_tokens - 1)``; requests with one output token have none.
- ITL: every gap between two successive responses of a request (a response may carry more than one token).
- duration: from the first measured request sent to the last one completed (answered or failed).
- request throughput: answered requests / duration; output token throughput: their output tokens / duration.
- goodput: answered requests whose TTFT and TPOT are both within the SLO bounds given, / duration.
- a load point meets the SLO when it has no errors, answered something, and its TTFT and TPOT at the SLO
  percentile are measured and within bounds (``yitrt.verdict``: a figure that is missing or not a number fails).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from yitrt.bench.acceptance import Acceptance
from yitrt.errors import UsageError
from yitrt.verdict import measured

#: Percentiles every latency is reported at.
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    """Latency bounds in milliseconds (None: unbounded) and the percentile a load point is judged at."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    percentile: float = 90.0

    def __post_init__(self) -> None:
        """Refuse bounds no request could be judged against (NaN compares False, so a NaN bound would pass all).

        Raises:
            UsageError: a bound that is not a positive finite number, or a percentile outside (0, 100].
        """
        for name, bound in (("ttft_ms", self.ttft_ms), ("tpot_ms", self.tpot_ms)):
            if bound is not None and not (measured(bound) and bound > 0):
                raise UsageError(f"SLO bound {name} must be a positive number of milliseconds, got {bound!r}", "pass a finite bound > 0")
        if not (measured(self.percentile) and 0 < self.percentile <= 100):
            raise UsageError(f"SLO percentile must be in (0, 100], got {self.percentile!r}", "pass e.g. 90 or 99")

    @property
    def given(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def request_ok(self, ttft_s: float | None, tpot_s: float | None) -> bool:
        """Whether one answered request met both bounds (a request with one token has no TPOT to break; a time
        that is not a number breaks every bound)."""
        if self.ttft_ms is not None and (not measured(ttft_s) or ttft_s * 1000 > self.ttft_ms):
            return False
        if tpot_s is not None and not measured(tpot_s):
            return False
        return self.tpot_ms is None or tpot_s is None or tpot_s * 1000 <= self.tpot_ms

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds; ``*_at`` are offsets from the start of the load point,
    the others are measured from the moment the request was sent.

    Attributes:
        index: order in which the load point created it.
        request_id: the id sent to Triton (it appears in the server's logs and traces).
        warmup: sent before the measured window; kept, not measured.
        max_tokens: tokens asked for.
        scheduled_at / sent_at: when it was due (arrival schedule or free slot) and when it went out.
        response_times: arrival of each response.
        ttft / e2e: first response; completion (final response, end of stream, or the error).
        input_tokens / output_tokens: as the server reported them, else counted here (``token_source`` says which).
        text: the generated text, as received.
        error: the server's or the transport's message when the request failed.
        session / turn: the multi-turn session (index within the load point) and the turn (0-based); None otherwise.
        acceptance: what the responses said about speculative decoding (``yitrt.bench.acceptance``).
        adapter: the LoRA adapter asked for (None: the base model); ``lora_weights_sent``: its weights went with the
            request; ``lora_resent``: the server did not hold it and the request went again with them.
    """

    index: int
    request_id: str
    max_tokens: int
    warmup: bool = False
    scheduled_at: float = 0.0
    sent_at: float = 0.0
    response_times: list[float] = field(default_factory=list)
    ttft: float | None = None
    e2e: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    token_source: str = "server"
    text: str = ""
    error: str | None = None
    session: int | None = None
    turn: int | None = None
    acceptance: Acceptance = field(default_factory=Acceptance)
    adapter: str | None = None
    lora_weights_sent: bool = False
    lora_resent: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e is not None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (None with fewer than two tokens or no timing)."""
        if not self.ok or self.ttft is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def gaps(self) -> list[float]:
        """Inter-response gaps (ITL samples)."""
        times = self.response_times
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    def to_json(self) -> dict[str, Any]:
        ms = _ms  # seconds → rounded milliseconds
        return {"index": self.index, "request_id": self.request_id, "warmup": self.warmup, "ok": self.ok,
                "error": self.error, "max_tokens": self.max_tokens, "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens, "token_source": self.token_source,
                "scheduled_at_s": round(self.scheduled_at, 6), "sent_at_s": round(self.sent_at, 6),
                "ttft_ms": ms(self.ttft), "e2e_ms": ms(self.e2e), "tpot_ms": ms(self.tpot),
                "response_ms": [ms(t) for t in self.response_times], "text": self.text,
                "session": self.session, "turn": self.turn, "adapter": self.adapter,
                "lora_weights_sent": self.lora_weights_sent, "lora_resent": self.lora_resent,
                "speculation": self.acceptance.figures(self.output_tokens) if self.acceptance.seen else None}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: list[float], extra: float | None = None, scale: float = 1000.0) -> dict[str, float | int | None]:
    """count, mean/min/max and the report percentiles (and ``extra``, the SLO percentile) of ``values`` times
    ``scale`` (default: seconds shown in milliseconds)."""
    values = [v * scale for v in values]
    if not values:
        return {"count": 0, "mean": None, "min": None, "max": None, **{f"p{q:g}": None for q in _quantiles(extra)}}
    out: dict[str, float | int | None] = {"count": len(values), "mean": round(sum(values) / len(values), 3),
                                          "min": round(min(values), 3), "max": round(max(values), 3)}
    for q in _quantiles(extra):
        out[f"p{q:g}"] = round(percentile(values, q), 3)
    return out


def _quantiles(extra: float | None) -> list[float]:
    return sorted(set(PERCENTILES) | ({extra} if extra is not None else set()))


def summarize(records: list[RequestRecord], slo: Slo) -> dict[str, Any]:
    """The metrics of one load point from its records (warmup records are left out).

    Returns:
        A JSON-ready dict: counts (sent, answered, errors and their messages), duration, throughputs, goodput
        (None without an SLO), the latency distributions in ms, token totals, and ``meets_slo``.
    """
    measured = [r for r in records if not r.warmup]
    done = [r for r in measured if r.ok]
    failed = [r for r in measured if not r.ok]
    ends = [r.sent_at + (r.e2e or 0.0) for r in measured]
    duration = max(ends) - min(r.sent_at for r in measured) if measured else 0.0
    per_s = (lambda n: round(n / duration, 4)) if duration > 0 else (lambda n: None)
    out_tokens = sum(r.output_tokens or 0 for r in done)
    in_tokens = sum(r.input_tokens or 0 for r in done)
    good = sum(1 for r in done if slo.request_ok(r.ttft, r.tpot)) if slo.given else None
    ttft = distribution([r.ttft for r in done if r.ttft is not None], slo.percentile)
    tpot = distribution([r.tpot for r in done if r.tpot is not None], slo.percentile)
    metrics = {
        "counts": {"sent": len(measured), "answered": len(done), "errors": len(failed),
                     "error_messages": dict(Counter(r.error or "no answer" for r in failed).most_common(10)),
                     "warmup": len(records) - len(measured)},
        "duration_s": round(duration, 6),
        "request_throughput": per_s(len(done)),
        "output_token_throughput": per_s(out_tokens),
        "input_token_throughput": per_s(in_tokens),
        "goodput": None if good is None else per_s(good),
        "good_requests": good,
        "output_tokens": out_tokens,
        "input_tokens": in_tokens,
        "output_tokens_per_request": distribution([float(r.output_tokens) for r in done if r.output_tokens is not None], scale=1.0),
        "short_outputs": sum(1 for r in done if r.output_tokens is not None and r.output_tokens < r.max_tokens),
        "ttft_ms": ttft,
        "tpot_ms": tpot,
        "itl_ms": distribution([g for r in done for g in r.gaps]),
        "e2e_ms": distribution([r.e2e for r in done if r.e2e is not None], slo.percentile),
        "token_sources": dict(Counter(r.token_source for r in done)),
    }
    metrics["meets_slo"] = meets_slo(metrics, slo) if slo.given else None
    return metrics


def meets_slo(metrics: dict[str, Any], slo: Slo) -> bool:
    """No errors, something answered, and TTFT/TPOT at the SLO percentile measured and within their bounds (a
    bounded latency no request measured — e.g. TPOT when every answer had one token — is not met)."""
    if metrics["counts"]["errors"] or not metrics["counts"]["answered"]:
        return False
    key = f"p{slo.percentile:g}"
    for bound, dist in ((slo.ttft_ms, metrics["ttft_ms"]), (slo.tpot_ms, metrics["tpot_ms"])):
        if bound is not None and (not measured(dist[key]) or dist[key] > bound):
            return False
    return True


def best_point(points: list[dict[str, Any]]) -> int | None:
    """Index of the load point with the highest output token throughput among those meeting the SLO (or, without an
    SLO, among those without errors); None when there is none."""
    candidates = [i for i, p in enumerate(points) if measured(p["output_token_throughput"]) and p["counts"]["answered"] > 0
                  and (p["meets_slo"] if p["meets_slo"] is not None else not p["counts"]["errors"])]
    return max(candidates, key=lambda i: points[i]["output_token_throughput"], default=None)
