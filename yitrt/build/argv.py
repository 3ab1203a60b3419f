"""Assemble a build: the checkpoint's facts, the plan's limits and a plugin profile → a checked ``trtllm-build`` argv.

Order of precedence for each value: the command line (``--max-batch-size`` …) over the profile's limit hints
over the plan; plugin flags: the profile over the release line's defaults. Everything is checked before any
process starts: the flags against the release line's table, the profile's requirements, the compatibility
rules, the memory plan and the worker count. All problems are reported at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yitrt.build.flags import FlagSpec, flag_table, known_line, release_line
from yitrt.build.lora import LoraBuild
from yitrt.build.profiles import Profile, load_profile, pick_profile, resolve_flags
from yitrt.build.speculative import SpeculativeBuild
from yitrt.checkpoint.trtllm_config import TARGET_TRTLLM
from yitrt.errors import UsageError, ValidationError
from yitrt.plan.gpus import Gpu
from yitrt.plan.memory import DEFAULT_KV_FRACTION, MemoryPlan, PlanRequest, Workload, plan_memory
from yitrt.plan.planner import PlanSource, load_source
from yitrt.plan.rules import Finding, check, rule_context, unmet
from yitrt.plan.speculative import PairPlan, pair_problems, plan_pair
from yitrt.quant.schemes import get_kv_cache, get_scheme

#: The timing cache's name inside the engine folder (reused by the next build of the same folder).
TIMING_CACHE = "timing.cache"


@dataclass
class BuildSpec:
    """A resolved, checked build."""

    checkpoint: Path
    source: PlanSource
    gpu: Gpu
    trtllm_version: str
    line: str
    profiles: list[str]
    plugins: dict[str, Any]
    limits: dict[str, int]
    workers: int
    plan: MemoryPlan
    findings: list[Finding] = field(default_factory=list)
    speculation: SpeculativeBuild | None = None
    pair: PairPlan | None = None
    max_beam_width: int = 1
    notes: list[str] = field(default_factory=list)
    lora: LoraBuild | None = None

    @property
    def world_size(self) -> int:
        """Ranks (engine files) of the build."""
        return (self.source.tp or 1) * (self.source.pp or 1)

    def argv(self, output_dir: Path, input_timing_cache: Path | None = None, program: str | None = None) -> list[str]:
        """The command line, valid for the spec's release line (``program``: the trtllm-build path to run)."""
        table = flag_table().flags(self.line)
        args: list[str] = [program or "trtllm-build", "--checkpoint_dir", str(self.checkpoint), "--output_dir", str(output_dir)]
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens"):
            args += [f"--{name}", str(self.limits[name])]
        args += ["--max_beam_width", str(self.max_beam_width)]
        for name, value in {**(self.speculation.argv_flags() if self.speculation else {}),
                            **(self.lora.argv_flags() if self.lora else {})}.items():
            if isinstance(value, bool):
                args += [f"--{name}"] if value else []
            else:  # a list is one flag with several values (nargs="+": --lora_target_modules attn_q attn_k ...)
                args += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
        args += ["--workers", str(self.workers), "--log_level", "info",
                 "--output_timing_cache", str(Path(output_dir) / TIMING_CACHE)]
        if input_timing_cache is not None:
            args += ["--input_timing_cache", str(input_timing_cache)]
        for name, value in self.plugins.items():
            spec = table[name]
            if spec.kind == "flag":
                args += [f"--{name}"] if value else []
            else:
                args += [f"--{name}", str(value)]
        return args

    def build_config(self) -> dict[str, Any]:
        """The resolved build configuration: limits, plugin flags (defaults included) and where they came from."""
        plugins = {**flag_table().plugin_defaults(self.line), **self.plugins}
        return {
            "trtllm_version": self.trtllm_version, "release_line": self.line, "gpu": self.gpu.to_json(),
            "profiles": self.profiles, "tp": self.source.tp, "pp": self.source.pp, "world_size": self.world_size,
            "dtype": self.source.dtype, "scheme": self.source.scheme, "kv_cache": self.source.kv,
            "limits": dict(self.limits), "max_beam_width": self.max_beam_width, "workers": self.workers, "plugin_config": plugins,
            "engine_limits": self.plan.limits.engine(self.speculation.engine_draft_len if self.speculation else 0),
            "speculative": self.speculation.to_json() if self.speculation else None,
            "lora": self.lora.to_json() if self.lora else None,
            "plan": {"kv_tokens": self.plan.kv_tokens, "max_concurrent_sequences": self.plan.max_concurrent,
                     "isl": self.plan.request.workload.isl, "osl": self.plan.request.workload.osl,
                     "kv_cache_free_gpu_mem_fraction": self.plan.request.workload.kv_fraction,
                     "max_tokens_in_paged_kv_cache": self.plan.max_tokens_in_paged_kv_cache,
                     "pair": {k: v for k, v in self.pair.to_json().items() if k != "draft"} if self.pair else None,
                     "lora_cache": self.plan.lora},
            "warnings": [str(f) for f in self.findings if f.severity == "warning"],
        }


