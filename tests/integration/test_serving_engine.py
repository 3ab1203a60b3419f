"""The reference slot's batch manager on a real tritonserver, configured by the repository's own tensorrt_llm
parameters: overlapping requests match single-request greedy, the metrics port shows KV reuse (and none when the
repository turns it off), and a shrunk KV pool refuses what it can never hold."""

from __future__ import annotations

import random
import re
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from yitrt.reference.runtime import ReferenceRuntime

pytestmark = pytest.mark.integration
TPB = 16


def set_parameter(config: Path, key: str, value: str) -> None:
    """Set a string parameter of a config.pbtxt (as a user editing the repository would)."""
    text = config.read_text()
    entry = f'parameters: {{\n  key: "{key}"\n  value: {{\n    string_value: "{value}"\n  }}\n}}\n'
    pattern = re.compile(r'parameters: \{\s*key: "' + re.escape(key) + r'"\s*value: \{\s*string_value: "[^"]*"\s*\}\s*\}\n?')
    config.write_text(pattern.sub(entry, text) if pattern.search(text) else text + entry)


def metric(port: int, family: str, label: str) -> float | None:
    """One gauge from the server's Prometheus text (summed over models), None when absent."""
    text = urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=10).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(family + "{") and f'="{label}"' in line]
    return sum(values) if values else None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from yitrt.build.environment import find_tritonserver
    from yitrt.checkpoint.convert import ConvertRequest, convert
    from yitrt.synthetic import SyntheticSpec, write_synthetic_model
    from yitrt.triton.cpu_stub import stub_env_dir

    if find_tritonserver() is None or not (stub_env_dir() / "pyvenv.cfg").is_file():
        pytest.skip("no tritonserver (nvidia-pytriton) or no NumPy-1.x stub environment: run `make setup`")
    root = tmp_path_factory.mktemp("serving")
    hf = write_synthetic_model(root / "hf", SyntheticSpec(seed=11, dtype="float32", tokenizer=True))
    convert(ConvertRequest(hf, root / "ckpt"))
    return root


def _serve(tiny: Path, name: str, **params: str):
    from yitrt.pipeline import free_ports
    from yitrt.triton.repository import DeployRequest, deploy
    from yitrt.triton.server import Ports, ServeRequest, start_server

    repo = tiny / name
    deploy(DeployRequest(tiny / "ckpt", repo, engine="reference", streaming=False, max_batch_size=8, max_seq_len=512))
    for key, value in {"tokens_per_block": str(TPB), **params}.items():
        set_parameter(repo / "tensorrt_llm" / "config.pbtxt", key, value)
    http, grpc_port, metrics = free_ports(3)
    return start_server(ServeRequest(repo, Ports(http, grpc_port, metrics), exit_timeout=5, ready_timeout=300)), http, metrics


def _generate(http: int, ids: list[int], max_new: int) -> list[int]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"localhost:{http}")
    inputs = []
    for name, value in (("input_ids", np.array([ids], dtype=np.int32)), ("input_lengths", np.array([[len(ids)]], dtype=np.int32)),
                        ("request_output_len", np.array([[max_new]], dtype=np.int32)), ("end_id", np.array([[-1]], dtype=np.int32))):
        tensor = httpclient.InferInput(name, list(value.shape), "INT32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = client.infer("tensorrt_llm", inputs)
    return result.as_numpy("output_ids").reshape(-1).tolist()


@pytest.fixture(scope="module")
def reuse_on(tiny):
    # a pool of 24 blocks (384 tokens) under max_utilization: eight overlapping requests do not all fit at once
    server, http, metrics = _serve(tiny, "reuse-on", enable_kv_cache_reuse="true", max_tokens_in_paged_kv_cache=str(24 * TPB),
                                   batch_scheduler_policy="max_utilization", enable_chunked_context="true", max_num_tokens="64")
    yield http, metrics
    server.stop()


@pytest.fixture(scope="module")
def alone(tiny):
    runtime = ReferenceRuntime(tiny / "ckpt", device="cpu")
    yield lambda ids, n: runtime.generate([ids], n)[0]
    runtime.close()


def _prompts(seed: int) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(seed)
    system = [rng.randrange(10, 500) for _ in range(3 * TPB + 5)]
    prompts = [system + [rng.randrange(10, 500) for _ in range(rng.randrange(1, 20))] if i % 3 else
               [rng.randrange(10, 500) for _ in range(rng.randrange(5, 60))] for i in range(8)]
    return system, prompts


def test_metrics_show_reused_blocks_after_two_requests_with_the_same_system_prompt(reuse_on, alone):
    http, metrics = reuse_on
    system, _ = _prompts(1)
    before = metric(metrics, "nv_trt_llm_kv_cache_block_metrics", "reused")
    first = _generate(http, system + [11, 12], 4)
    second = _generate(http, system + [13], 4)
    after = metric(metrics, "nv_trt_llm_kv_cache_block_metrics", "reused")
    assert after - before >= 3  # the system prompt's three full blocks
    assert metric(metrics, "nv_trt_llm_kv_cache_block_metrics", "tokens_per") == TPB
    assert metric(metrics, "nv_trt_llm_kv_cache_block_metrics", "max") == 24
    assert first == alone(system + [11, 12], 4) and second == alone(system + [13], 4)


def test_overlapping_staggered_requests_match_single_request_greedy(reuse_on, alone):
    http, metrics = reuse_on
    _, prompts = _prompts(2)
    answers: dict[int, list[int]] = {}

    def send(i: int) -> None:
        time.sleep(0.05 * i)
        answers[i] = _generate(http, prompts[i], 12)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert answers == {i: alone(p, 12) for i, p in enumerate(prompts)}
    assert metric(metrics, "nv_trt_llm_request_metrics", "completed") >= len(prompts)
    assert metric(metrics, "nv_trt_llm_request_metrics", "active") == 0  # all done, all released
    assert metric(metrics, "nv_trt_llm_kv_cache_block_metrics", "used") == 0


def test_a_request_the_shrunk_pool_cannot_hold_is_refused_with_the_fix(reuse_on):
    from tritonclient.utils import InferenceServerException

    http, _ = reuse_on
    with pytest.raises(InferenceServerException, match="raise max_tokens_in_paged_kv_cache"):
        _generate(http, list(range(10, 400)), 20)  # 410 tokens > the pool's 384
    assert _generate(http, [10, 11, 12], 2)  # the slot serves on


def test_a_repository_with_reuse_off_reports_none(tiny):
    server, http, metrics = _serve(tiny, "reuse-off", enable_kv_cache_reuse="false")
    try:
        system, _ = _prompts(1)
        _generate(http, system + [11, 12], 3)
        _generate(http, system + [13], 3)
        assert metric(metrics, "nv_trt_llm_kv_cache_block_metrics", "reused") == 0
        assert metric(metrics, "nv_trt_llm_kv_cache_block_metrics", "alloc_new") >= 8  # both prompts' blocks, fresh
    finally:
        server.stop()
