"""Speculative decoding in a Triton repository (``yitrt deploy --speculative``): the settings, checked against the
target and draft engines' ``config.json`` (for the reference slot the flags are the truth), and what they add to
the models' parameters, the launch and the README.

Facts (reference/trtllm-serving-features.md): §1.1 draft-target — the BLS orchestrates ``tensorrt_llm`` (target)
and a copy ``tensorrt_llm_draft``, each with its own engine, GPUs and KV fraction (DTM: 0.5 each on a shared GPU);
KV-block reuse on the target (the executor throws otherwise), one ``logits_datatype`` for both (the BLS forwards
the draft's ``generation_logits`` as ``draft_logits``), ``exclude_input_in_output`` false on both (safe for either
stock BLS variant), the orchestrator launch (``launch_triton_server.py --multi-model``); the stock BLS serves batch 1
per call without streaming. §1.2 lookahead — ``decoding_mode: lookahead`` and the three sizes, whose max_draft_len
must equal the engine's. The formula and the mode tables are yitrt.speculation's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yitrt.errors import CheckpointError, UsageError, ValidationError
from yitrt.speculation import (
    BUILD_MODES,
    DEFAULT_LOOKAHEAD,
    UNSUPPORTED_MODES,
    LookaheadSizes,
    check_draft_len,
    lookahead_max_draft_len,
    unsupported_reason,
)

if TYPE_CHECKING:
    from yitrt.triton.repository import DeployRequest, EngineFacts

#: the draft model's name in the repository (DTM, T-bls-cfg)
DRAFT_MODEL = "tensorrt_llm_draft"
#: ``--speculative`` values yitrt deploys (the keys of yitrt.speculation.BUILD_MODES)
MODES = tuple(BUILD_MODES)
#: the C++ backend's kv_cache_free_gpu_mem_fraction when the key is unset (reference triton-repository.md §1.5)
BACKEND_KV_FRACTION = 0.9
#: each model's share of the KV fraction when target and draft share GPUs (DTM uses 0.5 for both)
SHARED_SPLIT = 0.5
#: why speculation needs KV-block reuse on the target (IFB constructor)
REUSE_REQUIRED = ('the target executor throws "KV cache block reuse must be enabled for speculative decoding target model"; '
                  "drop --no-kv-reuse")
#: the stock BLS's limits on draft-target (T-dec ``validate``/``decode``, BE docs/model_config.md) and how yitrt's BLS differs
STOCK_BLS_LIMITS = ("NVIDIA's stock tensorrt_llm_bls serves draft-target with batch size 1 per BLS call and no streaming "
                    "(\"streaming is not supported with speculative decoding\"; it calls both models non-decoupled, so it needs "
                    "--no-streaming); yitrt's BLS (installed here) streams each round's accepted tokens and runs requests concurrently")


@dataclass(frozen=True)
class Speculation:
    """The speculative settings of one deployment, resolved and checked.

    Attributes:
        mode: ``draft-target`` or ``lookahead``.
        max_draft_len: the target's bound on draft tokens per step: the engine's ``max_draft_len`` (the reference slot:
            K for draft-target, the sizes' max_draft_len for lookahead).
        num_draft_tokens: K, the draft tokens per round yitrt's BLS asks for when a request names none (draft-target).
        use_draft_logits: the BLS's default for requests that do not send ``use_draft_logits`` (probabilistic
            acceptance with the draft's logits).
        lookahead: (W, N, G) of the ``tensorrt_llm`` model (lookahead).
        draft: the draft engine's (or checkpoint's) facts (draft-target).
        kv_fraction / draft_kv_fraction: ``kv_cache_free_gpu_mem_fraction`` of target and draft (None: unset).
        gpu_ids / draft_gpu_ids: ``gpu_device_ids`` of target and draft (engines in orchestrator mode; else None).
        kv_tokens / draft_kv_tokens: ``max_tokens_in_paged_kv_cache`` of target and draft (None: the target's usual
            value, the draft's unset).
    """

    mode: str
    max_draft_len: int
    num_draft_tokens: int | None = None
    use_draft_logits: bool = False
    lookahead: LookaheadSizes | None = None
    draft: EngineFacts | None = None
    kv_fraction: float | None = None
    draft_kv_fraction: float | None = None
    gpu_ids: tuple[int, ...] | None = None
    draft_gpu_ids: tuple[int, ...] | None = None
    kv_tokens: int | None = None
    draft_kv_tokens: int | None = None

    @property
    def draft_target(self) -> bool:
        """Whether the repository has a draft model."""
        return self.mode == "draft-target"

    @property
    def orchestrator(self) -> bool:
        """Whether tritonserver runs in TensorRT-LLM's orchestrator mode (``--multi-model``): two engine models, each
        spawning its own ranks. The reference slot's models are Python models and need none of it."""
        return self.draft_target and self.draft is not None and self.draft.kind == "trtllm"

    @property
    def orchestrator_gpus(self) -> list[int]:
        """Every GPU either model uses (each gets ``--cuda-memory-pool-byte-size=ID:0`` in orchestrator mode)."""
        return sorted(set(self.gpu_ids or ()) | set(self.draft_gpu_ids or ()))

    def describe(self) -> str:
        """One line for humans."""
        if not self.draft_target:
            w = self.lookahead
            return f"lookahead decoding, window {w.window}, ngram {w.ngram}, verification set {w.verification_set} (max_draft_len {self.max_draft_len})"
        d = self.draft
        where = f"{d.path} (tp {d.tp} × pp {d.pp})" if d else "?"
        return (f"draft-target, {self.num_draft_tokens} draft tokens per round (max_draft_len {self.max_draft_len}); "
                f"draft {DRAFT_MODEL} ← {where}; acceptance {'with draft logits' if self.use_draft_logits else 'by exact match'}")

    def notes(self) -> list[str]:
        """The limits and facts a user of the repository must know (deploy prints them, the README repeats them)."""
        if not self.draft_target:
            w = self.lookahead
            return [f"per-request lookahead inputs (lookahead_window_size, lookahead_ngram_size, lookahead_verification_set_size) exist "
                    f"only on tensorrt_llm, not on the ensemble or the BLS; send all three, with w <= {w.window}, n <= {w.ngram}, "
                    f"g <= {w.verification_set} ((1, 1, 0) is plain decoding)"]
        out = [STOCK_BLS_LIMITS,
               f"a request's num_draft_tokens (BLS input) overrides the default {self.num_draft_tokens} up to {self.max_draft_len}; "
               "0 turns speculation off for it",
               "exclude_input_in_output is false on tensorrt_llm and tensorrt_llm_draft (what either stock BLS variant expects): the "
               "ensemble (no speculation) returns the prompt before the answer unless a request sends exclude_input_in_output true"]
        if self.orchestrator:
            out.append("launch: orchestrator mode (launch_triton_server.py --multi-model): one tritonserver under mpirun -n 1 with "
                       f"TRTLLM_ORCHESTRATOR=1; the target spawns {_ranks(self.gpu_ids)}, the draft {_ranks(self.draft_gpu_ids)}")
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON of the deploy summary."""
        out: dict[str, Any] = {"mode": self.mode, "max_draft_len": self.max_draft_len}
        if self.draft_target:
            d = self.draft
            out.update({"num_draft_tokens": self.num_draft_tokens, "use_draft_logits": self.use_draft_logits,
                        "draft": {"model": DRAFT_MODEL, "source": str(d.path) if d else None, "tp": d.tp if d else None,
                                  "pp": d.pp if d else None, "kv_fraction": self.draft_kv_fraction, "kv_tokens": self.draft_kv_tokens,
                                  "gpu_device_ids": list(self.draft_gpu_ids) if self.draft_gpu_ids is not None else None},
                        "kv_fraction": self.kv_fraction, "kv_tokens": self.kv_tokens,
                        "gpu_device_ids": list(self.gpu_ids) if self.gpu_ids is not None else None,
                        "launch": "orchestrator" if self.orchestrator else "single"})
        else:
            w = self.lookahead
            out["lookahead"] = {"window": w.window, "ngram": w.ngram, "verification_set": w.verification_set}
        out["notes"] = self.notes()
        return out


def _ranks(ids: tuple[int, ...] | None) -> str:
    count = len(ids or ())
    return f"{count} rank{'s' if count != 1 else ''} on GPU {','.join(map(str, ids or ()))}"


def _sizes(value: Any) -> LookaheadSizes | None:
    if value is None or isinstance(value, LookaheadSizes):
        return value
    return LookaheadSizes(*value)


def resolve(req: DeployRequest, facts: EngineFacts) -> tuple[Speculation | None, list[str], list[str]]:
    """The deployment's speculation, checked against the engines (or taken from the flags for the reference slot).

    Returns:
        (the settings or None, every problem found, warnings). Problems are listed, not raised, so that deploy
        reports them with the serving problems at once.

    Raises:
        UsageError: an unknown mode, or one yitrt does not serve (EAGLE/Medusa: the reason).
    """
    mode = req.speculative
    if mode is not None and mode not in MODES:
        reason = UNSUPPORTED_MODES.get(mode)
        raise UsageError(f"--speculative {mode}: {reason}" if reason else f"unknown --speculative mode {mode!r}",
                         f"use one of: {', '.join(MODES)}")
    problems: list[str] = []
    warnings: list[str] = []
    engine = facts.kind == "trtllm"
    draft_only = [name for name, value in (("--draft", req.draft), ("--num-draft-tokens", req.num_draft_tokens),
                                           ("--use-draft-logits", req.use_draft_logits or None),
                                           ("--draft-kv-fraction", req.draft_kv_fraction), ("--draft-gpu-ids", req.draft_gpu_ids))
                  if value is not None]
    if draft_only and mode != "draft-target":
        problems.append(f"{', '.join(draft_only)}: draft-target options (pass --speculative draft-target"
                        + (")" if mode is None else ", or drop them for lookahead)"))
    if req.lookahead is not None and mode != "lookahead":
        problems.append("--lookahead W,N,G needs --speculative lookahead")
    if req.gpu_ids is not None and not (mode == "draft-target" and engine):
        problems.append("--gpu-ids: for draft-target deployments of engines (each model's gpu_device_ids in orchestrator mode)")
    built = facts.speculative_mode if engine else None
    if built is not None and unsupported_reason(built):
        problems.append(f"the engine was built with speculative_decoding_mode {built}, which yitrt does not serve: {unsupported_reason(built)}")
    if mode is None:
        if built == "draft_tokens_external":
            warnings.append(f"the engine was built as a draft-target target (max_draft_len {facts.max_draft_len}) and is deployed without "
                            "a draft: pass --speculative draft-target --draft DRAFT_ENGINE to speculate")
            if req.kv_reuse is False:
                problems.append(f"--no-kv-reuse: this engine is a speculative-decoding target; {REUSE_REQUIRED}")
        elif built == "lookahead_decoding":
            problems.append(f"the engine was built for lookahead decoding (max_draft_len {facts.max_draft_len}): deploy it with "
                            f"--speculative lookahead --lookahead W,N,G ({_sizes_for(facts.max_draft_len)})")
        return None, problems, warnings
    if mode == "lookahead":
        return _lookahead(req, facts, built, problems), problems, warnings
    return _draft_target(req, facts, built, problems, warnings), problems, warnings


def _sizes_for(draft_len: int) -> str:
    """A hint: lookahead sizes whose max_draft_len is ``draft_len`` (the one nearest TensorRT-LLM's defaults)."""
    found = [(w, n, g) for n in range(2, 9) for w in range(1, 17) for g in range(0, 17) if lookahead_max_draft_len(w, n, g) == draft_len]
    if not found:
        return f"whose max_draft_len is {draft_len}"
    w, n, g = min(found, key=lambda s: sum(abs(a - b) for a, b in zip(s, DEFAULT_LOOKAHEAD, strict=True)))
    return f"sizes whose max_draft_len is {draft_len}, e.g. {w},{n},{g}"


def _lookahead(req: DeployRequest, facts: EngineFacts, built: str | None, problems: list[str]) -> Speculation:
    sizes = _sizes(req.lookahead) or LookaheadSizes(*DEFAULT_LOOKAHEAD)
    shown = f"{sizes.window},{sizes.ngram},{sizes.verification_set}"
    if facts.kind == "trtllm":
        if built != "lookahead_decoding":
            problems.append(f"the engine was not built for lookahead decoding (speculative_decoding_mode {built or 'none'}): rebuild it with "
                            f"yitrt build --speculative lookahead --lookahead {shown} (trtllm-build --speculative_decoding_mode "
                            f"lookahead_decoding --max_draft_len {sizes.max_draft_len})")
        elif sizes.max_draft_len != facts.max_draft_len:
            given = f"--lookahead {shown}" if req.lookahead is not None else f"the default lookahead {shown}"
            problems.append(f"{given} needs max_draft_len {sizes.max_draft_len}, the engine was built with {facts.max_draft_len} "
                            f"(they must be equal): pass --lookahead {_sizes_for(facts.max_draft_len)}, or rebuild the engine for {shown}")
    return Speculation("lookahead", facts.max_draft_len if facts.kind == "trtllm" and built == "lookahead_decoding" else sizes.max_draft_len,
                       lookahead=sizes)


def _read_draft(req: DeployRequest, facts: EngineFacts, problems: list[str]) -> EngineFacts | None:
    from yitrt.triton.repository import DeployRequest as Request
    from yitrt.triton.repository import engine_facts

    what = "the draft engine folder (yitrt build of the draft)" if facts.kind == "trtllm" else "the draft checkpoint"
    if req.draft is None:
        problems.append(f"--speculative draft-target needs --draft: {what}")
        return None
    try:
        return engine_facts(Request(Path(req.draft), req.out, engine=facts.kind))
    except (UsageError, CheckpointError, ValidationError) as exc:
        problems.append(f"--draft {req.draft}: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
        return None


def _draft_target(req: DeployRequest, facts: EngineFacts, built: str | None, problems: list[str], warnings: list[str]) -> Speculation:
    from yitrt.triton.repository import reuse_possible

    engine = facts.kind == "trtllm"
    draft = _read_draft(req, facts, problems)
    if draft is not None and draft.path == facts.path:
        warnings.append("the draft is the target itself: every draft token is accepted, and nothing is gained (a test setup)")
    k = req.num_draft_tokens
    if k is not None:
        try:
            check_draft_len(k, "--num-draft-tokens")
        except UsageError as exc:
            problems.append(f"{exc.message} ({exc.hint})")
    if req.kv_reuse is False:
        problems.append(f"--no-kv-reuse with --speculative draft-target: {REUSE_REQUIRED}")
    if engine:
        limit = facts.max_draft_len
        if built != "draft_tokens_external":
            problems.append(f"the target engine was not built for draft-target speculation (speculative_decoding_mode {built or 'none'}, "
                            f"max_draft_len {limit}): rebuild it with yitrt build --speculative draft-target --max-draft-len K "
                            "(trtllm-build --speculative_decoding_mode draft_tokens_external --max_draft_len K)")
        elif k is not None and k > limit:
            problems.append(f"--num-draft-tokens {k} exceeds the target engine's max_draft_len {limit} (TensorRT-LLM refuses: \"Number of "
                            f"draft tokens ({k}) is larger than maximum number of draft tokens ({limit})\"): pass at most {limit}, or "
                            f"rebuild the target with --max-draft-len {k}")
        if facts.max_beam_width > 1:
            problems.append(f"draft-target decoding has no beam search (\"ExternalDraftTokensLayer does not support Beam search mode\") and "
                            f"the target engine was built with max_beam_width {facts.max_beam_width}: rebuild it with max_beam_width 1")
        if k is None:
            k = limit if limit >= 1 else None
    else:
        if k is None:
            problems.append("--speculative draft-target on the reference slot needs --num-draft-tokens K: the slot's yitrt_max_draft_len "
                            "stands in for the engine's --max_draft_len, and there is no engine to read it from")
        limit = k or 0
        if facts.kv_cache_quant_algo:
            problems.append(f"the target checkpoint's KV cache is {facts.kv_cache_quant_algo}: the reference slot reuses no KV blocks for it, "
                            "and a speculative target must (like an engine without paged context FMHA); use a checkpoint without KV-cache quantization")
    if draft is not None:
        _check_draft(req, facts, draft, problems, warnings, reuse_possible)
    gpus = draft_gpus = None
    if engine and draft is not None:
        gpus = _gpu_ids(req.gpu_ids, facts.world_size, "--gpu-ids", "target", problems)
        draft_gpus = _gpu_ids(req.draft_gpu_ids, draft.world_size, "--draft-gpu-ids", "draft", problems)
    kv, draft_kv, tokens, draft_tokens = _kv_settings(req, facts, draft, gpus, draft_gpus, problems)
    return Speculation("draft-target", limit, k, req.use_draft_logits, None, draft, kv, draft_kv, gpus, draft_gpus, tokens, draft_tokens)


def _check_draft(req, facts: EngineFacts, draft: EngineFacts, problems: list[str], warnings: list[str], reuse_possible) -> None:
    """Every way the draft does not fit the target."""
    if facts.vocab_size and draft.vocab_size and facts.vocab_size != draft.vocab_size:
        problems.append(f"the draft's vocabulary ({draft.vocab_size} tokens) differs from the target's ({facts.vocab_size}): draft and target "
                        "must share one tokenizer (pair Yi models of one family; `yitrt inspect TARGET --draft DRAFT` checks a pair)")
    if draft.logits_dtype != facts.logits_dtype:
        problems.append(f"the draft's logits_dtype {draft.logits_dtype} differs from the target's {facts.logits_dtype}: the BLS forwards the "
                        "draft's generation_logits as the target's draft_logits, so both need one logits_datatype; rebuild the draft with "
                        f"--logits_dtype {facts.logits_dtype}")
    if draft.kind == "trtllm":
        from yitrt.build.flags import release_line

        if draft.speculative_mode is not None:
            problems.append(f"the draft engine was built with speculative_decoding_mode {draft.speculative_mode}: a draft is an ordinary "
                            "engine (rebuild it without --speculative)")
        if req.use_draft_logits and not draft.gather_generation_logits:
            problems.append("--use-draft-logits needs the draft's generation logits, and the draft engine has none (build_config."
                            "gather_generation_logits is false): rebuild the draft with --gather_generation_logits (yitrt build with "
                            "use_draft_logits), or drop --use-draft-logits for exact-match acceptance")
        if draft.version and facts.version and release_line(draft.version) != release_line(facts.version):
            problems.append(f"the draft engine was built with TensorRT-LLM {draft.version}, the target with {facts.version}: one backend "
                            "serves both, so build both with the same version")
        if not reuse_possible(draft):
            problems.append("the draft engine has no paged context FMHA, so no KV-cache reuse (DTM builds both with "
                            "--use_paged_context_fmha enable): rebuild the draft with --use_paged_context_fmha enable")
        if draft.max_seq_len < facts.max_seq_len:
            warnings.append(f"the draft engine's max_seq_len {draft.max_seq_len} is below the target's {facts.max_seq_len}: requests longer than "
                            f"{draft.max_seq_len} tokens fail in the draft")
    else:
        if draft.max_seq_len < facts.max_seq_len:
            problems.append(f"the draft checkpoint's context ({draft.max_seq_len} tokens) is shorter than the target's max_seq_len "
                            f"{facts.max_seq_len}: pass --max-seq-len {draft.max_seq_len} or less")
        if draft.kv_cache_quant_algo:
            problems.append(f"the draft checkpoint's KV cache is {draft.kv_cache_quant_algo}: the reference slot reuses no KV blocks for it, "
                            "and both models of draft-target reuse them; use a draft without KV-cache quantization")


def _gpu_ids(given: tuple[int, ...] | None, world: int, option: str, what: str, problems: list[str]) -> tuple[int, ...]:
    """The model's ``gpu_device_ids``: as given (one per rank), else the first ``world`` GPUs (both models share them)."""
    if given is None:
        return tuple(range(world))
    ids = tuple(given)
    if len(ids) != world or len(set(ids)) != len(ids) or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < 1024 for i in ids):
        problems.append(f"{option} {','.join(map(str, ids))}: the {what} engine has {world} rank{'s' if world != 1 else ''} (tp × pp), "
                        f"so give {world} distinct GPU ids")
    return ids


def _pair_plan(facts: EngineFacts, draft: EngineFacts) -> dict[str, Any] | None:
    """The two models' KV parameters a pair plan recorded (``yitrt build`` of a target with its draft, or of a draft
    with its target: the engine manifest's ``plan.pair.triton``), the target's record first."""
    for plan in (facts.plan, draft.plan):
        triton = (plan.get("pair") or {}).get("triton") if isinstance(plan.get("pair"), dict) else None
        if isinstance(triton, dict) and isinstance(triton.get("tensorrt_llm"), dict) and isinstance(triton.get(DRAFT_MODEL), dict):
            return triton
    return None


def _kv_settings(req: DeployRequest, facts: EngineFacts, draft: EngineFacts | None, gpus, draft_gpus,
                 problems: list[str]) -> tuple[float | None, float | None, int | None, int | None]:
    """(target fraction, draft fraction, target token cap, draft token cap). Given options win; else a pair plan's
    values (fractions that reach each pool's cap in either load order); else, when both share GPUs, half each of
    the plan's fraction (the backend's 0.9 when there is none: DTM uses 0.5 each on one GPU) and each engine's own
    token cap."""
    for option, value in (("--kv-fraction", req.kv_fraction), ("--draft-kv-fraction", req.draft_kv_fraction)):
        if value is not None and not 0 < value <= 1:
            problems.append(f"{option} {value} must be in (0, 1]")
    if facts.kind != "trtllm" or draft is None:  # the slot's KV pool is a byte budget: fractions only as given
        return req.kv_fraction, req.draft_kv_fraction, req.max_kv_tokens, req.max_kv_tokens

    def given(option, planned):
        return option if option is not None else planned

    pair = _pair_plan(facts, draft)
    if pair is not None:
        t, d = pair["tensorrt_llm"], pair[DRAFT_MODEL]
        return (given(req.kv_fraction, t.get("kv_cache_free_gpu_mem_fraction")), given(req.draft_kv_fraction, d.get("kv_cache_free_gpu_mem_fraction")),
                given(req.max_kv_tokens, t.get("max_tokens_in_paged_kv_cache")), d.get("max_tokens_in_paged_kv_cache"))
    planned = facts.plan.get("kv_cache_free_gpu_mem_fraction")
    tokens = given(req.max_kv_tokens, facts.plan.get("max_tokens_in_paged_kv_cache"))
    draft_tokens = draft.plan.get("max_tokens_in_paged_kv_cache")
    if set(gpus or ()) & set(draft_gpus or ()):
        half = round(float(planned if planned is not None else BACKEND_KV_FRACTION) * SHARED_SPLIT, 4)
        return given(req.kv_fraction, half), given(req.draft_kv_fraction, half), tokens, draft_tokens
    return given(req.kv_fraction, planned), given(req.draft_kv_fraction, draft.plan.get("kv_cache_free_gpu_mem_fraction")), tokens, draft_tokens


# -- what the settings write ---------------------------------------------------------------------------------------


def _ids(ids: tuple[int, ...] | None) -> dict[str, str]:
    return {"gpu_device_ids": ",".join(map(str, ids))} if ids is not None else {}


def _fraction(value: float | None) -> dict[str, str]:
    return {"kv_cache_free_gpu_mem_fraction": f"{float(value):g}"} if value is not None else {}


def target_fill(spec: Speculation) -> dict[str, str]:
    """Template variables the target ``tensorrt_llm`` (and the BLS) get filled with."""
    if not spec.draft_target:
        w = spec.lookahead
        return {"decoding_mode": "lookahead", "lookahead_window_size": str(w.window), "lookahead_ngram_size": str(w.ngram),
                "lookahead_verification_set_size": str(w.verification_set)}
    tokens = {"max_tokens_in_paged_kv_cache": str(int(spec.kv_tokens))} if spec.kv_tokens is not None else {}
    return {"enable_kv_cache_reuse": "true", "exclude_input_in_output": "false", "tensorrt_llm_draft_model_name": DRAFT_MODEL,
            **_fraction(spec.kv_fraction), **tokens, **_ids(spec.gpu_ids)}


def draft_fill(spec: Speculation) -> dict[str, str | None]:
    """The draft model's template variables over the target's (None: leave the key unfilled)."""
    draft, tokens = spec.draft, spec.draft_kv_tokens
    return {"engine_dir": str(draft.path), "enable_kv_cache_reuse": "true", "exclude_input_in_output": "false",
            "kv_cache_free_gpu_mem_fraction": f"{float(spec.draft_kv_fraction):g}" if spec.draft_kv_fraction is not None else None,
            "max_tokens_in_paged_kv_cache": str(int(tokens)) if tokens is not None else None,
            "gpu_device_ids": ",".join(map(str, spec.draft_gpu_ids)) if spec.draft_gpu_ids is not None else None}


def target_parameters(spec: Speculation, kind: str) -> dict[str, str]:
    """yitrt's own target parameters: the reference slot's stand-in for the engine's ``--max_draft_len``."""
    return {"yitrt_max_draft_len": str(spec.max_draft_len)} if spec.draft_target and kind == "reference" else {}


def bls_parameters(spec: Speculation) -> dict[str, str]:
    """yitrt's BLS parameters: K per round when a request sends no ``num_draft_tokens``, the bound a request's value
    must keep, and the default of ``use_draft_logits``."""
    if not spec.draft_target:
        return {}
    return {"yitrt_num_draft_tokens": str(spec.num_draft_tokens), "yitrt_max_draft_len": str(spec.max_draft_len),
            "yitrt_use_draft_logits": str(spec.use_draft_logits).lower()}


def model_note(spec: Speculation | None, model: str) -> str | None:
    """The config.pbtxt comment of the target/draft under speculation (None: the usual one)."""
    if spec is None:
        return None
    if not spec.draft_target:
        w = spec.lookahead
        return (f"\nLookahead decoding: window {w.window}, ngram {w.ngram}, verification set {w.verification_set} (max_draft_len "
                f"{spec.max_draft_len}); requests may send smaller lookahead_* sizes (all three).\n"
                "exclude_input_in_output is true: answers hold only the new tokens (a request's own input overrides it).")
    role = ("the target of draft-target speculation: tensorrt_llm_bls sends it each round's draft tokens (draft_input_ids)"
            if model == "tensorrt_llm" else "the draft of draft-target speculation: tensorrt_llm_bls asks it for the draft tokens of each round")
    reuse = "required by a speculative target" if model == "tensorrt_llm" else "on both models, as DTM sets it"
    return (f"\nThis model is {role}.\nKV-cache reuse is on ({reuse}); exclude_input_in_output is false, "
            "as either stock BLS variant expects (yitrt's BLS asks for new tokens per request).")


def readme_section(spec: Speculation | None) -> str:
    """The README's section on speculation ('' without it)."""
    if spec is None:
        return ""
    lines = [f"\n## Speculative decoding: {spec.mode}\n", f"- {spec.describe()}"]
    if spec.draft_target:
        lines += [f"- BLS parameters: `tensorrt_llm_model_name: tensorrt_llm`, `tensorrt_llm_draft_model_name: {DRAFT_MODEL}`, "
                  f"`yitrt_num_draft_tokens: {spec.num_draft_tokens}`; request inputs `num_draft_tokens` (0..{spec.max_draft_len}) and "
                  f"`use_draft_logits` (default {str(spec.use_draft_logits).lower()})",
                  "- both models: `enable_kv_cache_reuse: true`, one `logits_datatype`, `exclude_input_in_output: false`"
                  + (f"; KV fractions {spec.kv_fraction} (target) and {spec.draft_kv_fraction} (draft)" if spec.draft_kv_fraction is not None else "")]
    lines += [f"- {note}" for note in spec.notes()]
    return "\n".join(lines) + "\n"
