"""Real engines: `trtllm-build` accepts the checkpoints yitrt writes (needs a CUDA GPU and TensorRT-LLM).

Skipped, with the reason, wherever either is missing (CI and development machines have neither).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from yitrt.checkpoint.convert import ConvertRequest, convert

pytestmark = pytest.mark.gpu


def _require_engine_toolchain() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("tensorrt_llm", reason="needs TensorRT-LLM (e.g. the tritonserver *-trtllm-python-py3 container)")
    if shutil.which("trtllm-build") is None:
        pytest.skip("needs the trtllm-build command of TensorRT-LLM")


@pytest.mark.parametrize(("scheme", "kv"), [("none", None), ("w8a16", None), ("fp8-rowwise", "fp8")])
def test_trtllm_build_accepts_our_checkpoint(make_model, tmp_path, scheme, kv):
    _require_engine_toolchain()
    src = make_model(overrides={"intermediate_size": 768})
    ckpt = tmp_path / "ckpt"
    convert(ConvertRequest(src, ckpt, scheme=scheme, kv_cache=kv))
    engine = tmp_path / "engine"
    proc = subprocess.run(
        ["trtllm-build", "--checkpoint_dir", str(ckpt), "--output_dir", str(engine), "--max_batch_size", "2",
         "--max_seq_len", "256", "--max_num_tokens", "256"],
        capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (engine / "rank0.engine").stat().st_size > 0
    built = json.loads((engine / "config.json").read_text())
    assert built["pretrained_config"]["rotary_base"] == 5e6
