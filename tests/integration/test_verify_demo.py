"""`yitrt verify` on the demo model (real weights, real tokenizer): clean checkpoints pass, a wrong scale fails."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli
from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.reference.verify import VerifyRequest, verify

pytestmark = pytest.mark.integration
SMALL = {"eval_tokens": 256, "window": 128, "max_new_tokens": 4, "device": "cpu", "prompts": ("The capital of France is", "北京是中国的")}


@pytest.fixture(scope="module")
def demo(demo_build):
    return demo_build[0].path


@pytest.mark.slow  # the demo model end to end; the tiny-model verify tests prove the same logic in make test
def test_clean_tp3_checkpoint_passes(demo, tmp_path):
    # 9 heads and 3 KV heads split three ways, in three processes
    convert(ConvertRequest(demo, tmp_path / "tp3", tp=3))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n北京是中国的\n")
    result = run_cli("verify", str(tmp_path / "tp3"), "--against", str(demo), "--eval-tokens", "128", "--window", "64",
                     "--max-new-tokens", "4", "--prompts", str(prompts), "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["top1_agreement"] == 1.0 and data["passed"] is True
    assert data["max_abs_logit_diff"] <= 2.0**-8 * data["logit_scale"]
    assert data["ppl_reference"] == pytest.approx(data["ppl_checkpoint"], rel=1e-5)


@pytest.mark.slow  # the demo model end to end; the tiny-model verify tests prove the same logic in make test
def test_fp8_rowwise_scale_off_by_two_fails(demo, tmp_path):
    convert(ConvertRequest(demo, tmp_path / "fp8", scheme="fp8-rowwise"))
    clean = verify(VerifyRequest(tmp_path / "fp8", demo, **SMALL))
    assert clean.passed, clean.failures
    shutil.copytree(tmp_path / "fp8", tmp_path / "bad")
    path = tmp_path / "bad" / "rank0.safetensors"
    tensors = load_file(str(path))
    tensors["transformer.layers.15.mlp.fc.per_channel_scale"] *= 2
    save_file(tensors, str(path), metadata={"format": "pt"})
    bad = verify(VerifyRequest(tmp_path / "bad", demo, **SMALL))
    assert not bad.passed
    assert bad.ppl_delta_pct > clean.ppl_delta_pct + 5
