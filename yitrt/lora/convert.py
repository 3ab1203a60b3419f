"""`yitrt lora convert`: a PEFT LoRA adapter → TensorRT-LLM's ``lora_weights`` / ``lora_config`` arrays, with a manifest.

The adapter (``adapter_config.json`` + ``adapter_model.safetensors``; ``adapter_model.bin`` only with
``allow_pickle``, loaded with ``torch.load(weights_only=True)``) is checked whole against the base model and the
engine's settings before anything is loaded or written, every problem in one message. Then each module's A and
B·scale are packed in TensorRT-LLM's row layout (``yitrt.lora.format``) and written, atomically, as

    DIR/model.lora_weights.npy    [1, rows, max_row_len]  (float16; float32 for float32 engines and — numpy has no
                                                            bf16 — for bfloat16 engines, holding bf16-rounded values)
    DIR/model.lora_config.npy     [1, rows, 3] int32      ([module_id, layer, r]; layers ascending, then module id)
    DIR/hf/adapter_config.json, DIR/hf/adapter_model.safetensors   (the adapter as ``trtllm-build --lora_dir`` reads it)
    DIR/yitrt-manifest.json

Scaling (trtllm-serving-features.md §2.3, §2.4): B is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with
``use_rslora``). Unlike TensorRT-LLM's ``hf_lora_convert.py``, which applies one global scale and so ignores PEFT's
``rank_pattern`` / ``alpha_pattern``, each module gets its own rank and alpha here: every ``lora_config`` row carries
its own adapter size, so per-module ranks are representable and the scale is the one PEFT applied to that module.

Choices (refused by name otherwise): ``peft_type`` LORA only; ``bias: "none"`` only (TensorRT-LLM's LoRA rows carry
no bias); ``fan_in_fan_out: false`` only (a Conv1D layout, never a Llama linear); no DoRA, no LoRA bias, no
``modules_to_save`` / trainable tokens, no embedding or lm_head adapters, no layer replication, no activated LoRA
(``alora_invocation_tokens``), no KaSA / MonteCLoRA / BD-LoRA / Arrow / QA-LoRA variants, no initialisations that
rewrite the base weights (PiSSA, OLoRA, CorDA, LoRA-GA) unless the adapter was saved converted to plain LoRA. ``lora_dropout`` is a training setting and ignored. Weights are full (unsplit) for
every TP rank — the runtime slices them — except that at tp > num_kv_heads the k/v B rows are repeated per KV head
exactly as the base k/v weights are (``yitrt.checkpoint.sharding``), because TensorRT-LLM's runtime then sizes k/v
as ``local_kv_heads · tp · head_dim`` rows (§2.6: inferred from GJC/LMOD-cpp, UNCONFIRMED).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yitrt import __version__
from yitrt.errors import LoraError, UsageError
from yitrt.lora.format import STORE_DTYPES, pack
from yitrt.lora.modules import LORA_MODULES, REFUSED_HF_MODULES, LoraModule, by_hf, by_trtllm

STAGE = "lora-convert"
WEIGHTS_NAME = "model.lora_weights.npy"
CONFIG_NAME = "model.lora_config.npy"
HF_DIR = "hf"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"

#: A PEFT LoRA tensor of a decoder layer: ``…layers.N.(self_attn|mlp).MODULE.lora_(A|B).weight`` (the key pattern
#: of hf_lora_convert.py, §2.4, anchored at both ends so nothing is silently dropped).
_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\.(?P<module>[A-Za-z0-9_]+)\.lora_(?P<ab>[AB])\.weight$")

#: Tensors of a PEFT adapter that TensorRT-LLM's LoRA format cannot carry, each recognised by its key and named.
_REFUSED_KEYS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.lora_magnitude_vector(\.weight)?$"), "DoRA magnitude vectors (use_dora): TensorRT-LLM's Triton LoRA rows have no DoRA column"),
    (re.compile(r"\.lora_embedding_[AB]$"), "embedding LoRA (lora_embedding_A/B): TensorRT-LLM's LoRA plugin adapts linear layers only"),
    (re.compile(r"\.lora_B\.bias$"), "a LoRA bias (lora_bias: true): TensorRT-LLM's LoRA rows carry no bias"),
    (re.compile(r"(^|\.)embed_tokens\.(weight|token_adapter\..*)$"), "a trained embed_tokens (modules_to_save / trainable tokens): not part of a TensorRT-LLM adapter"),
    (re.compile(r"(^|\.)lm_head\.(weight|lora_[AB]\.weight)$"), "an lm_head adapter or trained lm_head: TensorRT-LLM's LoRA plugin adapts decoder linears only"),
    (re.compile(r"(^|\.)embed_tokens\.lora_[AB]\.weight$"), "an embed_tokens adapter: TensorRT-LLM's LoRA plugin adapts linear layers only"),
)

#: adapter_config.json settings that change what the adapter computes in ways TensorRT-LLM cannot reproduce, with why.
#: A key is refused when its value is set (truthy), except where noted in ``_check_config``.
_REFUSED_SETTINGS: dict[str, str] = {
    "use_dora": "DoRA (use_dora: true) needs magnitude vectors that TensorRT-LLM's Triton LoRA rows (3 columns) cannot carry",
    "fan_in_fan_out": "fan_in_fan_out: true is the Conv1D (GPT-2) weight layout, not a Llama linear",
    "lora_bias": "lora_bias: true trains a bias on B, which TensorRT-LLM's LoRA rows cannot carry",
    "modules_to_save": "modules_to_save trains whole modules (e.g. lm_head, embed_tokens), which are not part of a TensorRT-LLM adapter",
    "trainable_token_indices": "trainable_token_indices trains embedding rows, which are not part of a TensorRT-LLM adapter",
    "layer_replication": "layer_replication changes the base model's layers",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies the adapter only after its invocation tokens",
    "target_parameters": "target_parameters adapts raw parameters (e.g. MoE experts), not linear layers",
    "use_qalora": "QA-LoRA (use_qalora) pools inputs per quantization group",
    "kasa_config": "KaSA (kasa_config) truncates the base weight's singular values and puts a learnt diagonal between A and B",
    "monteclora_config": "MonteCLoRA (monteclora_config) samples its adapter weights",
    "use_bdlora": "BD-LoRA (use_bdlora) stores block-diagonal factors",
    "arrow_config": "Arrow (arrow_config) routes each token among several adapters",
}
#: init_lora_weights values whose initialisation rewrote the base weights (the adapter only works on that base).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga")  # peft LoraLayer.*_init rewrite base_layer.weight

_FIX = "convert an adapter trained on this base model (PEFT LoRA, q/k/v/o/gate/up/down projections)"


@dataclass(frozen=True)
class BaseModel:
    """What conversion needs to know about the base model.

    Attributes:
        path: the folder read (an HF model folder or a TensorRT-LLM checkpoint folder).
        kind: "hf" or "checkpoint".
        hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim, num_layers: dims.
        dtype: the engine dtype it implies (a checkpoint's own; for an HF model what `yitrt convert` writes by default).
        tp: the checkpoint's tensor-parallel size (None for an HF model: any valid tp).
        repo_id: the Hub repo, when known.
        config_sha256: digest of its config.json (the conversion depends on nothing else of the base).
    """

    path: Path
    kind: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    dtype: str
    tp: int | None
    repo_id: str | None
    config_sha256: str

    @property
    def head_size(self) -> int:
        """TensorRT-LLM's name for head_dim."""
        return self.head_dim


def read_base(base: str | Path, revision: str | None = None) -> BaseModel:
    """The dims and dtype of a base model: an HF model folder (or Hub id, config only) or a TensorRT-LLM checkpoint folder.

    Raises:
        UsageError: not a folder nor a repo id. CheckpointError / UnsupportedModelError: an unreadable config.
        HubError: a Hub id that cannot be fetched.
    """
    from yitrt.hub import resolve_model
    from yitrt.userfiles import read_json

    resolved = resolve_model(str(base), revision=revision, metadata_only=True)
    path = Path(resolved.path)
    config_path = path / "config.json"
    from yitrt.errors import CheckpointError

    raw = read_json(config_path, "config.json", error=CheckpointError, fix="point --base at a model or checkpoint folder")
    digest = hashlib.sha256(config_path.read_bytes()).hexdigest()
    if "architecture" in raw and "architectures" not in raw:  # TensorRT-LLM's checkpoint config (reference §1.2)
        from yitrt.reference.spec import load_spec

        spec = load_spec(path)
        return BaseModel(path, "checkpoint", spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.num_kv_heads,
                         spec.head_size, spec.num_layers, spec.dtype, spec.tp, resolved.repo_id, digest)
    from yitrt.checkpoint.trtllm_config import resolve_dtype
    from yitrt.models.config import load_config

    cfg = load_config(path)
    return BaseModel(path, "hf", cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.num_layers, resolve_dtype("auto", cfg), None, resolved.repo_id, digest)


# -- reading the adapter ------------------------------------------------------------------------------------------


@dataclass
class _Adapter:
    folder: Path
    repo_id: str | None
    revision: str | None
    config: dict[str, Any]
    weights_file: Path | None  # the real path of the weights file
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    pickled: dict[str, Any] | None  # tensors already loaded from a pickle (allow_pickle)


def _read_adapter(ref: str | Path, revision: str | None, allow_pickle: bool, problems: list[str]) -> _Adapter:
    """The adapter's config and tensor shapes (safetensors: header only; a pickle is loaded, weights_only)."""
    from yitrt.hub import resolve_adapter
    from yitrt.userfiles import read_json, source_file

    resolved = resolve_adapter(str(ref), revision=revision, allow_pickle=allow_pickle)
    folder = Path(resolved.path)
    config_file = source_file(folder, ADAPTER_CONFIG, "adapter file", LoraError)
    if config_file is None:
        raise LoraError(f"{folder} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter", "give the folder `save_pretrained` wrote")
    config = read_json(config_file, ADAPTER_CONFIG, error=LoraError, fix="fix adapter_config.json, or save the adapter again", strict=True)
    adapter = _Adapter(folder, resolved.repo_id, resolved.revision, config, None, {}, {}, None)
    weights = source_file(folder, ADAPTER_WEIGHTS, "adapter file", LoraError)
    if weights is not None:
        from yitrt.checkpoint.safetensors_io import DTYPES, read_header

        try:
            tensors, _, _ = read_header(weights)
        except Exception as exc:  # CheckpointError: the file lies about its contents
            raise LoraError(str(exc), "save the adapter again (adapter_model.safetensors is damaged)") from None
        adapter.weights_file = weights
        adapter.shapes = {n: t.shape for n, t in tensors.items()}
        adapter.dtypes = {n: DTYPES[t.dtype][0] for n, t in tensors.items()}
        return adapter
    pickle = source_file(folder, ADAPTER_PICKLE, "adapter file", LoraError)
    if pickle is None:
        raise LoraError(f"{folder} has no {ADAPTER_WEIGHTS}", "give the folder `save_pretrained` wrote (safetensors weights)")
    if not allow_pickle:
        problems.append(f"the adapter's weights are a pickle ({ADAPTER_PICKLE}), which can run code when loaded: "
                        "pass --allow-pickle to load it with torch.load(weights_only=True), or save the adapter as safetensors")
        return adapter
    import torch

    from yitrt.checkpoint.source import pickle_refusal_reason

    try:
        state = torch.load(pickle, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad pickles
        raise LoraError(f"{pickle}: cannot be loaded safely ({pickle_refusal_reason(exc)})", "save the adapter as safetensors") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise LoraError(f"{pickle}: not a state dict of named tensors", "save the adapter as safetensors")
    adapter.weights_file = pickle
    adapter.pickled = state
    adapter.shapes = {n: tuple(t.shape) for n, t in state.items()}
    adapter.dtypes = {n: str(t.dtype).removeprefix("torch.") for n, t in state.items()}
    return adapter


def _load_tensors(adapter: _Adapter) -> dict[str, np.ndarray]:
    """Every tensor of the adapter as float32 numpy arrays."""
    if adapter.pickled is not None:
        tensors = adapter.pickled
    else:
        from yitrt.checkpoint.safetensors_io import load_safetensors

        tensors = load_safetensors(adapter.weights_file)
    return {name: t.detach().float().numpy() for name, t in tensors.items()}


# -- validation ---------------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_config(config: dict[str, Any], problems: list[str]) -> None:
    """Settings of adapter_config.json: what is required, what is refused by name."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        problems.append(f"peft_type {peft_type!r}: only LoRA adapters (peft_type LORA) have a TensorRT-LLM format")
    for key in ("r", "lora_alpha"):
        if key not in config:
            problems.append(f"adapter_config.json has no {key!r} (the scale alpha/r cannot be known): save the adapter with PEFT again")
    if "r" in config and not (_is_int(config["r"]) and config["r"] > 0):
        problems.append(f"adapter_config.json 'r' is {config['r']!r}, not a positive integer")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        problems.append(f"adapter_config.json 'lora_alpha' is {config['lora_alpha']!r}, not a number")
    if not isinstance(config.get("use_rslora", False), bool):
        problems.append(f"adapter_config.json 'use_rslora' is {config['use_rslora']!r}, not true or false")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        want = _is_int if key == "rank_pattern" else _is_number
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and want(v) and v > 0 for k, v in pattern.items()):
            problems.append(f"adapter_config.json {key!r} is {pattern!r}, not a mapping of module patterns to positive numbers"[:200])
    for key, why in _REFUSED_SETTINGS.items():
        if config.get(key):
            shown = config[key] if not isinstance(config[key], list) else ", ".join(map(str, config[key]))
            problems.append(f"{key} ({shown}) is not supported: {why}"[:300])
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        problems.append(f"bias {bias!r} is not supported: the adapter trained biases of the base model, which TensorRT-LLM's LoRA rows "
                        "cannot carry (bias 'none' only)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights {init!r} rewrote the base model's weights when the adapter was made, so it only works on that "
                        "modified base: save it with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA adapter")


def _pattern_key(patterns: dict[str, Any], module_key: str) -> str | None:
    """The ``rank_pattern`` / ``alpha_pattern`` key that applies to a module, as PEFT chooses it
    (peft.utils.other.get_pattern_key: the first key matching the end of the module's name at a dot boundary)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_key):
            return key
    return None


def _module_rank_alpha(config: dict[str, Any], module_key: str) -> tuple[int, float]:
    """The rank and alpha PEFT gave one module: rank_pattern / alpha_pattern over r / lora_alpha."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rkey, akey = _pattern_key(ranks, module_key), _pattern_key(alphas, module_key)
    return (ranks[rkey] if rkey is not None else config["r"]), float(alphas[akey] if akey is not None else config["lora_alpha"])


class _Problems:
    """Problems grouped by their text, each with the layers it occurs in (one line per kind, not one per layer)."""

    def __init__(self, problems: list[str]) -> None:
        self.plain = problems
        self.by_layer: dict[str, list[int]] = {}

    def add(self, text: str, layer: int | None = None) -> None:
        if layer is None:
            if text not in self.plain:
                self.plain.append(text)
            return
        self.by_layer.setdefault(text, []).append(layer)

    def lines(self) -> list[str]:
        out = list(self.plain)
        for text, layers in self.by_layer.items():
            layers = sorted(set(layers))
            shown = ", ".join(map(str, layers[:6])) + (", …" if len(layers) > 6 else "")
            out.append(f"{text} (layer{'s' if len(layers) > 1 else ''} {shown})")
        return out


@dataclass(frozen=True)
class _Entry:
    layer: int
    module: LoraModule
    a_name: str
    b_name: str
    rank: int
    alpha: float


def _check_tensors(adapter: _Adapter, base: BaseModel, max_lora_rank: int | None, enabled: set[str] | None,
                   found: _Problems) -> list[_Entry]:
    """Every tensor matched to a module and checked against the base; returns the (layer, module) entries."""
    groups: dict[tuple[int, str], dict[str, str]] = {}
    module_keys: dict[tuple[int, str], str] = {}
    for name in sorted(adapter.shapes):
        match = _KEY.match(name)
        if match is None:
            reason = next((why for pattern, why in _REFUSED_KEYS if pattern.search(name)), None)
            found.add(f"tensor {name}: {reason}" if reason else f"tensor {name} is not a LoRA A/B weight of a decoder layer (unknown to yitrt)")
            continue
        layer, hf = int(match["layer"]), match["module"]
        module = by_hf(hf)
        if module is None or module.parent != match["parent"]:
            if hf in REFUSED_HF_MODULES:
                found.add(f"{hf}: {REFUSED_HF_MODULES[hf]}")
            else:
                known = ", ".join(f"{m.parent}.{m.hf}" for m in LORA_MODULES)
                found.add(f"unknown module {match['parent']}.{hf} (a LoRA on Yi adapts {known})")
            continue
        groups.setdefault((layer, hf), {})[match["ab"]] = name
        # the module's name inside the PEFT model's base (what rank_pattern keys are matched against)
        module_keys[(layer, hf)] = (match["prefix"].removeprefix("base_model.model.") + f"layers.{layer}.{match['parent']}.{hf}")
    entries = []
    for (layer, hf), parts in sorted(groups.items()):
        module = by_hf(hf)
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            found.add(f"{hf} has no {missing}.weight", layer)
            continue
        if layer >= base.num_layers:
            found.add(f"the adapter has layer {layer} but the base model has {base.num_layers} layers (0-{base.num_layers - 1})", layer)
            continue
        a_shape, b_shape = adapter.shapes[parts["A"]], adapter.shapes[parts["B"]]
        n_in, n_out = module.in_dim(base, 1), module.out_dim(base, 1)
        if len(a_shape) != 2 or len(b_shape) != 2:
            found.add(f"{hf}: lora_A {list(a_shape)} and lora_B {list(b_shape)} are not matrices", layer)
            continue
        rank = a_shape[0]
        if a_shape[1] != n_in:
            found.add(f"{hf}: lora_A is {list(a_shape)}, the base model's {hf} takes {n_in} inputs (an adapter of another model?)", layer)
        if b_shape[0] != n_out:
            found.add(f"{hf}: lora_B is {list(b_shape)}, the base model's {hf} has {n_out} outputs (an adapter of another model?)", layer)
        if b_shape[1] != rank:
            found.add(f"{hf}: lora_A has rank {rank} but lora_B {b_shape[1]}", layer)
        want_rank, alpha = _module_rank_alpha(adapter.config, module_keys[(layer, hf)]) if "r" in adapter.config and "lora_alpha" in adapter.config else (rank, 0.0)
        if _is_int(want_rank) and rank != want_rank:
            found.add(f"{hf}: the tensors have rank {rank}, adapter_config.json says {want_rank} (r / rank_pattern)", layer)
        if max_lora_rank is not None and rank > max_lora_rank:
            found.add(f"{hf} has rank {rank}, above --max-lora-rank {max_lora_rank} (the engine's max_lora_rank): build the engine with "
                      f"--max_lora_rank {rank} or more", layer)
        if enabled is not None and module.trtllm not in enabled:
            found.add(f"{hf} ({module.trtllm}) is not among the engine's LoRA target modules ({', '.join(sorted(enabled))}): "
                      f"build with {module.trtllm} in --lora_target_modules, or use an adapter without {hf}")
        entries.append(_Entry(layer, module, parts["A"], parts["B"], rank, alpha))
    if not entries and not found.lines():
        found.add("the adapter holds no LoRA weights", None)
    return entries


def _enabled_modules(target_modules: Any, found: _Problems) -> set[str] | None:
    """The build's LoRA target modules as TensorRT-LLM names (HF names accepted too); None = not restricted."""
    if target_modules is None:
        return None
    items = [t.strip() for t in (target_modules.split(",") if isinstance(target_modules, str) else target_modules) if t.strip()]
    enabled = set()
    for item in items:
        module = by_trtllm(item) or by_hf(item)
        if module is None:
            found.add(f"--target-modules: unknown module {item!r} (TensorRT-LLM names: {', '.join(m.trtllm for m in LORA_MODULES)})")
            continue
        enabled.add(module.trtllm)
    return enabled


def _check_options(base: BaseModel, tp: int, dtype: str, max_lora_rank: int | None, found: _Problems) -> None:
    from yitrt.checkpoint.sharding import tp_problems

    for problem in tp_problems(base, tp):
        found.add(f"--tp: {problem}")
    if base.tp is not None and tp != base.tp:
        found.add(f"--tp {tp} differs from the base checkpoint's tp {base.tp} (the engine's): give --tp {base.tp}")
    if dtype not in STORE_DTYPES:
        found.add(f"--dtype {dtype!r}: choose one of {', '.join(STORE_DTYPES)}")
    elif dtype != base.dtype:
        where = "the base checkpoint's dtype" if base.kind == "checkpoint" else "the dtype `yitrt convert` gives this model"
        found.add(f"--dtype {dtype} differs from the engine's dtype {base.dtype} ({where}): TensorRT-LLM refuses it (\"Expected lora "
                  f"weights to be the same data type as base model\"); give --dtype {base.dtype}"
                  + ("" if base.kind == "checkpoint" else ", or --base the TensorRT-LLM checkpoint the engine is built from"))
    if max_lora_rank is not None and max_lora_rank < 1:
        found.add(f"--max-lora-rank {max_lora_rank} must be at least 1")


# -- conversion ---------------------------------------------------------------------------------------------------


def _kv_repeated(base: BaseModel, module: LoraModule, b: np.ndarray, tp: int) -> np.ndarray:
    """B's rows for k/v at tp > num_kv_heads: each rank's KV head, rank by rank, picked by the base weights' own
    sharding rule (``rank_segments`` of ``attention.qkv``), so adapter and base weights agree on which head a rank
    holds. UNCONFIRMED (trtllm-serving-features.md §2.6): inferred from the runtime's k/v size
    ``local_kv_heads · tp · head_dim``."""
    from yitrt.checkpoint.sharding import rank_segments
    from yitrt.models.llama import LLAMA_TENSORS, ResolvedPart, ResolvedTensor

    rule = next(r for r in LLAMA_TENSORS if r.target.endswith(module.target + ".weight"))
    parts = tuple(ResolvedPart(s.role, (0, 0), s.role) for s in rule.sources)  # names = roles: only the rows are used
    tensor = ResolvedTensor(rule, rule.target, 0, parts)
    blocks = []
    for tp_rank in range(tp):
        seg = next(s for s in rank_segments(base, tensor, tp, tp_rank) if s.source == module.role)
        blocks.append(b[seg.rows[0] : seg.rows[1]])
    return np.concatenate(blocks)


def _scale(entry: _Entry, rslora: bool) -> float:
    """PEFT's scaling of one module: alpha / r, or alpha / sqrt(r) with use_rslora (peft LoraLayer.update_layer)."""
    return entry.alpha / (math.sqrt(entry.rank) if rslora else entry.rank)


@dataclass(frozen=True)
class ConvertedAdapter:
    """A converted adapter read back: the two request arrays and the manifest.

    Attributes:
        path: the folder.
        weights: ``lora_weights`` [1, rows, max_row_len] (float16 or float32; see ``dtype``).
        config: ``lora_config`` [1, rows, 3] int32.
        manifest: the manifest as JSON (``manifest["extra"]`` holds the adapter facts: ``dtype``, ``tp``, ``r``,
            ``alpha``, ``rslora``, ``hf_modules``, ``trtllm_modules``, ``module_ids``, ``ranks``, ``max_rank``, ``rows``,
            ``max_row_len``, ``adapter_name``, ``adapter_source``, ``base_fingerprint``...).
    """

    path: Path
    weights: np.ndarray
    config: np.ndarray
    manifest: dict[str, Any]

    @property
    def info(self) -> dict[str, Any]:
        """The adapter facts recorded at conversion (the manifest's ``extra``)."""
        return self.manifest.get("extra", {})

    @property
    def dtype(self) -> str:
        """The engine dtype the weights are for (``bfloat16`` weights are stored as bf16-exact float32)."""
        return self.info["dtype"]

    @property
    def tp(self) -> int:
        """The tensor-parallel size converted for (decides k/v rows at tp > num_kv_heads)."""
        return self.info["tp"]

    @property
    def modules(self) -> list[str]:
        """The TensorRT-LLM modules the adapter adapts."""
        return list(self.info["trtllm_modules"])

    @property
    def max_rank(self) -> int:
        """The largest rank of any module (the engine's max_lora_rank must be at least this)."""
        return int(self.info["max_rank"])


def read_converted(out: str | Path) -> ConvertedAdapter:
    """Read the output of :func:`convert_adapter`.

    Raises:
        LoraError: not a converted adapter, or its files do not match the manifest.
    """
    from yitrt.manifest import find_reusable, read_manifest

    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None or manifest.stage != STAGE:
        raise LoraError(f"{out} is not a converted LoRA adapter (no {STAGE} manifest)", "convert the adapter with `yitrt lora convert`")
    if find_reusable(out, STAGE, manifest.key) is None:
        raise LoraError(f"{out}: the files do not match its manifest (changed or incomplete)", "convert the adapter again")
    try:
        weights = np.load(out / WEIGHTS_NAME, allow_pickle=False)
        config = np.load(out / CONFIG_NAME, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise LoraError(f"{out}: cannot read the LoRA arrays ({exc})", "convert the adapter again") from None
    if weights.ndim != 3 or config.ndim != 3 or config.shape[2] != 3 or config.dtype != np.int32 or weights.shape[:2] != config.shape[:2]:
        raise LoraError(f"{out}: lora arrays of shapes {list(weights.shape)} and {list(config.shape)} ({config.dtype})",
                        "convert the adapter again")
    return ConvertedAdapter(out, weights, config, manifest.to_json())


def convert_adapter(adapter: str | Path, base: str | Path, out: str | Path, tp: int | None = None, dtype: str | None = None,
                    max_lora_rank: int | None = None, target_modules: Any = None, allow_pickle: bool = False, *,
                    revision: str | None = None, base_revision: str | None = None, force: bool = False) -> Path:
    """Convert a PEFT LoRA adapter for a base model into TensorRT-LLM's request arrays (see the module docstring).

    Args:
        adapter: a PEFT adapter folder or a Hub repo id.
        base: the base model: an HF model folder or Hub id (config only), or a TensorRT-LLM checkpoint folder.
        out: the output folder (an artifact: created atomically; a previous one is replaced only when this succeeds).
        tp: the engine's tensor-parallel size (default: the checkpoint's, or 1).
        dtype: the engine dtype (default: the base's); anything else is refused, as the engine would.
        max_lora_rank: the engine's max_lora_rank (None: not checked).
        target_modules: the engine's lora_target_modules (TensorRT-LLM or HF names; list or comma-separated); None:
            not restricted.
        allow_pickle: accept ``adapter_model.bin`` (torch.load(weights_only=True)).
        revision, base_revision: Hub revisions of the adapter and of the base.
        force: convert again even if ``out`` already holds this conversion.

    Returns:
        ``out``.

    Raises:
        LoraError: every problem of the adapter against the base and the options, in one message.
        UsageError, HubError, CheckpointError: an unusable reference or base. ArtifactError: ``out`` cannot be written.
    """
    from yitrt.manifest import (
        ArtifactWriter,
        artifact_digest,
        artifact_key,
        check_output_folder,
        digest_json,
        find_reusable,
        hash_file,
    )
    from yitrt.userfiles import copy_into

    out = Path(out)
    if tp is not None and (not _is_int(tp) or tp < 1):
        raise UsageError(f"--tp {tp!r} must be a positive integer", "give the engine's tensor-parallel size")
    base_model = read_base(base, base_revision)
    problems: list[str] = []
    found = _Problems(problems)
    source = _read_adapter(adapter, revision, allow_pickle, problems)
    tp = tp if tp is not None else (base_model.tp or 1)
    dtype = dtype or base_model.dtype
    _check_options(base_model, tp, dtype, max_lora_rank, found)
    enabled = _enabled_modules(target_modules, found)
    _check_config(source.config, problems)
    entries = _check_tensors(source, base_model, max_lora_rank, enabled, found) if source.weights_file is not None else []
    lines = found.lines()
    if lines:
        head = lines[0] if len(lines) == 1 else f"{len(lines)} problems: " + "; ".join(lines)
        raise LoraError(f"cannot convert {adapter}: {head}", _FIX)
    check_output_folder(out, STAGE)

    files = [source.folder / ADAPTER_CONFIG, source.weights_file]
    adapter_digest = digest_json([[p.name, hash_file(p)] for p in files])
    params = {"tp": tp, "dtype": dtype, "max_lora_rank": max_lora_rank, "target_modules": sorted(enabled) if enabled is not None else None,
              "allow_pickle": allow_pickle}
    inputs = {"adapter": adapter_digest, "base_config": base_model.config_sha256}
    if not force and find_reusable(out, STAGE, artifact_key(STAGE, params, inputs)) is not None:
        return out

    tensors = _load_tensors(source)
    bad = sorted(n for n in [e.a_name for e in entries] + [e.b_name for e in entries] if not np.isfinite(tensors[n]).all())
    if bad:
        raise LoraError(f"cannot convert {adapter}: {len(bad)} tensor(s) hold NaN or Inf, e.g. {bad[0]}", "the adapter is damaged; train or save it again")
    rslora = bool(source.config.get("use_rslora", False))
    repeat_kv = tp > base_model.num_kv_heads
    modules: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    for entry in entries:
        a = tensors[entry.a_name]
        b = (tensors[entry.b_name].astype(np.float64) * _scale(entry, rslora)).astype(np.float32)
        if repeat_kv and entry.module.role in ("k", "v"):
            b = _kv_repeated(base_model, entry.module, b, tp)
        modules[(entry.layer, entry.module.trtllm)] = (a, b)
    weights, config = pack(modules, dtype)

    used = sorted({e.module.module_id for e in entries})
    ranks: dict[str, list[int]] = {}
    for entry in entries:
        ranks.setdefault(entry.module.trtllm, []).append(entry.rank)
    name = source.repo_id or source.folder.resolve().name
    with ArtifactWriter(out, STAGE, params, inputs, {"yitrt": __version__, "numpy": np.__version__}) as art:
        art.extra = {
            "adapter_name": name,
            "adapter_source": f"{source.repo_id}@{source.revision}" if source.repo_id else str(source.folder.resolve()),
            "base": str(base_model.path.resolve()) if base_model.repo_id is None else base_model.repo_id,
            "base_kind": base_model.kind,
            "base_fingerprint": artifact_digest(base_model.path) or base_model.config_sha256,
            "r": source.config["r"],
            "alpha": source.config["lora_alpha"],
            "rslora": rslora,
            "rank_pattern": source.config.get("rank_pattern") or {},
            "alpha_pattern": source.config.get("alpha_pattern") or {},
            "ranks": {m: sorted(set(r)) for m, r in ranks.items()},
            "max_rank": max(e.rank for e in entries),
            "hf_modules": [m.hf for m in LORA_MODULES if m.module_id in used],
            "trtllm_modules": [m.trtllm for m in LORA_MODULES if m.module_id in used],
            "module_ids": used,
            "layers": sorted({e.layer for e in entries}),
            "num_layers": base_model.num_layers,
            "dtype": dtype,
            "stored_as": weights.dtype.name,
            "tp": tp,
            "kv_heads_repeated": repeat_kv and any(e.module.role in ("k", "v") for e in entries),
            "rows": int(config.shape[1]),
            "max_row_len": int(weights.shape[2]),
        }
        np.save(art.path / WEIGHTS_NAME, weights, allow_pickle=False)
        np.save(art.path / CONFIG_NAME, config, allow_pickle=False)
        hf_dir = art.path / HF_DIR
        copy_into(source.folder, [ADAPTER_CONFIG] + ([ADAPTER_WEIGHTS] if source.pickled is None else []), hf_dir, "adapter file", LoraError)
        if source.pickled is not None:  # the --lora_dir copy is safetensors only
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in source.pickled.items()}, str(hf_dir / ADAPTER_WEIGHTS))
    return out
