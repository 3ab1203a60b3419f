"""LoRA in a Triton repository (trtllm-serving-features.md §2.3, §2.5, §2.6): the adapter cache parameters of
``tensorrt_llm``, the adapters' request arrays copied in, their index for clients, an optional prefetch folder.

Layout: each adapter's ``model.lora_weights.npy`` and ``model.lora_config.npy`` in ``tensorrt_llm/lora/<name>/`` (a
folder at the repository root would be taken for a model, as the tokenizer's would), ``lora_adapters.json`` at the
root (name → task id, folder, rank, modules, dtype: what `chat/bench --lora NAME` read), and with prefetch a copy per
task id in ``tensorrt_llm/lora/prefetch/<task_id>/`` (the backend loads numeric sub-folders of ``lora_prefetch_dir``
at start, §2.5). The ``lora_weights`` inputs are typed with the engine's dtype by the repository writer, adapters or
not: a bf16 engine refuses the template's FP16 (§2.6).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yitrt.errors import YitrtError
from yitrt.lora import (
    DEFAULT_GPU_MEMORY_FRACTION,
    DEFAULT_HOST_MEMORY_BYTES,
    DEFAULT_MAX_ADAPTER_SIZE,
    DEFAULT_OPTIMAL_ADAPTER_SIZE,
    NPY_FILES,
)

ADAPTERS_FILE = "lora_adapters.json"
LORA_FOLDER = "tensorrt_llm/lora"
PREFETCH_FOLDER = f"{LORA_FOLDER}/prefetch"
#: What an adapter name may be: it names a folder of the repository and what `chat/bench --lora NAME` take.
ADAPTER_NAME = r"^[a-z0-9_-]{1,64}$"
#: Why a bf16 engine cannot preload adapters, and what works instead (§2.6).
PREFETCH_BF16 = ("lora_prefetch_dir with a bfloat16 engine silently serves the base model (tensorrtllm_backend #791: the "
                 "preloaded .npy files are not bf16)")
PREFETCH_FIX = ("preload nothing (clients send each adapter's weights with its first request; `chat/bench --lora NAME` do), or "
                "build the engine in float16")

#: the largest lora_task_id (a UINT64 tensor, §2.3)
MAX_TASK_ID = (1 << 64) - 1


@dataclass(frozen=True)
class AdapterRequest:
    """One adapter to deploy: its name, a ``yitrt lora convert`` folder, and its task id (None: assigned)."""

    name: str
    path: Path
    task_id: int | None = None


def parse_adapter_option(text: str) -> AdapterRequest:
    """``NAME=DIR`` or ``NAME=DIR:TASK_ID`` (`yitrt deploy --lora`) → an AdapterRequest.

    Raises:
        UsageError: no ``=``, a name that is not ``[a-z0-9_-]``, a task id below 1.
    """
    from yitrt.errors import UsageError

    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise UsageError(f"--lora {text!r} is not NAME=DIR[:TASK_ID]", "e.g. --lora chat=yi-lora-chat or --lora chat=yi-lora-chat:3")
    if not re.fullmatch(ADAPTER_NAME, name):
        raise UsageError(f"--lora {text!r}: the name {name!r} must be a-z, 0-9, _ or - (at most 64)", "e.g. --lora chat=DIR")
    folder, colon, task = rest.rpartition(":")
    if colon and re.fullmatch(r"[0-9]+", task):  # ASCII digits only (str.isdigit takes '²' and '١')
        if not 1 <= int(task) <= MAX_TASK_ID:
            raise UsageError(f"--lora {text!r}: task id {task} must be 1 to 2^64 - 1 (lora_task_id is UINT64)", "task ids start at 1")
        return AdapterRequest(name, Path(folder), int(task))
    return AdapterRequest(name, Path(rest))


@dataclass(frozen=True)
class LoraRequest:
    """The LoRA settings of a deployment (the recipe's ``lora:`` section, or `yitrt deploy --lora`).

    Attributes:
        adapters: the adapters (task ids unique; None ones take the smallest free ids in order).
        optimal_adapter_size / max_adapter_size / gpu_memory_fraction / host_memory_bytes: the ``lora_cache_*``
            parameters (both sizes clamped to the engine's max rank).
        prefetch: preload every adapter at start (``lora_prefetch_dir``; refused for bf16 engines).
        max_rank / target_modules: the reference slot's LoRA limits (an engine has its own build's; None: from the
            adapters, as a build takes them).
    """

    adapters: tuple[AdapterRequest, ...]
    optimal_adapter_size: int = DEFAULT_OPTIMAL_ADAPTER_SIZE
    max_adapter_size: int = DEFAULT_MAX_ADAPTER_SIZE
    gpu_memory_fraction: float = DEFAULT_GPU_MEMORY_FRACTION
    host_memory_bytes: int = DEFAULT_HOST_MEMORY_BYTES
    prefetch: bool = False
    max_rank: int | None = None
    target_modules: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DeployedAdapter:
    """An adapter as the repository holds it."""

    name: str
    task_id: int
    source: Path
    rank: int
    modules: tuple[str, ...]
    dtype: str

    @property
    def folder(self) -> str:
        """Its folder, relative to the repository."""
        return f"{LORA_FOLDER}/{self.name}"

    def index_entry(self) -> dict[str, Any]:
        """Its entry in ``lora_adapters.json``."""
        return {"name": self.name, "task_id": self.task_id, "dir": self.folder, "rank": self.rank, "modules": list(self.modules),
                "dtype": self.dtype}


@dataclass(frozen=True)
class LoraDeployment:
    """The resolved LoRA part of a repository."""

    adapters: tuple[DeployedAdapter, ...]
    max_rank: int
    modules: tuple[str, ...]
    optimal_adapter_size: int
    max_adapter_size: int
    gpu_memory_fraction: float
    host_memory_bytes: int
    prefetch: bool

    def fill(self, repository: Path) -> dict[str, str]:
        """The ``tensorrt_llm`` template values (``lora_prefetch_dir``: absolute, as ``engine_dir`` is)."""
        out = {"lora_cache_optimal_adapter_size": str(self.optimal_adapter_size), "lora_cache_max_adapter_size": str(self.max_adapter_size),
               "lora_cache_gpu_memory_fraction": f"{self.gpu_memory_fraction:g}", "lora_cache_host_memory_bytes": str(self.host_memory_bytes)}
        if self.prefetch:
            out["lora_prefetch_dir"] = str(Path(repository).absolute() / PREFETCH_FOLDER)
        return out

    def slot_parameters(self) -> dict[str, str]:
        """What the reference slot needs that an engine knows from its build: the enabled modules and the max rank."""
        return {"yitrt_lora_target_modules": ",".join(self.modules), "yitrt_max_lora_rank": str(self.max_rank)}

    def index(self) -> dict[str, Any]:
        """``lora_adapters.json``."""
        return {"adapters": [a.index_entry() for a in self.adapters]}

    def write(self, repository: Path) -> None:
        """Copy every adapter's arrays into the repository (and the prefetch copies) and write the index."""
        from yitrt.userfiles import copy_into

        for adapter in self.adapters:
            copy_into(adapter.source, list(NPY_FILES), repository / adapter.folder, "LoRA adapter file")
            if self.prefetch:
                copy_into(adapter.source, list(NPY_FILES), repository / PREFETCH_FOLDER / str(adapter.task_id), "LoRA adapter file")
        (repository / ADAPTERS_FILE).write_text(json.dumps(self.index(), indent=1) + "\n")

    def to_json(self) -> dict[str, Any]:
        """JSON object (the deploy summary's ``lora``)."""
        return {"adapters": [a.index_entry() for a in self.adapters], "max_rank": self.max_rank, "modules": list(self.modules),
                "optimal_adapter_size": self.optimal_adapter_size, "max_adapter_size": self.max_adapter_size,
                "gpu_memory_fraction": self.gpu_memory_fraction, "host_memory_bytes": self.host_memory_bytes, "prefetch": self.prefetch}

    def readme_section(self, bls: str) -> str:
        """The README's LoRA section."""
        rows = "\n".join(f"| `{a.name}` | {a.task_id} | {a.rank} | {', '.join(a.modules)} | `{a.folder}/` |" for a in self.adapters)
        first = self.adapters[0].name
        n, digits = len(self.adapters), 2 if len(self.adapters) <= 10 else 4
        share = [round(1 / n, digits)] * (n - 1)
        share.append(1 - sum(share))  # the shares must sum to 1 (bench checks): 3 adapters are 0.33, 0.33, 0.34
        mix = ",".join(f"{a.name}:{w:.{digits}f}".rstrip("0").rstrip(".") for a, w in zip(self.adapters, share, strict=True))
        prefetch = (f"All adapters are preloaded at start (`lora_prefetch_dir` = `{PREFETCH_FOLDER}/`), so a request may send its task id "
                    "alone from the first one." if self.prefetch else
                    "An adapter's first request must carry `lora_task_id`, `lora_weights` and `lora_config` (the two `.npy` files); "
                    "later requests send the task id alone while the adapter is cached (\"LoRA task N not found in cache. Please send "
                    "LoRA weights with request\" otherwise). `yitrt chat`/`yitrt bench` do this for you.")
        from yitrt.triton.contract import TRITON_DTYPES

        wtype = TRITON_DTYPES.get(self.adapters[0].dtype, self.adapters[0].dtype)
        return f"""
## LoRA adapters

The engine serves these adapters (`{ADAPTERS_FILE}` lists them for clients); a request picks one with `lora_task_id`:

| adapter | task id | rank | modules | arrays |
| --- | --- | --- | --- | --- |
{rows}

    yitrt chat localhost:8001 --model {bls} --lora {first} "What is the capital of France?"
    yitrt bench localhost:8001 --model {bls} --lora {first}
    yitrt bench localhost:8001 --model {bls} --lora-mix {mix}

Run these from this folder (chat and bench read `{ADAPTERS_FILE}` here), or add `--repo <this folder>`.
{prefetch} `lora_weights` is {wtype} (the engine's dtype; a bf16 engine refuses FP16 weights). Adapter cache:
`lora_cache_gpu_memory_fraction` {self.gpu_memory_fraction:g} of the GPU memory the KV pool leaves, `lora_cache_host_memory_bytes`
{self.host_memory_bytes:,}, pages sized for rank {self.optimal_adapter_size} (`lora_cache_optimal_adapter_size`), up to rank
{self.max_adapter_size} (`lora_cache_max_adapter_size`); the least recently used adapter not in use is evicted when it is full.
Never reuse a task id for another adapter while the server runs: cached KV blocks are keyed by task id.
"""


def resolve(req: LoraRequest | None, engine_dtype: str, engine_kind: str, engine_lora: dict[str, Any] | None) -> tuple[LoraDeployment | None, list[str]]:
    """Check a deployment's adapters against the engine and resolve them. Returns (the deployment or None, problems).

    Args:
        req: the LoRA settings (None: no adapters).
        engine_dtype: the engine's (or the slot's checkpoint's) dtype: ``lora_weights`` must be it.
        engine_kind: ``trtllm`` or ``reference``.
        engine_lora: the engine's LoRA build settings (``plugin``, ``max_lora_rank``, ``lora_target_modules``; None: the
            engine has no LoRA plugin); ignored for the reference slot, which takes ``req``'s.
    """
    from yitrt.build.lora import engine_target_modules, read_adapter, target_module_problems

    if req is None or not req.adapters:
        return None, []
    problems: list[str] = []
    facts = []
    for a in req.adapters:
        try:
            facts.append((a, read_adapter(a.path)))
        except YitrtError as exc:
            problems.append(f"LoRA adapter {a.name}: {exc.message} ({exc.hint})")
    names = [a.name for a in req.adapters]
    if bad_names := [n for n in names if not isinstance(n, str) or not re.fullmatch(ADAPTER_NAME, n)]:
        problems.append(f"LoRA adapter names must be a-z, 0-9, _ or - (at most 64; they name folders): not {', '.join(map(repr, bad_names))}")
    if dup := sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"LoRA adapter names must be unique: {', '.join(dup)} given twice")
    given = [a.task_id for a in req.adapters if a.task_id is not None]
    if dup_ids := sorted({i for i in given if given.count(i) > 1}):
        problems.append(f"LoRA task ids must be unique: {', '.join(map(str, dup_ids))} given twice")
    if bad := [i for i in given if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= MAX_TASK_ID]:
        problems.append(f"LoRA task ids must be integers from 1 to 2^64 - 1 (UINT64), not {', '.join(map(repr, bad))}")
    if engine_kind == "reference":
        if req.target_modules is not None:
            problems += [f"LoRA target modules: {p}" for p in target_module_problems(req.target_modules)]
        modules = tuple(engine_target_modules(req.target_modules if req.target_modules is not None else
                                              (m for _, f in facts for m in f.modules)))
        max_rank = req.max_rank or max((f.rank for _, f in facts), default=1)
    elif not engine_lora:
        problems.append("the engine was built without the LoRA plugin, so it serves no adapter: rebuild it with the adapters "
                        "(the recipe's lora section, or `yitrt build --lora`)")
        modules, max_rank = (), 0
    else:
        modules, max_rank = tuple(engine_lora.get("lora_target_modules") or ()), int(engine_lora.get("max_lora_rank") or 0)
        if not modules or max_rank < 1:  # GJC: "lora_plugin enabled, but no lora module enabled: setting useLoraPlugin to false"
            problems.append(f"the engine's LoRA plugin has no module enabled or max_lora_rank {max_rank}, so TensorRT-LLM turns it off: "
                            "rebuild with --lora_target_modules and --max_lora_rank (yitrt build does)")
    for a, f in facts:
        if f.dtype != engine_dtype:
            problems.append(f"LoRA adapter {a.name} holds {f.dtype} weights, the engine is {engine_dtype} (\"Expected lora weights to be the "
                            f"same data type as base model\"): convert it with --dtype {engine_dtype}")
        if max_rank and f.rank > max_rank:
            problems.append(f"LoRA adapter {a.name} has rank {f.rank}, above the engine's max_lora_rank {max_rank}")
        if modules and (missing := [m for m in f.modules if m not in modules]):
            problems.append(f"LoRA adapter {a.name} adapts {', '.join(missing)}, which the engine does not enable (\"lora module X not "
                            "enabled for this model\")")
        missing_files = [n for n in NPY_FILES if not (f.path / n).is_file()]
        if missing_files:
            problems.append(f"LoRA adapter {a.name}: {f.path} lacks {', '.join(missing_files)} (convert it again)")
    if req.prefetch and engine_dtype == "bfloat16":
        problems.append(f"LoRA prefetch: {PREFETCH_BF16}; drop --lora-prefetch: {PREFETCH_FIX}")
    for key in ("optimal_adapter_size", "max_adapter_size", "host_memory_bytes"):
        value = getattr(req, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"LoRA cache {key} must be a positive integer, not {value!r}")
    if not (isinstance(req.gpu_memory_fraction, (int, float)) and 0 < req.gpu_memory_fraction <= 1):
        problems.append(f"LoRA cache gpu_memory_fraction must be in (0, 1], not {req.gpu_memory_fraction!r}")
    if problems:
        return None, problems
    ids = assign_task_ids([(a.name, a.task_id) for a in req.adapters])
    adapters = tuple(DeployedAdapter(a.name, ids[a.name], f.path, f.rank, f.modules, f.dtype) for a, f in facts)
    # the executor clamps both sizes to max_lora_rank (§2.5): the repository says the values it will use
    return LoraDeployment(adapters, max_rank, modules, min(req.optimal_adapter_size, max_rank), min(req.max_adapter_size, max_rank),
                          float(req.gpu_memory_fraction), int(req.host_memory_bytes), req.prefetch), []


