"""A truncated self-draft: the first N decoder layers with the embedding, final norm and lm_head, from a Hugging Face
folder (`convert --keep-layers`) or an existing checkpoint (`truncate_checkpoint`); it runs in the reference runtime,
answers differently from the full model and shares its embedding and lm_head tensors exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.checkpoint.truncate import layer_of, truncate_checkpoint, truncated_config
from yitrt.errors import ArtifactError, CheckpointError, ValidationError
from yitrt.manifest import MANIFEST_NAME, read_manifest
from yitrt.reference.runtime import ReferenceRuntime

SHARED = ("transformer.vocab_embedding.weight", "lm_head.weight", "transformer.ln_f.weight")


@pytest.fixture
def full(make_model, tmp_path):
    """A tiny 4-layer model (clear top-1 tokens) and its full tp-1 checkpoint."""
    src = make_model(head_std=1.0)
    out = tmp_path / "full"
    convert(ConvertRequest(src, out))
    return src, out


def _tensors(folder, rank=0):
    return load_file(folder / f"rank{rank}.safetensors")


def test_a_truncated_checkpoint_keeps_the_first_layers_and_the_shared_tensors(full, tmp_path):
    src, ckpt = full
    result = truncate_checkpoint(ckpt, tmp_path / "draft", 2)
    assert (result.layers, result.source_layers, result.world_size, result.reused) == (2, 4, 1, False)
    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert {k: v for k, v in config.items() if k != "num_hidden_layers"} == \
        {k: v for k, v in json.loads((ckpt / "config.json").read_text()).items() if k != "num_hidden_layers"}
    whole, draft = _tensors(ckpt), _tensors(tmp_path / "draft")
    assert {layer_of(n) for n in draft} == {None, 0, 1}
    assert result.dropped_tensors == sum(1 for n in whole if (layer_of(n) or 0) >= 2)
    for name in draft:  # every kept tensor is the full checkpoint's, bit for bit
        assert torch.equal(draft[name], whole[name]), name
    assert all(name in draft for name in SHARED)
    manifest = read_manifest(tmp_path / "draft")
    assert manifest.stage == "truncate" and manifest.parameters == {"layers": 2, "source_layers": 4}
    assert {f["path"] for f in manifest.files} == {"config.json", "rank0.safetensors"}
    again = truncate_checkpoint(ckpt, tmp_path / "draft", 2)
    assert again.reused


def test_the_draft_runs_in_the_reference_runtime_and_differs_from_the_full_model(full, tmp_path):
    _, ckpt = full
    truncate_checkpoint(ckpt, tmp_path / "draft", 2)
    prompt = [[1, 17, 42, 99, 7, 3, 250, 11]]
    target, draft = ReferenceRuntime(ckpt, device="cpu"), ReferenceRuntime(tmp_path / "draft", device="cpu")
    try:
        assert draft.spec.num_layers == 2 and target.spec.num_layers == 4
        t_logits, d_logits = target.score(prompt)[0], draft.score(prompt)[0]
        assert d_logits.shape == t_logits.shape and torch.isfinite(d_logits).all()
        assert not torch.allclose(t_logits, d_logits)  # a weaker model, not the same one
        t_out, d_out = target.generate(prompt, max_new_tokens=8), draft.generate(prompt, max_new_tokens=8)
        assert len(d_out[0]) == 8 and d_out != t_out
    finally:
        target.close()
        draft.close()


def test_convert_keep_layers_writes_the_same_draft_from_the_hf_folder(full, tmp_path):
    src, ckpt = full
    converted = convert(ConvertRequest(src, tmp_path / "kept", keep_layers=2))
    assert converted.config["num_hidden_layers"] == 2
    truncate_checkpoint(ckpt, tmp_path / "truncated", 2)
    a, b = _tensors(tmp_path / "kept"), _tensors(tmp_path / "truncated")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "kept" / "config.json").read_text()) == json.loads((tmp_path / "truncated" / "config.json").read_text())
    assert read_manifest(tmp_path / "kept").parameters["keep_layers"] == 2
    # a different N is a different artifact, not a reuse of this one
    assert not convert(ConvertRequest(src, tmp_path / "kept", keep_layers=3)).reused


def test_keep_layers_at_tp2_pp2_and_its_limits(make_model, tmp_path):
    src = make_model()
    out = tmp_path / "tp2pp2"
    convert(ConvertRequest(src, out, tp=2, pp=2, keep_layers=2))  # one kept layer per stage
    ranks = [_tensors(out, r) for r in range(4)]
    assert all({layer_of(n) for n in r} - {None} == {0} for r in ranks)
    assert "lm_head.weight" in ranks[3] and "transformer.vocab_embedding.weight" in ranks[0]
    with pytest.raises(ValidationError, match="exceeds the model's 4 decoder layers"):
        convert(ConvertRequest(src, tmp_path / "x", keep_layers=5))
    with pytest.raises(ValidationError, match="pp"):
        convert(ConvertRequest(src, tmp_path / "y", pp=2, keep_layers=1))  # 1 layer cannot fill 2 stages
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_tp2_checkpoints_truncate_every_rank(make_model, tmp_path):
    src = make_model()
    convert(ConvertRequest(src, tmp_path / "tp2", tp=2))
    result = truncate_checkpoint(tmp_path / "tp2", tmp_path / "draft", 1)
    assert result.world_size == 2
    for rank in range(2):
        whole, draft = _tensors(tmp_path / "tp2", rank), _tensors(tmp_path / "draft", rank)
        assert {layer_of(n) for n in draft} == {None, 0} and all(torch.equal(draft[k], whole[k]) for k in draft)


def test_refusals_leave_nothing_behind(make_model, full, tmp_path):
    _, ckpt = full
    with pytest.raises(ValidationError, match="--layers 9 exceeds the model's 4"):
        truncate_checkpoint(ckpt, tmp_path / "a", 9)
    with pytest.raises(ValidationError, match="positive integer"):
        truncate_checkpoint(ckpt, tmp_path / "a", 0)
    with pytest.raises(ArtifactError, match="source checkpoint itself"):
        truncate_checkpoint(ckpt, ckpt, 2)
    convert(ConvertRequest(make_model("pp"), tmp_path / "pp2", pp=2))
    with pytest.raises(ValidationError, match="pipeline stages"):
        truncate_checkpoint(tmp_path / "pp2", tmp_path / "a", 1)
    with pytest.raises(CheckpointError, match="not a TensorRT-LLM checkpoint"):
        truncate_checkpoint(make_model("hf"), tmp_path / "a", 1)
    # a config that claims more layers than the rank file holds
    liar = tmp_path / "liar"
    liar.mkdir()
    config = json.loads((ckpt / "config.json").read_text())
    (liar / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    (liar / "rank0.safetensors").write_bytes((ckpt / "rank0.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="config.json says 6"):
        truncate_checkpoint(liar, tmp_path / "a", 2)
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob("a.partial-*"))
    assert (ckpt / MANIFEST_NAME).is_file()


def test_exclude_modules_of_dropped_layers_go():
    config = {"num_hidden_layers": 4, "quantization": {"exclude_modules": ["lm_head", "*vocab_embedding", "transformer.layers.3.mlp",
                                                                           "transformer.layers.1.attention"]}}
    out = truncated_config(config, 2)
    assert out["num_hidden_layers"] == 2 and out["quantization"]["exclude_modules"] == ["lm_head", "*vocab_embedding", "transformer.layers.1.attention"]
    assert config["num_hidden_layers"] == 4  # the source config is not changed


def test_truncate_cli(cli, full, tmp_path):
    _, ckpt = full
    result = cli("truncate", str(ckpt), "--out", str(tmp_path / "d"), "--layers", "3", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["layers"] == 3 and data["source_layers"] == 4
    bad = cli("truncate", str(ckpt), "--out", str(tmp_path / "e"), "--layers", "7")
    assert bad.returncode == 3 and "exceeds" in bad.stderr
