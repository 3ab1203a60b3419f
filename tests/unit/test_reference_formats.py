"""The reference runtime's format emulations, checked against independent statements of each rule."""

from __future__ import annotations

import math

import pytest
import torch

from yitrt.reference.linear import (
    AwqLinear,
    Fp8Linear,
    Fp8RowwiseLinear,
    KvQuantizer,
    SmoothQuantLinear,
    Step,
    WeightOnlyLinear,
    round_half_away,
    unpack_int4,
    weight_only_quantize,
)


def test_round_half_away_differs_from_torch_round_on_halves():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 2.4, -2.6])
    assert round_half_away(x).tolist() == [1.0, 2.0, 3.0, -1.0, -3.0, 2.0, -3.0]
    assert torch.round(x).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 2.0, -3.0]


@pytest.mark.parametrize(("bits", "top", "bottom"), [(8, 127, -128), (4, 7, -8)])
def test_weight_only_divides_by_128_or_8_and_clamps(bits, top, bottom):
    w = torch.tensor([[1.0, -1.0, 0.25, 0.0], [-2.0, 0.5, 1.0, 0.0]], dtype=torch.bfloat16)
    q, scale = weight_only_quantize(w, bits)
    assert scale.dtype == torch.bfloat16  # stored in the model dtype
    assert scale.float().tolist() == [1.0 / (1 << (bits - 1)), 2.0 / (1 << (bits - 1))]
    # +amax maps to 2^(bits-1) and is clamped to top; -amax is exactly bottom
    assert q[0].tolist()[:2] == [top, bottom]
    assert q[1, 0].item() == bottom
    assert q.abs().max() <= -bottom


def test_weight_only_rounds_with_the_float32_scale_halves_away():
    # amax 1.0 → int8 scale 1/128; 2.5/128 is exactly 2.5 steps → 3 (torch.round would give 2)
    w = torch.tensor([[1.0, 2.5 / 128, -2.5 / 128]], dtype=torch.float32)
    q, _ = weight_only_quantize(w, 8)
    assert q[0, 1:].tolist() == [3.0, -3.0]


def test_weight_only_linear_dequantizes_q_times_stored_scale():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen).to(torch.bfloat16)
    lin = WeightOnlyLinear(w, 8, torch.float32)
    deq = lin(torch.eye(64)).T  # columns of the identity give the dequantized weight
    q, stored = weight_only_quantize(w, 8)
    assert torch.equal(deq, q * stored.float()[:, None])
    exact_step = w.float().abs().amax(dim=1, keepdim=True) / 128
    err = (q * exact_step - w.float()).abs()
    clipped = q == 127  # +amax/step = 128 is clipped: a full step off
    assert (err[~clipped] <= (exact_step / 2).expand_as(err)[~clipped] + 1e-7).all()  # rounding at the float32 scale
    assert (err[clipped] <= exact_step.expand_as(err)[clipped] + 1e-7).all()


