"""What speculative decoding asks of one engine build (reference trtllm-serving-features.md §1, §6).

Three roles: the *target* of a draft-target pair (``--speculative_decoding_mode draft_tokens_external
--max_draft_len K``, paged context FMHA for the KV reuse every round relies on), the *draft* (an ordinary engine
with paged context FMHA, ``--gather_generation_logits`` only when the draft's logits are used), and a *lookahead*
engine (``--speculative_decoding_mode lookahead_decoding --max_draft_len D`` with D from
``yitrt.speculation.LookaheadSizes``). The mode names and the lookahead formula live in ``yitrt.speculation``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from yitrt.errors import UsageError
from yitrt.speculation import (
    BUILD_MODES,
    DEFAULT_LOOKAHEAD,
    ENGINE_MODE_FLAGS,
    UNSUPPORTED_MODES,
    LookaheadSizes,
    check_draft_len,
    engine_mode,
)
from yitrt.speculation import parse_lookahead as parse_sizes

Role = Literal["target", "draft", "lookahead"]

#: mode name → the integer ``build_config.speculative_decoding_mode`` an engine's config.json holds (the inverse of
#: yitrt.speculation.ENGINE_MODE_FLAGS, the one table of TensorRT-LLM's ``SpeculativeDecodingMode`` IntFlag)
ENGINE_MODE_VALUES = {name: flag for flag, name in ENGINE_MODE_FLAGS.items()}

#: trtllm-build's error for context-logit gathering on a speculative engine (BUILD ``main()``, reference §1.1)
GATHER_CONTEXT_ERROR = "Gather context logits is not support with draft len > 0"


@dataclass(frozen=True)
class SpeculativeBuild:
    """One engine's part in speculative decoding.

    Attributes:
        role: ``target`` (draft-target), ``draft`` (the draft-target draft) or ``lookahead``.
        draft_len: target: K; draft: the K of its target (0: not given, the draft alone is planned); lookahead:
            D = ``lookahead.max_draft_len``.
        lookahead: the (W, N, G) of a lookahead engine.
        use_draft_logits: the draft returns its generation logits (probabilistic acceptance).
        pair: the other engine's checkpoint (a target's draft, a draft's target), to plan both on the same GPUs.
    """

    role: Role
    draft_len: int = 0
    lookahead: LookaheadSizes | None = None
    use_draft_logits: bool = False
    pair: Path | None = None

    @property
    def mode(self) -> str | None:
        """``--speculative_decoding_mode`` (None for the draft: an ordinary engine)."""
        return {"target": BUILD_MODES["draft-target"], "lookahead": BUILD_MODES["lookahead"]}.get(self.role)

    @property
    def engine_draft_len(self) -> int:
        """``--max_draft_len`` of this engine (0 for the draft)."""
        return 0 if self.role == "draft" else self.draft_len

    def argv_flags(self) -> dict[str, Any]:
        """The build arguments (not plugin flags) this role adds, in argv order."""
        if self.role == "draft":
            return {"gather_generation_logits": True} if self.use_draft_logits else {}
        return {"speculative_decoding_mode": self.mode, "max_draft_len": self.draft_len}

    @property
    def needs_paged_context_fmha(self) -> bool:
        """Draft-target target and draft re-process each round's sequence and rely on KV reuse (DTM)."""
        return self.role in ("target", "draft")

    def rule_fields(self) -> dict[str, Any]:
        """The ``build.*`` fields the compatibility rules read."""
        return {"speculative_decoding_mode": self.mode, "max_draft_len": self.engine_draft_len, "speculative_role": self.role}

    def to_json(self) -> dict[str, Any]:
        """JSON object (the build config's ``speculative`` section)."""
        out: dict[str, Any] = {"role": self.role, "speculative_decoding_mode": self.mode, "max_draft_len": self.engine_draft_len}
        if self.role == "draft":
            out["drafts_for_max_draft_len"] = self.draft_len or None
            out["gather_generation_logits"] = self.use_draft_logits
        if self.lookahead is not None:
            la = self.lookahead
            out.update(window=la.window, ngram=la.ngram, verification_set=la.verification_set, decoding_tokens=la.decoding_tokens)
        if self.pair is not None:
            out["planned_with"] = str(self.pair)
        return out


def engine_speculation(build_config: dict[str, Any]) -> tuple[str | None, int]:
    """The speculative mode (a ``--speculative_decoding_mode`` name, None: none) and ``max_draft_len`` an engine was
    built with, from its config.json ``build_config`` (the integer flag, or a name as older configs may hold).

    Raises:
        UsageError: a mode value TensorRT-LLM does not define.
    """
    raw = build_config.get("speculative_decoding_mode", 1)
    draft = int(build_config.get("max_draft_len") or 0)
    try:
        return (None if raw in (None, 0) else engine_mode(raw)), draft
    except ValueError:
        raise UsageError(f"engine build_config speculative_decoding_mode {raw!r} is not a TensorRT-LLM mode", "rebuild the engine") from None


