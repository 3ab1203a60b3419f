"""The facts the packed forward's batch invariance rests on, measured on this machine's torch: if a BLAS or torch
upgrade changes them, these fail before any answer silently depends on its batch."""

from __future__ import annotations

import torch

from yitrt.reference.model import KEY_BLOCK, attend, gemm_rows, silu
from yitrt.reference.rope import Rotary, RotaryTable


def test_a_gemm_row_is_the_same_whatever_the_padded_row_count():
    gen = torch.Generator().manual_seed(0)
    for k, n in ((256, 688), (576, 1536), (1536, 576), (64, 32000), (100, 37)):
        weight = torch.randn(n, k, generator=gen)
        rows = torch.randn(80, k, generator=gen)
        outputs = []
        for m in range(1, 70):
            padded = gemm_rows(m)
            x = torch.cat([rows[:m], torch.zeros(padded - m, k)])
            outputs.append((x @ weight.T)[0])
        reference = outputs[-1]
        assert all(torch.equal(out, reference) for out in outputs), (k, n)


def test_a_lora_delta_row_is_the_same_whatever_the_rows_sharing_its_adapter():
    # the two low-rank GEMMs of a LoRA delta (yitrt.reference.lora): x·Aᵀ with A padded to MIN_COLS rows, then ·Bᵀ
    from yitrt.reference.lora import MIN_COLS

    gen = torch.Generator().manual_seed(4)
    for k, r, n in ((64, 4, 64), (576, 16, 1536), (1536, 8, 576)):
        a = torch.cat([torch.randn(r, k, generator=gen), torch.zeros(max(r, MIN_COLS) - r, k)])
        b = torch.cat([torch.randn(n, r, generator=gen), torch.zeros(n, max(r, MIN_COLS) - r)], dim=1)
        rows = torch.randn(40, k, generator=gen)
        outputs = [((torch.cat([rows[:m], torch.zeros(gemm_rows(m) - m, k)]) @ a.T) @ b.T)[0] for m in range(1, 40)]
        assert all(torch.equal(out, outputs[-1]) for out in outputs), (k, r, n)


def test_unpadded_small_gemms_do_differ_so_the_padding_matters():
    gen = torch.Generator().manual_seed(1)
    weight, rows = torch.randn(1536, 576, generator=gen), torch.randn(16, 576, generator=gen)
    alone = (rows[:1] @ weight.T)[0]
    assert not torch.equal(alone, (rows @ weight.T)[0])  # if this starts to hold, gemm_rows may become identity


def test_attention_of_a_query_depends_only_on_its_keys_up_to_its_position():
    gen = torch.Generator().manual_seed(2)
    d, length = 32, 700
    q, keys, values = (torch.randn(1, length, d, generator=gen) for _ in range(3))

    def run(first: int, count: int, extra_keys: int) -> torch.Tensor:
        span = -(-(first + count + extra_keys) // KEY_BLOCK) * KEY_BLOCK
        k = torch.cat([keys[:, : first + count + extra_keys], torch.zeros(1, span - first - count - extra_keys, d)], dim=1)
        v = torch.cat([values[:, : first + count + extra_keys], torch.zeros(1, span - first - count - extra_keys, d)], dim=1)
        rows = gemm_rows(count)
        qr = torch.cat([q[:, first : first + count], torch.zeros(1, rows - count, d)], dim=1)
        pos = torch.cat([torch.arange(first, first + count), torch.full((rows - count,), first)])[None]
        return attend(qr, k, v, pos)[0, :count]

    alone = {p: run(p, 1, 0)[0] for p in (0, 63, 64, 255, 256, 300, 511, 650)}
    for first, count, extra in ((0, 700, 0), (60, 300, 0), (250, 60, 200), (300, 1, 333), (640, 20, 40)):
        out = run(first, count, extra)
        for p, row in alone.items():
            if first <= p < first + count:
                assert torch.equal(out[p - first], row), (first, count, extra, p)


def test_silu_and_rotary_rows_do_not_depend_on_the_tensor_around_them():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4099, generator=gen) * 4
    whole = silu(x)
    assert all(torch.equal(silu(x[i : i + n].clone()), whole[i : i + n]) for i, n in ((0, 17), (5, 31), (4090, 9), (100, 1)))
    table = RotaryTable(Rotary(10000.0, 64, None, 4096))
    positions = torch.tensor([0, 5, 4095, 4096, 9000])
    cos, sin = table.rows(positions, positions + 1)
    for i, p in enumerate(positions.tolist()):
        c1, s1 = table.rows(torch.tensor([p]), torch.tensor([p + 1]))
        assert torch.equal(c1[0], cos[i]) and torch.equal(s1[0], sin[i])
