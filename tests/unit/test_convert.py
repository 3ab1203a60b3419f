"""Conversion end to end on tiny synthetic models: layouts, schemes, naming variants, caching, atomicity."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.errors import ArtifactError, CheckpointError, UnsupportedModelError, ValidationError
from yitrt.manifest import MANIFEST_NAME, hash_file


def _hf(folder):
    """All HF tensors of a synthetic folder."""
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_tp2_pp2_layout_and_values(make_model, tmp_path):
    src = make_model(shards=3)  # multi-shard input with an index
    hf = _hf(src)
    out = tmp_path / "ckpt"
    result = convert(ConvertRequest(src, out, tp=2, pp=2))
    assert result.world_size == 4 and not result.reused
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["num_key_value_heads"] == 2
    ranks = [load_file(out / f"rank{r}.safetensors") for r in range(4)]
    # stage 1 (ranks 2, 3) holds global layers 2, 3 renumbered 0, 1; fc ← gate_proj, gate ← up_proj
    assert torch.equal(ranks[3]["transformer.layers.0.mlp.fc.weight"], hf["model.layers.2.mlp.gate_proj.weight"][344:])
    assert torch.equal(ranks[2]["transformer.layers.1.mlp.gate.weight"], hf["model.layers.3.mlp.up_proj.weight"][:344])
    assert torch.equal(ranks[1]["transformer.layers.0.attention.dense.weight"], hf["model.layers.0.self_attn.o_proj.weight"][:, 128:])
    assert "transformer.vocab_embedding.weight" in ranks[0] and "transformer.vocab_embedding.weight" not in ranks[2]
    assert "lm_head.weight" in ranks[3] and "lm_head.weight" not in ranks[1]
    assert "transformer.ln_f.weight" in ranks[2] and "transformer.ln_f.weight" not in ranks[0]
    assert not any(".layers.2." in n for r in ranks for n in r)


def test_legacy_yi_naming_gives_the_same_checkpoint(make_model, tmp_path):
    llama = make_model("llama", seed=7)
    legacy = make_model("legacy", seed=7, legacy_yi=True)
    convert(ConvertRequest(llama, tmp_path / "a", tp=2))
    convert(ConvertRequest(legacy, tmp_path / "b", tp=2))
    for rank in range(2):
        a, b = load_file(tmp_path / "a" / f"rank{rank}.safetensors"), load_file(tmp_path / "b" / f"rank{rank}.safetensors")
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["architecture"] == "LlamaForCausalLM"


def test_tied_embeddings_write_lm_head_from_the_embedding(make_model, tmp_path):
    src = make_model(tied=True, overrides={"vocab_size": 511})  # 511 % 2 != 0: padded rows
    hf = _hf(src)
    convert(ConvertRequest(src, tmp_path / "c", tp=2))
    heads = [load_file(tmp_path / "c" / f"rank{r}.safetensors")["lm_head.weight"] for r in range(2)]
    assert heads[0].shape == (256, 256) and heads[1].shape == (256, 256)
    assert torch.equal(torch.cat(heads)[:511], hf["model.embed_tokens.weight"])
    assert torch.count_nonzero(heads[1][255:]) == 0


def test_gqa_duplication_at_tp_above_kv_heads(make_model, tmp_path):
    src = make_model()  # 8 heads, 2 KV heads, head_dim 32
    hf = _hf(src)
    convert(ConvertRequest(src, tmp_path / "c", tp=4))
    k = hf["model.layers.1.self_attn.k_proj.weight"]
    for rank in range(4):
        qkv = load_file(tmp_path / "c" / f"rank{rank}.safetensors")["transformer.layers.1.attention.qkv.weight"]
        assert qkv.shape == (2 * 32 + 2 * 32, 256)
        head = rank * 2 // 4
        assert torch.equal(qkv[64:96], k[head * 32 : (head + 1) * 32])


def test_float16_dtype_and_fp8_rowwise_with_fp8_kv(make_model, tmp_path):
    src = make_model()
    hf = _hf(src)
    convert(ConvertRequest(src, tmp_path / "f16", dtype="float16"))
    f16 = load_file(tmp_path / "f16" / "rank0.safetensors")
    assert all(t.dtype == torch.float16 for t in f16.values())
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["dtype"] == "float16"

    convert(ConvertRequest(src, tmp_path / "fp8", tp=2, scheme="fp8-rowwise", kv_cache="fp8"))
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg["quantization"] == {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": "FP8", "clamp_val": [-1200.0, 1200.0]}
    r1 = load_file(tmp_path / "fp8" / "rank1.safetensors")
    w = r1["transformer.layers.0.mlp.proj.weight"]
    s = r1["transformer.layers.0.mlp.proj.per_channel_scale"]
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (256,)
    original = hf["model.layers.0.mlp.down_proj.weight"][:, 344:].float()
    # scale = row amax / 448 on the rank's slice; e4m3 has 3 mantissa bits: relative error <= 2^-4
    assert torch.allclose(s, original.abs().amax(dim=1) / 448)
    deq = w.float() * s[:, None]
    assert ((deq - original).abs() <= original.abs() * 2**-4 + 1e-6).all()
    assert r1["transformer.layers.0.attention.kv_cache_scaling_factor"].tolist() == [1.0]
    assert r1["lm_head.weight"].dtype == torch.bfloat16  # lm_head stays in the model dtype
    assert r1["transformer.layers.0.input_layernorm.weight"].dtype == torch.bfloat16


def test_weight_only_schemes_keep_full_precision_weights(tmp_path, make_model):
    src = make_model(overrides={"intermediate_size": 768})
    hf = _hf(src)
    convert(ConvertRequest(src, tmp_path / "w4", tp=2, scheme="w4a16"))
    cfg = json.loads((tmp_path / "w4" / "config.json").read_text())
    assert cfg["quantization"] == {"quant_algo": "W4A16", "kv_cache_quant_algo": None}
    r0 = load_file(tmp_path / "w4" / "rank0.safetensors")
    assert torch.equal(r0["transformer.layers.0.mlp.fc.weight"], hf["model.layers.0.mlp.gate_proj.weight"][:384])


def test_rerun_is_a_noop_and_force_redoes(make_model, tmp_path):
    src = make_model()
    out = tmp_path / "c"
    convert(ConvertRequest(src, out, tp=2))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = convert(ConvertRequest(src, out, tp=2))
    assert again.reused
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    changed = convert(ConvertRequest(src, out, tp=1))  # different parameters: redone
    assert not changed.reused and not (out / "rank1.safetensors").exists()
    forced = convert(ConvertRequest(src, out, tp=1, force=True))
    assert not forced.reused


def test_manifest_records_parameters_and_file_hashes(make_model, tmp_path):
    src = make_model()
    out = tmp_path / "c"
    convert(ConvertRequest(src, out, tp=2, scheme="fp8-rowwise"))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["stage"] == "convert"
    assert manifest["parameters"]["tp"] == 2 and manifest["parameters"]["scheme"] == "fp8-rowwise"
    assert manifest["inputs"]["model"]
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == {"config.json", "rank0.safetensors", "rank1.safetensors"}
    for name, entry in listed.items():
        assert entry["size"] == (out / name).stat().st_size
        assert entry["blake3"] == hash_file(out / name)
    with safe_open(str(out / "rank0.safetensors"), "pt") as f:
        assert f.metadata()["producer"] == "yitrt"


def _no_output(tmp_path, out):
    assert not out.exists()
    assert not list(tmp_path.glob(out.name + ".partial-*"))


@pytest.mark.parametrize(
    ("overrides", "kwargs", "needle"),
    [
        ({}, {"tp": 3}, "does not divide the 8 attention heads"),
        ({"num_attention_heads": 12, "num_key_value_heads": 6, "hidden_size": 384}, {"tp": 4}, "does not divide the 6 KV heads"),
        ({"num_attention_heads": 12, "num_key_value_heads": 4, "hidden_size": 384, "intermediate_size": 696}, {"tp": 6},
         "tp 6 > 4 KV heads needs tp to be a multiple of 4"),
        ({"intermediate_size": 692}, {"tp": 8}, "does not divide intermediate_size 692"),
        ({}, {"pp": 3}, "does not divide the 4 layers"),
        ({}, {"scheme": "int4-awq"}, "needs calibration"),
        ({}, {"scheme": "w8a16", "tp": 2}, "64·tp = 128"),
        ({}, {"kv_cache": "int8"}, "needs calibrated scales"),
    ],
)
def test_invalid_requests_fail_before_writing(make_model, tmp_path, overrides, kwargs, needle):
    src = make_model(overrides=overrides)
    out = tmp_path / "c"
    with pytest.raises(ValidationError) as info:
        convert(ConvertRequest(src, out, **kwargs))
    assert needle in info.value.message and info.value.hint
    _no_output(tmp_path, out)


def test_all_problems_reported_at_once(make_model, tmp_path):
    src = make_model()
    with pytest.raises(ValidationError) as info:
        convert(ConvertRequest(src, tmp_path / "c", tp=3, pp=3, scheme="fp8"))
    problems = info.value.problems
    assert len(problems) == 5, problems
    for needle in ("attention heads", "KV heads", "intermediate_size", "layers", "calibration"):
        assert sum(needle in p for p in problems) == 1, needle


def test_broken_sources_fail_cleanly(make_model, tmp_path):
    src = make_model(shards=2)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        convert(ConvertRequest(src, tmp_path / "c"))
    _no_output(tmp_path, tmp_path / "c")
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        convert(ConvertRequest(src, tmp_path / "c"))
    _no_output(tmp_path, tmp_path / "c")


def test_shape_mismatch_and_unsupported_inputs(make_model, tmp_path):
    src = make_model()
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 700}))
    with pytest.raises(CheckpointError, match="do not match config.json"):
        convert(ConvertRequest(src, tmp_path / "c"))
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="not supported"):
        convert(ConvertRequest(src, tmp_path / "c"))
    (src / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(UnsupportedModelError, match="pre-quantized"):
        convert(ConvertRequest(src, tmp_path / "c"))
    _no_output(tmp_path, tmp_path / "c")


def test_foreign_output_folder_is_refused_and_good_artifact_kept(make_model, tmp_path):
    src = make_model()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not made by yitrt"):
        convert(ConvertRequest(src, foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"

    good = tmp_path / "good"
    convert(ConvertRequest(src, good, tp=2))
    snapshot = {p.name: hash_file(p) for p in good.iterdir()}
    with pytest.raises(ValidationError):
        convert(ConvertRequest(src, good, tp=3))
    assert {p.name: hash_file(p) for p in good.iterdir()} == snapshot


def test_interrupted_conversion_leaves_previous_artifact(make_model, tmp_path, monkeypatch):
    src = make_model()
    good = tmp_path / "good"
    convert(ConvertRequest(src, good))
    snapshot = {p.name: hash_file(p) for p in good.iterdir()}
    import yitrt.checkpoint.convert as conv

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "copy_pieces", explode)
    with pytest.raises(KeyboardInterrupt):
        convert(ConvertRequest(src, good, force=True))
    assert {p.name: hash_file(p) for p in good.iterdir()} == snapshot
    assert not list(tmp_path.glob("good.partial-*")) and not list(tmp_path.glob("good.old-*"))


def test_stale_partial_of_a_dead_process_is_removed(make_model, tmp_path):
    src = make_model()
    stale = tmp_path / f"c.partial-{2**22 + 12345}"
    stale.mkdir()
    (stale / "rank0.safetensors").write_bytes(b"half")
    convert(ConvertRequest(src, tmp_path / "c"))
    assert not stale.exists() and (tmp_path / "c" / "rank0.safetensors").exists()
    assert os.path.getsize(tmp_path / "c" / "rank0.safetensors") > 1000


def test_artifact_of_another_stage_and_the_source_folder_are_refused(make_model, tmp_path):
    src = make_model()
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    (fetched / MANIFEST_NAME).write_text(json.dumps({"stage": "fetch", "key": "k", "files": []}))
    with pytest.raises(ArtifactError, match="fetch artifact"):
        convert(ConvertRequest(src, fetched))
    with pytest.raises(ArtifactError, match="not made by yitrt|model folder itself"):
        convert(ConvertRequest(src, src))
    assert (src / "config.json").exists()


@pytest.mark.parametrize(("stored", "declared", "expected"), [("bfloat16", "float32", "bfloat16"), ("float32", "float32", "float16"), ("float16", None, "float16")])
def test_auto_dtype_follows_the_stored_weights(make_model, tmp_path, stored, declared, expected):
    src = make_model(dtype=stored, overrides={"torch_dtype": declared})
    result = convert(ConvertRequest(src, tmp_path / "c"))
    assert result.config["dtype"] == expected
    assert all(t.dtype == getattr(torch, expected) for t in load_file(tmp_path / "c" / "rank0.safetensors").values())
