"""TensorRT-LLM's LoRA request format: the ``lora_weights`` / ``lora_config`` arrays, packed, unpacked and sliced.

One ``lora_config`` row is ``[module_id, layer_idx (global), adapter_size r]`` int32; the matching
``lora_weights`` row holds A (r × in) row-major, then B (out × r) row-major, zero-padded to the longest row.
Both are the full, unsplit matrices for every TP rank: the runtime slices them, column modules on B's rows,
row modules on A's columns (trtllm-serving-features.md §2.2, §2.3). B arrives already scaled by alpha/r.

``unpack`` validates as TensorRT-LLM's ``loraValidateRequestTensors`` / ``loraValidateRequestTensorDims``
(LUTIL) does, with its messages, so the reference slot refuses what an engine refuses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from yitrt.errors import LoraError
from yitrt.lora.modules import LORA_MODULES, STORE_DTYPES, LoraModule, by_id, by_trtllm, module_name

_FIX = "convert the adapter for this base model and engine with `yitrt lora convert ADAPTER --base MODEL --tp N --dtype DTYPE`"


def round_bf16(values: np.ndarray) -> np.ndarray:
    """Float32 values rounded to the nearest bfloat16 (ties to even), still as float32.

    numpy has no bfloat16, so bf16 adapters are stored as float32 arrays whose values are exactly bf16
    (SPEC-20 "dtype"); clients send them as TYPE_BF16, which loses nothing.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # round to nearest even on the 16 bits dropped; finite inputs only (the converter refuses non-finite weights)
    rounded = (bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def pack(modules: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]], store_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """The ``lora_weights`` and ``lora_config`` arrays of an adapter.

    Args:
        modules: (global layer, TensorRT-LLM module name) → (A [r, in], B [out, r] already scaled), float arrays.
        store_dtype: "float16", "bfloat16" (bf16-rounded values in float32) or "float32".

    Returns:
        ``weights`` [1, rows, max_row_len] in the store dtype (float32 for bfloat16) and ``config``
        [1, rows, 3] int32; rows ordered by layer, then module id.

    Raises:
        LoraError: an unknown module, an unknown dtype, A and B of different ranks, or nothing to pack.
    """
    if store_dtype not in STORE_DTYPES:
        raise LoraError(f"unknown LoRA storage dtype {store_dtype!r}", f"use one of {', '.join(STORE_DTYPES)}")
    if not modules:
        raise LoraError("the adapter adapts no module", "give an adapter that targets q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj")
    entries = []
    for (layer, name), (a, b) in modules.items():
        module = by_trtllm(name)
        if module is None:
            raise LoraError(f"unknown TensorRT-LLM LoRA module {name!r}", f"use one of {', '.join(m.trtllm for m in LORA_MODULES)}")
        a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise LoraError(f"layer {layer} {name}: A {list(a.shape)} and B {list(b.shape)} are not [r, in] and [out, r]", _FIX)
        entries.append((int(layer), module.module_id, a, b))
    entries.sort(key=lambda e: (e[0], e[1]))
    width = max(a.size + b.size for _, _, a, b in entries)
    weights = np.zeros((1, len(entries), width), dtype=np.float32)
    config = np.zeros((1, len(entries), 3), dtype=np.int32)
    for row, (layer, module_id, a, b) in enumerate(entries):
        weights[0, row, : a.size] = a.ravel()
        weights[0, row, a.size : a.size + b.size] = b.ravel()
        config[0, row] = (module_id, layer, a.shape[0])
    if store_dtype == "bfloat16":
        weights = round_bf16(weights)
    elif store_dtype == "float16":
        with np.errstate(over="ignore"):  # an overflow becomes Inf, which the converter refuses with its own message
            weights = weights.astype(np.float16)
    return weights, config


def _dtype_name(array: Any) -> str:
    """The element type of a numpy array or torch tensor as TensorRT-LLM names dtypes (``float16``, ``bfloat16``...)."""
    dtype = getattr(array, "dtype", None)
    return str(dtype).removeprefix("torch.")


