"""A PEFT LoRA adapter read and checked against a base model and an engine's LoRA settings, before any work.

``check_adapter`` reads ``adapter_config.json`` and the tensor shapes (a safetensors header; ``adapter_model.bin``
only with ``allow_pickle``, through ``torch.load(weights_only=True)``) and reports every problem in one
``LoraError``: keys that are not ``…layers.N.(self_attn|mlp).MODULE.lora_(A|B).weight`` and modules outside the
table (``yitrt.lora.modules``) — fused ``qkv_proj``, ``embed_tokens``, ``lm_head``, ``modules_to_save``,
``lora_embedding_*`` and DoRA's ``lora_magnitude_vector`` by name —, shapes against the base config (A [r, in],
B [out, r]), layers beyond the base's, ranks against ``r`` / ``rank_pattern`` and against the engine's
``max_lora_rank``, modules outside the engine's ``lora_target_modules``, a dtype other than the engine's, a tp the
base cannot take, and settings TensorRT-LLM cannot reproduce.

Choices (refused by name otherwise): ``peft_type`` LORA only; ``bias: "none"`` only (TensorRT-LLM's LoRA rows carry
no bias); ``fan_in_fan_out: false`` only (a Conv1D layout, never a Llama linear); no DoRA, no LoRA bias, no
``modules_to_save`` / trainable tokens, no embedding or lm_head adapters, no layer replication, no activated LoRA
(``alora_invocation_tokens``), no KaSA / MonteCLoRA / BD-LoRA / Arrow / QA-LoRA variants, no initialisations that
rewrite the base weights (PiSSA, OLoRA, CorDA, LoRA-GA) unless the adapter was saved converted to plain LoRA.
``use_rslora``, ``rank_pattern``, ``alpha_pattern`` and ``layers_to_transform`` are supported; ``lora_dropout`` is a
training setting and ignored. Without ``max_lora_rank`` / ``target_modules`` those two are not checked.

The engine dtype of a base is its own for a TensorRT-LLM checkpoint, and for a Hugging Face model the one `yitrt
convert` writes by default (its dtype; float32 becomes float16): an engine built in another dtype is named by
giving its checkpoint as the base.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yitrt.errors import CheckpointError, LoraError, UsageError
from yitrt.hub import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_WEIGHTS
from yitrt.lora.modules import LORA_MODULES, REFUSED_HF_MODULES, STORE_DTYPES, LoraModule, by_hf, by_trtllm

#: A PEFT LoRA tensor of a decoder layer: ``…layers.N.(self_attn|mlp).MODULE.lora_(A|B).weight`` (the key pattern
#: of hf_lora_convert.py, §2.4, anchored at both ends so nothing is silently dropped).
_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d{1,9})\.(?P<parent>self_attn|mlp)\.(?P<module>[A-Za-z0-9_]+)\.lora_(?P<ab>[AB])\.weight$")

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
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")  # peft LoraLayer.*_init rewrite base_layer.weight
# (loftq_init replaces the base weight by its quantized form: the adapter corrects that base, not the original)

_FIX = (f"fix each problem listed: use an adapter trained on this base (PEFT LoRA on {'/'.join(m.hf for m in LORA_MODULES)}), the base "
        "the engine is built from, and the engine's own --tp/--dtype/--max-lora-rank/--target-modules")


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
class AdapterSource:
    """A PEFT adapter's files as read: its config, tensor shapes and dtypes (a pickle's tensors already loaded)."""

    folder: Path
    repo_id: str | None
    revision: str | None
    config: dict[str, Any]
    weights_file: Path | None  # the real path of the weights file
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    pickled: dict[str, Any] | None  # tensors already loaded from a pickle (allow_pickle)


def _read_adapter(ref: str | Path, revision: str | None, allow_pickle: bool, problems: list[str]) -> AdapterSource:
    """The adapter's config and tensor shapes (safetensors: header only; a pickle is loaded, weights_only)."""
    from yitrt.hub import resolve_adapter
    from yitrt.userfiles import read_json, source_file

    resolved = resolve_adapter(str(ref), revision=revision, allow_pickle=allow_pickle)
    folder = Path(resolved.path)
    config_file = source_file(folder, ADAPTER_CONFIG, "adapter file", LoraError)
    if config_file is None:
        raise LoraError(f"{folder} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter", "give the folder `save_pretrained` wrote")
    config = read_json(config_file, ADAPTER_CONFIG, error=LoraError, fix="fix adapter_config.json, or save the adapter again", strict=True)
    adapter = AdapterSource(folder, resolved.repo_id, resolved.revision, config, None, {}, {}, None)
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


