"""KV-cache reuse as the server measures it: Triton's metrics endpoint (Prometheus text) scraped before and after a
load point's measured window.

The tensorrt_llm model (TensorRT-LLM's C++ backend, or yitrt's CPU reference slot) exports the gauge family
``nv_trt_llm_kv_cache_block_metrics`` with the label ``kv_cache_block_type``: ``max``, ``free``, ``used``,
``tokens_per`` and ``fraction`` are states; ``alloc_total``, ``alloc_new`` and ``reused`` are running counts of the KV
blocks allocated for requests (reused: found in the prefix cache; alloc_new: newly allocated; alloc_total: both).
A point's hit rate is Δreused / Δalloc_total over its window. Older C++ backends export no ``alloc_*`` (and some no
``fraction``): what is absent is reported as missing and its figures stay None — never 0, never guessed.
Values are summed over every ``model``/``version`` label set (one tensorrt_llm model in a normal deployment).
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from yitrt.errors import YitrtError

KV_FAMILY = "nv_trt_llm_kv_cache_block_metrics"
KV_LABEL = "kv_cache_block_type"
REQUEST_FAMILY = "nv_trt_llm_request_metrics"
REQUEST_LABEL = "request_type"
BATCHER_FAMILY = "nv_trt_llm_inflight_batcher_metrics"
BATCHER_LABEL = "inflight_batcher_specific_metric"
#: running counts (a point reports their change over its window)
KV_COUNTERS = ("reused", "alloc_total", "alloc_new")
#: states (a point reports their value at the end of its window)
KV_STATES = ("max", "free", "used", "tokens_per", "fraction")
#: Triton's default metrics port (``--metrics-port``)
DEFAULT_METRICS_PORT = 8002
SCRAPE_TIMEOUT_S = 5.0

# name{labels} value [timestamp]; label values are double-quoted with \\, \" and \n escapes
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class MetricsError(YitrtError):
    """The metrics endpoint could not be read or is not Prometheus text."""


@dataclass(frozen=True)
class Sample:
    """One Prometheus sample: metric name, labels, value."""

    name: str
    labels: dict[str, str]
    value: float


def parse_prometheus(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition (comments and blank lines skipped).

    Raises:
        ValueError: a line that is neither a comment nor a sample (named by number).
    """
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"line {number} is not a Prometheus sample: {line[:80]!r}")
        labels, rest = {}, match["labels"] or ""
        position = 0
        while position < len(rest.rstrip()):
            label = _LABEL.match(rest, position)
            if label is None:
                raise ValueError(f"line {number} has malformed labels: {rest[:80]!r}")
            labels[label[1]] = re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m[0]], label[2])
            position = label.end()
        try:
            value = float(match["value"])  # accepts NaN, +Inf, -Inf as Prometheus writes them
        except ValueError:
            raise ValueError(f"line {number} has no numeric value: {line[:80]!r}") from None
        samples.append(Sample(match["name"], labels, value))
    return samples


def family_sums(samples: list[Sample], family: str, label: str) -> dict[str, float]:
    """``{label value: sum over every other label set}`` of one family (empty when the family is absent)."""
    sums: dict[str, float] = {}
    for s in samples:
        if s.name == family and label in s.labels:
            sums[s.labels[label]] = sums.get(s.labels[label], 0.0) + s.value
    return sums


@dataclass(frozen=True)
class Snapshot:
    """What one scrape found of the families yitrt bench reads (each ``{label value: sum}``, empty when absent)."""

    kv: dict[str, float]
    requests: dict[str, float]
    batcher: dict[str, float]

    @classmethod
    def from_text(cls, text: str) -> Snapshot:
        samples = parse_prometheus(text)
        return cls(family_sums(samples, KV_FAMILY, KV_LABEL), family_sums(samples, REQUEST_FAMILY, REQUEST_LABEL),
                   family_sums(samples, BATCHER_FAMILY, BATCHER_LABEL))


