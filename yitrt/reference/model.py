"""One tensor-parallel rank of TensorRT-LLM's LLaMA model, computed with torch from the rank's checkpoint files.

A rank holds its slice of every layer of every pipeline stage (stages are run in order in the same process).
Per layer, as TensorRT-LLM's ``LLaMADecoderLayer``: RMSNorm → column-parallel qkv → RoPE → attention over the
KV cache (GQA: each query head reads KV head ``h // (heads/kv_heads)`` of its rank) → row-parallel dense →
all-reduce → + bias → residual; RMSNorm → fc (SiLU) · gate → row-parallel proj → all-reduce → residual.
The embedding is a masked lookup + all-reduce when split by vocab rows (all-gather when split by hidden), the
lm_head a column-parallel GEMM whose outputs are all-gathered and cut back to ``vocab_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from yitrt.errors import UnsupportedModelError, UsageError
from yitrt.reference.comm import Comm
from yitrt.reference.layout import is_quantized
from yitrt.reference.linear import (
    AwqLinear,
    DenseLinear,
    Fp8Linear,
    Fp8RowwiseLinear,
    KvQuantizer,
    SmoothQuantLinear,
    Step,
    WeightOnlyLinear,
)
from yitrt.reference.lora import LoraRows, RankAdapter
from yitrt.reference.rope import Rotary, RotaryTable, apply_rotary
from yitrt.reference.spec import CheckpointSpec

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

#: the fewest columns a GEMM of a packed step runs with (the attention value GEMM pads a smaller head size)
MIN_COLS = 16
#: attention keys are padded to a multiple of this, and the probability-weighted values summed block by block: the
#: BLAS picks its own blocking of a long reduction, so a reduction's length must not change what a row computes
KEY_BLOCK = 64
#: query rows per attention GEMM of a context segment (bounds the scores' memory)
ROW_CHUNK = 1024


def gemm_rows(m: int) -> int:
    """Rows to run an ``m``-row GEMM of a packed step with. The CPU BLAS sums a row the same way whatever the row
    count, except for 1-3, 5-7 and 9-11 rows (and fewer than 12 columns), where other kernels take another summation
    order — measured on torch 2.13's CPU build for every shape tried; tests/unit/test_engine_arithmetic.py measures
    it again. Padding to 4, 8 or 12 rows keeps a row's result independent of the batch it is in."""
    return 4 if m <= 4 else 8 if m <= 8 else max(m, 12)