def load_tensors(adapter: AdapterSource) -> dict[str, np.ndarray]:
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
    if "lora_alpha" in config and not (_is_number(config["lora_alpha"]) and config["lora_alpha"] > 0):
        problems.append(f"adapter_config.json 'lora_alpha' is {config['lora_alpha']!r}, not a positive number (0 would serve the base "
                        "model, a negative one the adapter's opposite)")
    if not isinstance(config.get("use_rslora", False), bool):
        problems.append(f"adapter_config.json 'use_rslora' is {config['use_rslora']!r}, not true or false")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        want = _is_int if key == "rank_pattern" else _is_number
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and want(v) and v > 0 for k, v in pattern.items()):
            problems.append(f"adapter_config.json {key!r} is {pattern!r}, not a mapping of module patterns to positive numbers"[:200])
            continue
        for k in pattern:  # PEFT matches the keys as regular expressions (get_pattern_key)
            try:
                re.compile(k)
            except re.error as exc:
                problems.append(f"adapter_config.json {key!r} key {k!r} is not a valid pattern ({exc})"[:200])
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
class AdapterModule:
    """One adapted module of one layer: its tensors' names, its rank and its alpha (rank_pattern / alpha_pattern applied)."""

    layer: int
    module: LoraModule
    a_name: str
    b_name: str
    rank: int
    alpha: float


def _check_tensors(adapter: AdapterSource, base: BaseModel, max_lora_rank: int | None, enabled: set[str] | None,
                   found: _Problems, config_ok: bool = True) -> list[AdapterModule]:
    """Every tensor matched to a module and checked against the base; returns the (layer, module) entries.
    ``config_ok`` False: adapter_config.json's ranks/alphas are already refused, so they are not read here."""
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
        group = groups.setdefault((layer, hf), {})
        if match["ab"] in group:  # two prefixes naming one module: which one PEFT would load is not knowable
            found.add(f"two tensors for {hf} lora_{match['ab']}: {group[match['ab']]} and {name}", layer)
            continue
        group[match["ab"]] = name
        # the module's name inside the PEFT model's base (what rank_pattern keys are matched against)
        module_keys[(layer, hf)] = (match["prefix"].removeprefix("base_model.model.") + f"layers.{layer}.{match['parent']}.{hf}")
    entries = []
    over_rank: dict[LoraModule, int] = {}
    not_enabled: set[LoraModule] = set()
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
        want_rank, alpha = _module_rank_alpha(adapter.config, module_keys[(layer, hf)]) if config_ok else (rank, 0.0)
        if _is_int(want_rank) and rank != want_rank:
            found.add(f"{hf}: the tensors have rank {rank}, adapter_config.json says {want_rank} (r / rank_pattern)", layer)
        if max_lora_rank is not None and rank > max_lora_rank:
            over_rank[module] = max(rank, over_rank.get(module, 0))
        if enabled is not None and module.trtllm not in enabled:
            not_enabled.add(module)
        entries.append(AdapterModule(layer, module, parts["A"], parts["B"], rank, alpha))
    if over_rank:  # one line for all modules: the fix is one build option
        top = max(over_rank.values())
        names = ", ".join(f"{m.hf} (rank {r})" for m, r in sorted(over_rank.items(), key=lambda i: i[0].module_id))
        found.add(f"ranks above --max-lora-rank {max_lora_rank} (the engine's max_lora_rank): {names} — build the engine with "
                  f"--max_lora_rank {top} or more")
    if not_enabled:
        names = ", ".join(f"{m.hf} ({m.trtllm})" for m in sorted(not_enabled, key=lambda m: m.module_id))
        found.add(f"modules outside the engine's LoRA target modules ({', '.join(sorted(enabled))}): {names} — build with them in "
                  "--lora_target_modules, or use an adapter without them")
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
                  f"weights to be the same data type as base model\") — give --dtype {base.dtype}"
                  + ("" if base.kind == "checkpoint" else ", or --base the TensorRT-LLM checkpoint the engine is built from"))
    if max_lora_rank is not None and max_lora_rank < 1:
        found.add(f"--max-lora-rank {max_lora_rank} must be at least 1")