def parse_lookahead(text: str | tuple[int, int, int] | None) -> LookaheadSizes | None:
    """``"W,N,G"`` (or a triple; None: none) → ``LookaheadSizes`` (``yitrt.speculation.parse_lookahead``).

    Raises:
        UsageError: not three integers, or sizes ``LookaheadSizes`` refuses.
    """
    if text is None:
        return None
    return parse_sizes(text) if isinstance(text, str) else LookaheadSizes(*text)


def speculative_build(
    speculative: str | None = None,
    *,
    max_draft_len: int | None = None,
    lookahead: str | tuple[int, int, int] | None = None,
    draft_engine: bool = False,
    use_draft_logits: bool = False,
    pair: Path | None = None,
    max_beam_width: int = 1,
) -> SpeculativeBuild | None:
    """Check the speculative options of `yitrt build` together and resolve them (None: an ordinary build).

    Args:
        speculative: ``draft-target`` or ``lookahead`` (eagle/medusa/explicit-draft-tokens are refused with the reason).
        max_draft_len: draft-target K (the target's ``--max_draft_len``; for ``draft_engine``, the target's K, needed
            only to plan the pair).
        lookahead: ``"W,N,G"`` for lookahead (default ``DEFAULT_LOOKAHEAD``).
        draft_engine: build the draft of a draft-target pair (an ordinary engine).
        use_draft_logits: the draft's generation logits are used (``--gather_generation_logits`` on the draft).
        pair: the other model's checkpoint (``--draft`` for a target, ``--target`` for a draft).
        max_beam_width: speculative decoding runs with beam width 1 only.

    Raises:
        UsageError: every contradiction at once.
    """
    problems: list[str] = []
    mode = speculative.strip().lower() if isinstance(speculative, str) else None
    if draft_engine and mode in (None, "draft-target"):
        mode = "draft-target"
    elif draft_engine:
        problems.append(f"--draft-engine builds the draft of a draft-target pair, not a {mode} engine")
    if mode is None:
        given = [flag for flag, value in (("--max-draft-len", max_draft_len), ("--lookahead", lookahead),
                                          ("--use-draft-logits", use_draft_logits or None), ("--draft/--target", pair)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --speculative draft-target|lookahead "
                             "(or --draft-engine)",
                             "add --speculative draft-target --max-draft-len K, or --speculative lookahead --lookahead W,N,G")
        return None
    if mode in UNSUPPORTED_MODES:
        raise UsageError(f"--speculative {mode}: {UNSUPPORTED_MODES[mode]}", "use --speculative draft-target or lookahead")
    if mode not in BUILD_MODES:
        raise UsageError(f"--speculative {speculative!r} is not a mode", "use draft-target or lookahead (" +
                         ", ".join(f"{m}: unsupported" for m in UNSUPPORTED_MODES) + ")")
    if max_beam_width != 1:
        problems.append(f"speculative decoding runs with beam width 1 only, not --max-beam-width {max_beam_width} "
                        "(ExternalDraftTokensLayer does not support beam search)")
    sizes = None
    if mode == "lookahead":
        if max_draft_len is not None:
            problems.append("--max-draft-len is derived for lookahead (from --lookahead W,N,G); drop it")
        if use_draft_logits:
            problems.append("--use-draft-logits belongs to a draft-target draft, not a lookahead engine")
        if pair is not None:
            problems.append("lookahead needs no second model (--draft/--target)")
        try:
            sizes = parse_lookahead(lookahead) or LookaheadSizes(*DEFAULT_LOOKAHEAD)
        except UsageError as exc:
            problems.append(exc.message)
        if sizes is not None and sizes.max_draft_len < 1:
            problems.append(f"lookahead {sizes.window},{sizes.ngram},{sizes.verification_set} drafts no token (max_draft_len 0): "
                            "that is plain decoding")
    else:
        if lookahead is not None:
            problems.append("--lookahead belongs to --speculative lookahead, not draft-target")
        if max_draft_len is None and not draft_engine:
            problems.append("--speculative draft-target needs --max-draft-len K (draft tokens per round)")
        elif max_draft_len is not None:
            try:
                check_draft_len(max_draft_len, "--max-draft-len")
            except UsageError as exc:
                problems.append(exc.message)
        if use_draft_logits and not draft_engine:
            problems.append("--use-draft-logits changes the draft engine only: pass it with --draft-engine "
                            "(the target is built the same either way)")
        if draft_engine and pair is not None and max_draft_len is None:
            problems.append("planning the draft with its --target needs the target's --max-draft-len K")
    if problems:
        raise UsageError("; ".join(problems), "see `yitrt build --help` (speculative decoding options)")
    if sizes is not None:
        return SpeculativeBuild("lookahead", sizes.max_draft_len, sizes)
    return SpeculativeBuild("draft" if draft_engine else "target", max_draft_len or 0, None, use_draft_logits, pair)
