"""`yitrt quantize` calibrating on CUDA (the model in its own dtype on the GPU; several GPUs: device_map) gives a
checkpoint that verify passes, and reports peak GPU memory. Needs a CUDA GPU and nvidia-modelopt."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("scheme", ["fp8", "int4-awq"])
def test_quantize_on_cuda_then_verify(make_model, tmp_path, scheme):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("modelopt.torch.quantization")
    from yitrt.quant.calibrate import QuantizeRequest, quantize
    from yitrt.reference.verify import VerifyRequest, verify

    hf = make_model(overrides={"intermediate_size": 512, "num_key_value_heads": 4}, dtype="float16", seed=3, tokenizer=True, head_std=0.25)
    result = quantize(QuantizeRequest(hf, tmp_path / "q", scheme, device="cuda", calib_size=8, calib_seq_len=64))
    assert result.calibration["device"].startswith("cuda") and result.peak_device_bytes and max(result.peak_device_bytes) > 0
    report = verify(VerifyRequest(tmp_path / "q", hf, device="cpu", max_new_tokens=2))
    # calibrated in float16 on the GPU, verified in float32 on the CPU: the pipeline bound still holds
    assert report.pipeline.ran and report.passed, report.failures
