"""`yitrt quantize` then `yitrt verify` on the demo model (real weights, bf16) from the command line.

FP8 runs here. The AWQ schemes are slow on a 2-core CPU (ModelOpt's AWQ search runs a forward pass per layer and
candidate scale), so int4-awq (--awq-block-size 64, as hidden 576 requires) and int8-sq are measured by
`make bench-fidelity` instead; w4a8-awq cannot be built for this model at all (TensorRT-LLM pads its layers to
multiples of 128, and 576 is not one), which the validation test below proves.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from yitrt.errors import ValidationError

pytestmark = pytest.mark.integration
pytest.importorskip("modelopt.torch.quantization")


@pytest.mark.slow  # a real calibration of the demo model; tests/integration/test_quantize.py covers the schemes on tiny models
def test_demo_fp8_quantize_then_verify(demo_build, tmp_path):
    model = demo_build[0].path
    out = tmp_path / "fp8"
    proc = run_cli("quantize", str(model), "--scheme", "fp8", "--kv-cache", "fp8", "--calib-size", "8", "--calib-seq-len", "128",
                   "--eval-tokens", "256", "--eval-window", "128", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)  # stdout holds only the JSON, ModelOpt's prints went to stderr
    assert result["quant_algo"] == "FP8" and result["kv_cache_quant_algo"] == "FP8" and result["dtype"] == "bfloat16"
    assert result["calibration"]["source"].startswith("shipped") and result["calibration_seconds"] > 0
    check = run_cli("verify", str(out), "--json", "--max-new-tokens", "4", "--eval-tokens", "256", "--window", "128")
    report = json.loads(check.stdout)
    assert check.returncode == 0 and report["passed"], report["failures"]
    pipe = report["pipeline"]
    assert pipe["ran"] and pipe["top1_agreement"] >= 0.99 and abs(pipe["ppl_delta_pct"]) <= 1.0
    assert pipe["scales_checked"] == 30 * 6  # 5 activation scales and 1 KV scale per layer
    assert report["quantization_loss_judged_as"] == "warning" and report["top1_agreement"] < 1.0  # FP8 costs something


def test_demo_w4a8_is_refused_before_loading(demo_build, tmp_path):
    proc = run_cli("quantize", str(demo_build[0].path), "--scheme", "w4a8-awq", "--out", str(tmp_path / "q"))
    assert proc.returncode == ValidationError.exit_code and "hidden 576" in proc.stderr and not (tmp_path / "q").exists()
