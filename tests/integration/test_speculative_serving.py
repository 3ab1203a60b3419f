"""Speculative decoding on a real tritonserver, on the reference slot (tiny model, 4 layers, head_std 0.2 so that the
draft agrees with it about half the time; the draft is its first
2 layers with the final norm and lm_head — ``truncate_checkpoint``, a real, weaker draft):

- draft-target through yitrt's BLS (``tensorrt_llm_bls`` → ``tensorrt_llm_draft`` + ``tensorrt_llm``): the answer equals
  the same deployment's answer without speculation (``num_draft_tokens`` 0) and the target's greedy answer alone,
  streamed and not; each streamed response is one target step whose ``accepted_draft_tokens`` and token count agree;
- ``tensorrt_llm`` asked directly with ``draft_input_ids`` (what the stock BLS sends): the accepted prefix plus one;
- lookahead (``decoding_mode: lookahead``): ``tensorrt_llm`` answers the greedy tokens, reporting accepted tokens.
"""

from __future__ import annotations

import queue
import random
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from yitrt.reference.runtime import ReferenceRuntime

pytestmark = pytest.mark.integration
K = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from yitrt.build.environment import find_tritonserver
    from yitrt.checkpoint.convert import ConvertRequest, convert
    from yitrt.checkpoint.truncate import truncate_checkpoint
    from yitrt.synthetic import SyntheticSpec, write_synthetic_model
    from yitrt.triton.cpu_stub import stub_env_dir

    if find_tritonserver() is None or not (stub_env_dir() / "pyvenv.cfg").is_file():
        pytest.skip("no tritonserver (nvidia-pytriton) or no NumPy-1.x stub environment: run `make setup`")
    root = tmp_path_factory.mktemp("spec-serving")
    hf = write_synthetic_model(root / "hf", SyntheticSpec(seed=21, dtype="float32", layers=4, tokenizer=True, head_std=0.2))
    convert(ConvertRequest(hf, root / "target"))
    truncate_checkpoint(root / "target", root / "draft", 2)
    return root


def _server(repo: Path):
    from yitrt.pipeline import free_ports
    from yitrt.triton.server import Ports, ServeRequest, start_server

    http, grpc_port, metrics = free_ports(3)
    return start_server(ServeRequest(repo, Ports(http, grpc_port, metrics), exit_timeout=5, ready_timeout=300)), grpc_port


@pytest.fixture(scope="module")
def server(models):
    """One tritonserver for both: the draft-target repository, plus the lookahead repository's ``tensorrt_llm`` copied
    in as ``tensorrt_llm_lookahead`` (one server start instead of two)."""
    import shutil

    from yitrt.speculation import LookaheadSizes
    from yitrt.triton.repository import DeployRequest, deploy

    repo, la_repo = models / "repo-dt", models / "repo-la"
    deploy(DeployRequest(models / "target", repo, engine="reference", streaming=True, max_batch_size=8, max_seq_len=256,
                         speculative="draft-target", draft=models / "draft", num_draft_tokens=K))
    assert (repo / "tensorrt_llm_draft" / "config.pbtxt").is_file()
    deploy(DeployRequest(models / "target", la_repo, engine="reference", streaming=True, max_batch_size=8, max_seq_len=256,
                         speculative="lookahead", lookahead=LookaheadSizes(4, 3, 3)))
    config = (la_repo / "tensorrt_llm" / "config.pbtxt").read_text()
    assert 'string_value: "lookahead"' in config
    shutil.copytree(la_repo / "tensorrt_llm", repo / "tensorrt_llm_lookahead")
    (repo / "tensorrt_llm_lookahead" / "config.pbtxt").write_text(config.replace('name: "tensorrt_llm"', 'name: "tensorrt_llm_lookahead"', 1))
    srv, port = _server(repo)
    yield port
    srv.stop()


@pytest.fixture(scope="module")
def draft_target(server):
    return server


@pytest.fixture(scope="module")
def lookahead(server):
    return server


