"""The HF ↔ TensorRT-LLM tensor table at real Yi shapes, with meta tensors (no memory used).

Expected names/shapes: shared reference/trtllm-checkpoint-and-build.md §1.3 (names, per-rank shapes),
§2.1 (rank numbering), §2.3 (GQA), §2.4 (vocab) and §2.6 (pipeline stages, local renumbering).
"""

from __future__ import annotations

import math

import pytest
import torch

from yitrt.checkpoint.sharding import Mapping, local_shape, shard
from yitrt.errors import CheckpointError
from yitrt.models.config import parse_config
from yitrt.models.llama import Split, resolve_tensors
from yitrt.synthetic import SHAPES, tensor_shapes

YI_SHAPES = ["yi-6b", "yi-9b", "yi-34b", "yi-coder-1.5b"]
PER_LAYER = (
    "input_layernorm.weight",
    "attention.qkv.weight",
    "attention.dense.weight",
    "post_layernorm.weight",
    "mlp.fc.weight",
    "mlp.gate.weight",
    "mlp.proj.weight",
)


def _raw(shape: str, **extra) -> dict:
    return {"architectures": ["LlamaForCausalLM"], **SHAPES[shape], "rope_theta": 5e6, **extra}


def _meta_reader(available: dict[str, tuple[int, ...]]):
    calls = []

    def read(name, rows=None):
        calls.append((name, rows))
        t = torch.empty(available[name], device="meta", dtype=torch.bfloat16)
        return t if rows is None else t[rows[0] : rows[1]]

    read.calls = calls
    return read


