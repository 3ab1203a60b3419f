"""Our bf16 checkpoint equals NVIDIA ModelOpt's ``export_tensorrt_llm_checkpoint`` tensor for tensor.

ModelOpt is an independent implementation of the same contract (reference §7), so agreement on every name,
shape, dtype and value at several TP/PP layouts — including KV-head repetition at tp 4 > 2 KV heads — is strong
evidence that both follow TensorRT-LLM's rules.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
export = pytest.importorskip("modelopt.torch.export")
from safetensors.torch import load_file  # noqa: E402

from yitrt.checkpoint.convert import ConvertRequest, convert  # noqa: E402

pytestmark = pytest.mark.integration

#: Config keys both producers must agree on (ModelOpt adds its own extras and writes logits_dtype float16).
SHARED_KEYS = (
    "architecture", "dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_size", "intermediate_size", "hidden_act", "norm_epsilon",
    "position_embedding_type", "max_position_embeddings", "use_parallel_embedding", "embedding_sharding_dim", "mapping",
)


@pytest.fixture(scope="module")
def tiny_yi(tmp_path_factory):
    """A tiny Yi-shaped Llama (GQA 8 heads / 2 KV heads) built in-process and saved as bf16."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=8, num_key_value_heads=2, intermediate_size=688, vocab_size=512,
        num_hidden_layers=4, rope_theta=5e6, max_position_embeddings=4096, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    folder = tmp_path_factory.mktemp("tiny-yi")
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_bf16_checkpoint_equals_modelopt_export(tiny_yi, tmp_path, tp, pp):
    model, hf_dir = tiny_yi
    ours, theirs = tmp_path / "yitrt", tmp_path / "modelopt"
    export.export_tensorrt_llm_checkpoint(
        model, decoder_type="llama", dtype=torch.bfloat16, export_dir=str(theirs),
        inference_tensor_parallel=tp, inference_pipeline_parallel=pp,
    )
    convert(ConvertRequest(hf_dir, ours, tp=tp, pp=pp))

    our_cfg = json.loads((ours / "config.json").read_text())
    their_cfg = json.loads((theirs / "config.json").read_text())
    for key in SHARED_KEYS:
        assert our_cfg[key] == their_cfg[key], key
    assert our_cfg["quantization"]["quant_algo"] is None and their_cfg["quantization"]["quant_algo"] is None
    assert our_cfg["rotary_base"] == 5e6

    for rank in range(tp * pp):
        a = load_file(ours / f"rank{rank}.safetensors")
        b = load_file(theirs / f"rank{rank}.safetensors")
        assert sorted(a) == sorted(b), f"rank {rank} tensor names differ"
        for name in b:
            assert a[name].dtype == b[name].dtype, name
            assert a[name].shape == b[name].shape, name
            assert torch.equal(a[name], b[name]), f"rank {rank}: {name} differs"


def test_replicated_embedding_equals_gathered_modelopt_embedding(tiny_yi, tmp_path):
    """Without parallel embedding each rank holds the whole table: ModelOpt's row shards gathered."""
    model, hf_dir = tiny_yi
    tp = 2
    ours, theirs = tmp_path / "yitrt", tmp_path / "modelopt"
    export.export_tensorrt_llm_checkpoint(model, decoder_type="llama", dtype=torch.bfloat16, export_dir=str(theirs), inference_tensor_parallel=tp)
    convert(ConvertRequest(hf_dir, ours, tp=tp, parallel_embedding=False))
    name = "transformer.vocab_embedding.weight"
    gathered = torch.cat([load_file(theirs / f"rank{r}.safetensors")[name] for r in range(tp)])
    for rank in range(tp):
        assert torch.equal(load_file(ours / f"rank{rank}.safetensors")[name], gathered)
    assert json.loads((ours / "config.json").read_text())["use_parallel_embedding"] is False


def _fp8_bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def test_fp8_rowwise_equals_modelopt_fp8_per_channel_per_token(tmp_path):
    """Data-free FP8 rowwise against ModelOpt's FP8_PER_CHANNEL_PER_TOKEN export (weights need no calibration).

    tp 1: bit-for-bit. tp 2: column-parallel layers bit-for-bit; row-parallel layers (dense, proj) differ by
    design — yitrt takes each row's scale over the rank's slice, as TensorRT-LLM's own converter does, ModelOpt over
    the whole row — so there the dequantized weights are compared, within e4m3's rounding.
    """
    mtq = pytest.importorskip("modelopt.torch.quantization")
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=8, num_key_value_heads=2, intermediate_size=768, vocab_size=512,
        num_hidden_layers=2, rope_theta=5e6,
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 512, (2, 16))
    model = mtq.quantize(model, mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG, lambda m: m(ids))
    for tp in (1, 2):
        theirs, ours = tmp_path / f"modelopt{tp}", tmp_path / f"yitrt{tp}"
        export.export_tensorrt_llm_checkpoint(model, decoder_type="llama", dtype=torch.bfloat16, export_dir=str(theirs), inference_tensor_parallel=tp)
        convert(ConvertRequest(tmp_path / "hf", ours, tp=tp, scheme="fp8-rowwise"))
        assert json.loads((ours / "config.json").read_text())["quantization"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
        for rank in range(tp):
            a = load_file(ours / f"rank{rank}.safetensors")
            b = load_file(theirs / f"rank{rank}.safetensors")
            assert sorted(a) == sorted(b)
            for name in b:
                assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
                row_parallel = tp > 1 and (".attention.dense." in name or ".mlp.proj." in name)
                if not row_parallel:
                    assert torch.equal(_fp8_bits(a[name]), _fp8_bits(b[name])), f"tp {tp} rank {rank}: {name}"
                elif name.endswith(".weight"):
                    scale = name.removesuffix("weight") + "per_channel_scale"
                    ours_w = a[name].float() * a[scale][:, None]
                    their_w = b[name].float() * b[scale][:, None]
                    assert torch.allclose(ours_w, their_w, rtol=2**-3, atol=1e-4), name
