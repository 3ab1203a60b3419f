"""Shard-then-gather round trips with real (small, random) tensors, and the TP/PP validity rules.

Reference: shared reference/trtllm-checkpoint-and-build.md §2.2 (splits), §2.3 (QKV/GQA: rank r holds KV head
r·n_kv // tp when tp > n_kv, heads repeated consecutively), §2.4 (vocab padding with zero rows), §2.6 (pp).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from yitrt.checkpoint.sharding import local_shape, pp_problems, shard, tp_problems
from yitrt.models.config import parse_config
from yitrt.models.llama import Split, resolve_tensors
from yitrt.synthetic import tensor_shapes

MAX_TP = 8


def _valid_tp(n_h: int, n_kv: int, inter: int, tp: int) -> bool:
    """Independent statement of the rules: whole q heads per rank; KV heads split evenly, or (tp > n_kv)
    each KV head repeated tp/n_kv times; intermediate split evenly."""
    if n_h % tp or inter % tp:
        return False
    if tp <= n_kv:
        return n_kv % tp == 0
    return tp % n_kv == 0


@st.composite
def layouts(draw):
    d = draw(st.sampled_from([1, 2, 4, 8]))
    n_kv = draw(st.integers(1, 6))
    g = draw(st.integers(1, 4))
    n_h = n_kv * g
    tps = [tp for tp in range(1, MAX_TP + 1) if n_h % tp == 0 and (n_kv % tp == 0 or tp % n_kv == 0)]
    tp = draw(st.sampled_from(tps))
    inter = tp * draw(st.integers(1, 5))
    vocab = draw(st.integers(1, 37))  # often not a multiple of tp, sometimes smaller than tp
    hidden = draw(st.integers(1, 12))
    layers = draw(st.integers(1, 2))
    attention_bias = draw(st.booleans())
    mlp_bias = draw(st.booleans())
    return dict(d=d, n_kv=n_kv, n_h=n_h, tp=tp, inter=inter, vocab=vocab, hidden=hidden, layers=layers,
                attention_bias=attention_bias, mlp_bias=mlp_bias)


def _model(lay: dict, seed: int):
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": lay["hidden"],
        "num_hidden_layers": lay["layers"],
        "num_attention_heads": lay["n_h"],
        "num_key_value_heads": lay["n_kv"],
        "head_dim": lay["d"],
        "intermediate_size": lay["inter"],
        "vocab_size": lay["vocab"],
        "attention_bias": lay["attention_bias"],
        "mlp_bias": lay["mlp_bias"],
    }
    shapes = dict(tensor_shapes(raw))
    q, kv, h, i = lay["n_h"] * lay["d"], lay["n_kv"] * lay["d"], lay["hidden"], lay["inter"]
    for layer in range(lay["layers"]):
        p = f"model.layers.{layer}."
        if lay["attention_bias"]:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (h,)})
        if lay["mlp_bias"]:
            shapes.update({p + "mlp.gate_proj.bias": (i,), p + "mlp.up_proj.bias": (i,), p + "mlp.down_proj.bias": (h,)})
    gen = torch.Generator().manual_seed(seed)
    # +1 offset: no source value is exactly zero, so zero padding rows cannot be confused with data
    data = {n: torch.rand(s, generator=gen) + 1.0 for n, s in shapes.items()}
    return parse_config(raw), data


def _reader(data):
    def read(name, rows=None):
        t = data[name]
        return t.clone() if rows is None else t[rows[0] : rows[1]].clone()

    return read


def _check_qkv(pieces, parts, data, lay):
    tp, n_h, n_kv, d = lay["tp"], lay["n_h"], lay["n_kv"], lay["d"]
    q_rows = n_h // tp * d
    kv_rows = math.ceil(n_kv / tp) * d
    qs, ks, vs = [], [], []
    for piece in pieces:
        assert piece.shape[0] == q_rows + 2 * kv_rows
        q, k, v = torch.split(piece, [q_rows, kv_rows, kv_rows])
        qs.append(q)
        ks.append(k)
        vs.append(v)
    orig = {p.role: data[p.name] for p in parts}
    assert torch.equal(torch.cat(qs), orig["q"])
    for role, got in (("k", ks), ("v", vs)):
        if tp <= n_kv:
            assert torch.equal(torch.cat(got), orig[role])
            continue
        reps = tp // n_kv
        for r in range(tp):
            head = r // reps  # consecutive ranks share a head (h0, h0, h1, h1, ...)
            assert torch.equal(got[r], orig[role][head * d : (head + 1) * d]), (role, r)
            if r % reps:
                assert torch.equal(got[r], got[r - 1])
        assert torch.equal(torch.cat([got[r] for r in range(0, tp, reps)]), orig[role])


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(lay=layouts(), seed=st.integers(0, 2**16))
def test_shard_then_gather_restores_every_tensor(lay, seed):
    cfg, data = _model(lay, seed)
    tp = lay["tp"]
    assert tp_problems(cfg, tp) == []
    read = _reader(data)
    tensors = resolve_tensors(cfg, {n: tuple(t.shape) for n, t in data.items()})
    seen = set()
    for t in tensors:
        pieces = shard(cfg, t, tp, read)
        assert len(pieces) == tp
        for piece in pieces:
            assert tuple(piece.shape) == local_shape(cfg, t, tp), t.target
            assert piece.dtype == data[t.parts[0].name].dtype
        original = data[t.parts[0].name]
        split = t.rule.split
        seen.add(split)
        if split is Split.REPLICATE:
            for piece in pieces:
                assert torch.equal(piece, original)
        elif split is Split.COLUMN:
            assert torch.equal(torch.cat(pieces, dim=0), original)
        elif split is Split.ROW:
            assert original.dim() == 2
            assert torch.equal(torch.cat(pieces, dim=1), original)
        elif split is Split.VOCAB:
            v = lay["vocab"]
            per = math.ceil(v / tp)
            gathered = torch.cat(pieces, dim=0)
            assert gathered.shape[0] == per * tp
            assert torch.equal(gathered[:v], original)
            assert torch.count_nonzero(gathered[v:]) == 0
        else:
            assert split is Split.QKV
            _check_qkv(pieces, t.parts, data, lay)
    assert {Split.REPLICATE, Split.COLUMN, Split.ROW, Split.VOCAB, Split.QKV} <= seen


@settings(max_examples=150, deadline=None, database=None)
@given(
    n_kv=st.integers(1, 8),
    g=st.integers(1, 6),
    inter=st.integers(1, 200),
    layers=st.integers(1, 40),
)
def test_tp_and_pp_problems_agree_with_the_rules(n_kv, g, inter, layers):
    n_h = n_kv * g
    cfg = parse_config({"architectures": ["LlamaForCausalLM"], "hidden_size": n_h * 4, "num_hidden_layers": layers,
                        "num_attention_heads": n_h, "num_key_value_heads": n_kv, "intermediate_size": inter,
                        "vocab_size": 10})
    for tp in range(1, 17):
        assert (tp_problems(cfg, tp) == []) is _valid_tp(n_h, n_kv, inter, tp), tp
    for pp in range(1, 9):
        assert (pp_problems(cfg, pp) == []) is (layers % pp == 0), pp


SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152}


def test_smollm2_tp_rules():
    cfg = parse_config(SMOLLM2)
    assert tp_problems(cfg, 1) == []
    assert tp_problems(cfg, 3) == []  # 9 % 3, 3 % 3, 1536 % 3 all zero
    two = tp_problems(cfg, 2)  # 9 heads and 3 KV heads are odd
    assert len(two) == 2
    assert any("9 attention heads" in p for p in two)
    assert any("3 KV heads" in p for p in two)
    six = tp_problems(cfg, 6)  # 9 % 6 = 3; 6 is a multiple of 3 KV heads; 1536 % 6 = 0
    assert len(six) == 1 and "9 attention heads" in six[0]
    nine = tp_problems(cfg, 9)  # 9 heads fine, 9 = 3·3 KV repeats fine, 1536 % 9 = 6
    assert len(nine) == 1 and "1536" in nine[0]
    assert tp_problems(cfg, 0) != []


def test_smollm2_pp_rules():
    cfg = parse_config(SMOLLM2)
    assert [pp for pp in range(1, 9) if not pp_problems(cfg, pp)] == [1, 2, 3, 5, 6]
    assert "30 layers" in pp_problems(cfg, 4)[0]
    assert pp_problems(cfg, 0) != []


@pytest.mark.parametrize(
    ("dims", "valid"),
    [
        ((32, 4, 11008), [1, 2, 4, 8, 16]),  # Yi-6B/9B: 8 and 16 repeat KV heads
        ((56, 8, 20480), [1, 2, 4, 8]),  # Yi-34B: 7 and 14 divide the heads but not the 8 KV heads
        ((16, 16, 5504), [1, 2, 4, 8, 16]),  # Yi-Coder-1.5B (MHA); 5504 = 2^7·43
    ],
)
def test_yi_tp_sizes(dims, valid):
    n_h, n_kv, inter = dims
    cfg = parse_config({"architectures": ["LlamaForCausalLM"], "hidden_size": n_h * 128, "num_hidden_layers": 2,
                        "num_attention_heads": n_h, "num_key_value_heads": n_kv, "intermediate_size": inter,
                        "vocab_size": 64000})
    assert [tp for tp in range(1, 17) if not tp_problems(cfg, tp)] == valid


def test_vocab_smaller_than_tp_pads_whole_ranks():
    lay = dict(d=2, n_kv=1, n_h=4, tp=4, inter=4, vocab=3, hidden=5, layers=1, attention_bias=False, mlp_bias=False)
    cfg, data = _model(lay, 0)
    lm_head = next(t for t in resolve_tensors(cfg, {n: tuple(t.shape) for n, t in data.items()}) if t.target == "lm_head.weight")
    pieces = shard(cfg, lm_head, 4, _reader(data))
    assert [tuple(p.shape) for p in pieces] == [(1, 5)] * 4
    for r in range(3):
        assert torch.equal(pieces[r], data["lm_head.weight"][r : r + 1])
    assert torch.count_nonzero(pieces[3]) == 0
