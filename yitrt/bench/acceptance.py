"""Speculative decoding as the bench sees it: the request inputs that turn it on or off, what each response says
about it, and the acceptance figures of a load point (pure functions and small records: no I/O, no clock).

Responses (SPEC of issue #19, reference/triton-repository.md §1.4): TensorRT-LLM's perf-metric outputs, returned when
the request sets ``return_perf_metrics`` — ``total_accepted_draft_tokens`` and ``total_draft_tokens`` (INT32 [1],
cumulative for the request) and ``acceptance_rate`` (FP32 [1]) — and yitrt's ``accepted_draft_tokens`` (INT32 [-1]:
per target step in this response, the draft tokens that step accepted; the yitrt BLS streams one response per step).

Definitions, per request (``steps_source`` says which way its steps were found):
- ``responses``: the per-step entries of yitrt's ``accepted_draft_tokens`` over all its responses;
- ``stream``: without that output (a stock engine, the slot's ``tensorrt_llm``), a streamed ``tensorrt_llm`` answers
  one response per target step, so each response with tokens is a step that accepted the change of the cumulative
  ``total_accepted_draft_tokens`` since the previous response (every response with tokens must carry it);
- ``totals``: otherwise steps = output tokens − ``total_accepted_draft_tokens`` (every step yields its accepted
  draft tokens plus one token of the target's own).
- accepted: the sum of the per-step entries, else ``total_accepted_draft_tokens``; drafted: ``total_draft_tokens``.
Per load point (answered, measured requests; sums over requests, never means of per-request means):
- mean accepted draft tokens per target step = Σ accepted / Σ steps;
- acceptance rate = Σ accepted / Σ drafted (over the requests that report drafted);
- tokens per target step = (Σ accepted + Σ steps) / Σ steps.
A point where no request drafted anything (no speculative outputs, or a server reporting 0 drafted) measured no
speculation: every figure is None, never 0 or NaN.
Cross-check: a response that carries per-step entries and whose token count is known (the token ids of a
``tensorrt_llm`` response; for a text entry model the change of a cumulative ``num_output_tokens`` carried by every
response) must hold steps + accepted tokens — one step per streamed response, so its tokens − 1 = its accepted
count. The request's last step-carrying response may hold fewer (the end token is not returned; max_tokens or a stop
word cut the accepted run): counted as ``cut_at_end``, not as a mismatch; any other difference is a mismatch.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from yitrt.errors import UsageError
from yitrt.speculation import LookaheadSizes, check_draft_len

#: yitrt's per-step output and TensorRT-LLM's perf-metric outputs of speculative decoding
PER_STEP = "accepted_draft_tokens"
TOTAL_ACCEPTED = "total_accepted_draft_tokens"
TOTAL_DRAFT = "total_draft_tokens"
RATE = "acceptance_rate"
#: the request inputs: the BLS's draft length, TensorRT-LLM's perf-metrics switch, tensorrt_llm's lookahead sizes
NUM_DRAFT_TOKENS = "num_draft_tokens"
PERF_METRICS = "return_perf_metrics"
LOOKAHEAD_INPUTS = ("lookahead_window_size", "lookahead_ngram_size", "lookahead_verification_set_size")
#: the only model that takes the lookahead inputs (the ensemble and the BLS do not forward them, reference §1.2)
LOOKAHEAD_MODEL = "tensorrt_llm"
#: the server's acceptance_rate is said to disagree with accepted / drafted beyond this
RATE_TOLERANCE = 1e-3


def option_problems(num_draft_tokens: int | None, lookahead: LookaheadSizes | None, model: str | None) -> list[str]:
    """What is wrong with the speculation options, before connecting (each problem names its fix)."""
    problems = []
    if num_draft_tokens is not None and num_draft_tokens != 0:
        try:
            check_draft_len(num_draft_tokens, "--num-draft-tokens")
        except UsageError as exc:
            problems.append(f"{exc.message} (or 0: the same deployment without speculation)")
    if lookahead is not None:
        if not isinstance(lookahead, LookaheadSizes):
            problems.append(f"lookahead must be LookaheadSizes, got {type(lookahead).__name__}")
        if model != LOOKAHEAD_MODEL:
            problems.append(f"--lookahead is sent as the {LOOKAHEAD_MODEL} model's {', '.join(LOOKAHEAD_INPUTS)} inputs, which "
                            f"the BLS and the ensemble do not forward: pass --model {LOOKAHEAD_MODEL} (and --tokenizer: the "
                            "bench then sends token ids)")
        if num_draft_tokens is not None:
            problems.append(f"--num-draft-tokens goes to the BLS model and --lookahead to {LOOKAHEAD_MODEL}: pass one of them")
    return problems


def request_inputs(num_draft_tokens: int | None, lookahead: LookaheadSizes | None, perf_metrics: bool | None,
                   inputs: dict[str, str], model: str) -> tuple[dict[str, Any], list[str]]:
    """The speculation inputs every request of the run carries, and warnings. ``return_perf_metrics`` is sent when
    asked (``perf_metrics`` True) or, by default (None), when speculation is measured (a draft length or lookahead
    sizes given); ``inputs`` are the model's declared inputs.

    Raises:
        UsageError: an input the option needs that the model does not have (never dropped silently).
    """
    values: dict[str, Any] = {}
    warnings: list[str] = []
    if num_draft_tokens is not None:
        if NUM_DRAFT_TOKENS not in inputs:
            raise UsageError(f"model {model} has no {NUM_DRAFT_TOKENS} input, so --num-draft-tokens cannot be sent",
                             "ask the BLS model of a draft-target deployment (--model tensorrt_llm_bls), or drop the option")
        values[NUM_DRAFT_TOKENS] = num_draft_tokens
    if lookahead is not None:
        missing = [name for name in LOOKAHEAD_INPUTS if name not in inputs]
        if missing:
            raise UsageError(f"model {model} has no {', '.join(missing)} input, so --lookahead cannot be sent",
                             f"pass --model {LOOKAHEAD_MODEL} of a lookahead deployment")
        values.update(zip(LOOKAHEAD_INPUTS, (lookahead.window, lookahead.ngram, lookahead.verification_set), strict=True))
    wanted = perf_metrics if perf_metrics is not None else (num_draft_tokens is not None or lookahead is not None)
    if wanted and PERF_METRICS not in inputs:
        if perf_metrics:
            raise UsageError(f"model {model} has no {PERF_METRICS} input, so --perf-metrics cannot be sent",
                             "drop --perf-metrics, or ask a model that takes it (tensorrt_llm, the ensemble, the BLS)")
        warnings.append(f"model {model} has no {PERF_METRICS} input: acceptance comes only from what its responses carry")
    elif wanted:
        values[PERF_METRICS] = True
    return values, warnings


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass
class Acceptance:
    """What one request's responses said about speculation.

    Attributes:
        responses: per response that carried any speculative output, (its token count or None when unknown, its
            per-step accepted counts or None when it had no ``accepted_draft_tokens``).
        total_accepted / total_draft / rate: the last ``total_accepted_draft_tokens``, ``total_draft_tokens``,
            ``acceptance_rate`` (cumulative, so the last one is the request's).
        stream: per response of a streamed ``tensorrt_llm`` answer (one target step each), (its tokens, [the change
            of total_accepted_draft_tokens] — [] for a response without tokens —, the total); ``stream_ok`` turns
            False when a response with tokens came without the total (its step's acceptance is unknown).
    """

    responses: list[tuple[int | None, list[int] | None]] = field(default_factory=list)
    total_accepted: int | None = None
    total_draft: int | None = None
    rate: float | None = None
    stream: list[tuple[int, list[int], int]] = field(default_factory=list)
    stream_ok: bool = True

    def take(self, per_step: list[int] | None, totals: dict[str, float | None], tokens: int | None,
             one_step: bool = False) -> None:
        """Record one response: its per-step entries, its perf-metric outputs (None when absent) and its tokens;
        ``one_step``: the response is one target step's (a streamed ``tensorrt_llm`` answer)."""
        if one_step and per_step is None and tokens is not None:
            total = totals.get(TOTAL_ACCEPTED)
            if total is None:
                self.stream_ok = self.stream_ok and tokens == 0  # a step without the count: no stream steps
            else:
                before = self.stream[-1][2] if self.stream else 0
                self.stream.append((tokens, [int(total) - before] if tokens else [], int(total)))
        if per_step is None and all(v is None for v in totals.values()):
            return
        self.responses.append((tokens, per_step))
        if totals.get(TOTAL_ACCEPTED) is not None:
            self.total_accepted = int(totals[TOTAL_ACCEPTED])
        if totals.get(TOTAL_DRAFT) is not None:
            self.total_draft = int(totals[TOTAL_DRAFT])
        if totals.get(RATE) is not None:
            self.rate = _finite(float(totals[RATE]))

    @property
    def seen(self) -> bool:
        return bool(self.responses)

    @property
    def steps(self) -> list[int] | None:
        """Accepted draft tokens per target step, in order (None: no response carried the per-step output)."""
        lists = [s for _, s in self.responses if s is not None]
        return [a for s in lists for a in s] if lists else None

    def figures(self, output_tokens: int | None) -> dict[str, Any]:
        """This request's steps, accepted, drafted (each None when unknown), how steps were found, and the checks."""
        steps = self.steps
        pairs: list[tuple[int | None, list[int] | None]] = self.responses
        stream = [a for _, s, _ in self.stream for a in s]
        if steps is None and self.stream_ok and stream:
            steps, pairs, source = stream, [(t, s) for t, s, _ in self.stream], "stream"
        elif steps is not None:
            source = "responses"
        if steps is not None:
            accepted, n_steps = sum(steps), len(steps)
        else:
            accepted, pairs = self.total_accepted, []
            n_steps = output_tokens - accepted if accepted is not None and output_tokens is not None and output_tokens > accepted else None
            source = "totals" if n_steps is not None else None
        checked = mismatches = cut = 0
        last = max((i for i, (_, s) in enumerate(pairs) if s), default=None)
        for i, (tokens, step_list) in enumerate(pairs):
            if tokens is None or step_list is None:
                continue
            checked += 1
            expected = len(step_list) + sum(step_list)
            if tokens < expected and i == last:
                cut += 1
            elif tokens != expected:
                mismatches += 1
        return {"steps": n_steps, "accepted": accepted, "drafted": self.total_draft, "steps_source": source,
                "server_acceptance_rate": self.rate, "total_accepted_draft_tokens": self.total_accepted,
                "accepted_per_step": steps, "responses_checked": checked, "mismatches": mismatches, "cut_at_end": cut}


def point_figures(records: list) -> dict[str, Any]:
    """A load point's ``speculation`` entry from its records (warmup and failed requests are left out).

    Returns:
        ``measured`` (did any request draft?), ``requests`` (requests with speculative outputs), ``target_steps``,
        ``accepted_draft_tokens``, ``draft_tokens``, ``mean_accepted_per_step``, ``acceptance_rate``,
        ``tokens_per_step``, ``accepted_histogram`` (per-step accepted count → steps), ``steps_source`` (requests per
        source), ``cross_check`` (``responses_checked``, ``mismatches`` — None when nothing could be checked —,
        ``cut_at_end``), ``totals_disagree`` (requests whose per-step sum differs from ``total_accepted_draft_tokens``)
        and ``server_rate_disagrees`` (requests whose ``acceptance_rate`` differs from accepted / drafted).
    """
    rows = [r.acceptance.figures(r.output_tokens) for r in records
            if not r.warmup and r.ok and r.acceptance is not None and r.acceptance.seen]
    usable = [f for f in rows if f["accepted"] is not None]
    with_steps = [f for f in usable if f["steps"] is not None]
    with_draft = [f for f in usable if f["drafted"] is not None]
    drafted = sum(f["drafted"] for f in with_draft)
    measured = drafted > 0 or any(f["drafted"] is None and f["steps_source"] in ("responses", "stream") for f in usable)
    steps = sum(f["steps"] for f in with_steps)
    accepted_in_steps = sum(f["accepted"] for f in with_steps)
    checked = sum(f["responses_checked"] for f in rows)
    histogram = Counter(a for f in usable for a in (f["accepted_per_step"] or []))
    out = {
        "measured": measured,
        "requests": len(rows),
        "target_steps": steps if measured and with_steps else None,
        "accepted_draft_tokens": sum(f["accepted"] for f in usable) if measured else None,
        "draft_tokens": drafted if measured and with_draft else None,
        "mean_accepted_per_step": round(accepted_in_steps / steps, 4) if measured and steps else None,
        "acceptance_rate": round(sum(f["accepted"] for f in with_draft) / drafted, 4) if measured and drafted else None,
        "tokens_per_step": round((accepted_in_steps + steps) / steps, 4) if measured and steps else None,
        "accepted_histogram": {str(k): histogram[k] for k in sorted(histogram)} if measured and histogram else None,
        "steps_source": dict(Counter(f["steps_source"] for f in with_steps)),
        "cross_check": {"responses_checked": checked,
                        "mismatches": sum(f["mismatches"] for f in rows) if checked else None,
                        "cut_at_end": sum(f["cut_at_end"] for f in rows) if checked else None},
        "totals_disagree": sum(1 for f in rows if f["steps_source"] in ("responses", "stream") and f["total_accepted_draft_tokens"] is not None
                               and f["total_accepted_draft_tokens"] != f["accepted"]),
        "server_rate_disagrees": sum(1 for f in rows if f["server_acceptance_rate"] is not None and f["drafted"]
                                     and abs(f["server_acceptance_rate"] - f["accepted"] / f["drafted"]) > RATE_TOLERANCE),
    }
    return out


def point_warnings(label: str, spec: dict[str, Any]) -> list[str]:
    """What makes a point's acceptance figures doubtful: responses whose tokens disagree with their accepted counts,
    totals that disagree with the per-step entries."""
    out = []
    mismatches = spec["cross_check"]["mismatches"]
    if mismatches:
        out.append(f"{label}: {mismatches} of {spec['cross_check']['responses_checked']} responses hold a number of tokens "
                   "other than their target steps + accepted draft tokens (one step per streamed response: tokens − 1 = "
                   "accepted): the server's accepted_draft_tokens do not describe its token stream")
    if spec["totals_disagree"]:
        out.append(f"{label}: {spec['totals_disagree']} requests' {TOTAL_ACCEPTED} differ from the sum of their "
                   f"{PER_STEP} (the per-step figures are used)")
    if spec["server_rate_disagrees"]:
        out.append(f"{label}: {spec['server_rate_disagrees']} requests' {RATE} differ from their accepted / drafted tokens")
    return out


def describe(spec: dict[str, Any] | None) -> str:
    """One line for the text report: the point's acceptance, or that it measured none."""
    if not spec or not spec["measured"]:
        return "no speculation measured"
    parts = []
    if spec["mean_accepted_per_step"] is not None:
        parts.append(f"{spec['mean_accepted_per_step']:.2f} accepted draft tokens per target step over "
                     f"{spec['target_steps']} steps, {spec['tokens_per_step']:.2f} tokens per step")
    if spec["acceptance_rate"] is not None:
        parts.append(f"acceptance {spec['acceptance_rate']:.1%} ({spec['accepted_draft_tokens']} of {spec['draft_tokens']} drafted)")
    check = spec["cross_check"]
    if check["mismatches"] is not None:
        parts.append(f"{check['mismatches']} token-count mismatches in {check['responses_checked']} responses")
    return "; ".join(parts) or "speculative outputs without figures"