@pytest.fixture(scope="module")
def alone(models):
    runtime = ReferenceRuntime(models / "target", device="cpu")
    yield lambda ids, n: runtime.generate([ids], n)[0]
    runtime.close()


def _tensor(grpc, name, value):
    dtype = {np.int32: "INT32", np.bool_: "BOOL", np.object_: "BYTES"}[value.dtype.type]
    t = grpc.InferInput(name, list(value.shape), dtype)
    t.set_data_from_numpy(value)
    return t


def _stream(port: int, model: str, values: dict[str, np.ndarray]) -> list:
    """Every response of one streamed request (decoupled model), in order."""
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(f"localhost:{port}")
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), results))
    try:
        client.async_stream_infer(model, [_tensor(grpc, n, v) for n, v in values.items()], enable_empty_final_response=True)
        out = []
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                raise AssertionError(f"{model}: {error}")
            if result.get_response().parameters["triton_final_response"].bool_param:
                if result.as_numpy("text_output") is not None or result.as_numpy("output_ids") is not None:
                    out.append(result)
                return out
            out.append(result)
    finally:
        client.stop_stream()
        client.close()


def _bls(port: int, prompt: str, max_tokens: int, stream: bool, k: int | None = None, draft_logits: bool = False) -> list:
    values = {"text_input": np.array([[prompt.encode()]], dtype=np.object_), "max_tokens": np.array([[max_tokens]], dtype=np.int32),
              "min_tokens": np.array([[max_tokens]], dtype=np.int32),  # no early end: every round is a full round
              "stream": np.array([[stream]], dtype=np.bool_), "return_num_output_tokens": np.array([[True]], dtype=np.bool_)}
    if k is not None:
        values["num_draft_tokens"] = np.array([[k]], dtype=np.int32)
    if draft_logits:  # the draft returns generation_logits, the BLS forwards them as draft_logits: probabilistic acceptance
        values["use_draft_logits"] = np.array([[True]], dtype=np.bool_)
    return _stream(port, "tensorrt_llm_bls", values)


def _text(responses) -> str:
    return "".join(r.as_numpy("text_output").reshape(-1)[0].decode() for r in responses if r.as_numpy("text_output") is not None)


PROMPTS = ["the quick brown fox", "speculative decoding on a cpu"]


def test_bls_draft_target_answers_equal_the_target_without_speculation(draft_target):
    port = draft_target
    for prompt in PROMPTS:
        plain = _text(_bls(port, prompt, 14, stream=False, k=0))
        assert _text(_bls(port, prompt, 14, stream=False)) == plain, prompt  # the deployment's K
        assert _text(_bls(port, prompt, 14, stream=False, k=1)) == plain, prompt
        with_logits = _bls(port, prompt, 14, stream=False, draft_logits=True)
        assert _text(with_logits) == plain, prompt  # greedy: p_target is one-hot, the answer cannot change
        assert int(with_logits[-1].as_numpy("total_draft_tokens").reshape(-1)[0]) > 0


def test_bls_streams_one_response_per_target_step_with_its_acceptance(draft_target):
    port = draft_target
    steps, total_drafted = [], 0
    for prompt in PROMPTS:
        responses = _bls(port, prompt, 14, stream=True)
        rounds = [r for r in responses if r.as_numpy("accepted_draft_tokens") is not None and r.as_numpy("accepted_draft_tokens").size]
        accepted = [int(r.as_numpy("accepted_draft_tokens").reshape(-1)[0]) for r in rounds]
        final = responses[-1]
        generated = int(final.as_numpy("num_output_tokens").reshape(-1)[0])
        # each round emits its accepted run + 1 (the last one: what is left of max_tokens)
        left, count = 14, 0
        for a in accepted:
            count += min(a + 1, left)
            left -= min(a + 1, left)
        assert count == generated == 14
        assert _text(responses) == _text(_bls(port, prompt, 14, stream=False, k=0))  # streamed rounds: the same text
        assert int(final.as_numpy("total_accepted_draft_tokens").reshape(-1)[0]) == sum(accepted)
        drafted = int(final.as_numpy("total_draft_tokens").reshape(-1)[0])
        assert all(0 <= a <= K for a in accepted) and drafted <= K * len(accepted)
        rate = float(final.as_numpy("acceptance_rate").reshape(-1)[0])
        assert rate == pytest.approx(sum(accepted) / drafted)
        steps += accepted
        total_drafted += drafted
    # the 2-layer draft is a real, weaker draft: some tokens accepted, not all
    assert 0 < sum(steps) < total_drafted


