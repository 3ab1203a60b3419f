"""`yitrt build` for real: plans, runs trtllm-build and checks the engine folder (needs a GPU and TensorRT-LLM).

Skipped, with the reason, wherever either is missing (CI and development machines have neither).
"""

from __future__ import annotations

import json
import shutil

import pytest

from yitrt.build.environment import detect_gpus, find_trtllm
from yitrt.build.runner import BuildRequest, build_engine
from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.manifest import read_manifest

pytestmark = pytest.mark.gpu


def _require_build_machine() -> None:
    if shutil.which("trtllm-build") is None:
        pytest.skip("needs trtllm-build (TensorRT-LLM 1.2.x, e.g. the tritonserver *-trtllm-python-py3 container)")
    if not detect_gpus():
        pytest.skip("needs an NVIDIA GPU (nvidia-smi reports none)")


@pytest.mark.parametrize("tp", [1, 2])
def test_yitrt_build_makes_an_engine(make_model, tmp_path, tp):
    _require_build_machine()
    if tp > len(detect_gpus()):
        pytest.skip(f"tp {tp} needs {tp} GPUs")
    ckpt = tmp_path / "ckpt"
    convert(ConvertRequest(make_model(overrides={"intermediate_size": 768}), ckpt, tp=tp))
    out = tmp_path / "engine"
    result = build_engine(BuildRequest(ckpt, out, max_batch_size=4, max_seq_len=256, workers=tp))
    for rank in range(tp):
        assert (out / f"rank{rank}.engine").stat().st_size > 1000  # a real serialized plan, not a layout
    built = json.loads((out / "config.json").read_text())
    assert built["build_config"]["max_batch_size"] == 4 and built["build_config"]["plugin_config"]["use_paged_context_fmha"]
    engine = read_manifest(out).extra["engine"]
    assert engine["trtllm_version"] == built["version"] == find_trtllm().trtllm_version
    assert result.log and "TensorRT" in (out / "build.log").read_text()
    assert build_engine(BuildRequest(ckpt, out, max_batch_size=4, max_seq_len=256, workers=tp)).reused
