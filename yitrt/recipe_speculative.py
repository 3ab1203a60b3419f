"""Checks of a recipe's ``speculative:`` section (:class:`yitrt.recipe.Speculative`), in the recipe's style: every
problem as one ``key: what is wrong`` line, all at once, before any work.

:func:`speculative_problems` needs only the recipe and yitrt's tables (mode-specific fields, the draft length, the
lookahead sizes, the draft's precision against the GPU, KV-cache reuse, which a draft-target deployment needs).
:func:`draft_model_checks` reads what is known about the draft without weights (the registry's dims for a known Yi
repo, a folder's config.json, the demo's GGUF header): its heads against its tp, its layer count, its vocabulary
against the target's, and the tokenizer identity of the pair — compared file by file when both are local folders,
from the registry's tokenizer groups when both are known Yi repos, and otherwise once both are fetched.
"""

from __future__ import annotations

from typing import Any

from yitrt.errors import UsageError, YitrtError
from yitrt.speculation import LookaheadSizes, check_draft_len

_LOOKAHEAD_KEYS = ("window", "ngram", "verification_set")


def speculative_problems(sections: dict[str, Any]) -> list[str]:
    """The model-free checks of the ``speculative`` section against the other sections that parsed (absent ones
    leave their checks silent)."""
    spec = sections.get("speculative")
    if spec is None:
        return []
    if spec.mode == "lookahead":
        return _lookahead_problems(spec)
    return _draft_target_problems(spec, sections)


def _lookahead_problems(spec: Any) -> list[str]:
    problems = []
    try:
        derived: int | None = LookaheadSizes(spec.window, spec.ngram, spec.verification_set).max_draft_len
    except UsageError as exc:
        derived = None
        problems.append(f"speculative: {exc.message} ({exc.hint})")
    if spec.max_draft_len is not None:
        value = f" (here {derived})" if derived is not None else ""
        problems.append(f"speculative.max_draft_len: lookahead derives it from window, ngram and verification_set{value}; remove it")
    if spec.draft is not None:
        problems.append("speculative.draft: draft-target only (lookahead drafts from the target itself); remove it or use mode draft-target")
    if spec.use_draft_logits:
        problems.append("speculative.use_draft_logits: draft-target only (lookahead has no draft model)")
    return problems


def _draft_target_problems(spec: Any, sections: dict[str, Any]) -> list[str]:
    from yitrt.recipe import precision_problems

    problems = []
    if spec.max_draft_len is None:
        problems.append("speculative.max_draft_len: required for draft-target (draft tokens per round, e.g. 4)")
    else:
        try:
            check_draft_len(spec.max_draft_len, "speculative.max_draft_len")
        except UsageError as exc:
            problems.append(f"{exc.message} ({exc.hint})")
    if given := [k for k in _LOOKAHEAD_KEYS if getattr(spec, k) is not None]:
        problems.append(f"speculative.{', speculative.'.join(given)}: lookahead only (mode is draft-target)")
    serve, target, precision = sections.get("serve"), sections.get("target"), sections.get("precision")
    if serve is not None and serve.kv_reuse is False:
        problems.append("serve.kv_reuse: false, but the target of draft-target speculation needs KV-cache block reuse (TensorRT-LLM: "
                        "\"KV cache block reuse must be enabled for speculative decoding target model\"); leave it unset or true")
    if target is not None and precision is not None:
        problems += _reuse_problems("precision", "target", precision, target)
    if spec.draft is None:
        problems.append("speculative.draft: required for draft-target (the draft model: model, and optionally precision, tp, layers)")
        return problems
    scheme, found = precision_problems(spec.draft.precision, "speculative.draft.precision")
    problems += found
    if target is not None and scheme is not None:
        problems += _reuse_problems("speculative.draft.precision", "draft", spec.draft.precision, target)
        problems += _draft_rule_problems(spec.draft, scheme, sections)
    return problems


def _reuse_problems(where: str, role: str, precision: Any, target: Any) -> list[str]:
    """Draft-target keeps KV-cache reuse on for both models (the target's executor refuses to start without it;
    the build gives both paged context FMHA, reference §1.1): a KV format that rules reuse out is a problem."""
    from yitrt.plan.rules import effective_paged_context_fmha
    from yitrt.quant.schemes import KV_CACHE_FORMATS, SCHEMES

    if precision.kv_cache is None:
        return []
    kv, scheme = KV_CACHE_FORMATS.get(precision.kv_cache), SCHEMES.get(precision.scheme)
    if kv is None or scheme is None:
        return []  # unknown names are reported by the precision checks
    if target.engine == "reference":
        return [f"{where}.kv_cache {kv.name}: the reference slot does no KV-cache reuse with a quantized KV cache, and the {role} "
                "of draft-target speculation needs it; leave kv_cache null"]
    if not effective_paged_context_fmha({"use_paged_context_fmha": "enable"}, scheme, kv):
        return [f"{where}.kv_cache {kv.name}: the build turns paged context FMHA off for KV cache {kv.name} with quant_algo "
                f"{scheme.quant_algo}, so the {role} of draft-target speculation gets no KV-cache reuse, which it needs; "
                "use kv_cache fp8 with the fp8 scheme, or null"]
    return []