def _to_numpy(array: Any, what: str) -> np.ndarray:
    """A numpy view of a numpy array or (CPU) torch tensor; bfloat16 tensors become float32 (exact)."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "detach"):  # a torch tensor, without importing torch here
        tensor = array.detach().cpu()
        if _dtype_name(tensor) == "bfloat16":
            tensor = tensor.float()
        return tensor.numpy()
    raise LoraError(f"{what} must be an array, found {type(array).__name__}", _FIX)


def _is_bf16_exact(values: np.ndarray) -> bool:
    """Whether every float32 value is a bfloat16 value (its low 16 bits are zero)."""
    return values.dtype == np.float32 and not np.any(np.ascontiguousarray(values).view(np.uint32) & np.uint32(0xFFFF))


def unpack(weights: Any, config: Any, cfg: Any, tp: int = 1, max_lora_rank: int | None = None,
           enabled: set[str] | None = None, engine_dtype: str | None = None,
           num_layers: int | None = None) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """Check ``lora_weights`` / ``lora_config`` as TensorRT-LLM does and read every module's A and B.

    Args:
        weights: [rows, L] or [1, rows, L] (numpy or torch; float16, bfloat16, float32).
        config: [rows, 3] or [1, rows, 3] int32.
        cfg: the base model's dims: a ``ModelConfig`` or a ``CheckpointSpec`` (hidden, intermediate, heads, KV
            heads, head size, layers).
        tp: the engine's tensor-parallel size (decides the k/v rows when tp > KV heads).
        max_lora_rank: the engine's ``max_lora_rank`` (None: no limit).
        enabled: the engine's ``lora_target_modules`` (TensorRT-LLM names; None: every Yi module).
        engine_dtype: the engine's dtype; the weights must have it (None: not checked). For "bfloat16" a float32
            array whose values are all bf16 values is taken as bf16 (numpy has no bf16: the stored convention).
        num_layers: layers of the engine (None: ``cfg.num_layers``).

    Returns:
        (global layer, TensorRT-LLM module name) → (A [r, in], B [out, r]) float32, full (unsplit), B scaled.

    Raises:
        LoraError: every problem found, TensorRT-LLM's message first ("lora module X not enabled for this
            model", "lora_weights has to few values for X", "Expected lora weights to be the same data type as
            base model" ...).
    """
    name = _dtype_name(weights)
    w = _to_numpy(weights, "lora_weights")
    c = _to_numpy(config, "lora_config")
    # Dims first (LUTIL loraValidateRequestTensorDims): Triton adds the batch dim, so 3-D with batch 1
    if w.ndim == 3:
        if w.shape[0] != 1:
            raise LoraError("Expected batch dimension to be 1 for each lora request", "send one adapter's rows per request")
        w = w[0]
    if c.ndim == 3:
        if c.shape[0] != 1:
            raise LoraError("Expected batch dimension to be 1 for each lora request", "send one adapter's rows per request")
        c = c[0]
    if w.ndim != 2:
        raise LoraError("Invalid shape for lora_weights tensor", "lora_weights is [rows, max_row_len] (or [1, rows, max_row_len])")
    if c.ndim != 2:
        raise LoraError("Invalid shape for lora_keys tensor", "lora_config is [rows, 3] (or [1, rows, 3])")
    if c.dtype != np.int32:
        raise LoraError(f"Expected  lora keys to have TYPE_INT32 but was {c.dtype.name}", "send lora_config as int32")
    if c.shape[0] != w.shape[0]:
        raise LoraError("Expected dim1 lora_weights and lora_keys to have the same size",
                        f"lora_weights has {w.shape[0]} rows, lora_config {c.shape[0]}: send the two arrays of one conversion")
    if c.shape[0] == 0:  # an adapter of nothing: never a meaningful request (the base model is asked for with no task id)
        raise LoraError("lora_config has no rows: the adapter adapts nothing", "send the arrays `yitrt lora convert` wrote, or no LoRA tensors for the base model")
    if c.shape[1] != 3:
        # TensorRT-LLM also reads a 4th column (is_dora); the Triton template fixes 3 and yitrt has no DoRA
        raise LoraError(f"Expected dim2 of lora_keys to have a size in [3, 3], found {c.shape[1]}", "send [module_id, layer_idx, adapter_size] rows (DoRA is not supported)")
    if engine_dtype is not None and name != engine_dtype:
        if not (engine_dtype == "bfloat16" and _is_bf16_exact(w)):
            raise LoraError(
                f"Expected lora weights to be the same data type as base model (the engine is {engine_dtype}, lora_weights are {name})",
                f"convert the adapter with --dtype {engine_dtype}",
            )
    layers = cfg.num_layers if num_layers is None else num_layers
    allowed = {m.trtllm for m in LORA_MODULES} if enabled is None else set(enabled)
    w32 = w.astype(np.float32, copy=False)
    problems: list[str] = []
    out: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    for row, (module_id, layer, rank) in enumerate(c.tolist()):
        label = module_name(module_id)
        if not 0 <= layer < layers:
            problems.append(f"row {row}: Expected layerId to be in the range [0, numModelLayers) (layer {layer}, {layers} layers)")
            continue
        if rank <= 0:
            problems.append(f"row {row}: Expected adapterSize to be > 0 (found {rank})")
            continue
        module = by_id(module_id)
        if module is None or module.trtllm not in allowed:
            problems.append(f"lora module {label} not enabled for this model")
            continue
        size = module.flat_size(cfg, tp, rank)
        if size > w.shape[1]:
            problems.append(f"lora_weights has to few values for {label} (row {row} needs {size}, has {w.shape[1]})")
            continue
        if max_lora_rank is not None and rank > max_lora_rank:
            problems.append(f"Invalid low_rank ({rank}). low_rank must be smaller than mMaxLowRank ({max_lora_rank})")
            continue
        key = (int(layer), module.trtllm)
        if key in out:  # not a TensorRT-LLM check: two rows for one module and layer leave the answer undefined
            problems.append(f"row {row}: a second row for layer {layer} {label}")
            continue
        n_in, n_out = module.in_dim(cfg, tp), module.out_dim(cfg, tp)
        values = w32[row]
        a = values[: rank * n_in].reshape(rank, n_in).copy()
        b = values[rank * n_in : rank * (n_in + n_out)].reshape(n_out, rank).copy()
        out[key] = (a, b)
    if problems:
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems[:6])
        raise LoraError(head, _FIX)
    return out


def rank_slice(module: LoraModule, A: np.ndarray, B: np.ndarray, tp: int, tp_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The A and B one TP rank uses (LMOD-cpp split dims; trtllm-serving-features.md §2.2).

    Column modules (q, k, v, fc, gate) split B's out rows in tp equal chunks — for k/v at tp > KV heads B
    holds the repeated heads (``out_dim``), so a chunk is the rank's own KV head; row modules (dense, proj)
    split A's in columns.

    Args:
        module: the module.
        A: [r, in] (full).
        B: [out, r] (full, as ``unpack`` returns it).
        tp: tensor-parallel size.
        tp_rank: this rank.

    Returns:
        (A_local, B_local): column: (A, B[rank chunk]); row: (A[:, rank chunk], B).

    Raises:
        LoraError: the split dimension does not divide by tp, or tp_rank is out of range.
    """
    if not 0 <= tp_rank < tp:
        raise LoraError(f"tp rank {tp_rank} is outside tp {tp}", "give a rank from 0 to tp - 1")
    if module.split == "column":
        rows = B.shape[0]
        if rows % tp:
            raise LoraError(f"{module.trtllm}: B's {rows} rows do not split into {tp} ranks", _FIX)
        per = rows // tp
        return A, B[tp_rank * per : (tp_rank + 1) * per]
    cols = A.shape[1]
    if cols % tp:
        raise LoraError(f"{module.trtllm}: A's {cols} columns do not split into {tp} ranks", _FIX)
    per = cols // tp
    return A[:, tp_rank * per : (tp_rank + 1) * per], B
