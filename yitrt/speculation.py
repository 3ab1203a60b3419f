"""Speculative decoding facts shared by recipe, build, plan, deploy and the reference slot (no heavy imports).

Sources: reference/trtllm-serving-features.md §1 — draft-target (DTM, EDTL/EDTK), lookahead (LA; the same formula in
``decodingConfig.cpp`` ``calculateSpeculativeResourceTuple``, legality in the ``LookaheadDecodingConfig`` constructor),
EAGLE/Medusa (§1.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from yitrt.errors import UsageError

#: yitrt's mode names → trtllm-build ``--speculative_decoding_mode`` values
BUILD_MODES = {"draft-target": "draft_tokens_external", "lookahead": "lookahead_decoding"}

#: modes TensorRT-LLM has that yitrt refuses for Yi, with the reason (§1.3)
UNSUPPORTED_MODES = {
    "eagle": "EAGLE needs trained EAGLE heads and TensorRT-LLM's EAGLE converter; no EAGLE heads exist for Yi "
             "(none in the official EAGLE/EAGLE-3 weight tables); use draft-target or lookahead",
    "medusa": "Medusa needs trained Medusa heads (TensorRT-LLM supports it for Vicuna only); none exist for Yi; "
              "use draft-target or lookahead",
    "explicit-draft-tokens": "explicit draft tokens (ReDrafter) need a trained drafter head; none exists for Yi; "
                             "use draft-target or lookahead",
}

#: the largest draft length yitrt accepts for draft-target (the stock BLS sends at most this many per round; past a
#: few tokens acceptance of a small Yi draft falls off, and every draft token costs target compute)
MAX_DRAFT_TOKENS = 64

#: TensorRT-LLM executor defaults (W, N, G) = (4, 3, 4) (EXH ``kDefaultLookaheadDecoding*``)
DEFAULT_LOOKAHEAD = (4, 3, 4)


@dataclass(frozen=True)
class LookaheadSizes:
    """Lookahead decoding's (window W, ngram N, verification set G), checked as ``LookaheadDecodingConfig`` checks them.

    Raises:
        UsageError: N < 1, W < 1, G < 0, or N == 1 without W == 1 and G == 0.
    """

    window: int
    ngram: int
    verification_set: int

    def __post_init__(self) -> None:
        w, n, g = self.window, self.ngram, self.verification_set
        problems = [f"{name} must be an integer, got {value!r}" for name, value in
                    (("window", w), ("ngram", n), ("verification_set", g)) if not isinstance(value, int) or isinstance(value, bool)]
        if not problems:
            if w < 1:
                problems.append(f"window must be >= 1, got {w}")
            if n < 1:
                problems.append(f"ngram must be >= 1, got {n}")
            if g < 0:
                problems.append(f"verification_set must be >= 0, got {g}")
            if n == 1 and (w != 1 or g != 0):
                problems.append(f"ngram 1 needs window 1 and verification_set 0 (plain decoding), got window {w}, verification_set {g}")
            if w > 64 or n > 64 or g > 64:
                problems.append(f"lookahead sizes above 64 are not supported (window {w}, ngram {n}, verification_set {g})")
        if problems:
            raise UsageError("lookahead " + "; ".join(problems), "use sizes like window 4, ngram 3, verification_set 4 (TensorRT-LLM's defaults)")

    @property
    def max_draft_len(self) -> int:
        """``--max_draft_len`` for the engine: ``(N == 1 ? 0 : N − 2) + (W − 1 + G) · (N − 1)`` (LA, DC)."""
        return lookahead_max_draft_len(self.window, self.ngram, self.verification_set)

    @property
    def decoding_tokens(self) -> int:
        """Tokens one sequence feeds the target per step (``maxDecodingTokens = max_draft_len + 1``, DC)."""
        return self.max_draft_len + 1

    def covers(self, other: LookaheadSizes) -> bool:
        """A per-request configuration must fit the model's: w ≤ W, n ≤ N, g ≤ G (T-utilsh, LA)."""
        return other.window <= self.window and other.ngram <= self.ngram and other.verification_set <= self.verification_set


def lookahead_max_draft_len(window: int, ngram: int, verification_set: int) -> int:
    """The engine's ``max_draft_len`` for lookahead (W, N, G): ``(N == 1 ? 0 : N − 2) + (W − 1 + G) · (N − 1)``.

    Worked examples (reference §1.2): (7, 7, 7) → 83, (4, 3, 4) → 15, (7, 5, 3) → 39, (1, 1, 0) → 0.
    """
    return (0 if ngram == 1 else ngram - 2) + (window - 1 + verification_set) * (ngram - 1)


def check_draft_len(k: int, what: str = "max_draft_len") -> int:
    """A draft-target draft length: 1..MAX_DRAFT_TOKENS.

    Raises:
        UsageError: not an integer in range.
    """
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise UsageError(f"{what} must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {k!r}",
                         "draft 3-8 tokens per round for a small Yi draft (acceptance falls off after that)")
    return k


#: an engine's ``config.json`` ``build_config.speculative_decoding_mode``: TensorRT-LLM's ``SpeculativeDecodingMode``
#: IntFlag (``tensorrt_llm/models/modeling_utils.py``, kept in sync with ``speculativeDecodingMode.h``), read by the
#: C++ runtime as an integer (``gptJsonConfig.cpp`` ``parseBuilderConfig``) → the trtllm-build mode name (None: none)
ENGINE_MODE_FLAGS = {1: None, 2: "draft_tokens_external", 4: "medusa", 8: "lookahead_decoding", 16: "explicit_draft_tokens",
                     32: "eagle"}


def engine_mode(value: object) -> str | None:
    """The trtllm-build mode name of an engine's ``speculative_decoding_mode`` (None: no speculation).

    Accepts the integer flag config.json holds, and (for engines written by other tools) the mode's name as
    trtllm-build spells it or as ``SpeculativeDecodingMode.NAME``.

    Raises:
        ValueError: a value that names no mode.
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value in ENGINE_MODE_FLAGS:
            return ENGINE_MODE_FLAGS[value]
    elif isinstance(value, str):
        name = value.strip().rpartition(".")[2].lower()
        if name == "none":
            return None
        if name in ENGINE_MODE_FLAGS.values():
            return name
    raise ValueError(f"speculative_decoding_mode {value!r} names no TensorRT-LLM mode")


def unsupported_reason(build_mode: str) -> str | None:
    """Why yitrt refuses an engine built with this trtllm-build mode (None: a mode yitrt serves)."""
    return UNSUPPORTED_MODES.get(build_mode.replace("_", "-"))


def parse_lookahead(text: str) -> LookaheadSizes:
    """``"W,N,G"`` (e.g. ``"4,3,4"``) → checked ``LookaheadSizes``.

    Raises:
        UsageError: not three integers, or sizes ``LookaheadSizes`` refuses.
    """
    parts = [p.strip() for p in str(text).split(",")]
    try:
        window, ngram, verification_set = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--lookahead takes W,N,G (window, ngram, verification set): {text!r} is not three integers",
                         "e.g. --lookahead 4,3,4 (TensorRT-LLM's defaults); 1,1,0 is plain decoding") from None
    return LookaheadSizes(window, ngram, verification_set)
