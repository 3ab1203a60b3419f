"""`yitrt quantize` with NVIDIA ModelOpt on a tiny Yi-shaped model: every calibrated scheme, with and without
a quantized KV cache, at tp 1 and 2, exports a checkpoint that `yitrt verify` passes with zero pipeline error;
broken exports fail; invalid requests fail before anything is loaded or written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import run_cli
from yitrt.errors import CheckpointError, UsageError, ValidationError
from yitrt.manifest import read_manifest
from yitrt.quant.calibrate import QuantizeRequest, quantize
from yitrt.reference.verify import VerifyRequest, verify
from yitrt.synthetic import SyntheticSpec, write_synthetic_model

pytestmark = pytest.mark.integration
pytest.importorskip("modelopt.torch.quantization")

CALIB = {"calib_size": 8, "calib_seq_len": 64}
EVAL = {"eval_tokens": 256, "window": 128}  # recorded at quantize time and used by verify (smaller than the defaults, for speed)
#: (scheme, KV cache, tp): each scheme without and with KV quantization, at tp 1 and 2
CASES = [
    ("fp8", None, 1), ("fp8", "fp8", 2),
    ("int8-sq", None, 2), ("int8-sq", "int8", 1),
    ("int4-awq", None, 1), ("int4-awq", "fp8", 2),
    ("w4a8-awq", None, 2), ("w4a8-awq", "fp8", 1),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # hidden 256, 8 heads of 32, 4 KV heads, intermediate 512: every linear dim is a multiple of 128·2, so AWQ
    # groups never straddle ranks and TensorRT-LLM pads nothing at tp 2; float16 so that W4A8 can be built;
    # a wide lm_head so that top-1 tokens are clear rather than near-ties of a random model
    root = tmp_path_factory.mktemp("quantize")
    spec = SyntheticSpec(overrides=(("intermediate_size", 512), ("num_key_value_heads", 4)), dtype="float16", seed=3,
                         tokenizer=True, head_std=0.25)
    return root, write_synthetic_model(root / "hf", spec)


def _quantize(tiny, scheme, kv, tp, name=None, **extra):
    root, hf = tiny
    out = root / (name or f"{scheme}-{kv}-tp{tp}")
    request = QuantizeRequest(hf, out, scheme, kv, tp=tp, device="cpu", eval_tokens=EVAL["eval_tokens"], eval_window=EVAL["window"],
                              **{**CALIB, **extra})
    return quantize(request), out


def _copy(tiny, scheme, kv, tp, name):
    """A copy of a case's artifact (quantized by the parametrized test, or now) to break or re-run."""
    _, out = _quantize(tiny, scheme, kv, tp)  # reused when the parametrized case already made it
    copy = out.parent / name
    shutil.copytree(out, copy)
    return copy


def _verify(ckpt, hf, **extra):
    return verify(VerifyRequest(ckpt, hf, max_new_tokens=2, device="cpu", **EVAL, **extra))


@pytest.mark.parametrize(("scheme", "kv", "tp"), CASES)
def test_calibrated_scheme_exports_and_verifies(tiny, scheme, kv, tp):
    result, out = _quantize(tiny, scheme, kv, tp)
    config = json.loads((out / "config.json").read_text())
    assert config["rotary_base"] == json.loads((tiny[1] / "config.json").read_text())["rope_theta"]  # ModelOpt 0.47 omits it
    assert config["mapping"]["tp_size"] == tp and config["logits_dtype"] == "float32"
    assert sorted(result.files) == sorted(["config.json", *[f"rank{r}.safetensors" for r in range(tp)]])
    data = result.to_json()
    assert data["calibration"]["sequences"] == 8 and data["calibration"]["tokens"] == 8 * 64
    assert data["calibration_seconds"] > 0 and data["peak_rss_bytes"] > 0 and data["peak_device_bytes"] is None
    extra = read_manifest(out).extra
    assert extra["fake_quant"]["weights_only"]["ppl"] > 1 and len(extra["fake_quant"]["weights_only"]["top1"]) == 2  # 2 windows
    report = _verify(out, tiny[1])
    pipe = report.pipeline
    assert pipe.ran and pipe.failures == [], pipe.failures
    assert pipe.top1_agreement >= 0.99 and abs(pipe.ppl_delta_pct) <= 1.0
    expected_scales = 4 * ((5 if scheme != "int4-awq" else 0) + (1 if kv else 0))
    assert pipe.scales_checked == expected_scales
    assert report.passed, report.failures