def default_metrics_url(grpc_url: str) -> str:
    """``http://<the gRPC host>:8002/metrics`` (Triton's default metrics port on the benchmarked host)."""
    from yitrt.triton.client import parse_url

    host, _ = parse_url(grpc_url)
    return f"http://{host}:{DEFAULT_METRICS_PORT}/metrics"


def check_metrics_url(url: str) -> str | None:
    """The problem with a ``--metrics-url`` (None when it is an http(s) URL)."""
    if not re.match(r"^https?://[^/\s]+(/\S*)?$", url or ""):
        return f"--metrics-url must be an http:// or https:// URL, got {url!r} (e.g. http://localhost:8002/metrics)"
    return None


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT_S) -> Snapshot:
    """Read the metrics endpoint once.

    Raises:
        MetricsError: nothing answers, an HTTP error, or a body that is not Prometheus text.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - the URL was checked to be http(s)
            body = response.read(16 << 20).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", None) or exc
        raise MetricsError(f"cannot read Triton metrics at {url} ({why})",
                           "pass --metrics-url http://HOST:METRICS_PORT/metrics (yitrt serve --metrics-port), or none") from None
    try:
        return Snapshot.from_text(body)
    except ValueError as exc:
        raise MetricsError(f"{url} did not answer Prometheus text: {exc}", "pass Triton's metrics endpoint (…/metrics)") from None


def _delta(before: dict[str, float], after: dict[str, float], key: str) -> int | None:
    """after − before of a running count; None when either scrape lacks it or it went down (a restarted server)."""
    if key not in before or key not in after:
        return None
    change = after[key] - before[key]
    return None if change < 0 or not math.isfinite(change) else int(round(change))


def _state(after: dict[str, float], key: str, digits: int | None = None) -> float | int | None:
    if key not in after or not math.isfinite(after[key]):
        return None
    return round(after[key], digits) if digits is not None else int(round(after[key]))


def kv_point(before: Snapshot | None, after: Snapshot | None, source: str | None) -> dict[str, Any]:
    """A load point's ``kv_cache`` entry from the scrapes around its measured window.

    Returns:
        ``source`` (the URL, None when not scraped), ``reused_blocks`` / ``alloc_total_blocks`` / ``alloc_new_blocks``
        (changes over the window), ``hit_rate`` (reused / alloc_total; None when nothing was allocated or a count is
        absent), the states at the window's end ``tokens_per_block``, ``max_blocks``, ``free_blocks``,
        ``used_blocks``, ``used_fraction``, the request family's ``requests_completed`` change and the batcher's
        ``context_tokens``/``paused_requests`` at the end, and ``missing``: what the server did not export (a whole
        family, or ``kv_cache_block_type=alloc_total`` etc.).
    """
    kv_b, kv_a = (before.kv if before else {}), (after.kv if after else {})
    reused, total, new = (_delta(kv_b, kv_a, k) for k in KV_COUNTERS)
    missing = []
    if before is not None and after is not None:
        if not kv_a:
            missing.append(KV_FAMILY)
        else:
            missing += [f"{KV_LABEL}={k}" for k in (*KV_COUNTERS, *KV_STATES) if k not in kv_a or k not in kv_b]
        if not after.requests:
            missing.append(REQUEST_FAMILY)
    req_b, req_a = (before.requests if before else {}), (after.requests if after else {})
    batcher = after.batcher if after else {}
    return {
        "source": source,
        "reused_blocks": reused,
        "alloc_total_blocks": total,
        "alloc_new_blocks": new,
        # nothing allocated (or not measured) means no hit rate, not a rate of 0
        "hit_rate": round(reused / total, 4) if reused is not None and total else None,
        "tokens_per_block": _state(kv_a, "tokens_per"),
        "max_blocks": _state(kv_a, "max"),
        "free_blocks": _state(kv_a, "free"),
        "used_blocks": _state(kv_a, "used"),
        "used_fraction": _state(kv_a, "fraction", 4),
        "requests_completed": _delta(req_b, req_a, "completed"),
        "context_tokens": _state(batcher, "total_context_tokens"),
        "paused_requests": _state(batcher, "paused_requests"),
        "missing": missing,
    }