def _draft_rule_problems(draft: Any, scheme: Any, sections: dict[str, Any]) -> list[str]:
    """The compatibility rules (``yitrt/plan/rules.yaml``) for the draft's own engine: its scheme and KV format on the
    GPU and TensorRT-LLM line, at its tp (the draft is built with pp 1)."""
    from yitrt.build.profiles import load_profile, pick_profile, resolve_flags
    from yitrt.plan.gpus import get_gpu
    from yitrt.plan.rules import check, rule_context
    from yitrt.quant.schemes import KV_CACHE_FORMATS

    target, build, par = sections["target"], sections.get("build"), sections.get("parallelism")
    try:
        gpu = get_gpu(target.gpu)
        profile = load_profile(build.plugins) if build is not None and build.plugins is not None else pick_profile(gpu, scheme)
    except UsageError:
        return []  # the target's checks report an unknown GPU or profile
    tp = draft.tp or (par.tp if par is not None else 1)
    flags = resolve_flags(profile, gpu, scheme, tp)[0]
    precision = draft.precision
    context = rule_context(gpu=gpu, scheme=scheme, kv=KV_CACHE_FORMATS.get(precision.kv_cache or ""),
                           dtype=None if precision.dtype == "auto" else precision.dtype, tp=tp, pp=1, trtllm=target.trtllm_version,
                           plugins=flags if target.engine == "trtllm" else None)
    return [f"speculative.draft: {f}" for f in check(context) if f.severity == "error"]


def draft_model_checks(sections: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The draft against what is known of both models without weights. Returns (problems, warnings)."""
    from yitrt.checkpoint.sharding import tp_problems
    from yitrt.models.registry import load_registry
    from yitrt.recipe import model_config_of

    spec = sections.get("speculative")
    if spec is None or spec.mode != "draft-target" or spec.draft is None:
        return [], []
    draft, model, par = spec.draft, sections.get("model"), sections.get("parallelism")
    if draft.model.repo and (why := load_registry().unsupported.get(draft.model.repo.lower())):
        return [f"speculative.draft.model.repo: {draft.model.repo} is {why}"], []
    try:
        dcfg = model_config_of(draft.model)
    except YitrtError as exc:
        return [f"speculative.draft.model: {exc.message}" + (f" ({exc.hint})" if exc.hint else "")], []
    problems: list[str] = []
    tp = draft.tp or (par.tp if par is not None else 1)
    inherited = "" if draft.tp else " (the target's tp; set speculative.draft.tp)"
    if found := tp_problems(dcfg, tp):
        problems.append(f"speculative.draft.tp {tp}{inherited}: {'; '.join(found)}")
    if draft.layers is not None and draft.layers >= dcfg.num_layers:
        problems.append(f"speculative.draft.layers {draft.layers}: must be fewer than the draft's {dcfg.num_layers} layers (null keeps them all)")
    if model is None:
        return problems, []
    pair_problems, warnings = _pair_checks(model, draft, dcfg)
    return problems + pair_problems, warnings


def _pair_checks(model: Any, draft: Any, dcfg: Any) -> tuple[list[str], list[str]]:
    """Tokenizer identity of target and draft, as far as it is known before fetching; and whether drafting saves work."""
    from yitrt.models.draft_pairing import check_draft_pair, registry_pair_problems
    from yitrt.recipe import model_config_of

    try:
        tcfg = model_config_of(model)
    except YitrtError:
        return [], []  # the target's own checks report it
    problems: list[str] = []
    warnings: list[str] = []
    same_model = model.ref == draft.model.ref and model.revision == draft.model.revision
    if same_model and draft.layers is None:
        warnings.append("speculative.draft: the draft is the target itself with all its layers; it saves nothing (set draft.layers)")
    elif not same_model and dcfg.param_count() >= tcfg.param_count():
        warnings.append(f"speculative.draft: {draft.model.ref} ({dcfg.param_count():,} parameters) is not smaller than the target "
                        f"({tcfg.param_count():,}); a draft saves time only when it is much cheaper")
    if model.path is not None and draft.model.path is not None:
        try:
            return problems + [f"speculative.draft: {p}" for p in check_draft_pair(model.path, draft.model.path)], warnings
        except YitrtError as exc:
            return problems + [f"speculative.draft: tokenizers not compared: {exc.message}"], warnings
    if tcfg.vocab_size != dcfg.vocab_size:
        problems.append(f"speculative.draft: vocab_size {dcfg.vocab_size} differs from the target's {tcfg.vocab_size} "
                        "(the draft's token ids must be the target's)")
    if same_model:
        return problems, warnings  # one model, one tokenizer
    if model.repo and draft.model.repo:
        known = registry_pair_problems(model.repo, draft.model.repo)
        if known or _registry_knows(model.repo, draft.model.repo):
            return problems + [f"speculative.draft.model: {p}" for p in known], warnings
    warnings.append(f"speculative.draft: the tokenizers of {draft.model.ref} and {model.ref} are compared once both are fetched "
                    f"(`yitrt inspect {model.ref} --draft {draft.model.ref}` compares them now)")
    return problems, warnings


def _registry_knows(*repos: str) -> bool:
    """Whether every repo is a known Yi checkpoint (so the registry's tokenizer groups answer for the pair)."""
    from yitrt.models.registry import load_registry

    registry = load_registry()
    return all(registry.by_repo_id(r) is not None for r in repos)