def load_rank_file(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """All tensors of one rank file (safetensors, header validated first; never pickles).

    Raises:
        CheckpointError: the file is damaged, lies in its header or changed while read.
    """
    from yitrt.checkpoint.safetensors_io import load_safetensors

    return {k: v.to(device) for k, v in load_safetensors(path).items()}


def make_linear(spec: CheckpointSpec, module: str, t: dict[str, torch.Tensor], compute: torch.dtype, step: Step | None = None):
    """The emulation of one linear module, chosen by quant_algo and ``exclude_modules``."""
    model_dtype = _DTYPES[spec.dtype]
    weight = t[module + ".weight"]
    if not is_quantized(spec, module):
        return DenseLinear(weight, compute)
    algo = spec.quant_algo
    if algo in ("W8A16", "W4A16"):
        if weight.dtype == torch.int8:
            raise UnsupportedModelError(
                f"{module}: pre-quantized {algo} weights are in the arch-specific kernel layout and cannot be read back exactly",
                "write full-precision weights with quant_algo set (yitrt convert does) and let trtllm-build quantize",
            )
        return WeightOnlyLinear(weight, 8 if algo == "W8A16" else 4, compute)
    if algo == "FP8":
        return Fp8Linear(weight, t[module + ".weights_scaling_factor"], t[module + ".activation_scaling_factor"], model_dtype, compute)
    if algo == "FP8_PER_CHANNEL_PER_TOKEN":
        return Fp8RowwiseLinear(weight, t[module + ".per_channel_scale"], spec.clamp_val, compute)
    if algo == "W8A8_SQ_PER_CHANNEL":
        return SmoothQuantLinear(
            weight, t[module + ".weights_scaling_factor"], t[module + ".activation_scaling_factor"],
            t[module + ".prequant_scaling_factor"], model_dtype, compute,
        )
    w4a8 = algo == "W4A8_AWQ"
    return AwqLinear(
        weight, t[module + ".weights_scaling_factor"], t.get(module + ".prequant_scaling_factor") if spec.pre_quant_scale else None,
        spec.group_size, model_dtype, compute,
        weight_scale_2=t[module + ".weights_scaling_factor_2"] if w4a8 else None,
        act_scale=t[module + ".activation_scaling_factor"] if w4a8 else None, step=step,
    )


def _kv_quantizer(spec: CheckpointSpec, prefix: str, t: dict[str, torch.Tensor]) -> KvQuantizer | None:
    if not spec.kv_cache_quant_algo:
        return None
    scale = t.get(prefix + "kv_cache_scaling_factor")
    if scale is None:  # the build merges separate k/v scales as max(k, v) (§3.2)
        scale = torch.maximum(t[prefix + "k_cache_scaling_factor"].reshape(()), t[prefix + "v_cache_scaling_factor"].reshape(()))
    return KvQuantizer(spec.kv_cache_quant_algo, scale, t.get(prefix + "kv_cache_rcp_scaling_factor"), _DTYPES[spec.dtype])


def silu(x: torch.Tensor) -> torch.Tensor:
    """x·sigmoid(x) as x / (1 + exp(-x)): torch's own silu computes the tail of a tensor on a scalar path that can
    differ in the last bit, so a row's result would depend on the rows after it."""
    return x / (1 + torch.exp(-x))


@dataclass(frozen=True)
class PackedSegment:
    """One sequence's rows of a packed step (see ``RankModel.forward_packed``)."""

    start: int  # first row
    count: int  # rows (new tokens)
    past: int  # tokens cached before the step
    slots: torch.Tensor  # [past + count] cache slots of all its tokens, in order
    context: bool  # context phase (its own new keys are attended to unquantized, as context FMHA reads them)
    adapter: int | None = None  # LoRA task id whose adapter its rows use (``RankModel.adapters``), None: the base model


@dataclass(frozen=True)
class PackedStep:
    """The rows of one iteration: tokens of every scheduled sequence, concatenated (TensorRT-LLM's packed input)."""

    ids: torch.Tensor  # [n]
    positions: torch.Tensor  # [n]
    seq_lens: torch.Tensor  # [n] the row's sequence length after the step
    segments: tuple[PackedSegment, ...]
    logit_rows: torch.Tensor  # [k] rows whose logits are returned


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] >= rows else torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


def _pad_keys(x: torch.Tensor, length: int) -> torch.Tensor:
    """[P, S, d] → [P, length, d] with zero rows."""
    return x if x.shape[1] == length else torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], x.shape[2])], dim=1)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """Causal attention of P independent problems of the same shape, computed so that a query row's result depends
    only on its own query, its position and the keys/values up to that position.

    Args:
        q: [P, R, d] query rows (R from ``gemm_rows``), float32.
        keys, values: [P, S, d] with S a multiple of ``KEY_BLOCK`` (rows past a problem's length are arbitrary).
        query_pos: [P, R] the last key position each row may see.

    Returns:
        [P, R, d] float32.
    """
    p, r, d = q.shape
    s = keys.shape[1]
    scores = (q @ keys.transpose(-1, -2)).div_(math.sqrt(d))
    hidden = torch.arange(s, device=q.device)[None, None, :] > query_pos[..., None]
    probs = torch.softmax(scores.masked_fill_(hidden, float("-inf")), dim=-1)  # invisible keys weigh exactly 0
    width = max(d, MIN_COLS)
    vals = values if width == d else torch.cat([values, values.new_zeros(p, s, width - d)], dim=-1)
    blocks = s // KEY_BLOCK
    parts = probs.view(p, r, blocks, KEY_BLOCK).transpose(1, 2) @ vals.view(p, blocks, KEY_BLOCK, width)  # [P, blocks, R, w]
    out = parts[:, 0]
    for j in range(1, blocks):  # in key order, one block at a time: trailing all-zero blocks add exactly nothing
        out = out + parts[:, j]
    return out[..., :d]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32: x · rsqrt(mean(x²) + eps) · weight."""
    xf = x.to(torch.float32)
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(torch.float32)
    return out.to(x.dtype)


@dataclass
class Layer:
    """One decoder layer's slice on this rank."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: object
    dense: object
    fc: object
    gate: object
    proj: object
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    kv_quant: KvQuantizer | None = None


@dataclass
class KvCache:
    """Keys and values per layer, [B, kv_heads_local, S, head_size], as read back from the cache."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]

    @property
    def length(self) -> int:
        """Slots already cached (the same for every sequence: batches are left-padded)."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]