@dataclass(frozen=True)
class CheckedAdapter:
    """An adapter that passed :func:`check_adapter`, with what conversion needs.

    Attributes:
        source: the adapter's files.
        base: the base model.
        modules: every adapted (layer, module), layers ascending.
        tp, dtype: the engine's tensor-parallel size and dtype (resolved defaults).
        max_lora_rank: as given (None: not checked).
        enabled: the engine's target modules as TensorRT-LLM names (None: not restricted).
    """

    source: AdapterSource
    base: BaseModel
    modules: list[AdapterModule]
    tp: int
    dtype: str
    max_lora_rank: int | None
    enabled: set[str] | None

    @property
    def rslora(self) -> bool:
        """Whether the adapter uses rank-stabilised scaling (alpha / sqrt(r))."""
        return bool(self.source.config.get("use_rslora", False))

    def scale(self, module: AdapterModule) -> float:
        """PEFT's scaling of one module: alpha / r, or alpha / sqrt(r) with use_rslora (peft LoraLayer.update_layer)."""
        return module.alpha / (math.sqrt(module.rank) if self.rslora else module.rank)


def check_adapter(adapter: str | Path, base: str | Path, tp: int | None = None, dtype: str | None = None,
                  max_lora_rank: int | None = None, target_modules: Any = None, allow_pickle: bool = False, *,
                  revision: str | None = None, base_revision: str | None = None) -> CheckedAdapter:
    """Read a PEFT adapter and check it whole against a base model and an engine's LoRA settings (nothing written).

    Args:
        adapter: a PEFT adapter folder or a Hub repo id.
        base: an HF model folder or Hub id (config only), or a TensorRT-LLM checkpoint folder.
        tp: the engine's tensor-parallel size (default: the checkpoint's, or 1).
        dtype: the engine dtype (default: the base's); another one is refused, as the engine would.
        max_lora_rank: the engine's max_lora_rank (None: not checked).
        target_modules: the engine's lora_target_modules (TensorRT-LLM or HF names; list or comma-separated);
            None: not restricted.
        allow_pickle: accept ``adapter_model.bin`` (torch.load(weights_only=True)).
        revision, base_revision: Hub revisions of the adapter and of the base.

    Returns:
        The checked adapter.

    Raises:
        LoraError: every problem found, in one message.
        UsageError, HubError, CheckpointError: an unusable reference or base.
    """
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
    before = len(problems)
    _check_config(source.config, problems)
    config_ok = len(problems) == before  # a refused r/lora_alpha/pattern is not used to check the tensors
    modules = _check_tensors(source, base_model, max_lora_rank, enabled, found, config_ok) if source.weights_file is not None else []
    lines = found.lines()
    if lines:
        head = lines[0] if len(lines) == 1 else f"{len(lines)} problems: " + "; ".join(lines)
        raise LoraError(f"cannot convert {adapter}: {head}", _FIX)
    return CheckedAdapter(source, base_model, modules, tp, dtype, max_lora_rank, enabled)