def test_quantization_loss_is_a_warning_and_a_broken_export_fails(tiny):
    out = _copy(tiny, "fp8", None, 1, "fp8-tamper-base")
    hf = tiny[1]
    strict = _verify(out, hf, thresholds={"min_top1": 0.9999, "max_ppl_delta_pct": 1e-6})
    assert strict.passed and any(w.startswith("quantization loss:") for w in strict.warnings)
    from safetensors.torch import load_file, save_file

    for tensor, needle in (("mlp.proj.weights_scaling_factor", "perplexity"), ("mlp.proj.activation_scaling_factor", "scales differ")):
        broken = out.parent / f"fp8-broken-{tensor.split('.')[-1]}"
        shutil.copytree(out, broken)
        tensors = load_file(str(broken / "rank0.safetensors"))
        tensors[f"transformer.layers.1.{tensor}"] = tensors[f"transformer.layers.1.{tensor}"] * 2
        save_file(tensors, str(broken / "rank0.safetensors"), metadata={"format": "pt"})
        report = _verify(broken, hf)
        assert not report.passed and any("pipeline error" in f and needle in f for f in report.failures), report.failures


def test_swapped_int4_nibbles_fail_verify(tiny):
    from safetensors.torch import load_file, save_file

    broken = _copy(tiny, "int4-awq", None, 1, "awq-swapped")
    tensors = load_file(str(broken / "rank0.safetensors"))
    for name, t in tensors.items():
        if t.dtype == torch.int8 and name.endswith(".weight"):
            b = t.view(torch.uint8)
            tensors[name] = ((b << 4) | (b >> 4)).view(torch.int8)  # high and low int4 swapped in every byte
    save_file(tensors, str(broken / "rank0.safetensors"), metadata={"format": "pt"})
    report = _verify(broken, tiny[1])
    assert not report.passed and any("pipeline error" in f for f in report.failures), report.failures


def test_rerun_is_reused_and_force_redoes(tiny):
    out = _copy(tiny, "fp8", None, 1, "fp8-reuse")
    before = read_manifest(out)
    again, _ = _quantize(tiny, "fp8", None, 1, name="fp8-reuse")
    assert again.reused and read_manifest(out).created == before.created
    changed, _ = _quantize(tiny, "fp8", None, 1, name="fp8-reuse", seed=1)  # other calibration → redone
    assert not changed.reused and read_manifest(out).key != before.key
    assert changed.fake_quant["windows_digest"] == before.extra["fake_quant"]["windows_digest"]


def _config_only(tmp_path, **dims):
    folder = tmp_path / "cfg"
    folder.mkdir()
    raw = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "max_position_embeddings": 8192,
           "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", **dims}
    (folder / "config.json").write_text(json.dumps(raw))
    return folder  # no weights: any attempt to load would fail with a different error


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"scheme": "fp8", "tp": 2}, "does not divide the 9 attention heads"),
    ({"scheme": "int4-awq"}, "hidden 576"),
    ({"scheme": "w4a8-awq"}, "max(128, group size 128)"),
    ({"scheme": "int4-awq", "awq_block_size": 32}, "not 32"),
    ({"scheme": "fp8", "awq_block_size": 64}, "AWQ schemes only"),
    ({"scheme": "fp8", "gpu": "A100"}, "SM >= 89"),
    ({"scheme": "int8-sq", "gpu": "B200"}, "above SM 99"),
    ({"scheme": "fp8", "kv_cache": "int8", "gpu": "B200"}, "int8 KV cache"),
    ({"scheme": "w4a8-awq", "dtype": "bfloat16", "awq_block_size": 128}, "float16"),
])
def test_invalid_requests_fail_before_loading(tmp_path, kwargs, needle):
    out = tmp_path / "q"
    with pytest.raises(ValidationError) as info:
        quantize(QuantizeRequest(_config_only(tmp_path), out, device="cpu", **kwargs))
    assert any(needle in p for p in info.value.problems), info.value.problems
    assert info.value.hint and not out.exists() and not list(tmp_path.glob("q.*"))


