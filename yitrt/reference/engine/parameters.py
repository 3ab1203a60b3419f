"""The ``tensorrt_llm`` model's parameters → an ``EngineConfig`` for the reference slot.

Read as the C++ backend reads them (reference/triton-repository.md §1.5): a key that is missing, empty or still a
``${…}`` placeholder is unset and takes the backend's default; booleans are ``true/false`` in any case or ``1/0``;
an unknown ``batch_scheduler_policy`` falls back to ``guaranteed_no_evict`` with a warning. The KV pool holds
``max_tokens_in_paged_kv_cache`` tokens, bounded (as the GPU fraction bounds it on an engine) by the CPU byte budget
``yitrt_kv_cache_bytes``; ``kv_cache_host_memory_bytes`` sizes the host pool. Engine limits that a real engine
carries from its build (``max_num_tokens``, ``tokens_per_block``, ``--max_draft_len`` as ``yitrt_max_draft_len``) are
parameters of the slot's config. ``decoding_mode: lookahead`` with the three ``lookahead_*`` sizes turns on lookahead
decoding (trtllm-serving-features.md §1.2, T-mis); a draft-target target needs KV-cache reuse, as the executor does.
The LoRA adapter cache (``adapters.py``) is sized by ``lora_cache_optimal_adapter_size``, ``lora_cache_max_adapter_size``,
``lora_cache_gpu_memory_fraction`` (of ``yitrt_lora_free_memory_bytes``, the slot's stand-in for the GPU memory left
after engine and KV cache), ``lora_cache_host_memory_bytes`` and ``lora_prefetch_dir`` (§2.5); the engine's LoRA build
limits are ``yitrt_max_lora_rank`` (``--max_lora_rank``, default 64) and ``yitrt_lora_target_modules`` (comma-separated
``--lora_target_modules``; unset: every Yi module). With neither set the slot stands for an engine built without the
LoRA plugin: it has no adapter cache and refuses LoRA requests.
"""

from __future__ import annotations

from typing import Any

from yitrt.errors import UsageError
from yitrt.reference.engine.scheduler import POLICIES, EngineConfig
from yitrt.speculation import LookaheadSizes

#: the slot's defaults for unset keys (TensorRT-LLM's where it has one: max_num_tokens 8192, tokens_per_block 32,
#: reuse on in the 1.x backend, guaranteed_no_evict, no chunking, no host pool)
DEFAULTS = {"max_batch_size": 8, "max_num_tokens": 8192, "tokens_per_block": 32, "yitrt_kv_cache_bytes": 1 << 30,
            "kv_cache_host_memory_bytes": 0, "enable_kv_cache_reuse": True, "enable_chunked_context": False,
            "batch_scheduler_policy": "guaranteed_no_evict", "yitrt_max_draft_len": 0}
KEYS = ("max_batch_size", "max_num_tokens", "tokens_per_block", "max_tokens_in_paged_kv_cache", "yitrt_kv_cache_bytes",
        "kv_cache_host_memory_bytes", "enable_kv_cache_reuse", "enable_chunked_context", "batch_scheduler_policy",
        "yitrt_max_draft_len", "decoding_mode", "lookahead_window_size", "lookahead_ngram_size", "lookahead_verification_set_size")
#: the LoRA cache's parameters (reference/trtllm-serving-features.md §2.5) and the slot's LoRA build limits
LORA_KEYS = ("lora_cache_optimal_adapter_size", "lora_cache_max_adapter_size", "lora_cache_gpu_memory_fraction",
             "lora_cache_host_memory_bytes", "lora_prefetch_dir", "yitrt_lora_free_memory_bytes", "yitrt_max_lora_rank",
             "yitrt_lora_target_modules")
#: decoding_mode values the backend knows (T-mis); the slot runs the sampling ones and lookahead
_SAMPLING_MODES = ("auto", "top_k", "top_p", "top_k_top_p", "beam_search")
_HEAD_MODES = ("medusa", "eagle", "explicit_draft_tokens")
_TRUE, _FALSE = ("true", "1"), ("false", "0")


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and (not value.strip() or value.strip().startswith("${")))