def _flag_problems(plugins: dict[str, Any], table: dict[str, FlagSpec], line: str) -> list[str]:
    problems = []
    for name, value in plugins.items():
        spec = table.get(name)
        if spec is None:
            lines = [ln for ln in flag_table().lines if name in flag_table().flags(ln)]
            where = f" (it exists in {lines[0]}-{lines[-1]})" if lines else " (no release line has it)"
            problems.append(f"the profile sets --{name}, which TensorRT-LLM {line} does not have{where}")
        elif (why := spec.problem(value)) is not None:
            problems.append(why)
    return problems


def _requirement_problems(profile: Profile, context: dict[str, Any]) -> list[str]:
    return [f"plugin profile {profile.name} requires {path} {profile.requires[path]!r}" for path in unmet(context, profile.requires)]


def _checkpoint_source(checkpoint: Path, what: str = "") -> PlanSource:
    source = load_source(str(checkpoint))
    if source.origin != "checkpoint":
        raise UsageError(f"{what}{checkpoint} is not a TensorRT-LLM checkpoint", "build from `yitrt convert` or `yitrt quantize` output")
    return source


def _plan_request(source: PlanSource, gpu: Gpu, workload: Workload, max_draft_len: int = 0, lora: LoraBuild | None = None) -> PlanRequest:
    return PlanRequest(cfg=source.cfg, dtype=source.dtype, scheme=get_scheme(source.scheme or "none"), kv=get_kv_cache(source.kv),
                       tp=source.tp or 1, pp=source.pp or 1, gpu=gpu, workload=workload,
                       parallel_embedding=source.parallel_embedding, group_size=source.group_size, max_draft_len=max_draft_len,
                       lora=lora.cache if lora else None)


def _speculative_plan(source: PlanSource, gpu: Gpu, workload: Workload, speculation: SpeculativeBuild | None,
                      problems: list[str], notes: list[str], lora: LoraBuild | None = None) -> tuple[MemoryPlan, PairPlan | None]:
    """This engine's plan: alone, with its lookahead/target draft length, or as one half of a draft-target pair."""
    if speculation is None or speculation.role == "lookahead":
        return plan_memory(_plan_request(source, gpu, workload, speculation.draft_len if speculation else 0, lora)), None
    k = speculation.draft_len
    if speculation.pair is None:
        other = "--draft DRAFT_CHECKPOINT" if speculation.role == "target" else "--target TARGET_CHECKPOINT --max-draft-len K"
        notes.append(f"the {speculation.role} is planned alone: pass {other} to plan both engines on the same GPUs "
                     "(two sets of weights, two KV pools)")
        return plan_memory(_plan_request(source, gpu, workload, k if speculation.role == "target" else 0)), None
    other = _checkpoint_source(speculation.pair, "--draft " if speculation.role == "target" else "--target ")
    if speculation.role == "target":
        target, draft = _plan_request(source, gpu, workload, k), _plan_request(other, gpu, workload)
    else:
        target, draft = _plan_request(other, gpu, workload, k), _plan_request(source, gpu, workload)
    structural = pair_problems(target, draft)
    if structural:
        problems += structural
        return plan_memory(target if speculation.role == "target" else draft), None
    pair = plan_pair(target, draft)
    problems += [f"the draft-target pair does not fit {gpu.name}: {p}" for p in pair.problems]
    notes += [f"pair: {n}" for n in pair.notes]
    return (pair.target if speculation.role == "target" else pair.draft), pair


