"""The record ``yitrt quantize`` keeps of the calibrated model, for ``yitrt verify``'s pipeline check.

ModelOpt's fake-quantized model is evaluated on the verification text three ways: with its full quantized
arithmetic (perplexity, for the report); with its weights as the checkpoint stores them and the build loads them
but activations and K/V unquantized (perplexity and top-1 predictions: the form in which a checkpoint can be
compared tightly, see ``yitrt.reference.linear.DecodedWeight.weights_only``); and every activation and KV-cache
scale its quantizers hold.
"""

from __future__ import annotations

import contextlib
from typing import Any

from yitrt.errors import QuantizationError
from yitrt.quant.data_free import FP8_MAX
from yitrt.verdict import bound_failure, measured, nothing_judged


def evaluate_calibrated(model, windows: list[list[int]], digest: str, eval_tokens: int, window: int, dtype: str) -> dict[str, Any]:
    """What ``yitrt verify`` compares the checkpoint with: the calibrated model's perplexity with its full
    quantized arithmetic; its perplexity and top-1 predictions with weights quantized but activations and K/V
    not (the form two computations can agree on tightly, see ``DecodedWeight.weights_only``); and every
    activation and KV-cache scale its quantizers hold.

    Both passes compute in float32 whatever dtype the model was calibrated in (``_in_float32``): the reference
    runtime scores the checkpoint in float32, and on a GPU, where calibration runs in the model dtype, a bfloat16
    evaluation differs from it by more than the pipeline bound (seen on an H200 with Yi-6B's shapes: top-1
    agreement 0.94-0.95 against a bound of 0.99, from arithmetic alone)."""
    import torch

    from yitrt.reference.original import score_original
    from yitrt.reference.verify import perplexity

    with torch.no_grad():
        with _in_float32(model):
            full = perplexity(score_original(model, windows), windows)
        with _as_stored(model, dtype) as stored, _in_float32(model, stored):
            logits = score_original(model, windows)
    weights_only = perplexity(logits, windows)
    positions = sum(len(w) for w in windows)
    scales = recorded_scales(model)
    problems = [p for p in (nothing_judged("positions evaluated", positions),
                            bound_failure("the calibrated model's perplexity", full, minimum=1.0),
                            bound_failure("its perplexity with weights as stored", weights_only, minimum=1.0)) if p]
    problems += [f"scale {key} is {value!r}" for key, value in scales.items() if not (measured(value) and value > 0)][:3]
    if problems:  # the record verify trusts must never hold a figure that is not a number
        raise QuantizationError("calibration diverged: " + "; ".join(problems), "try another --calib or scheme")
    return {
        "ppl": full, "windows_digest": digest, "eval_tokens": eval_tokens, "window": window,
        "positions": positions, "compute_dtype": "float32",
        "weights_only": {"ppl": weights_only, "top1": [row.argmax(-1).tolist() for row in logits]},
        "scales": scales,
    }