def test_target_verifies_draft_input_ids_directly(draft_target, alone):
    """What the stock BLS sends the target: the prompt, K draft tokens, request_output_len K + 1."""
    port = draft_target
    rng = random.Random(3)
    prompt = [rng.randrange(10, 400) for _ in range(12)]
    greedy = alone(prompt, K + 1)
    for draft, accepted in ((greedy[:K], K), (greedy[:1] + [(greedy[1] + 1) % 400] + greedy[2:K], 1), ([(greedy[0] + 1) % 400] * K, 0)):
        values = {"input_ids": np.array([prompt], dtype=np.int32), "input_lengths": np.array([[len(prompt)]], dtype=np.int32),
                  "request_output_len": np.array([[K + 1]], dtype=np.int32), "draft_input_ids": np.array([draft], dtype=np.int32),
                  "end_id": np.array([[-1]], dtype=np.int32), "return_perf_metrics": np.array([[True]], dtype=np.bool_),
                  "exclude_input_in_output": np.array([[True]], dtype=np.bool_)}
        responses = _stream(port, "tensorrt_llm", values)
        tokens = [t for r in responses if r.as_numpy("output_ids") is not None for t in r.as_numpy("output_ids").reshape(-1).tolist()]
        assert tokens == greedy[: accepted + 1]
        assert int(responses[-1].as_numpy("total_accepted_draft_tokens").reshape(-1)[0]) == accepted
        assert int(responses[-1].as_numpy("total_draft_tokens").reshape(-1)[0]) == K
    values["draft_input_ids"] = np.array([[1] * (K + 1)], dtype=np.int32)
    with pytest.raises(AssertionError, match=r"larger than maximum number of draft tokens \(3\)"):
        _stream(port, "tensorrt_llm", values)


def test_lookahead_answers_the_greedy_tokens(lookahead, alone):
    rng = random.Random(5)
    accepted_any = 0
    for _ in range(3):
        prompt = [rng.randrange(10, 400) for _ in range(rng.randrange(4, 20))]
        values = {"input_ids": np.array([prompt], dtype=np.int32), "input_lengths": np.array([[len(prompt)]], dtype=np.int32),
                  "request_output_len": np.array([[24]], dtype=np.int32), "end_id": np.array([[-1]], dtype=np.int32),
                  "streaming": np.array([[True]], dtype=np.bool_), "return_perf_metrics": np.array([[True]], dtype=np.bool_)}
        responses = _stream(lookahead, "tensorrt_llm_lookahead", values)
        tokens = [t for r in responses if r.as_numpy("output_ids") is not None for t in r.as_numpy("output_ids").reshape(-1).tolist()]
        assert tokens == alone(prompt, 24)
        totals = [int(r.as_numpy("total_accepted_draft_tokens").reshape(-1)[0]) for r in responses if r.as_numpy("output_ids") is not None]
        counts = [r.as_numpy("output_ids").size for r in responses if r.as_numpy("output_ids") is not None]
        steps = list(zip([0] + totals, totals, counts, strict=False))
        for before, after, count in steps[:-1]:  # a step's tokens = its accepted run + 1
            assert count == after - before + 1
        before, after, count = steps[-1]
        assert 1 <= count <= after - before + 1  # the last one: what is left of request_output_len
        accepted_any += totals[-1]
    assert accepted_any > 0
