"""The calibrated model's record is evaluated in float32 whatever dtype the model was calibrated in (a GPU
calibrates in the model dtype; the reference runtime scores checkpoints in float32)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_in_float32_computes_what_a_float32_copy_computes(make_model):
    pytest.importorskip("transformers")
    from yitrt.quant.record import _in_float32
    from yitrt.reference.original import load_original, score_original

    hf = make_model(seed=5, head_std=0.25)
    seqs = [[5, 17, 99, 3, 250, 41, 7], [8, 9, 10]]
    low = load_original(hf, torch.device("cpu"), torch.bfloat16)
    high = load_original(hf, torch.device("cpu"), torch.bfloat16).float()  # bf16 weights, float32 arithmetic
    before = {n: p.detach().clone() for n, p in low.named_parameters()}
    with torch.no_grad():
        bf16 = score_original(low, seqs)
        with _in_float32(low):
            f32 = score_original(low, seqs)
        want = score_original(high, seqs)
    for got, ref, rough in zip(f32, want, bf16, strict=True):
        assert torch.equal(got, ref)
        assert not torch.equal(rough, ref)  # the bfloat16 forward differs: the hooks did something
    for name, param in low.named_parameters():  # every parameter back as it was, dtype included
        assert param.dtype == torch.bfloat16 and torch.equal(param, before[name]), name


def test_in_float32_swaps_in_the_given_weight_only_while_the_module_runs():
    from yitrt.quant.record import _in_float32

    layer = torch.nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    original = layer.weight.data_ptr()
    seen = []
    layer.register_forward_hook(lambda m, a, o: seen.append(m.weight.dtype))
    with _in_float32(layer, lambda m: torch.ones(3, 4)):
        out = layer(torch.ones(1, 4))
    assert torch.equal(out, torch.full((1, 3), 4.0)) and out.dtype == torch.float32 and seen == [torch.float32]
    assert layer.weight.data_ptr() == original and layer.weight.dtype == torch.bfloat16
