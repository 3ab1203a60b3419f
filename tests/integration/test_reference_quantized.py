"""Quantized formats: the reference runtime reads NVIDIA ModelOpt's TensorRT-LLM exports and computes what
ModelOpt's own fake-quantized model computes, layer by layer.

ModelOpt is the independent oracle here: it calibrated the scales, wrote the checkpoint, and its fake
quantization is the arithmetic the format stands for. Per layer (the row-parallel dense and proj, whose
exported tensors ModelOpt does not re-fuse), the emulation must sit much closer to ModelOpt's output than the
unquantized layer does. The remaining gap is TensorRT-LLM's own choices (documented in yitrt/reference/linear.py:
the FP8 activation scale rounded to the model dtype, FP8 weights for the W4A8 MMA, the prequant scale stored
in the model dtype), which flip a few roundings.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from yitrt.models.config import load_config
from yitrt.reference.linear import Step
from yitrt.reference.model import make_linear
from yitrt.reference.runtime import ReferenceRuntime
from yitrt.reference.spec import load_spec
from yitrt.synthetic import SyntheticSpec, write_synthetic_model

pytestmark = pytest.mark.integration
mtq = pytest.importorskip("modelopt.torch.quantization")
export = pytest.importorskip("modelopt.torch.export")

#: ModelOpt config → (quant_algo it exports, max |emulation − ModelOpt| / |unquantized − ModelOpt| per layer)
CASES = {
    "FP8_DEFAULT_CFG": ("FP8", 0.7),
    "INT8_SMOOTHQUANT_CFG": ("W8A8_SQ_PER_CHANNEL", 0.5),
    "INT4_AWQ_CFG": ("W4A16_AWQ", 0.02),
    "W4A8_AWQ_BETA_CFG": ("W4A8_AWQ", 0.7),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("modelopt")
    # intermediate 512 so that every AWQ split is a multiple of the 128-wide groups
    hf = write_synthetic_model(root / "hf", SyntheticSpec(overrides=(("intermediate_size", 512),), dtype="float16", seed=2))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float16).float().eval()
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 512, (1, 64), generator=gen) for _ in range(8)]
    return root, model, calib


def _quantize_and_export(base, name: str, tp: int):
    root, model, calib = base
    quantized = copy.deepcopy(model)
    mtq.quantize(quantized, copy.deepcopy(getattr(mtq, name)), lambda m: [m(c) for c in calib])
    out = root / f"{name}-tp{tp}"
    export.export_tensorrt_llm_checkpoint(quantized, "llama", torch.float16, export_dir=out, inference_tensor_parallel=tp)
    config = json.loads((out / "config.json").read_text())
    config["rotary_base"] = load_config(root / "hf").rope_theta  # ModelOpt 0.47 omits it (issue #4 writes it)
    (out / "config.json").write_text(json.dumps(config))
    return quantized, out


def _layer_input(model, module, calib) -> torch.Tensor:
    seen = {}
    handle = module.register_forward_hook(lambda mod, args, out: seen.update(x=args[0].detach()) or None)
    with torch.no_grad():
        model(calib[0])
    handle.remove()
    return seen["x"][0]


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_layers_track_modelopt(base, name):
    from safetensors.torch import load_file

    algo, max_ratio = CASES[name]
    _, model, calib = base
    quantized, ckpt = _quantize_and_export(base, name, tp=1)
    spec = load_spec(ckpt)
    assert spec.quant_algo == algo
    tensors = load_file(str(ckpt / "rank0.safetensors"))
    for hf_name, trt_name in (("self_attn.o_proj", "attention.dense"), ("mlp.down_proj", "mlp.proj")):
        fake = quantized.model.layers[1].get_submodule(hf_name)
        x = _layer_input(quantized, fake, calib)
        with torch.no_grad():
            oracle = fake(x)
        layer = make_linear(spec, f"transformer.layers.1.{trt_name}", tensors, torch.float32, Step(tokens=x.shape[0]))
        ours = layer(x)
        unquantized = x @ model.model.layers[1].get_submodule(hf_name).weight.T
        gap, quantization_effect = (ours - oracle).abs().max(), (unquantized - oracle).abs().max()
        assert gap <= max_ratio * quantization_effect, f"{hf_name}: {gap:.3g} vs {quantization_effect:.3g}"


def test_modelopt_export_runs_at_tp2(base):
    _, model, calib = base
    quantized, ckpt = _quantize_and_export(base, "INT4_AWQ_CFG", tp=2)
    seqs = [c[0, :24].tolist() for c in calib[:2]]
    with torch.no_grad():
        oracle = [quantized(torch.tensor([s])).logits[0] for s in seqs]
    with ReferenceRuntime(ckpt, device="cpu") as runtime:
        got = runtime.score(seqs)
    for a, b in zip(got, oracle, strict=True):
        assert torch.isfinite(a).all()
        # whole model: ModelOpt re-fuses q/k/v and fc/gate scales on export, so allow more than per layer
        assert (a - b).abs().max() < 0.5 * b.abs().max()