@contextlib.contextmanager
def _in_float32(model, weights=None):
    """For the duration, every module runs its forward with its own parameters in float32: they are cast when the
    module is entered and the originals put back when it returns, so the extra memory is one module's float32
    copy (a Yi-34B-sized model calibrated in bfloat16 on one GPU has no room for a whole float32 copy). The
    embedding's float32 output then carries float32 activations through the whole model.

    Args:
        weights: ``weights(module)`` → a float32 weight to run that module with instead of its own (the stored
            form of a quantized weight, see ``_as_stored``), or None.
    """
    import torch

    def enter(module, _args):
        saved = {}
        for name, param in module.named_parameters(recurse=False):
            replacement = weights(module) if weights is not None and name == "weight" else None
            if replacement is not None or (param.is_floating_point() and param.dtype != torch.float32):
                saved[name] = param.data
                param.data = replacement if replacement is not None else param.data.float()
        module._yitrt_saved = saved

    def leave(module, _args, _output):
        for name, data in module.__dict__.pop("_yitrt_saved", {}).items():
            getattr(module, name).data = data

    modules = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    handles = [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in modules:  # a forward that raised never reached its exit hook
            leave(module, None, None)


@contextlib.contextmanager
def _as_stored(model, dtype: str):
    """For the duration: activation and K/V quantizers off, weight quantizers off where the weight is replaced by
    its stored form, and the pre-quant scales as the checkpoint stores them and the build loads them. Yields
    ``stored(module)``: the module's weight as the checkpoint stores it (float32, computed when asked, so at most
    one is alive at a time), or None. Then restore.

    - Pre-quant scales (AWQ, SmoothQuant) are multiplied in even by a disabled quantizer (ModelOpt applies them
      before its disabled check); the checkpoint stores them, and the build uses them, in the model dtype.
    - FP8 per tensor and INT8 per channel: ModelOpt's fake quantization multiplies by maxbound/amax while its
      exporter (and TensorRT-LLM) divides by amax/maxbound; where the quotient lands exactly on a rounding tie
      — often, for bfloat16 weights and FP8 — the two disagree by one step. The exporter's arithmetic is used.
    - INT4 groups: the integers are the exporter's (float32 group scales), the build casts the group scales to
      the model dtype.
    - W4A8: the two levels as the build combines them (``_stored_w4a8_weight``).
    """
    import torch

    model_dtype = getattr(torch, dtype)
    quantizers = [q for name, q in model.named_modules()
                  if name.endswith(("input_quantizer", "bmm_quantizer")) and getattr(q, "is_enabled", False)]
    replaced, prequants = set(), []
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if _stored_weight(quantizer, getattr(module, "weight", None), model_dtype) is not None:
            replaced.add(module)
            quantizers.append(quantizer)
        iq = getattr(module, "input_quantizer", None)
        if iq is not None and getattr(iq, "pre_quant_scale", None) is not None:
            prequants.append((iq, iq.pre_quant_scale))
            iq.pre_quant_scale = iq.pre_quant_scale.to(model_dtype).to(iq.pre_quant_scale.dtype)

    def stored(module):
        if module not in replaced:
            return None
        return _stored_weight(module.weight_quantizer, module.weight, model_dtype, enabled_only=False).to(torch.float32)

    for q in quantizers:
        q.disable()
    try:
        yield stored
    finally:
        for q in quantizers:
            q.enable()
        for iq, original in prequants:
            iq.pre_quant_scale = original


def _stored_weight(quantizer, weight, model_dtype, enabled_only: bool = True):
    """The dequantized weight as the exporter writes it and the build loads it, for the formats where that
    differs from ModelOpt's fake quantization (see ``_as_stored``); None for the others (and, with
    ``enabled_only``, for a disabled quantizer)."""

    if quantizer is None or weight is None or (enabled_only and not getattr(quantizer, "is_enabled", False)):
        return None
    from modelopt.torch.quantization.nn import SequentialQuantizer

    from yitrt.reference.linear import to_fp8

    if not isinstance(quantizer, SequentialQuantizer) and getattr(quantizer, "amax", None) is None:
        return None

    if isinstance(quantizer, SequentialQuantizer):
        return _stored_w4a8_weight(quantizer, weight.data.float(), model_dtype)
    w, amax, bits, blocks = weight.data.float(), quantizer.amax.float(), quantizer.num_bits, quantizer.block_sizes
    if bits == (4, 3) and not blocks and amax.numel() == 1:
        scale = amax.reshape(()) / FP8_MAX
        return to_fp8(w / scale) * scale
    if bits == 8 and not blocks and amax.numel() == w.shape[0]:
        scale = amax.reshape(-1, 1) / 127.0
        return (w / scale).round().clamp(-128, 127) * scale
    group = (blocks or {}).get(-1)
    if bits == 4 and group and w.shape[1] % group == 0 and amax.numel() == w.numel() // group:
        scale = amax.reshape(w.shape[0], w.shape[1] // group, 1) / 7.0
        q = (w.view(w.shape[0], -1, group) / scale).round().clamp(-8, 7)
        return (q * scale.to(model_dtype).float()).view_as(w)
    return None


def _stored_w4a8_weight(quantizer, w, model_dtype):
    """W4A8's two-level weight as the build computes it: int4 groups from the exporter (float32 group scales
    amax/7), group scales stored in the model dtype and divided by ``weights_scaling_factor_2`` (amax/448) into
    float16, the product cast to FP8 for the MMA and multiplied back by scale 2 (reference §3.2)."""
    import torch

    from yitrt.reference.linear import to_fp8

    if len(quantizer) != 2 or quantizer[0].amax is None or quantizer[1].amax is None:
        return None
    group = (quantizer[0].block_sizes or {}).get(-1)
    if not group or w.shape[1] % group or quantizer[0].amax.numel() != w.numel() // group:
        return None
    scale = quantizer[0].amax.float().reshape(w.shape[0], w.shape[1] // group, 1) / 7.0
    q = (w.view(w.shape[0], -1, group) / scale).round().clamp(-8, 7)
    scale_2 = quantizer[1].amax.float().reshape(()) / FP8_MAX
    per_fp8 = (scale.to(model_dtype).float() / scale_2).to(torch.float16).float()
    fp8 = to_fp8(q * per_fp8)
    return (fp8 * scale_2).view_as(w)


def _layer_linears() -> dict[str, str]:
    """HF module → the TensorRT-LLM linear whose input it quantizes, from the tensor table (q/k/v feed one
    ``attention.qkv`` and share one scale after the exporter's fusion, so q_proj speaks for them)."""
    from yitrt.models.llama import LLAMA_TENSORS, Kind, Scope

    linears = {}
    for rule in LLAMA_TENSORS:
        if rule.kind is Kind.LINEAR and rule.scope is Scope.LAYER:
            hf = rule.sources[0].name.removeprefix("model.layers.{i}.").removesuffix(".weight")
            linears[hf] = rule.target.removeprefix("transformer.layers.{i}.").removesuffix(".weight")
    return linears


def recorded_scales(model) -> dict[str, float]:
    """Every activation and KV-cache dequantization scale (amax / the format's largest value), keyed
    ``"{global layer}.{TensorRT-LLM module}.{tensor}"``, as the checkpoint must hold them."""
    scales: dict[str, float] = {}
    for i, layer in enumerate(model.get_decoder().layers):
        for hf_name, trt_name in _layer_linears().items():
            q = getattr(layer.get_submodule(hf_name), "input_quantizer", None)
            if q is not None and q.is_enabled and q.amax is not None:
                scales[f"{i}.{trt_name}.activation_scaling_factor"] = float(q.amax.float().max() / q.maxbound)
        k = getattr(layer.self_attn, "k_bmm_quantizer", None)
        if k is not None and k.is_enabled and k.amax is not None:  # K and V share one scale (merge_kv_scales)
            scales[f"{i}.attention.kv_cache_scaling_factor"] = float(k.amax.float().max() / k.maxbound)
    return scales
