"""A recipe's ``lora:`` section: LoRA adapters served on one base engine (trtllm-serving-features.md §2).

The schema (:class:`Lora`, its :class:`LoraAdapter` entries and :class:`LoraCache`) is strict like every recipe
section. :func:`lora_problems` needs only the recipe and yitrt's tables: adapter names and task ids unique, the
engine's ``target_modules`` known TensorRT-LLM module names, no speculative decoding beside it. :func:`lora_model_checks` reads what is known without weights — each local
adapter's ``adapter_config.json`` (a Hub adapter's is read once fetched: a warning says so) and the model's dtype —
and checks each adapter's rank against ``max_rank``, its target modules against the module table and the engine's
``target_modules``, DoRA and other features TensorRT-LLM's LoRA plugin lacks, and ``cache.prefetch`` against a
bf16 engine (backend #791, §2.6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from yitrt.errors import YitrtError
from yitrt.lora import (
    DEFAULT_GPU_MEMORY_FRACTION,
    DEFAULT_HOST_MEMORY_BYTES,
    DEFAULT_MAX_ADAPTER_SIZE,
    DEFAULT_OPTIMAL_ADAPTER_SIZE,
)
from yitrt.triton.lora import ADAPTER_NAME, PREFETCH_BF16, PREFETCH_FIX, assign_task_ids

#: TensorRT-LLM's LoRA cache defaults (T-mis getPeftCacheConfigFromParams, §2.5).
StrictPositive = Annotated[int, Field(ge=1, strict=True)]


class _LoraSection(BaseModel):
    # the same settings as yitrt.recipe's sections (defined here too: yitrt.recipe imports this module)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LoraAdapter(_LoraSection):
    """One adapter: a PEFT folder or Hub repo (``adapter_config.json`` + ``adapter_model.safetensors``)."""

    name: str = Field(..., pattern=ADAPTER_NAME, description="What requests call it (`chat/bench --lora NAME`): a-z, 0-9, _ and -, "
                      "at most 64 characters; unique.")
    source: str = Field(..., min_length=1, description="A local PEFT adapter folder or a Hugging Face repo id (owner/name).")
    revision: str | None = Field(None, description="Branch, tag or commit sha of a Hub adapter (default: the default branch).")
    task_id: StrictPositive | None = Field(None, description="Its lora_task_id (unique, >= 1; null: the smallest ids the others "
                                           "leave free, in order: 1..N when none is given).")
    allow_pickle: bool = Field(False, description="Accept adapter_model.bin (loaded with weights_only=True).")

    @property
    def is_local(self) -> bool:
        """Whether ``source`` names a folder (a path that exists, or one written as a path) rather than a Hub repo."""
        from yitrt.hub import is_repo_id

        return Path(self.source).expanduser().exists() or not is_repo_id(self.source)


class LoraCache(_LoraSection):
    """The engine's adapter cache (``tensorrt_llm`` parameters ``lora_cache_*``, §2.5)."""

    optimal_adapter_size: StrictPositive = Field(DEFAULT_OPTIMAL_ADAPTER_SIZE, description="lora_cache_optimal_adapter_size: the rank "
                                                 "one cache page fits exactly (clamped to max_rank).")
    max_adapter_size: StrictPositive = Field(DEFAULT_MAX_ADAPTER_SIZE, description="lora_cache_max_adapter_size: the largest rank a "
                                             "page holds for one module and layer (clamped to max_rank).")
    gpu_memory_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        DEFAULT_GPU_MEMORY_FRACTION, description="lora_cache_gpu_memory_fraction: of the GPU memory left after the engine and the KV pool.")
    host_memory_bytes: Annotated[int, Field(ge=1, strict=True)] = Field(DEFAULT_HOST_MEMORY_BYTES, description="lora_cache_host_memory_bytes.")
    prefetch: bool = Field(False, description="Preload every adapter at start (lora_prefetch_dir); refused for bf16 engines.")


