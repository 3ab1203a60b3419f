"""Rotary position embedding as TensorRT-LLM's GPT attention applies it for ``rope_gpt_neox``.

GPT-NeoX style (the two halves of each head rotate together), angles and rotation in float32. The inverse
frequencies follow ``rotary_scaling`` (HF ``rope_scaling`` copied into the checkpoint): none, linear (positions
divided by the factor), dynamic NTK (base enlarged once a sequence is longer than ``max_position_embeddings``,
from that sequence's current KV length, new token included — the context and XQA kernels' rule; keys already
cached keep the rotation they were written with), yarn (blended inverse frequencies and an attention factor applied to
cos/sin) and llama3 (wavelength-dependent smoothing). Sources: TensorRT-LLM functional.py
``RopeEmbeddingUtils``, layers/attention.py (``type`` read before ``rope_type``), decoderMaskedMultiheadAttention
utils ``update_rotary_base``, unfusedAttentionKernels (rotation in float32); transformers modeling_rope_utils.py
computes the same for the default settings.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def _llama3(base: float, dim: int, s: dict[str, Any]) -> torch.Tensor:
    inv = _default_inv_freq(base, dim)
    factor, low, high = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(base: float, dim: int, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """TensorRT-LLM's ``create_sinusoidal_positions_yarn``: keys read with its defaults (beta_fast 32, beta_slow 1,
    mscale 1, mscale_all_dim 0, original_max_position_embeddings 4096); HF's ``attention_factor`` key is not
    read; the correction range is always floored/ceiled; cos and sin are multiplied by
    ``mscale(f, mscale) / mscale(f, mscale_all_dim)`` (so q·k by its square)."""
    factor = float(s["factor"])
    original = float(s.get("original_max_position_embeddings") or 4096)
    beta_fast, beta_slow = float(s.get("beta_fast", 32.0)), float(s.get("beta_slow", 1.0))
    attention = _yarn_mscale(factor, float(s.get("mscale", 1.0))) / _yarn_mscale(factor, float(s.get("mscale_all_dim", 0.0)))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv, attention


class Rotary:
    """Rotary embedding for one checkpoint: inverse frequencies fixed at load, except dynamic NTK."""

    def __init__(self, base: float, dim: int, scaling: dict[str, Any] | None, max_positions: int | None) -> None:
        self.base, self.dim, self.max_positions = base, dim, max_positions
        self.kind = "none"
        self.factor = 1.0
        self.attention_factor = 1.0
        if scaling:
            self.kind = scaling.get("type") or scaling.get("rope_type") or "none"
            self.factor = float(scaling.get("factor", 1.0))
        if self.kind == "default":
            self.kind = "none"
        if self.kind == "llama3":
            self.inv_freq = _llama3(base, dim, scaling)
        elif self.kind == "yarn":
            self.inv_freq, self.attention_factor = _yarn(base, dim, scaling)
        elif self.kind == "linear":
            self.inv_freq = _default_inv_freq(base, dim) / self.factor  # positions × 1/factor
        else:
            self.inv_freq = _default_inv_freq(base, dim)

    def inv_freq_for(self, seq_len: int) -> torch.Tensor:
        """Inverse frequencies for a sequence whose current total length is ``seq_len``."""
        if self.kind != "dynamic" or not self.max_positions or seq_len <= self.max_positions:
            return self.inv_freq
        base = self.base * ((self.factor * seq_len / self.max_positions) - (self.factor - 1)) ** (self.dim / (self.dim - 2))
        return _default_inv_freq(base, self.dim)

    def cos_sin(self, positions: torch.Tensor, seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [B, T, dim] (float32) for positions [B, T]; ``seq_lens[b]`` is sequence b's total
        length after this step (used by dynamic NTK only)."""
        inv = torch.stack([self.inv_freq_for(n) for n in seq_lens]).to(positions.device)  # [B, dim/2]
        angles = positions.to(torch.float32)[..., None] * inv[:, None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


#: positions per chunk of the cos/sin table (each chunk is computed by one fixed-shape operation)
TABLE_CHUNK = 4096


class RotaryTable:
    """cos/sin rows of a ``Rotary`` read from a table built in fixed chunks of positions, so a position's values do
    not depend on which other positions a step computes (an elementwise cos/sin over a tensor takes a scalar path
    for its tail elements, which may differ from the vector path in the last bit)."""

    def __init__(self, rotary: Rotary) -> None:
        self.rotary = rotary
        self._chunks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _chunk(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self._chunks:
            r = self.rotary
            positions = torch.arange(index * TABLE_CHUNK, (index + 1) * TABLE_CHUNK)
            angles = positions.to(torch.float32)[:, None] * r.inv_freq[None, :]
            angles = torch.cat([angles, angles], dim=-1)
            self._chunks[index] = (angles.cos() * r.attention_factor, angles.sin() * r.attention_factor)
        return self._chunks[index]

    def rows(self, positions: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n, dim] for positions [n]; ``seq_lens[i]``: row i's sequence length after the step (dynamic
        NTK past max_position_embeddings computes those rows directly: their frequencies depend on the length)."""
        r = self.rotary
        dynamic = r.kind == "dynamic" and r.max_positions and bool((seq_lens > r.max_positions).any())
        if dynamic:
            cos, sin = r.cos_sin(positions[:, None], [int(n) for n in seq_lens])
            return cos[:, 0], sin[:, 0]
        pos = positions.cpu()
        chunks = sorted(set((pos // TABLE_CHUNK).tolist()))
        cos = torch.empty(len(pos), r.dim)
        sin = torch.empty(len(pos), r.dim)
        for c in chunks:
            mine = (pos // TABLE_CHUNK) == c
            table_cos, table_sin = self._chunk(c)
            cos[mine], sin[mine] = table_cos[pos[mine] - c * TABLE_CHUNK], table_sin[pos[mine] - c * TABLE_CHUNK]
        return cos.to(positions.device), sin.to(positions.device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, dim] with cos/sin [B, T, dim] (GPT-NeoX halves), in float32."""
    xf = x.to(torch.float32)
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    out = xf * cos[:, None] + rotated * sin[:, None]
    return out.to(x.dtype)