def _pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Independent packer: row 2j → low nibble, row 2j+1 → high nibble of byte row j."""
    v = values.to(torch.int16) & 0xF
    return ((v[1::2] << 4) | v[0::2]).to(torch.uint8).view(torch.int8)


def test_unpack_int4_inverts_the_packing_rule():
    gen = torch.Generator().manual_seed(1)
    values = torch.randint(-8, 8, (6, 10), generator=gen, dtype=torch.int8)
    assert torch.equal(unpack_int4(_pack_int4(values)), values)


def test_unpack_int4_matches_modelopt_packer():
    quant_utils = pytest.importorskip("modelopt.torch.export.quant_utils")
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 256, generator=gen)
    scale = w.abs().reshape(8, 2, 128).amax(-1) / 7
    packed = quant_utils.pack_int4_in_uint8(w, scale, 128)
    q = (w / scale.repeat_interleave(128, dim=1)).round().clamp(-8, 7).to(torch.int8)
    assert torch.equal(unpack_int4(packed.view(torch.int8)), q)


def test_awq_w4a16_is_grouped_dequant_with_prequant():
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-8, 8, (4, 8), generator=gen, dtype=torch.int8)
    scales = torch.tensor([[0.5, 2.0]] * 4, dtype=torch.float16)
    prequant = torch.full((8,), 2.0, dtype=torch.float16)
    lin = AwqLinear(_pack_int4(q), scales, prequant, group_size=4, model_dtype=torch.float16, compute=torch.float32)
    x = torch.randn(3, 8, generator=gen)
    w = q.float() * torch.tensor([0.5] * 4 + [2.0] * 4)
    assert torch.allclose(lin(x), (x * 2.0) @ w.T, atol=1e-5)


def test_awq_w4a8_quantizes_to_fp8_only_from_five_tokens():
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(-8, 8, (4, 8), generator=gen, dtype=torch.int8)
    scales = torch.full((4, 2), 0.3, dtype=torch.float16)
    step = Step()
    lin = AwqLinear(_pack_int4(q), scales, torch.ones(8, dtype=torch.float16), 4, torch.float16, torch.float32,
                    weight_scale_2=torch.tensor([0.3 * 7 / 448]), act_scale=torch.tensor([0.01]), step=step)
    x = torch.randn(6, 8, generator=gen)
    exact = x @ (q.float() * 0.3).T
    step.tokens = 4  # GEMV path: no FP8 anywhere
    small = lin(x)
    step.tokens = 6  # CUTLASS path: FP8 activations and weights
    large = lin(x)
    assert torch.allclose(small, exact, rtol=1e-2, atol=1e-2)  # only the fp16 scale roundings
    assert not torch.allclose(large, small, rtol=1e-4, atol=1e-4)
    fp8 = lambda t: t.clamp(-448, 448).to(torch.float8_e4m3fn).float()  # noqa: E731
    s2, a = 0.3 * 7 / 448, 0.01
    w_fp8 = fp8(q.float() * torch.tensor(0.3 / s2, dtype=torch.float32).half().float())
    x_fp8 = fp8(x * torch.tensor(1 / a).half().float())
    assert torch.allclose(large, (x_fp8 @ w_fp8.T) * a * s2, rtol=1e-5, atol=1e-5)


def test_fp8_rowwise_token_scales_clamp_values_not_amax():
    w = torch.eye(4).to(torch.float8_e4m3fn)
    lin = Fp8RowwiseLinear(w, torch.ones(4), clamp=(-2.0, 2.0), compute=torch.float32)
    x = torch.tensor([[10.0, 1.0, -0.5, 0.25]])
    y = lin(x)
    # 10 is clamped to 2 before the per-token amax; then 2 → 448 exactly, others scale by 224
    assert y[0, 0].item() == pytest.approx(2.0)
    assert y[0, 1].item() == pytest.approx(1.0)
    assert y[0, 3].item() == pytest.approx(0.25)


def test_fp8_per_tensor_divides_by_the_model_dtype_scale():
    w = torch.eye(2).to(torch.float8_e4m3fn)
    act = torch.tensor([0.1])  # 0.1 in bf16 is 0.10009765625
    lin = Fp8Linear(w, torch.tensor([1.0]), act, torch.bfloat16, torch.float32)
    x = torch.tensor([[44.8, 1000.0]])
    y = lin(x)
    divisor = torch.tensor(0.1).to(torch.bfloat16).float()
    expected = (x / divisor).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 0.1
    assert torch.allclose(y, expected)
    assert y[0, 1].item() == pytest.approx(448 * 0.1)  # saturated, not NaN


def test_smoothquant_rounds_half_to_even_and_saturates():
    w = torch.eye(3, dtype=torch.int8)
    lin = SmoothQuantLinear(w, torch.ones(3), torch.tensor([1.0]), torch.ones(3), torch.float16, torch.float32)
    y = lin(torch.tensor([[2.5, 3.5, 500.0]]))
    assert y[0].tolist() == [2.0, 4.0, 127.0]


def test_kv_int8_rounds_half_even_and_fp8_saturates():
    int8 = KvQuantizer("INT8", torch.tensor([0.5]), None, torch.float16)
    assert int8.roundtrip(torch.tensor([1.25, 1.75, 100.0])).tolist() == [1.0, 2.0, 63.5]
    fp8 = KvQuantizer("FP8", torch.tensor([1.0]), None, torch.bfloat16)
    out = fp8.roundtrip(torch.tensor([1000.0, 1.0625]))
    assert out[0].item() == 448.0 and not math.isnan(out[0].item())
    assert out[1].item() == 1.0  # e4m3 has 3 mantissa bits: 1.0625 rounds to 1.0