class Lora(_LoraSection):
    """LoRA adapters served per request on one base engine (absent: no LoRA plugin)."""

    adapters: list[LoraAdapter] = Field(..., min_length=1, description="The adapters, each with a name and a source.")
    max_rank: StrictPositive | None = Field(None, description="The engine's --max_lora_rank (null: the largest adapter rank); an "
                                            "adapter above it is refused.")
    target_modules: list[str] | None = Field(None, description="The engine's --lora_target_modules, TensorRT-LLM names (null: every "
                                             "module an adapter adapts; attn_q/k/v are completed all-or-none as TensorRT-LLM does).")
    cache: LoraCache = LoraCache()

    @model_validator(mode="after")
    def _unique(self) -> Lora:
        names = [a.name for a in self.adapters]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"adapter names must be unique: {', '.join(dup)} given twice")
        ids = [a.task_id for a in self.adapters if a.task_id is not None]
        if dup_ids := sorted({i for i in ids if ids.count(i) > 1}):
            raise ValueError(f"adapter task_id values must be unique: {', '.join(map(str, dup_ids))} given twice")
        return self

    @property
    def task_ids(self) -> dict[str, int]:
        """Adapter name → its lora_task_id (:func:`assign_task_ids`)."""
        return assign_task_ids([(a.name, a.task_id) for a in self.adapters])


def lora_problems(sections: dict[str, Any]) -> list[str]:
    """The model-free checks of the ``lora`` section against the other sections that parsed."""
    from yitrt.build.lora import target_module_problems

    spec = sections.get("lora")
    if spec is None:
        return []
    problems = []
    if spec.target_modules is not None:
        problems += [f"lora.target_modules: {p}" for p in target_module_problems(spec.target_modules)]
    if sections.get("speculative") is not None:
        problems.append("lora: yitrt does not combine LoRA adapters with speculative decoding (the draft would propose without "
                        "the adapter; untested on the engine path); remove one of the two sections")
    for i, adapter in enumerate(spec.adapters):
        if adapter.revision is not None and adapter.is_local:
            problems.append(f"lora.adapters.{i}.revision: applies to a Hub adapter, and {adapter.source} is a local folder")
    return problems


def adapter_summary(source: Path) -> dict[str, Any]:
    """What an adapter folder's ``adapter_config.json`` says: its largest rank ``r`` (``r`` or a ``rank_pattern`` entry),
    ``target_modules`` (HF names), ``use_dora``.

    Raises:
        UsageError: no such folder or file, not JSON, not an object, r not a positive integer.
    """
    from yitrt.errors import UsageError
    from yitrt.userfiles import read_json

    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder", "give a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) or a Hub id")
    config = read_json(folder / "adapter_config.json", "adapter_config.json", fix="give a PEFT adapter folder")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UsageError(f"{folder}/adapter_config.json: r is {r!r}, not a positive integer", "give a PEFT LoRA adapter")
    modules = config.get("target_modules")
    if isinstance(modules, str):  # PEFT's one string is a regex (or "all-linear"): it is checked against the tensors at conversion
        modules = []
    elif not (isinstance(modules, list | type(None)) and all(isinstance(m, str) for m in modules or [])):
        raise UsageError(f"{folder}/adapter_config.json: target_modules is {modules!r}"[:200] + ", not a list of module names",
                         "give a PEFT LoRA adapter (save it with PEFT again)")
    else:  # PEFT matches a name by its end ("self_attn.q_proj" is q_proj)
        modules = [m.rsplit(".", 1)[-1] for m in modules or []]
    pattern = config.get("rank_pattern") if isinstance(config.get("rank_pattern"), dict) else {}
    # a module's own rank (PEFT rank_pattern) may exceed r: the engine's max rank must hold the largest
    ranks = [r, *(v for v in pattern.values() if isinstance(v, int) and not isinstance(v, bool) and v > 0)]
    return {"r": max(ranks), "target_modules": list(modules or []), "use_dora": bool(config.get("use_dora"))}