def assemble(
    checkpoint: Path,
    gpu: Gpu,
    *,
    plugins: str | None = None,
    trtllm_version: str | None = None,
    max_batch_size: int | None = None,
    max_seq_len: int | None = None,
    max_num_tokens: int | None = None,
    workers: int | None = None,
    isl: int = 1024,
    osl: int = 512,
    kv_fraction: float = DEFAULT_KV_FRACTION,
    speculation: SpeculativeBuild | None = None,
    max_beam_width: int = 1,
    lora: LoraBuild | None = None,
) -> BuildSpec:
    """Resolve and check a build of ``checkpoint`` for ``gpu``.

    ``speculation`` (``yitrt.build.speculative.speculative_build``) adds the speculative build arguments and
    plans the engine for them: a lookahead engine with its ``max_draft_len``, a draft-target target or draft beside
    the other model of the pair when its checkpoint (``speculation.pair``) is known — both builds of a pair then get
    the same ``max_batch_size``. ``lora`` (``yitrt.build.lora.lora_build``) adds the LoRA plugin in the engine's
    dtype and the LoRA build arguments, and plans the adapter cache.

    Raises:
        UsageError: the input is not a TensorRT-LLM checkpoint; unknown profile or version.
        ValidationError: every problem with the combination, at once.
    """
    source = _checkpoint_source(checkpoint)
    version = trtllm_version or TARGET_TRTLLM
    line = release_line(version)
    scheme, kv = get_scheme(source.scheme or "none"), get_kv_cache(source.kv)
    profile = load_profile(plugins) if plugins else pick_profile(gpu, scheme)
    tp, pp = source.tp or 1, source.pp or 1
    flags, hints, chain = resolve_flags(profile, gpu, scheme, tp)
    problems: list[str] = []
    notes: list[str] = []
    if speculation is not None and speculation.needs_paged_context_fmha:
        if flags.get("use_paged_context_fmha") == "disable":
            problems.append(f"draft-target speculative decoding needs --use_paged_context_fmha enable on the {speculation.role} "
                            f"(KV reuse every round); plugin profile {profile.name} disables it")
        else:
            flags["use_paged_context_fmha"] = "enable"
    if lora is not None:
        if speculation is not None:
            problems.append("yitrt does not combine LoRA adapters with speculative decoding: build one or the other")
        flags["lora_plugin"] = source.dtype  # the plugin computes in the engine's dtype, as lora_weights must be (§2.6)
        problems += lora.problems(source.dtype, tp, source.cfg.num_kv_heads, flags)
    if speculation is None and max_beam_width < 1:
        problems.append(f"--max-beam-width must be >= 1, got {max_beam_width}")
    if known_line(line):
        table = flag_table().flags(line)
        problems += _flag_problems(flags, table, line)
        problems += _flag_problems(speculation.argv_flags() if speculation else {}, table, line)
        problems += _flag_problems({k: v for k, v in (lora.argv_flags() if lora else {}).items() if not isinstance(v, list)}, table, line)
        tokens_per_block = int(flags.get("tokens_per_block") or table["tokens_per_block"].default)
    else:
        tokens_per_block = 32
    workload = Workload(isl=isl, osl=osl, max_seq_len=max_seq_len, max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                        kv_fraction=kv_fraction, tokens_per_block=tokens_per_block).with_hints(hints)
    plan, pair = _speculative_plan(source, gpu, workload, speculation, problems, notes, lora)
    if max_beam_width > 1 and speculation is None:
        notes.append(f"max_beam_width {max_beam_width}: the plan sizes the KV pool for one beam per sequence")
    limits = plan.limits.to_json()
    problems += [f"does not fit {gpu.name}: {p}" for p in plan.problems]
    workers = workers or 1
    if workers > tp * pp:
        problems.append(f"--workers {workers} exceeds the {tp * pp} ranks to build")
    context = rule_context(gpu=gpu, scheme=scheme, kv=kv, dtype=source.dtype, tp=tp, pp=pp, trtllm=version,
                           plugins=flags, build={**limits, "max_beam_width": max_beam_width, **(speculation.rule_fields() if speculation else {})},
                           context_length=plan.request.context_length)
    findings = check(context)
    problems += _requirement_problems(profile, context)
    errors = problems + [str(f) for f in findings if f.severity == "error"]
    if errors:
        raise ValidationError(errors, "fix every problem listed (`yitrt plan` and `yitrt plugins show` explain the choices)")
    return BuildSpec(Path(checkpoint).absolute(), source, gpu, version, line, chain, flags, limits, workers, plan, findings,
                     speculation, pair, max_beam_width, notes + (["the draft's --gather_generation_logits: trtllm-build "
                     "prints that the flag is deprecated, but Triton returns generation logits only from an engine built "
                     "with it (reference §1.1)"] if speculation and speculation.use_draft_logits else []), lora)
