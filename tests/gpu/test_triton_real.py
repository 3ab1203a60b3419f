"""The whole serving path for real: the demo model built into a TensorRT-LLM engine, deployed for the C++
``tensorrtllm`` backend, served by the container's tritonserver (mpirun ranks when tp > 1) and asked over gRPC.

Needs a GPU, trtllm-build and a tritonserver with the tensorrtllm backend (the Triton TRT-LLM container); skipped,
with the reason, elsewhere (CI and development machines have none of them).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from yitrt.build.environment import detect_gpus, find_tritonserver
from yitrt.build.runner import BuildRequest, build_engine
from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.triton.client import ChatRequest, chat
from yitrt.triton.cpu_stub import is_wheel_server
from yitrt.triton.repository import DeployRequest, deploy
from yitrt.triton.server import Ports, ServeRequest, start_server

pytestmark = pytest.mark.gpu


def _require_serving_machine(tp: int) -> str:
    if shutil.which("trtllm-build") is None:
        pytest.skip("needs trtllm-build (TensorRT-LLM 1.2.x, e.g. the tritonserver *-trtllm-python-py3 container)")
    if len(detect_gpus()) < tp:
        pytest.skip(f"needs {tp} NVIDIA GPU(s)")
    server = find_tritonserver()
    if server is None or is_wheel_server(server) or not (Path(server).parents[1] / "backends" / "tensorrtllm").is_dir():
        pytest.skip("needs tritonserver with the tensorrtllm backend (the Triton TRT-LLM container)")
    if tp > 1 and shutil.which("mpirun") is None:
        pytest.skip("needs mpirun for tp > 1")
    return server


@pytest.mark.parametrize("tp", [1, 3])
def test_engine_repository_answers_on_triton(request, tmp_path, tp):
    server_binary = _require_serving_machine(tp)
    demo_model = request.getfixturevalue("demo_build")[0].path  # only once the machine can serve
    ckpt = tmp_path / "ckpt"
    convert(ConvertRequest(demo_model, ckpt, tp=tp))
    engine = tmp_path / "engine"
    build_engine(BuildRequest(ckpt, engine, max_batch_size=8, max_seq_len=1024, workers=tp))
    repo = tmp_path / "repo"
    result = deploy(DeployRequest(engine, repo))
    assert result.engine.world_size == tp
    server = start_server(ServeRequest(repo, Ports(18600, 18601, 18602), tritonserver=server_binary, exit_timeout=10))
    try:
        answer = chat(ChatRequest("localhost:18601", "What is the capital of France?", max_tokens=32))
        assert "Paris" in answer.text and answer.streamed and answer.output_tokens < 32  # stopped at the end id
        whole = chat(ChatRequest("localhost:18601", "What is the capital of France?", max_tokens=32, stream=False))
        assert whole.text == answer.text
    finally:
        server.stop()
