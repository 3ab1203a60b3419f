"""LoRA adapters in the reference runtime: one adapter's slices on one TP rank, and the deltas they add.

TensorRT-LLM's LoRA plugin adds ``(x · Aᵀ) · Bᵀ`` to the output of every targeted linear of a request's rows, with
B already multiplied by alpha/r in the request tensors (trtllm-serving-features.md §2.3-2.4). Each rank holds its
slice (§2.2): column-parallel modules (the q/k/v parts of the fused qkv, fc, gate) take this rank's rows of B and
the whole A; row-parallel ones (dense, proj) take this rank's columns of A and the whole B, so their delta is a
partial sum added to the GEMM's local output *before* the all-reduce — Σ_ranks (x_r·A_rᵀ)·Bᵀ = (x·Aᵀ)·Bᵀ.

The q, k and v parts of one layer are applied as one block: A stacked [r_q + r_k + r_v, H] and B block-diagonal
[q + kv + kv, r_q + r_k + r_v], each part's B rows at the part's offset in the rank's fused qkv output (zero rows
where a part has no adapter, as TensorRT-LLM zero-fills the missing ones of q/k/v, §2.1). The low-rank dimension is
zero-padded to at least ``MIN_COLS``: a GEMM narrower than that runs other kernels, whose summation depends on the
row count (``model.gemm_rows``); zero columns add exactly nothing.

Deltas are computed in float32 from the activations the linear receives (unquantized: for a quantized base,
which input the plugin sees — before or after the format's activation quantization — is UNCONFIRMED) and cast to
the base output's dtype before they are added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: base linear of TensorRT-LLM's decoder layer (``Layer`` attribute) per LoRA target (yitrt.lora.modules ``target``)
LINEAR_OF_TARGET = {"attention.qkv": "qkv", "attention.dense": "dense", "mlp.fc": "fc", "mlp.gate": "gate", "mlp.proj": "proj"}
#: order of the parts in the fused qkv output
QKV_ROLES = ("q", "k", "v")
#: the fewest low-rank columns a delta GEMM runs with (see the module docstring)
MIN_COLS = 16


def unpack_for(spec, weights, config, max_lora_rank: int | None = None, enabled: set[str] | None = None,
               engine_dtype: str | None = None) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """Validate request tensors against a checkpoint and return the full (unsplit) matrices per (layer, module):
    ``yitrt.lora.format.unpack`` with the checkpoint's dims and tp.

    Raises:
        LoraError: what TensorRT-LLM's request validation refuses (the message it gives).
    """
    from yitrt.lora.format import unpack

    return unpack(weights, config, spec, spec.tp, max_lora_rank, enabled, engine_dtype, spec.num_layers)


@dataclass(frozen=True)
class Delta:
    """One (layer, base linear) low-rank update on this rank: ``(x · aᵀ) · bᵀ``, float32."""

    a: torch.Tensor  # [R, in_local], R >= MIN_COLS (zero rows past the real ranks)
    b: torch.Tensor  # [out_local, R]

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The delta of rows ``x`` [..., in_local] in ``out_dtype``."""
        return ((x.to(torch.float32) @ self.a.T) @ self.b.T).to(out_dtype)


class RankAdapter:
    """One adapter's slices on one TP rank: a ``Delta`` per (global layer, base linear) it targets."""

    def __init__(self, deltas: dict[tuple[int, str], Delta], rank: int) -> None:
        self.deltas, self.rank = deltas, rank

    @classmethod
    def load(cls, spec, tp_rank: int, weights, config, device: torch.device, max_lora_rank: int | None = None,
             enabled: set[str] | None = None, engine_dtype: str | None = None) -> RankAdapter:
        """Validate the request tensors (``unpack_for``), slice them for ``tp_rank`` (``yitrt.lora.format.rank_slice``)
        and assemble the rank's deltas.

        Raises:
            LoraError: the tensors do not fit this checkpoint (TensorRT-LLM's messages).
        """
        from yitrt.lora.format import rank_slice
        from yitrt.lora.modules import by_trtllm

        full = unpack_for(spec, weights, config, max_lora_rank, enabled, engine_dtype)
        parts: dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for (layer, name), (a, b) in full.items():
            module = by_trtllm(name)
            a_local, b_local = rank_slice(module, a, b, spec.tp, tp_rank)
            key = (layer, LINEAR_OF_TARGET[module.target])
            parts.setdefault(key, {})[module.role if module.target == "attention.qkv" else ""] = (
                torch.as_tensor(np.ascontiguousarray(a_local), dtype=torch.float32),
                torch.as_tensor(np.ascontiguousarray(b_local), dtype=torch.float32),
            )
        heads, kv_heads, d = spec.num_heads // spec.tp, -(-spec.num_kv_heads // spec.tp), spec.head_size
        qkv_sizes = {"q": heads * d, "k": kv_heads * d, "v": kv_heads * d}
        deltas = {key: _assemble(p, qkv_sizes if key[1] == "qkv" else None, device) for key, p in parts.items()}
        return cls(deltas, max(int(a.shape[0]) for a, _ in full.values()) if full else 0)

    def get(self, layer: int, linear: str) -> Delta | None:
        """The delta of a layer's base linear (None: not targeted)."""
        return self.deltas.get((layer, linear))


def _assemble(parts: dict[str, tuple[torch.Tensor, torch.Tensor]], qkv_sizes: dict[str, int] | None, device) -> Delta:
    """One ``Delta`` from a linear's parts ("" for a plain linear; "q"/"k"/"v" placed block-diagonally)."""
    roles = [r for r in QKV_ROLES if r in parts] if qkv_sizes else [""]
    ranks = [parts[r][0].shape[0] for r in roles]
    width = max(sum(ranks), MIN_COLS)
    in_local = parts[roles[0]][0].shape[1]
    out_local = sum(qkv_sizes.values()) if qkv_sizes else parts[""][1].shape[0]
    a = torch.zeros(width, in_local, dtype=torch.float32)
    b = torch.zeros(out_local, width, dtype=torch.float32)
    col = 0
    for role, r in zip(roles, ranks, strict=True):
        pa, pb = parts[role]
        row = 0 if not qkv_sizes else sum(qkv_sizes[q] for q in QKV_ROLES[: QKV_ROLES.index(role)])
        a[col : col + r] = pa
        b[row : row + pb.shape[0], col : col + r] = pb
        col += r
    return Delta(a.to(device), b.to(device))


class LoraRows:
    """Which rows of a forward's activations use which adapter: ``groups`` of (adapter, row indices); indices None
    means every row (a scoring batch under one adapter)."""

    def __init__(self, groups: list[tuple[RankAdapter, torch.Tensor | None]]) -> None:
        self.groups = groups

    def add(self, layer: int, linear: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base output of ``linear`` on rows ``x``; a row-parallel one before its all-reduce) plus each
        group's delta on its rows. A packed group's rows are padded to ``gemm_rows`` before the GEMMs, so a row's
        delta does not depend on how many rows share its adapter."""
        from yitrt.reference.model import _pad_rows, gemm_rows

        for adapter, rows in self.groups:
            delta = adapter.get(layer, linear)
            if delta is None:
                continue
            if rows is None:
                y = y + delta(x, y.dtype)
                continue
            n = rows.numel()
            part = delta(_pad_rows(x[rows], gemm_rows(n)), y.dtype)[:n]
            y = y.index_add(0, rows, part)  # rows are distinct: y[rows] + part, exactly
        return y
