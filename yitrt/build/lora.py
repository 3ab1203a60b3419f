"""What LoRA asks of an engine build (trtllm-serving-features.md §2.1, §6).

``--lora_plugin <engine dtype> --lora_target_modules m1 m2 … --max_lora_rank R --lora_dir <first adapter's hf/>
--lora_ckpt_source hf``, every one explicit: an engine whose ``lora_config`` ends up with no modules or rank 0 logs
"lora_plugin enabled, but no lora module enabled: setting useLoraPlugin to false" and serves no adapter (GJC), and
the newest loader raises when neither modules nor a ``lora_dir`` are given (LMGR). The target modules are completed
q/k/v all-or-none, as TensorRT-LLM does itself (LHELP ``get_missing_qkv_modules_from_lora_modules``), so the argv
says what the engine will hold; and ``mlp_h_to_4h``/``mlp_gate`` are completed as a pair: with ``--use_fused_mlp
enable`` (yitrt's default) TensorRT-LLM's ``FusedGatedMLP`` adds the fc/gate LoRA only when the engine has BOTH modules
(layers/mlp.py ``fc_gate_lora``: ``if mlp_fc_lora_params is not None and mlp_gate_lora_params is not None``), so an
engine built with one of them would silently serve that module's adapter rows as the base model. A module an adapter
does not adapt costs its share of the cache pages and a rank-0 GEMM, nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yitrt.errors import UsageError, ValidationError
from yitrt.plan.lora import LoraCacheRequest

#: the modules TensorRT-LLM enables together (a missing one is added and zero-filled, §2.1)
QKV = ("attn_q", "attn_k", "attn_v")
#: the modules the fused gated MLP adapts only together (see the module docstring)
MLP_IN = ("mlp_h_to_4h", "mlp_gate")
#: plugins whose fused fc/gate GEMM has no LoRA path ("LoRA of splitting fc and gate is not yet implemented for
#: gemm_swiglu_plugin", layers/mlp.py ``FusedGatedMLP.fc_gate_plugin``)
SWIGLU_PLUGINS = ("gemm_swiglu_plugin", "low_latency_gemm_swiglu_plugin")


def target_module_problems(names: Iterable[str]) -> list[str]:
    """Why ``names`` are not valid ``--lora_target_modules`` of a Yi engine (empty: they are)."""
    from yitrt.lora.modules import LORA_MODULES, TRTLLM_MODULE_IDS, by_hf, by_trtllm

    names = list(names)
    known = ", ".join(m.trtllm for m in LORA_MODULES)
    if not names:
        return [f"empty: the engine would adapt nothing (give some of {known}, or leave it null)"]
    problems = []
    for name in names:
        if by_trtllm(name) is not None:
            continue
        if (hf := by_hf(name)) is not None:
            problems.append(f"{name} is the PEFT name; the engine takes TensorRT-LLM names ({name} is {hf.trtllm})")
        elif name == "attn_qkv":
            problems.append("attn_qkv adapts a fused qkv_proj, which Yi does not have (its q/k/v are attn_q, attn_k, attn_v)")
        elif name in TRTLLM_MODULE_IDS:
            problems.append(f"{name} is a TensorRT-LLM module Yi's decoder does not have (known: {known})")
        else:
            problems.append(f"unknown module {name!r} (known: {known})")
    return problems


def engine_target_modules(names: Iterable[str]) -> list[str]:
    """The modules an engine enables for ``names``: q/k/v completed all-or-none, fc/gate as a pair, in module-id order,
    no repeats."""
    from yitrt.lora.modules import TRTLLM_MODULE_IDS

    chosen = set(names)
    for group in (QKV, MLP_IN):
        if chosen & set(group):
            chosen |= set(group)
    return sorted(chosen, key=lambda n: TRTLLM_MODULE_IDS.get(n, 1 << 16))


@dataclass(frozen=True)
class ConvertedAdapter:
    """A ``yitrt lora convert`` output folder, as the build and deploy read it."""

    path: Path
    name: str
    rank: int
    modules: tuple[str, ...]  # TensorRT-LLM names
    dtype: str
    tp: int

    def to_json(self) -> dict[str, Any]:
        """JSON object."""
        return {"path": str(self.path), "name": self.name, "rank": self.rank, "modules": list(self.modules), "dtype": self.dtype,
                "tp": self.tp}


def read_adapter(folder: Path) -> ConvertedAdapter:
    """A converted adapter's facts (``yitrt.lora.convert.read_converted``); its name is its folder's.

    Raises:
        LoraError: not a ``yitrt lora convert`` folder, or its files do not match its manifest.
    """
    from yitrt.lora.convert import read_converted

    folder = Path(folder).absolute()
    converted = read_converted(folder)
    return ConvertedAdapter(folder, folder.name, converted.max_rank, tuple(converted.modules), converted.dtype, int(converted.tp))


@dataclass(frozen=True)
class LoraBuild:
    """The LoRA part of one engine build.

    Attributes:
        adapters: the converted adapters the engine is for (the first one's ``hf/`` is ``--lora_dir``).
        target_modules: ``--lora_target_modules`` (q/k/v completed, module-id order).
        max_rank: ``--max_lora_rank``.
        cache_settings: the adapter cache it is planned with (None: TensorRT-LLM's defaults).
    """

    adapters: tuple[ConvertedAdapter, ...]
    target_modules: tuple[str, ...]
    max_rank: int
    cache_settings: LoraCacheRequest | None = None

    @property
    def cache(self) -> LoraCacheRequest:
        """The adapter cache the plan checks: the given settings, else TensorRT-LLM's defaults for these modules and rank."""
        return self.cache_settings or LoraCacheRequest(self.target_modules, self.max_rank)

    @property
    def lora_dir(self) -> Path:
        """``--lora_dir``: the first adapter's PEFT copy (safetensors only)."""
        from yitrt.lora import HF_DIR

        return self.adapters[0].path / HF_DIR

    def argv_flags(self) -> dict[str, Any]:
        """The build arguments (not plugin flags), in argv order; a list is one flag with several values."""
        return {"lora_target_modules": list(self.target_modules), "max_lora_rank": self.max_rank, "lora_dir": str(self.lora_dir),
                "lora_ckpt_source": "hf"}

    def problems(self, dtype: str, tp: int, num_kv_heads: int, plugin_flags: dict[str, Any] | None = None) -> list[str]:
        """Why these adapters do not go with an engine of ``dtype`` at ``tp`` built with ``plugin_flags`` (empty: they do)."""
        out = []
        swiglu = [f for f in SWIGLU_PLUGINS if (plugin_flags or {}).get(f) not in (None, "disable")]
        if swiglu and set(MLP_IN) & set(self.target_modules):
            out.append(f"--{swiglu[0]} has no LoRA path for {'/'.join(MLP_IN)} (TensorRT-LLM: \"LoRA of splitting fc and gate is not "
                       f"yet implemented for gemm_swiglu_plugin\"): use a plugin profile without it, or adapters without gate_proj/up_proj")
        for a in self.adapters:
            if a.dtype != dtype:
                out.append(f"adapter {a.name} was converted for {a.dtype}, the engine is {dtype} (lora_weights must be the engine's "
                           f"dtype: \"Expected lora weights to be the same data type as base model\"); convert it with --dtype {dtype}")
            kv = {"attn_k", "attn_v"} & set(a.modules)
            if a.tp != tp and kv and max(a.tp, tp) > num_kv_heads:
                out.append(f"adapter {a.name} was converted at tp {a.tp}, the engine is tp {tp}: its {'/'.join(sorted(kv))} rows follow "
                           f"the KV-head repetition of tp > {num_kv_heads} KV heads; convert it with --tp {tp}")
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON object (the build config's ``lora`` section)."""
        return {"target_modules": list(self.target_modules), "max_lora_rank": self.max_rank, "lora_dir": str(self.lora_dir),
                "lora_ckpt_source": "hf", "adapters": [a.to_json() for a in self.adapters]}


def lora_build(adapters: Sequence[Path | ConvertedAdapter], max_rank: int | None = None, target_modules: Sequence[str] | None = None,
               cache: dict[str, Any] | None = None) -> LoraBuild | None:
    """Check converted adapters against the engine's LoRA settings and resolve them (None: no adapters, no LoRA).

    Args:
        adapters: ``yitrt lora convert`` folders (or their facts).
        max_rank: ``--max_lora_rank`` (None: the largest adapter rank).
        target_modules: ``--lora_target_modules`` (None: every module an adapter adapts); completed q/k/v all-or-none.
        cache: ``LoraCacheRequest`` fields other than modules and rank (None: TensorRT-LLM's defaults).

    Raises:
        LoraError: not a converted adapter. ValidationError: every problem at once (a rank above ``max_rank``, a
            module the engine would not enable, an unknown module).
    """
    if not adapters:
        if max_rank is not None or target_modules is not None:
            raise UsageError("--max-lora-rank/--lora-target-modules need adapters", "pass --lora CONVERTED_ADAPTER (yitrt lora convert output)")
        return None
    facts = tuple(a if isinstance(a, ConvertedAdapter) else read_adapter(a) for a in adapters)
    problems = []
    if target_modules is not None:
        problems += [f"--lora_target_modules: {p}" for p in target_module_problems(target_modules)]
    names = [a.name for a in facts]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"adapter names must be unique: {', '.join(dup)} given twice")
    rank = max_rank if max_rank is not None else max(a.rank for a in facts)
    modules = tuple(engine_target_modules(target_modules if target_modules is not None else (m for a in facts for m in a.modules)))
    for a in facts:
        if a.rank > rank:
            problems.append(f"adapter {a.name} has rank {a.rank}, above max_lora_rank {rank}: raise max_lora_rank or use a smaller adapter")
        if missing := [m for m in a.modules if m not in modules]:
            problems.append(f"adapter {a.name} adapts {', '.join(missing)}, which the engine would not enable (\"lora module X not "
                            "enabled for this model\"): add them to the target modules")
    if problems:
        raise ValidationError(problems, "fix the adapters or the LoRA settings (lora.max_rank, lora.target_modules)")
    return LoraBuild(facts, modules, rank, LoraCacheRequest(modules, rank, **(cache or {})))