class RankModel:
    """The model slice of one TP rank (all pipeline stages, in order)."""

    def __init__(self, spec: CheckpointSpec, tp_rank: int, comm: Comm, device: torch.device, compute: torch.dtype,
                 weight_cache_bytes: int = 4 << 30) -> None:
        """Load the rank's files; decoded GEMM weights are kept when they fit ``weight_cache_bytes`` (float32)."""
        self.spec, self.tp_rank, self.comm, self.device, self.compute = spec, tp_rank, comm, device, compute
        self.heads = spec.num_heads // spec.tp
        self.kv_heads = spec.kv_heads_local()
        self.layers: list[Layer] = []
        self.step = Step()  # shared with the layers whose kernel depends on the step's token count
        d = spec.head_size
        for pp_rank in range(spec.pp):
            t = load_rank_file(Path(spec.path) / f"rank{pp_rank * spec.tp + tp_rank}.safetensors", device)
            if pp_rank == 0:
                self.embedding = t["transformer.vocab_embedding.weight"]
            for local in range(len(spec.stage_layers(pp_rank))):
                p = f"transformer.layers.{local}."
                biases = {k.removeprefix(p): v for k, v in t.items() if k.startswith(p) and k.endswith(".bias")}
                linear = {m: make_linear(spec, p + m, t, compute, self.step) for m in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")}
                self.layers.append(Layer(
                    t[p + "input_layernorm.weight"], t[p + "post_layernorm.weight"],
                    linear["attention.qkv"], linear["attention.dense"], linear["mlp.fc"], linear["mlp.gate"], linear["mlp.proj"],
                    biases, _kv_quantizer(spec, p + "attention.", t),
                ))
            if pp_rank == spec.pp - 1:
                self.ln_f = t["transformer.ln_f.weight"]
                if "lm_head.weight" not in t:  # allowed only where TensorRT-LLM shares the embedding (layout check)
                    t["lm_head.weight"] = t["transformer.vocab_embedding.weight"]
                self.lm_head = make_linear(spec, "lm_head", t, compute, self.step)
            del t
        linears = [getattr(layer, n) for layer in self.layers for n in ("qkv", "dense", "fc", "gate", "proj")] + [self.lm_head]
        decoded_bytes = 4 * sum(lin.decoded_numel() for lin in linears)  # float32 each
        if decoded_bytes <= weight_cache_bytes:
            for lin in linears:
                lin.keep_decoded()
        self.rotary = Rotary(spec.rotary_base, d, spec.rotary_scaling, spec.max_position_embeddings)
        self.rope_table = RotaryTable(self.rotary)
        # True: stored weights and scales, unquantized activations and K/V (see DecodedWeight.weights_only)
        self.weights_only = False
        self.q_size, self.kv_size = self.heads * d, self.kv_heads * d
        #: LoRA adapters by task id (``RankEngine.load_adapter``): this rank's slices
        self.adapters: dict[int, RankAdapter] = {}

    def new_cache(self) -> KvCache:
        """An empty KV cache."""
        n = len(self.layers)
        return KvCache([None] * n, [None] * n)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, H] (the parallel embedding reassembled across ranks)."""
        spec, table = self.spec, self.embedding
        if not spec.parallel_embedding or spec.tp == 1:
            return table[ids].to(self.compute)
        if spec.embedding_sharding_dim == 1:
            return self.comm.all_gather(table[ids].to(self.compute), dim=-1)
        rows = table.shape[0]
        local = ids - self.tp_rank * rows
        mine = (local >= 0) & (local < rows)
        out = table[local.clamp(0, rows - 1)].to(self.compute) * mine[..., None].to(self.compute)
        return self.comm.all_reduce(out)

    def _attention(self, layer: Layer, index: int, x: torch.Tensor, cos, sin, cache: KvCache, mask: torch.Tensor,
                   lora: LoraRows | None) -> torch.Tensor:
        b, t, _ = x.shape
        d = self.spec.head_size
        qkv = self._linear(layer.qkv, x, lora, index, "qkv")
        if "attention.qkv.bias" in layer.biases:
            qkv = qkv + layer.biases["attention.qkv.bias"].to(self.compute)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.reshape(b, t, self.heads, d).transpose(1, 2), cos, sin)
        k = apply_rotary(k.reshape(b, t, self.kv_heads, d).transpose(1, 2), cos, sin)
        v = v.reshape(b, t, self.kv_heads, d).transpose(1, 2)
        # The cache holds what a quantized cache reads back. In the context phase the prompt attends to its own
        # unquantized K/V (context FMHA reads the QKV buffer; paged context FMHA is off for INT8 KV and for FP8
        # KV without FP8 weights); in the generation phase the XQA kernel reads every key, the new token's too,
        # back from the cache (the preprocessing kernel writes it there first).
        past_k, past_v = cache.keys[index], cache.values[index]
        kv_quant = layer.kv_quant if not self.weights_only else None
        stored_k = kv_quant.roundtrip(k) if kv_quant else k
        stored_v = kv_quant.roundtrip(v) if kv_quant else v
        cache.keys[index] = stored_k if past_k is None else torch.cat([past_k, stored_k], dim=2)
        cache.values[index] = stored_v if past_v is None else torch.cat([past_v, stored_v], dim=2)
        keys, values = (k, v) if past_k is None else (cache.keys[index], cache.values[index])
        group = self.heads // self.kv_heads
        keys = keys.repeat_interleave(group, dim=1).to(torch.float32)
        values = values.repeat_interleave(group, dim=1).to(torch.float32)
        scores = (q.to(torch.float32) @ keys.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ values
        out = out.transpose(1, 2).reshape(b, t, self.q_size).to(self.compute)
        y = self.comm.all_reduce(self._linear(layer.dense, out, lora, index, "dense"))
        if "attention.dense.bias" in layer.biases:
            y = y + layer.biases["attention.dense.bias"].to(self.compute)
        return y

    def _linear(self, linear, x: torch.Tensor, lora: LoraRows | None = None, index: int = 0, name: str = "") -> torch.Tensor:
        """A base linear on this rank (a row-parallel one before its all-reduce), plus the LoRA deltas of the rows
        that have an adapter: the plugin adds them to the GEMM's local output (yitrt.reference.lora)."""
        y = linear.weights_only(x) if self.weights_only else linear(x)
        return y if lora is None else lora.add(index, name, x, y)

    def _mlp(self, layer: Layer, x: torch.Tensor, lora: LoraRows | None = None, index: int = 0) -> torch.Tensor:
        fc, gate = self._linear(layer.fc, x, lora, index, "fc"), self._linear(layer.gate, x, lora, index, "gate")
        if "mlp.fc.bias" in layer.biases:
            fc = fc + layer.biases["mlp.fc.bias"].to(self.compute)
            gate = gate + layer.biases["mlp.gate.bias"].to(self.compute)
        y = self.comm.all_reduce(self._linear(layer.proj, silu(fc) * gate, lora, index, "proj"))  # fc is the activated branch
        if "mlp.proj.bias" in layer.biases:
            y = y + layer.biases["mlp.proj.bias"].to(self.compute)
        return y

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor, cache: KvCache, last_only: bool = False,
                adapter: int | None = None) -> torch.Tensor:
        """Run new tokens through the model.

        Args:
            ids: [B, T] token ids (left-padded batches; padding ids are arbitrary).
            positions: [B, T] RoPE positions of the new tokens.
            key_valid: [B, S] which cache slots (old and new, S = cached + T) are real tokens.
            cache: updated in place.
            last_only: return logits of the last position only.
            adapter: LoRA task id (``adapters``) every row uses; None: the base model.

        Returns:
            float32 logits [B, T or 1, vocab_size].
        """
        spec = self.spec
        b, t = ids.shape
        past = cache.length
        seq_lens = [int(n) for n in key_valid.sum(dim=1)]
        self.step.tokens = int(key_valid[:, past:].sum())  # TensorRT-LLM removes padding: m = real tokens
        cos, sin = self.rotary.cos_sin(positions, seq_lens)
        slots = torch.arange(past + t, device=ids.device)
        query_slots = (past + torch.arange(t, device=ids.device))[:, None]
        causal = slots[None, :] <= query_slots  # [T, S]
        # every query may see itself, so the left-padding rows stay finite (their outputs are never used)
        mask = (causal[None] & key_valid[:, None, :]) | (slots[None, :] == query_slots)[None]
        lora = None if adapter is None else LoraRows([(self.adapter(adapter), None)])
        h = self.embed(ids)
        for index, layer in enumerate(self.layers):
            h = h + self._attention(layer, index, rms_norm(h, layer.input_norm, spec.norm_epsilon), cos, sin, cache, mask, lora)
            h = h + self._mlp(layer, rms_norm(h, layer.post_norm, spec.norm_epsilon), lora, index)
        if last_only:
            h = h[:, -1:]
        h = rms_norm(h, self.ln_f, spec.norm_epsilon)
        logits = self.comm.all_gather(self._linear(self.lm_head, h), dim=-1)[..., : spec.vocab_size]
        logits = logits.to(_DTYPES.get(spec.logits_dtype, torch.float32))  # the engine's declared logits dtype
        return logits.to(torch.float32)

    # ---- packed steps of the engine loop (yitrt/reference/engine) ----
    @torch.inference_mode()
    def forward_packed(self, step: PackedStep, kv) -> torch.Tensor:
        """One iteration of the engine loop: the new tokens of every scheduled sequence as one packed batch (no
        padding between sequences), keys and values written to and read from the paged ``kv`` (``KvStorage``).

        A row's arithmetic does not depend on the other rows: GEMMs run with ``gemm_rows`` rows, elementwise
        functions avoid torch's scalar tail paths, cos/sin come from a fixed table and attention pads and sums keys in
        fixed blocks (``attend``). So a sequence's logits are bit-identical whatever it is batched with, however its
        prompt is chunked and whether its prefix was computed now or reused from the cache (for a float KV cache).
        Segments may use different LoRA adapters (``PackedSegment.adapter``): each adapter's rows run its delta GEMMs
        together, padded the same way (``LoraRows``).

        Returns:
            float32 logits [len(step.logit_rows), vocab_size].
        """
        spec = self.spec
        n = step.ids.numel()
        rows = gemm_rows(n)
        self.step.tokens = n  # the engine's GEMM m: real tokens (W4A8-AWQ picks its kernel by it, as the engine does)
        cos, sin = self.rope_table.rows(step.positions, step.seq_lens)
        lora = self._lora_rows(step.segments)
        h = self.embed(_pad_rows(step.ids, rows)[None])[0]
        for index, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, spec.norm_epsilon)
            h = h + self._attention_packed(layer, index, x, cos, sin, step, kv, rows, lora)
            h = h + self._mlp(layer, rms_norm(h, layer.post_norm, spec.norm_epsilon), lora, index)
        k = step.logit_rows.numel()
        h = rms_norm(_pad_rows(h[step.logit_rows], gemm_rows(k)), self.ln_f, spec.norm_epsilon)
        logits = self.comm.all_gather(self._linear(self.lm_head, h), dim=-1)[:k, : spec.vocab_size]
        logits = logits.to(_DTYPES.get(spec.logits_dtype, torch.float32))
        return logits.to(torch.float32)

    def adapter(self, task_id: int) -> RankAdapter:
        """A loaded adapter.

        Raises:
            UsageError: no adapter is loaded under ``task_id`` (the engine loop's adapter cache loads it first).
        """
        found = self.adapters.get(task_id)
        if found is None:
            raise UsageError(f"LoRA task {task_id} not found in cache. Please send LoRA weights with request",
                             "load the adapter (ReferenceRuntime.load_adapter) before using its task id")
        return found

    def _lora_rows(self, segments: tuple[PackedSegment, ...]) -> LoraRows | None:
        """The step's rows grouped by adapter (None: no segment uses one)."""
        groups: dict[int, list[int]] = {}
        for seg in segments:
            if seg.adapter is not None:
                groups.setdefault(seg.adapter, []).extend(range(seg.start, seg.start + seg.count))
        if not groups:
            return None
        dev = self.device
        return LoraRows([(self.adapter(t), torch.tensor(rows, dtype=torch.long, device=dev)) for t, rows in groups.items()])

    def _attention_packed(self, layer: Layer, index: int, x: torch.Tensor, cos, sin, step: PackedStep, kv, rows: int,
                          lora: LoraRows | None = None) -> torch.Tensor:
        n, d = step.ids.numel(), self.spec.head_size
        qkv = self._linear(layer.qkv, x, lora, index, "qkv")[:n]
        if "attention.qkv.bias" in layer.biases:
            qkv = qkv + layer.biases["attention.qkv.bias"].to(self.compute)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.reshape(n, self.heads, d).transpose(0, 1)[None], cos[None], sin[None])[0].transpose(0, 1)
        k = apply_rotary(k.reshape(n, self.kv_heads, d).transpose(0, 1)[None], cos[None], sin[None])[0].transpose(0, 1)
        v = v.reshape(n, self.kv_heads, d)
        kv_quant = layer.kv_quant if not self.weights_only else None
        cache_k, cache_v = kv.flat(index)
        new_slots = torch.cat([seg.slots[seg.past:] for seg in step.segments])
        cache_k[new_slots] = (kv_quant.roundtrip(k) if kv_quant else k).to(cache_k.dtype)
        cache_v[new_slots] = (kv_quant.roundtrip(v) if kv_quant else v).to(cache_v.dtype)
        out = torch.zeros(rows, self.heads, d, dtype=torch.float32, device=x.device)
        group = self.heads // self.kv_heads
        single = [seg for seg in step.segments if seg.count == 1 and not (seg.context and kv_quant)]
        if single:  # one query token each (generation, or a one-token context): attended together
            self._attend_singles(single, q, out, cache_k, cache_v, group)
        for seg in step.segments:
            if seg.count == 1 and not (seg.context and kv_quant):
                continue
            rows_q = q[seg.start : seg.start + seg.count].to(torch.float32)  # [t, heads, d]
            t = seg.count
            keys, values = cache_k[seg.slots], cache_v[seg.slots]  # [S, kv_heads, d] as read back from the cache
            if seg.context and kv_quant:  # context FMHA reads the step's own K/V from the QKV buffer, unquantized
                keys = torch.cat([keys[: seg.past], k[seg.start : seg.start + t].to(keys.dtype)])
                values = torch.cat([values[: seg.past], v[seg.start : seg.start + t].to(values.dtype)])
            length = -(-keys.shape[0] // KEY_BLOCK) * KEY_BLOCK
            keys = _pad_keys(keys.transpose(0, 1).to(torch.float32), length)  # [kv_heads, S, d]
            values = _pad_keys(values.transpose(0, 1).to(torch.float32), length)
            # query rows per KV head: (group member, token), GQA head h reads KV head h // group
            qh = rows_q.reshape(t, self.kv_heads, group, d).permute(1, 2, 0, 3).reshape(self.kv_heads, group * t, d)
            pos = (seg.past + torch.arange(t, device=x.device)).repeat(group)
            result = torch.empty_like(qh)
            for lo in range(0, group * t, ROW_CHUNK):
                hi = min(lo + ROW_CHUNK, group * t)
                chunk = _pad_rows(qh[:, lo:hi].transpose(0, 1), gemm_rows(hi - lo)).transpose(0, 1)
                cpos = _pad_rows(pos[lo:hi], gemm_rows(hi - lo))
                cpos[hi - lo :] = seg.past  # padding rows see a real key: finite, discarded
                result[:, lo:hi] = attend(chunk.contiguous(), keys, values, cpos.expand(self.kv_heads, -1))[:, : hi - lo]
            out[seg.start : seg.start + t] = result.reshape(self.kv_heads, group, t, d).permute(2, 0, 1, 3).reshape(t, self.heads, d)
        y = self.comm.all_reduce(self._linear(layer.dense, out.reshape(rows, self.q_size).to(self.compute), lora, index, "dense"))
        if "attention.dense.bias" in layer.biases:
            y = y + layer.biases["attention.dense.bias"].to(self.compute)
        return y

    def _attend_singles(self, segs: list[PackedSegment], q: torch.Tensor, out: torch.Tensor, cache_k, cache_v, group: int) -> None:
        """Attention of every one-token segment in one batched call (keys gathered per sequence, padded to the
        longest)."""
        d, kvh = self.spec.head_size, self.kv_heads
        length = -(-max(seg.past + 1 for seg in segs) // KEY_BLOCK) * KEY_BLOCK
        index = torch.zeros(len(segs), length, dtype=torch.long, device=q.device)
        for i, seg in enumerate(segs):
            index[i, : seg.past + 1] = seg.slots
        keys = cache_k[index].to(torch.float32).permute(0, 2, 1, 3).reshape(len(segs) * kvh, length, d)
        values = cache_v[index].to(torch.float32).permute(0, 2, 1, 3).reshape(len(segs) * kvh, length, d)
        starts = torch.tensor([seg.start for seg in segs], device=q.device)
        qh = q[starts].to(torch.float32).reshape(len(segs) * kvh, group, d)
        width = gemm_rows(group)
        qh = torch.cat([qh, qh.new_zeros(len(segs) * kvh, width - group, d)], dim=1) if width > group else qh
        pos = torch.tensor([seg.past for seg in segs], device=q.device).repeat_interleave(kvh)[:, None].expand(-1, width)
        result = attend(qh.contiguous(), keys, values, pos)[:, :group]  # [segs*kvh, group, d]
        out[starts] = result.reshape(len(segs), self.heads, d)