def assign_task_ids(adapters: list[tuple[str, int | None]]) -> dict[str, int]:
    """(name, task id or None) → name → task id: the given ones kept, the others the smallest ids left free, in order
    (1..N when none is given)."""
    taken = {task_id for _, task_id in adapters if task_id is not None}
    out, candidate = {}, 1
    for name, task_id in adapters:
        if task_id is not None:
            out[name] = task_id
            continue
        while candidate in taken:
            candidate += 1
        out[name] = candidate
        taken.add(candidate)
    return out


def engine_lora(build_config: dict[str, Any]) -> dict[str, Any] | None:
    """An engine's LoRA build settings from its config.json ``build_config`` (None: built without the LoRA plugin)."""
    plugins = build_config.get("plugin_config") if isinstance(build_config, dict) else None
    plugin = plugins.get("lora_plugin") if isinstance(plugins, dict) else None
    if plugin in (None, False, "disable"):
        return None
    lora = build_config.get("lora_config") or {}
    lora = lora if isinstance(lora, dict) else {}
    modules, rank = lora.get("lora_target_modules"), lora.get("max_lora_rank")
    # a value of the wrong type reads as absent: the caller then refuses the engine's LoRA settings, naming them
    return {"plugin": plugin, "max_lora_rank": rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
            "lora_target_modules": [m for m in modules if isinstance(m, str)] if isinstance(modules, list) else []}