def _int(key: str, value: str, low: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise UsageError(f"parameter {key} = {value!r} is not an integer", f"set {key} to a whole number in the tensorrt_llm config") from None
    if number < low:
        raise UsageError(f"parameter {key} = {number} must be >= {low}", f"set {key} to at least {low} in the tensorrt_llm config")
    return number


def bytes_per_block(spec, tokens_per_block: int, element_bytes: int) -> int:
    """KV bytes of one block over all layers and KV heads (keys and values), as the slot stores them."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_size * element_bytes * tokens_per_block


def engine_config(params: dict[str, Any], spec, element_bytes: int = 4) -> tuple[EngineConfig, list[str]]:
    """The slot's ``EngineConfig`` from the model's parameter strings, and warnings to log.

    Raises:
        UsageError: a number that does not parse or is out of range (named, with the fix).
    """
    warnings: list[str] = []
    raw = {k: params.get(k) for k in KEYS}
    value = {k: DEFAULTS.get(k) if _unset(v) else v for k, v in raw.items()}
    batch = _int("max_batch_size", value["max_batch_size"], 1)
    tokens = _int("max_num_tokens", value["max_num_tokens"], 1)
    tpb = _int("tokens_per_block", value["tokens_per_block"], 2)
    budget = _int("yitrt_kv_cache_bytes", value["yitrt_kv_cache_bytes"], 1)
    host = _int("kv_cache_host_memory_bytes", value["kv_cache_host_memory_bytes"], 0)
    flags = {}
    for key in ("enable_kv_cache_reuse", "enable_chunked_context"):
        v = value[key]
        text = str(v).strip().lower() if not isinstance(v, bool) else str(v).lower()
        if text not in _TRUE + _FALSE:
            raise UsageError(f"parameter {key} = {v!r} is not a boolean", f"set {key} to true or false in the tensorrt_llm config")
        flags[key] = text in _TRUE
    policy = str(value["batch_scheduler_policy"]).strip()
    if policy not in POLICIES:
        warnings.append(f"batch_scheduler_policy {policy!r} is not one of {', '.join(POLICIES)}: using guaranteed_no_evict (as the backend does)")
        policy = "guaranteed_no_evict"
    per_block = bytes_per_block(spec, tpb, element_bytes)
    blocks = budget // per_block
    if not _unset(raw["max_tokens_in_paged_kv_cache"]):
        capped = -(-_int("max_tokens_in_paged_kv_cache", raw["max_tokens_in_paged_kv_cache"], 1) // tpb)
        blocks = min(blocks, capped)  # effective = min(the cap, what the memory budget holds), as on an engine
    if blocks < 1:
        raise UsageError(f"the KV pool holds no block: yitrt_kv_cache_bytes {budget} is less than one {tpb}-token block ({per_block} bytes)",
                         "raise yitrt_kv_cache_bytes or max_tokens_in_paged_kv_cache in the tensorrt_llm config")
    reuse, chunked = flags["enable_kv_cache_reuse"], flags["enable_chunked_context"]
    if spec.kv_cache_quant_algo and (reuse or chunked):
        # an engine loses paged context FMHA with a quantized KV cache (§4.3) and then turns reuse off with a warning;
        # the slot does the same for chunking too: its context phase reads its own keys unquantized
        warnings.append(f"KV cache reuse and chunked context disabled: the checkpoint's KV cache is {spec.kv_cache_quant_algo}")
        reuse = chunked = False
    if tpb & (tpb - 1):
        raise UsageError(f"parameter tokens_per_block = {tpb} is not a power of two", "use 16, 32, 64 or 128")
    draft_len = _int("yitrt_max_draft_len", value["yitrt_max_draft_len"], 0)
    lookahead = _lookahead(raw)
    if draft_len and not reuse:  # the executor's check (IFB constructor)
        raise UsageError("KV cache block reuse must be enabled for speculative decoding target model",
                         "set enable_kv_cache_reuse true (and keep the KV cache unquantized on the slot)")
    if draft_len and lookahead:
        raise UsageError("yitrt_max_draft_len and decoding_mode lookahead are both set", "a model is a draft-target target or a lookahead model: drop one")
    config = EngineConfig(max_batch_size=batch, max_num_tokens=tokens, tokens_per_block=tpb, primary_blocks=blocks,
                          host_blocks=host // per_block, policy=policy, reuse=reuse, chunked_context=chunked,
                          max_draft_len=draft_len, lookahead=lookahead, lora=lora_cache_config(params))
    return config, warnings


def _float(key: str, value: str, low: float, high: float) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise UsageError(f"parameter {key} = {value!r} is not a number", f"set {key} to a number in the tensorrt_llm config") from None
    if not low < number <= high:
        raise UsageError(f"parameter {key} = {number} must be in ({low}, {high}]", f"set {key} in the tensorrt_llm config")
    return number


def lora_cache_config(params: dict[str, Any]):
    """The adapter cache's ``LoraCacheConfig`` from the ``lora_cache_*`` parameters (unset: the backend's defaults);
    None when neither ``yitrt_lora_target_modules`` nor ``yitrt_max_lora_rank`` is set (no LoRA plugin).

    Raises:
        UsageError: a value that does not parse or is out of range.
    """
    from yitrt.reference.engine import adapters as a

    raw = {k: None if _unset(params.get(k)) else params.get(k) for k in LORA_KEYS}
    if raw["yitrt_lora_target_modules"] is None and raw["yitrt_max_lora_rank"] is None:
        return None

    def number(key: str, default: int, low: int) -> int:
        return default if raw[key] is None else _int(key, raw[key], low)

    fraction = a.DEFAULT_GPU_MEMORY_FRACTION if raw["lora_cache_gpu_memory_fraction"] is None else \
        _float("lora_cache_gpu_memory_fraction", raw["lora_cache_gpu_memory_fraction"], 0.0, 1.0)
    free = number("yitrt_lora_free_memory_bytes", a.DEFAULT_FREE_MEMORY_BYTES, 1)
    modules = None
    if raw["yitrt_lora_target_modules"] is not None:
        modules = tuple(m.strip() for m in str(raw["yitrt_lora_target_modules"]).split(",") if m.strip())
    return a.LoraCacheConfig(optimal_adapter_size=number("lora_cache_optimal_adapter_size", a.DEFAULT_OPTIMAL_ADAPTER_SIZE, 1),
                             max_adapter_size=number("lora_cache_max_adapter_size", a.DEFAULT_MAX_ADAPTER_SIZE, 1),
                             device_bytes=int(fraction * free),
                             host_bytes=number("lora_cache_host_memory_bytes", a.DEFAULT_HOST_MEMORY_BYTES, 1),
                             max_lora_rank=number("yitrt_max_lora_rank", a.DEFAULT_MAX_LORA_RANK, 1),
                             target_modules=modules, prefetch_dir=raw["lora_prefetch_dir"] and str(raw["lora_prefetch_dir"]))


def _lookahead(raw: dict[str, Any]) -> LookaheadSizes | None:
    """``decoding_mode`` and the lookahead sizes → LookaheadSizes (None: not lookahead)."""
    mode = "" if _unset(raw["decoding_mode"]) else str(raw["decoding_mode"]).strip().lower()
    if mode in _HEAD_MODES:
        raise UsageError(f"decoding_mode {mode} needs trained heads the reference slot does not have",
                         "use decoding_mode lookahead, or draft-target through tensorrt_llm_bls")
    if mode != "lookahead":
        if mode and mode not in _SAMPLING_MODES:
            raise UsageError(f"parameter decoding_mode = {mode!r} is not one of {', '.join(_SAMPLING_MODES + ('lookahead',) + _HEAD_MODES)}",
                             "fix decoding_mode in the tensorrt_llm config")
        return None
    keys = ("lookahead_window_size", "lookahead_ngram_size", "lookahead_verification_set_size")
    if any(_unset(raw[k]) for k in keys):  # T-mis
        raise UsageError("Decoding mode is set to lookahead but lookahead parameters are not specified",
                         "set lookahead_window_size, lookahead_ngram_size and lookahead_verification_set_size")
    return LookaheadSizes(*(_int(k, raw[k], 0) for k in keys))
