"""`yitrt plan`: what a model, checkpoint or known Yi repo needs on a GPU, what fits, and the build limits.

The input is resolved without reading weights: a TensorRT-LLM checkpoint folder (its config fixes scheme, KV
format, dtype and tp × pp), a Hugging Face model folder, a Yi repo id the registry knows (its dims, offline), or
any other Hub repo id (config only). Every candidate is checked against the sharding rules, the scheme's padding
rules and the compatibility rules, sized by ``yitrt.plan.memory``, and — when it does not fit — answered with
the changes that would fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from yitrt.build.profiles import pick_profile, resolve_flags
from yitrt.checkpoint.sharding import pp_problems, tp_problems
from yitrt.checkpoint.trtllm_config import TARGET_TRTLLM, resolve_dtype
from yitrt.checkpoint.truncate import keep_layers_problems
from yitrt.errors import UsageError, ValidationError
from yitrt.models.config import ModelConfig, load_config, parse_config
from yitrt.models.registry import load_registry, request_pitfalls
from yitrt.plan.gpus import Gpu, get_gpu
from yitrt.plan.lora import LoraCacheRequest
from yitrt.plan.memory import MemoryPlan, PlanRequest, Workload, plan_memory
from yitrt.plan.rules import Finding, check, rule_context
from yitrt.plan.speculative import pair_problems, plan_pair
from yitrt.quant.rules import padding_problems
from yitrt.quant.schemes import KV_CACHE_FORMATS, SCHEMES, KvCacheFormat, Scheme, get_kv_cache, get_scheme
from yitrt.speculation import BUILD_MODES, LookaheadSizes, check_draft_len

#: Candidates `--compare` and the suggestions try (a single node holds at most 8 GPUs).
TP_CHOICES = (1, 2, 4, 8)
COMPARE_SCHEMES = ("none", "fp8", "int8-sq", "int4-awq", "w8a16", "w4a8-awq")


@dataclass(frozen=True)
class PlanSource:
    """What the plan input fixes.

    Attributes:
        cfg: the model's dims.
        origin: "checkpoint", "model" (HF folder or Hub config) or "registry".
        name: the path or repo id given.
        repo_id: the Hub repo id, when known.
        dtype: model dtype.
        scheme / kv / tp / pp: fixed by a checkpoint (None: free).
        parallel_embedding: embedding split across TP ranks.
        group_size: AWQ group size fixed by a checkpoint.
    """

    cfg: ModelConfig
    origin: str
    name: str
    repo_id: str | None
    dtype: str
    scheme: str | None = None
    kv: str | None = None
    tp: int | None = None
    pp: int | None = None
    parallel_embedding: bool = True
    group_size: int | None = None


def scheme_of_algo(algo: str | None) -> str:
    """The scheme whose quant_algo a checkpoint or engine config names."""
    for scheme in SCHEMES.values():
        if scheme.quant_algo == algo:
            return scheme.name
    raise UsageError(f"quant_algo {algo!r} is not a scheme yitrt plans", "plan checkpoints written by yitrt convert/quantize")


def kv_of_algo(algo: str | None) -> str | None:
    """The KV-cache format a kv_cache_quant_algo names (None: the model dtype)."""
    if algo is None:
        return None
    for kv in KV_CACHE_FORMATS.values():
        if kv.kv_cache_quant_algo == algo:
            return kv.name
    raise UsageError(f"kv_cache_quant_algo {algo!r} is not a format yitrt plans", "use FP8 or INT8 KV caches")


def checkpoint_source(folder: Path, config: dict[str, Any]) -> PlanSource:
    """The plan input of a TensorRT-LLM checkpoint (its config.json already parsed)."""
    from yitrt.reference.spec import load_spec

    spec = load_spec(folder)
    raw = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_size,
        "intermediate_size": spec.intermediate_size, "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings or 2048, "rope_theta": spec.rotary_base,
        "rope_scaling": spec.rotary_scaling, "torch_dtype": spec.dtype, "attention_bias": spec.attn_bias,
        "mlp_bias": spec.mlp_bias, "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
    }
    cfg = parse_config(raw, str(folder / "config.json"))
    return PlanSource(cfg, "checkpoint", str(folder), None, spec.dtype, scheme_of_algo(spec.quant_algo),
                      kv_of_algo(spec.kv_cache_quant_algo), spec.tp, spec.pp, spec.parallel_embedding,
                      spec.group_size if spec.quant_algo and "AWQ" in spec.quant_algo else None)


def load_source(model_or_ckpt: str, revision: str | None = None) -> PlanSource:
    """Resolve the plan input (see the module docstring); reads configs only.

    Raises:
        UsageError, CheckpointError, HubError: an input that is none of the accepted kinds.
    """
    path = Path(model_or_ckpt)
    if path.is_dir():
        config_path = path / "config.json"
        if not os.path.lexists(config_path):
            raise UsageError(f"{path} has no config.json", "pass a TensorRT-LLM checkpoint, a Hugging Face model folder or a repo id")
        from yitrt.userfiles import read_json

        config = read_json(config_path, "config.json", fix="pass a TensorRT-LLM checkpoint, a Hugging Face model folder or a repo id")
        if "pretrained_config" in config:
            raise UsageError(f"{path} is a built engine", "plan its checkpoint or model instead")
        if "architecture" in config and "mapping" in config:
            return checkpoint_source(path, config)
        cfg = load_config(path)
        return PlanSource(cfg, "model", str(path), None, resolve_dtype("auto", cfg))
    cfg = load_registry().config_of(model_or_ckpt) if revision is None else None
    if cfg is not None:
        return PlanSource(cfg, "registry", model_or_ckpt, model_or_ckpt, resolve_dtype("auto", cfg))
    if "/" not in model_or_ckpt or path.exists():
        raise UsageError(f"{model_or_ckpt} is neither a folder nor a Hub repo id", "pass a checkpoint or model folder, or owner/name")
    from yitrt.hub import resolve_model

    resolved = resolve_model(model_or_ckpt, revision=revision, metadata_only=True)
    cfg = load_config(resolved.path)
    return PlanSource(cfg, "model", model_or_ckpt, resolved.repo_id, resolve_dtype("auto", cfg))


@dataclass(frozen=True)
class PlanOptions:
    """Options of one `yitrt plan` call (None: take the source's or yitrt's choice)."""

    gpu: str
    tp: tuple[int, ...] = ()
    pp: int | None = None
    schemes: tuple[str, ...] = ()
    kv_cache: str | None = None
    workload: Workload = Workload()
    trtllm_version: str = TARGET_TRTLLM
    compare: bool = False
    #: draft-target: the draft (checkpoint, HF folder or repo id), K, and the draft's tp/scheme/KV where it is not a
    #: checkpoint (default: the target's), its first N layers only (a truncated self-draft) and an already resolved
    #: draft input (``draft_source``, like ``plan(source=)``); lookahead: (W, N, G). At most one of the two.
    draft: str | None = None
    max_draft_len: int | None = None
    draft_tp: int | None = None
    draft_scheme: str | None = None
    draft_kv_cache: str | None = None
    draft_layers: int | None = None
    draft_source: PlanSource | None = None
    lookahead: LookaheadSizes | None = None
    #: the LoRA adapter cache the engine is served with (None: no LoRA)
    lora: LoraCacheRequest | None = None

    @property
    def speculative(self) -> str | None:
        """``draft-target``, ``lookahead`` or None."""
        return "draft-target" if self.draft else "lookahead" if self.lookahead else None


@dataclass
class Candidate:
    """One configuration: its memory plan (None when invalid), its problems and rule findings."""

    scheme: str
    kv: str | None
    tp: int
    pp: int
    plan: MemoryPlan | None
    invalid: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    profile: str = ""

    @property
    def ok(self) -> bool:
        """Valid and fits."""
        return not self.invalid and self.plan is not None and self.plan.fits

    def to_json(self) -> dict[str, Any]:
        """JSON object."""
        return {"scheme": self.scheme, "kv_cache": self.kv, "tp": self.tp, "pp": self.pp, "profile": self.profile,
                "invalid": self.invalid, "rules": [f.to_json() for f in self.findings],
                "plan": self.plan.to_json() if self.plan else None, "fits": self.ok}


@dataclass
class PlanReport:
    """Everything `yitrt plan` shows."""

    source: PlanSource
    gpu: Gpu
    options: PlanOptions
    candidates: list[Candidate]
    suggestions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    slo: dict[str, Any] | None = None
    speculative: dict[str, Any] | None = None

    @property
    def primary(self) -> Candidate:
        """The single plan (no --compare)."""
        return self.candidates[0]

    @property
    def fits(self) -> bool:
        """The single plan fits (a draft-target pair: both engines with at least one sequence)."""
        return self.primary.ok and (self.speculative is None or bool(self.speculative.get("fits")))

    def to_json(self) -> dict[str, Any]:
        """JSON object of `yitrt plan --json`."""
        cfg = self.source.cfg
        return {
            "source": {"name": self.source.name, "origin": self.source.origin, "repo_id": self.source.repo_id,
                       "dtype": self.source.dtype, "params": cfg.param_count(), "num_layers": cfg.num_layers,
                       "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                       "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                       "vocab_size": cfg.vocab_size, "context_length": cfg.max_position_embeddings},
            "gpu": self.gpu.to_json(), "trtllm_version": self.options.trtllm_version, "compare": self.options.compare,
            "candidates": [c.to_json() for c in self.candidates], "suggestions": self.suggestions,
            "warnings": self.warnings, "slo": self.slo, "speculative": self.speculative,
        }


def planned_dtype(source: PlanSource, scheme: Scheme) -> str:
    """The dtype the checkpoint would have: the source's, or the scheme's only dtype when it needs another
    (w4a8-awq is quantized with --dtype float16); a checkpoint keeps its own."""
    if source.origin != "checkpoint" and scheme.dtypes and source.dtype not in scheme.dtypes:
        return scheme.dtypes[0]
    return source.dtype


def _request(source: PlanSource, opts: PlanOptions, gpu: Gpu, scheme: Scheme, kv: KvCacheFormat | None, tp: int, pp: int,
             max_draft_len: int = 0) -> PlanRequest:
    return PlanRequest(cfg=source.cfg, dtype=planned_dtype(source, scheme), scheme=scheme, kv=kv, tp=tp, pp=pp, gpu=gpu,
                       workload=opts.workload, parallel_embedding=source.parallel_embedding, group_size=source.group_size,
                       max_draft_len=max_draft_len, lora=opts.lora)


def _role_fields(role: str | None, draft_len: int) -> dict[str, Any]:
    """The ``build.*`` rule fields of a speculative role (see ``yitrt.build.speculative.SpeculativeBuild``)."""
    if role is None:
        return {}
    mode = {"target": BUILD_MODES["draft-target"], "lookahead": BUILD_MODES["lookahead"]}.get(role)
    return {"speculative_decoding_mode": mode, "max_draft_len": draft_len if mode else 0, "speculative_role": role}


def evaluate(source: PlanSource, opts: PlanOptions, gpu: Gpu, scheme_name: str, kv_name: str | None, tp: int, pp: int,
             role: str | None = None, draft_len: int = 0) -> Candidate:
    """Validate and size one configuration (never raises for an invalid one: the reasons are in ``invalid``).

    ``role`` (``target``, ``draft`` or ``lookahead``) and ``draft_len`` (K or D) plan a speculative engine: its
    ``max_draft_len`` in the memory plan (not the draft's) and the speculative rules.
    """
    scheme, kv = get_scheme(scheme_name), get_kv_cache(kv_name)
    cfg = source.cfg
    invalid = tp_problems(cfg, tp) + pp_problems(cfg, pp) + padding_problems(cfg, scheme, tp, source.group_size)
    dtype = planned_dtype(source, scheme)
    if source.origin != "checkpoint" and kv is not None and not kv.data_free and not scheme.calibrated:
        invalid.append(f"a {kv.name} KV cache needs calibration: use a calibrated scheme (`yitrt quantize`)")
    profile = pick_profile(gpu, scheme)
    flags, limits, _ = resolve_flags(profile, gpu, scheme, tp)
    flags["tokens_per_block"] = opts.workload.tokens_per_block
    plan = None
    engine_draft = draft_len if role in ("target", "lookahead") else 0
    if not tp_problems(cfg, tp) and not pp_problems(cfg, pp):
        plan = plan_memory(_request(source, opts, gpu, scheme, kv, tp, pp, engine_draft))
    build = {**(plan.limits.to_json() if plan else {}), **_role_fields(role, draft_len)}
    findings = check(rule_context(gpu=gpu, scheme=scheme, kv=kv, dtype=dtype, tp=tp, pp=pp,
                                  trtllm=opts.trtllm_version, plugins=flags, build=build,
                                  context_length=plan.request.context_length if plan else None))
    invalid += [str(f) for f in findings if f.severity == "error"]
    return Candidate(scheme_name, kv_name, tp, pp, plan, invalid, findings, profile.name)


def _suggest(source: PlanSource, opts: PlanOptions, gpu: Gpu, base: Candidate) -> list[str]:
    """Changes that would make a configuration that does not fit fit (each tried and sized)."""
    tries: list[tuple[str, str, str | None, int, int]] = []
    if source.tp is None:
        tries += [(f"--tp {tp}", base.scheme, base.kv, tp, base.pp) for tp in TP_CHOICES if tp > base.tp]
    if source.scheme is None:
        current = get_scheme(base.scheme)
        smaller = sorted((s for s in COMPARE_SCHEMES if get_scheme(s).weight_bits < current.weight_bits),
                         key=lambda s: -get_scheme(s).weight_bits)
        tries += [(f"--scheme {s}", s, base.kv, base.tp, base.pp) for s in smaller]
    if source.kv is None and base.kv is None and gpu.fp8:
        tries.append(("--kv-cache fp8", base.scheme, "fp8", base.tp, base.pp))  # data-free (scale 1.0) or calibrated
    out = []
    for label, scheme, kv, tp, pp in tries:
        cand = evaluate(source, opts, gpu, scheme, kv, tp, pp)
        if cand.ok:
            out.append(f"{label}: fits, {cand.plan.max_concurrent} sequences of {opts.workload.isl + opts.workload.osl} tokens "
                       f"({cand.plan.ranks[0].weight_bytes / 1e9:.2f} GB weights per GPU)")
    plan = base.plan
    if plan is not None and plan.weights_fit and (tokens := plan.kv_tokens):
        out.append(f"shorter sequences: the KV pool holds {tokens} tokens per rank (e.g. --isl/--osl summing to at most {tokens})")
    return out


def plan(model_or_ckpt: str, opts: PlanOptions, revision: str | None = None, source: PlanSource | None = None) -> PlanReport:
    """Plan a model on a GPU: one configuration, or (``compare``) every tp × scheme candidate.

    Args:
        model_or_ckpt: checkpoint folder, HF model folder or Hub repo id.
        opts: the options.
        revision: Hub revision.
        source: an already resolved input (skips resolution).

    Returns:
        The report.

    Raises:
        ValidationError: (single plan) the configuration is invalid: every reason, at once.
        UsageError: options that contradict a checkpoint, unknown GPU/scheme.
    """
    source = source or load_source(model_or_ckpt, revision)
    gpu = get_gpu(opts.gpu)
    _check_speculative_options(opts)
    fixed = {"--scheme": (opts.schemes, source.scheme), "--tp": (opts.tp, source.tp)}
    for flag, (given, fixed_value) in fixed.items():
        if fixed_value is not None and given and any(g != fixed_value for g in given):
            raise UsageError(f"{source.name} is a checkpoint at {flag} {fixed_value}; {flag} cannot change it",
                             "plan the Hugging Face model to compare other settings")
    if source.kv is not None and opts.kv_cache not in (None, source.kv) or source.pp is not None and opts.pp not in (None, source.pp):
        raise UsageError(f"{source.name} is a checkpoint with its KV format and pp fixed", "plan the Hugging Face model instead")
    kv = source.kv if source.origin == "checkpoint" else opts.kv_cache
    pp = source.pp or opts.pp or 1
    warnings = []
    if opts.compare:
        tps = opts.tp or ((source.tp,) if source.tp else TP_CHOICES)
        schemes = opts.schemes or ((source.scheme,) if source.scheme else COMPARE_SCHEMES)
        candidates = [evaluate(source, opts, gpu, s, kv, tp, pp) for s in schemes for tp in tps]
        return PlanReport(source, gpu, opts, candidates, warnings=warnings)
    if len(opts.tp) > 1 or len(opts.schemes) > 1:
        raise UsageError("several --tp or --scheme values need --compare", "add --compare, or give one of each")
    scheme = source.scheme or (opts.schemes[0] if opts.schemes else "none")
    tp = source.tp or (opts.tp[0] if opts.tp else 1)
    if opts.speculative == "draft-target":
        return _plan_draft_target(source, opts, gpu, scheme, kv, tp, pp)
    if opts.lookahead is not None:
        cand = evaluate(source, opts, gpu, scheme, kv, tp, pp, role="lookahead", draft_len=opts.lookahead.max_draft_len)
    else:
        cand = evaluate(source, opts, gpu, scheme, kv, tp, pp)
    if cand.invalid:
        raise ValidationError(cand.invalid, "fix every problem listed; `yitrt plan --compare` shows what is valid")
    warnings += [str(f) for f in cand.findings if f.severity == "warning"]
    warnings += request_pitfalls(source.cfg, source.repo_id, {"pp": pp, "kv_cache": kv, "scheme": scheme})
    # an adapter cache too small is the only problem a plan reports with it (memory.plan_memory): its fix is the cache's
    lora_only = cand.plan is not None and cand.plan.lora is not None and cand.plan.lora["only_problem"]
    suggestions = _suggest(source, opts, gpu, cand) if not cand.ok and opts.lookahead is None and not lora_only else []
    report = PlanReport(source, gpu, opts, [cand], suggestions, warnings)
    if opts.lookahead is not None:
        la = opts.lookahead
        report.speculative = {"mode": "lookahead", "window": la.window, "ngram": la.ngram, "verification_set": la.verification_set,
                              "max_draft_len": la.max_draft_len, "decoding_tokens": la.decoding_tokens, "fits": cand.ok,
                              "max_concurrent_sequences": cand.plan.max_concurrent if cand.plan else 0,
                              "triton": {"tensorrt_llm": {"decoding_mode": "lookahead", "lookahead_window_size": la.window,
                                                          "lookahead_ngram_size": la.ngram,
                                                          "lookahead_verification_set_size": la.verification_set}}}
    return report


def _check_speculative_options(opts: PlanOptions) -> None:
    """Refuse speculative plan options that contradict each other (all at once).

    Raises:
        UsageError: the problems.
    """
    problems = []
    if opts.draft and opts.lookahead is not None:
        problems.append("--draft (draft-target) and --lookahead are two kinds of speculative decoding: pick one")
    if opts.max_draft_len is not None and not opts.draft:
        problems.append("--max-draft-len is the draft-target K and needs --draft DRAFT (lookahead derives it from --lookahead)")
    if opts.draft and opts.max_draft_len is None:
        problems.append("--draft needs --max-draft-len K (draft tokens per round)")
    if opts.max_draft_len is not None:
        try:
            check_draft_len(opts.max_draft_len, "--max-draft-len")
        except UsageError as exc:
            problems.append(exc.message)
    unused = [f for f, v in (("--draft-tp", opts.draft_tp), ("--draft-scheme", opts.draft_scheme),
                             ("--draft-kv-cache", opts.draft_kv_cache), ("--draft-layers", opts.draft_layers)) if v is not None]
    if unused and not opts.draft:
        problems.append(f"{', '.join(unused)} describe the draft: pass --draft DRAFT")
    if opts.compare and opts.speculative:
        problems.append("--compare plans one model; plan a speculative deployment without it")
    if opts.lookahead is not None and opts.lookahead.max_draft_len < 1:
        problems.append("--lookahead 1,1,0 drafts nothing (plain decoding): use sizes with ngram >= 2")
    if problems:
        raise UsageError("; ".join(problems), "e.g. `yitrt plan TARGET --gpu H100 --draft DRAFT --max-draft-len 4` or `--lookahead 4,3,4`")


def _plan_draft_target(source: PlanSource, opts: PlanOptions, gpu: Gpu, scheme: str, kv: str | None, tp: int, pp: int) -> PlanReport:
    """A draft-target pair: the target and the draft validated each, then planned together on the same GPUs."""
    k = opts.max_draft_len or 0
    draft = opts.draft_source or load_source(opts.draft or "")
    if opts.draft_layers is not None:
        if problems := keep_layers_problems(draft.cfg.num_layers, opts.draft_layers, "--draft-layers"):
            raise UsageError("--draft-layers: " + "; ".join(problems), f"keep 1..{draft.cfg.num_layers} of the draft's layers")
        draft = replace(draft, cfg=replace(draft.cfg, num_layers=opts.draft_layers))
    if draft.origin == "checkpoint" and any(v is not None and v != fixed for v, fixed in
                                            ((opts.draft_scheme, draft.scheme), (opts.draft_tp, draft.tp), (opts.draft_kv_cache, draft.kv))):
        raise UsageError(f"{draft.name} is a checkpoint: its scheme, tp and KV format are fixed", "drop --draft-scheme/--draft-tp/--draft-kv-cache")
    d_scheme = draft.scheme or opts.draft_scheme or scheme
    d_kv = draft.kv if draft.origin == "checkpoint" else (opts.draft_kv_cache if opts.draft_kv_cache is not None else kv)
    d_tp = draft.tp or opts.draft_tp or tp
    cand = evaluate(source, opts, gpu, scheme, kv, tp, pp, role="target", draft_len=k)
    d_cand = evaluate(draft, opts, gpu, d_scheme, d_kv, d_tp, draft.pp or 1, role="draft", draft_len=k)
    invalid = cand.invalid + [f"draft {draft.name}: {p}" for p in d_cand.invalid]
    if not invalid:
        target_req = _request(source, opts, gpu, get_scheme(scheme), get_kv_cache(kv), tp, pp, k)
        draft_req = _request(draft, opts, gpu, get_scheme(d_scheme), get_kv_cache(d_kv), d_tp, draft.pp or 1)
        invalid += pair_problems(target_req, draft_req)
    if invalid:
        raise ValidationError(invalid, "fix every problem listed; plan each model alone to see what is valid")
    pair = plan_pair(target_req, draft_req)
    cand.plan, d_cand.plan = pair.target, pair.draft
    warnings = [str(f) for f in cand.findings if f.severity == "warning"]
    warnings += [f"draft: {f}" for f in d_cand.findings if f.severity == "warning"]
    warnings += request_pitfalls(source.cfg, source.repo_id, {"pp": pp, "kv_cache": kv, "scheme": scheme})
    warnings += [f"draft: {w}" for w in request_pitfalls(draft.cfg, draft.repo_id, {"pp": 1, "kv_cache": d_kv, "scheme": d_scheme})]
    report = PlanReport(source, gpu, opts, [cand], [], warnings)
    cfg = draft.cfg
    report.speculative = {
        **pair.to_json(),
        "draft_model": {"name": draft.name, "origin": draft.origin, "repo_id": draft.repo_id, "dtype": draft.dtype,
                        "params": cfg.param_count(), "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
                        "vocab_size": cfg.vocab_size, "scheme": d_scheme, "kv_cache": d_kv, "tp": d_tp, "profile": d_cand.profile,
                        "rules": [f.to_json() for f in d_cand.findings]},
    }
    return report