def test_bad_calibration_file_fails_before_loading(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "wrong field"}\n')
    with pytest.raises(UsageError) as info:
        quantize(QuantizeRequest(_config_only(tmp_path, hidden_size=512, num_attention_heads=8, num_key_value_heads=4),
                                 tmp_path / "q", "fp8", calib=bad))
    assert "bad.jsonl:2" in info.value.message and not (tmp_path / "q").exists()


def test_cli_validation_is_one_line_and_json(tmp_path):
    cfg = _config_only(tmp_path)
    proc = run_cli("quantize", str(cfg), "--scheme", "int4-awq", "--tp", "3", "--out", str(tmp_path / "q"), "--json")
    err = json.loads(proc.stdout)
    assert proc.returncode == ValidationError.exit_code and not err["ok"]
    assert "hidden 576" in err["error"]["message"] and "--awq-block-size 64" in err["error"]["hint"]
    human = run_cli("quantize", str(cfg), "--scheme", "w8a16", "--calib-size", "8", "--out", str(tmp_path / "q"))
    assert human.returncode == UsageError.exit_code and len(human.stderr.strip().splitlines()) == 1
    assert "apply to calibrated schemes" in human.stderr and not (tmp_path / "q").exists()


def test_export_that_breaks_its_config_is_not_published(tiny, monkeypatch):
    from yitrt.quant import calibrate

    def drop_a_tensor(model, folder, dtype, tp, pp):  # a double of ModelOpt's exporter that loses one tensor
        real_export(model, folder, dtype, tp, pp)
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "rank0.safetensors"))
        del tensors["transformer.layers.0.mlp.proj.weight"]
        save_file(tensors, str(folder / "rank0.safetensors"))

    real_export = calibrate._export
    monkeypatch.setattr(calibrate, "_export", drop_a_tensor)
    root, _ = tiny
    with pytest.raises(CheckpointError) as info:
        _quantize(tiny, "fp8", None, 1, name="fp8-dropped")
    assert "mlp.proj.weight" in info.value.message
    assert not (root / "fp8-dropped").exists() and not list(root.glob("fp8-dropped.*"))


def test_awq_vocab_padding_is_undone(tmp_path):
    # ModelOpt pads the vocab of AWQ exports to a multiple of 64 and raises vocab_size; the padded rows would be
    # real tokens to the engine, so yitrt cuts them back (vocab 500 at tp 2: 250 rows per rank, no padding)
    spec = SyntheticSpec(overrides=(("intermediate_size", 512), ("num_key_value_heads", 4), ("vocab_size", 500)),
                         dtype="float16", seed=4, tokenizer=True, head_std=0.25)
    hf = write_synthetic_model(tmp_path / "hf", spec)
    out = tmp_path / "awq"
    quantize(QuantizeRequest(hf, out, "int4-awq", tp=2, device="cpu", eval_tokens=EVAL["eval_tokens"], eval_window=EVAL["window"], **CALIB))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 500
    from safetensors import safe_open

    for rank in (0, 1):
        with safe_open(str(out / f"rank{rank}.safetensors"), framework="pt") as f:
            assert f.get_slice("lm_head.weight").get_shape()[0] == 250
            assert f.get_slice("transformer.vocab_embedding.weight").get_shape()[0] == 250
    report = _verify(out, hf)
    assert report.passed and report.pipeline.ran and report.pipeline.top1_agreement >= 0.99, report.failures