def _expected_shapes(d: dict, tp: int) -> dict[str, tuple[int, ...]]:
    """Per-rank shapes from reference §1.3 (head size 128 for every Yi model)."""
    H, I, V = d["hidden_size"], d["intermediate_size"], d["vocab_size"]  # noqa: E741
    n_h, n_kv, hd = d["num_attention_heads"], d["num_key_value_heads"], 128
    assert H // n_h == hd
    kv_r = math.ceil(n_kv / tp)
    return {
        "input_layernorm.weight": (H,),
        "attention.qkv.weight": ((n_h // tp + 2 * kv_r) * hd, H),
        "attention.dense.weight": (H, n_h * hd // tp),
        "post_layernorm.weight": (H,),
        "mlp.fc.weight": (I // tp, H),
        "mlp.gate.weight": (I // tp, H),
        "mlp.proj.weight": (H, I // tp),
        "transformer.vocab_embedding.weight": (math.ceil(V / tp), H),
        "transformer.ln_f.weight": (H,),
        "lm_head.weight": (math.ceil(V / tp), H),
    }


@pytest.fixture(scope="module", params=YI_SHAPES)
def resolved(request):
    raw = _raw(request.param)
    cfg = parse_config(raw)
    available = dict(tensor_shapes(raw))
    return request.param, raw, cfg, available, resolve_tensors(cfg, available)


def test_resolve_counts_and_parts(resolved):
    shape, raw, cfg, available, tensors = resolved
    L = raw["num_hidden_layers"]
    assert len(tensors) == 7 * L + 3
    by_target = {t.target: t for t in tensors}
    assert len(by_target) == len(tensors)
    for i in (0, L - 1):
        p = f"model.layers.{i}."
        t = f"transformer.layers.{i}."
        # the swap: fc ← gate_proj (activated branch), gate ← up_proj
        assert [x.name for x in by_target[t + "mlp.fc.weight"].parts] == [p + "mlp.gate_proj.weight"]
        assert [x.name for x in by_target[t + "mlp.gate.weight"].parts] == [p + "mlp.up_proj.weight"]
        assert [x.name for x in by_target[t + "mlp.proj.weight"].parts] == [p + "mlp.down_proj.weight"]
        assert [x.name for x in by_target[t + "attention.dense.weight"].parts] == [p + "self_attn.o_proj.weight"]
        qkv = by_target[t + "attention.qkv.weight"]
        assert [(x.name, x.role) for x in qkv.parts] == [
            (p + "self_attn.q_proj.weight", "q"),
            (p + "self_attn.k_proj.weight", "k"),
            (p + "self_attn.v_proj.weight", "v"),
        ]
        assert [x.name for x in by_target[t + "input_layernorm.weight"].parts] == [p + "input_layernorm.weight"]
        assert [x.name for x in by_target[t + "post_layernorm.weight"].parts] == [p + "post_attention_layernorm.weight"]
        assert by_target[t + "attention.qkv.weight"].layer == i
    assert [x.name for x in by_target["transformer.vocab_embedding.weight"].parts] == ["model.embed_tokens.weight"]
    assert [x.name for x in by_target["transformer.ln_f.weight"].parts] == ["model.norm.weight"]
    assert [x.name for x in by_target["lm_head.weight"].parts] == ["lm_head.weight"]
    # every HF tensor is used exactly once
    used = [p.name for t in tensors for p in t.parts]
    assert sorted(used) == sorted(available)
    # part shapes are the HF shapes
    for t in tensors:
        for part in t.parts:
            assert part.shape == available[part.name]


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("pp", [1, 2])
def test_per_rank_names_and_shapes(resolved, tp, pp):
    shape, raw, cfg, available, tensors = resolved
    L = raw["num_hidden_layers"]
    per_stage = L // pp
    mapping = Mapping(tp, pp)
    assert mapping.world_size == tp * pp
    assert mapping.ranks() == [(s * tp + r, s, r) for s in range(pp) for r in range(tp)]

    # expected content of every stage, from reference §2.6
    expected: dict[int, dict[str, tuple[str, int | None]]] = {}
    for s in range(pp):
        names: dict[str, tuple[str, int | None]] = {}
        if s == 0:
            names["transformer.vocab_embedding.weight"] = ("transformer.vocab_embedding.weight", None)
        for local in range(per_stage):
            for suffix in PER_LAYER:
                names[f"transformer.layers.{local}.{suffix}"] = (suffix, s * per_stage + local)
        if s == pp - 1:
            names["transformer.ln_f.weight"] = ("transformer.ln_f.weight", None)
            names["lm_head.weight"] = ("lm_head.weight", None)
        expected[s] = names

    got: dict[int, dict[str, object]] = {s: {} for s in range(pp)}
    for t in tensors:
        stages = mapping.stages_holding(cfg, t)
        assert len(stages) == 1
        name = mapping.local_name(cfg, t)
        assert name not in got[stages[0]], f"{name} twice on stage {stages[0]}"
        got[stages[0]][name] = t
    for s in range(pp):
        assert set(got[s]) == set(expected[s]), f"stage {s}"
        for name, t in got[s].items():
            assert t.layer == expected[s][name][1], name

    shapes = _expected_shapes(SHAPES[shape], tp)
    read = _meta_reader(available)
    for s in range(pp):
        for name, t in got[s].items():
            key = expected[s][name][0]
            assert local_shape(cfg, t, tp) == shapes[key], f"{name} tp={tp}"
            pieces = shard(cfg, t, tp, read)
            assert len(pieces) == tp
            for piece in pieces:
                assert tuple(piece.shape) == shapes[key], f"{name} tp={tp}"


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_row_split_weights_read_row_ranges(resolved, tp):
    """Column/QKV/vocab tensors are read as row ranges (bounded memory), never whole at tp > 1."""
    shape, raw, cfg, available, tensors = resolved
    read = _meta_reader(available)
    for t in tensors:
        if t.layer not in (None, 0):
            continue
        read.calls.clear()
        shard(cfg, t, tp, read)
        if t.rule.split in (Split.COLUMN, Split.QKV, Split.VOCAB) and tp > 1:
            assert all(rows is not None for _, rows in read.calls), t.target


def test_yi_6b_tp8_qkv_rows_hold_one_kv_head():
    raw = _raw("yi-6b")
    cfg = parse_config(raw)
    available = dict(tensor_shapes(raw))
    qkv = next(t for t in resolve_tensors(cfg, available) if t.target == "transformer.layers.0.attention.qkv.weight")
    read = _meta_reader(available)
    shard(cfg, qkv, 8, read)
    # rank r reads q heads [4r, 4r+4) and KV head r // 2 (heads repeated 8/4 = 2 times), rows of 128
    k_calls = [rows for name, rows in read.calls if name.endswith("k_proj.weight")]
    q_calls = [rows for name, rows in read.calls if name.endswith("q_proj.weight")]
    assert q_calls == [(4 * r * 128, (4 * r + 4) * 128) for r in range(8)]
    assert k_calls == [((r // 2) * 128, (r // 2 + 1) * 128) for r in range(8)]


# ---- resolve errors and variants (tiny dims, same code paths) ---------------------------------------------

def _small(**extra) -> tuple[dict, dict]:
    raw = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 100, **extra}
    return raw, dict(tensor_shapes(raw))


def test_legacy_ln1_ln2_resolve_to_layernorms():
    raw, _ = _small(architectures=["YiForCausalLM"])
    available = dict(tensor_shapes(raw, legacy_yi=True))
    assert "model.layers.0.ln1.weight" in available
    cfg = parse_config(raw)
    assert cfg.legacy_yi
    by_target = {t.target: t for t in resolve_tensors(cfg, available)}
    for i in range(2):
        assert [p.name for p in by_target[f"transformer.layers.{i}.input_layernorm.weight"].parts] == [f"model.layers.{i}.ln1.weight"]
        assert [p.name for p in by_target[f"transformer.layers.{i}.post_layernorm.weight"].parts] == [f"model.layers.{i}.ln2.weight"]


def test_both_ln1_and_input_layernorm_is_an_error():
    raw, available = _small()
    available["model.layers.1.ln1.weight"] = (64,)
    with pytest.raises(CheckpointError) as info:
        resolve_tensors(parse_config(raw), available)
    assert "model.layers.1.input_layernorm.weight" in info.value.message
    assert "model.layers.1.ln1.weight" in info.value.message


def test_unknown_tensor_is_named():
    raw, available = _small()
    available["model.layers.0.self_attn.q_norm.weight"] = (16,)
    with pytest.raises(CheckpointError) as info:
        resolve_tensors(parse_config(raw), available)
    assert "model.layers.0.self_attn.q_norm.weight" in info.value.message
    assert "1 tensor(s)" in info.value.message


def test_rotary_inv_freq_is_ignored():
    raw, available = _small()
    for i in range(2):
        available[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = (8,)
    tensors = resolve_tensors(parse_config(raw), available)
    assert not any("inv_freq" in p.name for t in tensors for p in t.parts)
    assert len(tensors) == 7 * 2 + 3


def test_missing_tensor_is_an_error():
    raw, available = _small()
    del available["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError) as info:
        resolve_tensors(parse_config(raw), available)
    assert "missing" in info.value.message
    assert "model.layers.1.mlp.up_proj.weight" in info.value.message


def test_misshaped_tensor_is_an_error():
    raw, available = _small()
    available["model.layers.0.self_attn.k_proj.weight"] = (64, 64)  # config implies 2 kv heads × 16 = 32 rows
    with pytest.raises(CheckpointError) as info:
        resolve_tensors(parse_config(raw), available)
    msg = info.value.message
    assert "model.layers.0.self_attn.k_proj.weight" in msg
    assert "[64, 64]" in msg and "[32, 64]" in msg


def test_several_problems_are_reported_together():
    raw, available = _small()
    del available["model.norm.weight"]
    available["model.layers.0.mlp.down_proj.weight"] = (64, 95)
    available["extra.weight"] = (3,)
    with pytest.raises(CheckpointError) as info:
        resolve_tensors(parse_config(raw), available)
    msg = info.value.message
    assert "model.norm.weight" in msg and "down_proj" in msg and "extra.weight" in msg


def test_tied_embeddings_use_embed_tokens_for_lm_head():
    raw, available = _small(tie_word_embeddings=True)
    assert "lm_head.weight" not in available
    tensors = resolve_tensors(parse_config(raw), available)
    lm_head = next(t for t in tensors if t.target == "lm_head.weight")
    assert [p.name for p in lm_head.parts] == ["model.embed_tokens.weight"]
    assert lm_head.parts[0].shape == (100, 64)
    embed = next(t for t in tensors if t.target == "transformer.vocab_embedding.weight")
    assert [p.name for p in embed.parts] == ["model.embed_tokens.weight"]


def test_untied_model_without_lm_head_is_an_error():
    raw, available = _small()
    del available["lm_head.weight"]
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        resolve_tensors(parse_config(raw), available)


def test_attention_bias_expects_qkvo_biases():
    raw, available = _small(attention_bias=True)
    with pytest.raises(CheckpointError) as info:
        resolve_tensors(parse_config(raw), available)
    assert "bias" in info.value.message and "missing" in info.value.message
    for i in range(2):
        p = f"model.layers.{i}.self_attn."
        available[p + "q_proj.bias"] = (64,)
        available[p + "k_proj.bias"] = (32,)
        available[p + "v_proj.bias"] = (32,)
        available[p + "o_proj.bias"] = (64,)
    by_target = {t.target: t for t in resolve_tensors(parse_config(raw), available)}
    qkv_bias = by_target["transformer.layers.0.attention.qkv.bias"]
    assert [(p.name, p.role) for p in qkv_bias.parts] == [
        ("model.layers.0.self_attn.q_proj.bias", "q"),
        ("model.layers.0.self_attn.k_proj.bias", "k"),
        ("model.layers.0.self_attn.v_proj.bias", "v"),
    ]
    dense_bias = by_target["transformer.layers.1.attention.dense.bias"]
    assert [p.name for p in dense_bias.parts] == ["model.layers.1.self_attn.o_proj.bias"]
    cfg = parse_config(raw)
    # qkv bias rows per rank like the weight; the row-parallel dense bias is not split (reference §2.2)
    assert local_shape(cfg, qkv_bias, 2) == ((2 + 2 * 1) * 16,)
    assert local_shape(cfg, dense_bias, 2) == (64,)


def test_biases_without_the_flag_are_unknown():
    raw, available = _small()
    available["model.layers.0.self_attn.q_proj.bias"] = (64,)
    with pytest.raises(CheckpointError, match="q_proj.bias"):
        resolve_tensors(parse_config(raw), available)