def lora_model_checks(sections: dict[str, Any]) -> tuple[list[str], list[str], Any]:
    """Each adapter against what is known without weights. Returns (problems, warnings, the adapter cache to plan:
    a ``yitrt.plan.lora.LoraCacheRequest``, or None when no rank or module is known yet)."""
    from yitrt.build.lora import engine_target_modules
    from yitrt.lora.modules import REFUSED_HF_MODULES, by_hf

    spec = sections.get("lora")
    if spec is None:
        return [], [], None
    problems: list[str] = []
    warnings: list[str] = []
    ranks: dict[str, int] = {}
    adapted: list[str] = []
    for i, adapter in enumerate(spec.adapters):
        where = f"lora.adapters.{i} ({adapter.name})"
        if not adapter.is_local:
            warnings.append(f"{where}: the Hub adapter {adapter.source} is checked (rank, modules) once fetched")
            continue
        try:
            summary = adapter_summary(Path(adapter.source))
        except YitrtError as exc:
            problems.append(f"{where}.source: {exc.message} ({exc.hint})")
            continue
        ranks[adapter.name] = summary["r"]
        if summary["use_dora"]:
            problems.append(f"{where}: a DoRA adapter (use_dora) is not served through Triton (lora_config rows are 3 wide: no DoRA)")
        for hf in summary["target_modules"]:
            module = by_hf(hf)
            if module is not None:
                adapted.append(module.trtllm)
            elif hf in REFUSED_HF_MODULES:
                problems.append(f"{where}: target module {hf}: {REFUSED_HF_MODULES[hf]}")
            else:
                problems.append(f"{where}: unknown target module {hf!r} (a Yi adapter targets q_proj, k_proj, v_proj, o_proj, "
                                "gate_proj, up_proj, down_proj)")
        if spec.max_rank is not None and summary["r"] > spec.max_rank:
            problems.append(f"{where}: rank {summary['r']} exceeds lora.max_rank {spec.max_rank}; raise max_rank (the engine's "
                            "--max_lora_rank) or use a smaller adapter")
    if spec.target_modules is not None:
        enabled = set(engine_target_modules(spec.target_modules))
        if missing := [m for m in dict.fromkeys(adapted) if m not in enabled]:
            problems.append(f"lora.target_modules: the adapters also adapt {', '.join(missing)}, which the engine would not enable "
                            "(\"lora module X not enabled for this model\"); add them or leave target_modules null")
    if spec.cache.prefetch:
        dtype = _engine_dtype(sections)
        if dtype == "bfloat16":
            problems.append(f"lora.cache.prefetch: {PREFETCH_BF16}; set it false or precision.dtype float16: {PREFETCH_FIX}")
    return problems, warnings, _cache_request(spec, ranks, adapted)


def _cache_request(spec: Lora, ranks: dict[str, int], adapted: list[str]) -> Any:
    """The cache the plan checks: the section's settings with the rank and modules known so far (the largest rank
    and the modules of the adapters read; a Hub adapter adds its own once fetched)."""
    from yitrt.build.lora import engine_target_modules, target_module_problems
    from yitrt.plan.lora import LoraCacheRequest

    modules = spec.target_modules if spec.target_modules is not None else adapted
    rank = spec.max_rank or max(ranks.values(), default=None)
    if rank is None or not modules or target_module_problems(modules):
        return None
    c = spec.cache
    return LoraCacheRequest(tuple(engine_target_modules(modules)), rank, c.optimal_adapter_size, c.max_adapter_size,
                            c.gpu_memory_fraction, c.host_memory_bytes)


def _engine_dtype(sections: dict[str, Any]) -> str | None:
    """The engine's dtype: the recipe's, else the model's (None when unknown)."""
    precision = sections.get("precision")
    if precision is not None and precision.dtype != "auto":
        return precision.dtype
    model = sections.get("model")
    if model is None:
        return None
    from yitrt.checkpoint.trtllm_config import resolve_dtype
    from yitrt.recipe import model_config_of

    try:
        return resolve_dtype("auto", model_config_of(model))
    except YitrtError:
        return None  # the model's own checks report it
