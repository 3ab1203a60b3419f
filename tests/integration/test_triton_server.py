"""End to end on a real tritonserver (the nvidia-pytriton wheel's, on CPU): the demo model converted, deployed with
the CPU reference engine slot, served by `start_server`, asked through gRPC by tritonclient — chat, streaming,
stop words, no echo, 32 concurrent requests, bad requests answered with clean errors while the server keeps serving,
and a clean stop with no process left behind."""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import SERVED_MAX_INPUT
from yitrt.build.environment import find_tritonserver
from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.errors import RequestFailedError
from yitrt.triton.client import ChatRequest, chat
from yitrt.triton.cpu_stub import stub_env_dir
from yitrt.triton.repository import DeployRequest, deploy

QUESTION = "What is the capital of France?"
PLAIN = "The capital of France is"  # a plain-text prompt (no chat template) the model continues
CHAT = json.dumps([{"role": "user", "content": QUESTION}])
MAX_INPUT = SERVED_MAX_INPUT


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _infer(url: str, model: str, values: dict, stream: bool = False) -> tuple[list[str], str | None]:
    """Raw tritonclient call (independent of yitrt's chat client): (text pieces, error message)."""
    import queue

    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url)
    inputs = []
    for name, value in values.items():
        dtype = {str: "BYTES", bool: "BOOL", int: "INT32"}[type(value)]
        array = np.array([[value.encode() if isinstance(value, str) else value]], dtype=object if dtype == "BYTES" else (np.bool_ if dtype == "BOOL" else np.int32))
        tensor = grpc.InferInput(name, [1, 1], dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    pieces: list[str] = []
    try:
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        while True:
            result, error = events.get(timeout=120)
            if error is not None:
                return pieces, str(error)
            text = result.as_numpy("text_output")
            if text is not None and text.size:
                pieces.append(text.reshape(-1)[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                return pieces, None
    finally:
        client.stop_stream()


def test_chat_answers_paris_through_bls_and_ensemble(served):
    _, url, _ = served
    answer = chat(ChatRequest(url, QUESTION, max_tokens=24))  # no model named: the BLS entry model is found
    assert answer.model == "tensorrt_llm_bls"
    assert "Paris" in answer.text and answer.streamed and len(answer.chunks) > 1
    assert answer.output_tokens is not None and 0 < answer.output_tokens <= 24 and answer.input_tokens > 10
    assert answer.ttft_s is not None and answer.ttft_s <= answer.total_s
    via_ensemble = chat(ChatRequest(url, QUESTION, model="ensemble", max_tokens=24))
    assert via_ensemble.text == answer.text  # same tokens, same end: the ensemble and the BLS agree


def test_streamed_text_concatenates_exactly_to_the_non_streamed_text(served):
    _, url, _ = served
    for question in (QUESTION, "Write one sentence about café culture in Paris, with an emoji."):
        messages = json.dumps([{"role": "user", "content": question}])
        streamed, err1 = _infer(url, "tensorrt_llm_bls", {"text_input": "", "messages": messages, "max_tokens": 40, "stream": True})
        whole, err2 = _infer(url, "tensorrt_llm_bls", {"text_input": "", "messages": messages, "max_tokens": 40, "stream": False})
        assert err1 is None and err2 is None
        assert len([p for p in streamed if p]) > 1 and len(whole) == 1
        assert "".join(streamed) == whole[0] and whole[0].strip()


def test_a_stop_word_ends_generation_and_the_prompt_is_not_echoed(served):
    _, url, _ = served
    full = chat(ChatRequest(url, QUESTION, max_tokens=24))
    stopped = chat(ChatRequest(url, QUESTION, max_tokens=24, stop_words=("Paris",)))
    assert "Paris" in full.text and "Paris" not in stopped.text
    assert full.text.startswith(stopped.text) and stopped.output_tokens < full.output_tokens
    for model in ("ensemble", "tensorrt_llm_bls"):  # plain text, stock-style client
        raw, error = _infer(url, model, {"text_input": PLAIN, "max_tokens": 16})
        assert error is None and "".join(raw).strip() and PLAIN not in "".join(raw)


def test_32_concurrent_requests_all_complete(served):
    _, url, _ = served
    questions = [f"What is the capital of France? Answer #{i}." for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda q: chat(ChatRequest(url, q, max_tokens=12)), questions))
    assert len(answers) == 32
    assert all(a.text.strip() and a.output_tokens and a.output_tokens <= 12 for a in answers)


@pytest.mark.parametrize("model", ["tensorrt_llm_bls", "ensemble"])
@pytest.mark.parametrize("values, expected", [
    ({"text_input": "", "max_tokens": 8}, "no text"),
    ({"text_input": QUESTION, "max_tokens": 0}, "max_tokens must be >= 1"),
    ({"text_input": "word " * (MAX_INPUT + 50), "max_tokens": 8}, f"at most {MAX_INPUT}"),
    ({"text_input": "", "messages": "{not json", "max_tokens": 8}, "not valid JSON"),
    ({"text_input": "", "messages": json.dumps([{"role": "robot", "content": "x"}]), "max_tokens": 8}, "messages[0]"),
])
def test_bad_requests_get_clean_errors_and_the_server_keeps_serving(served, model, values, expected):
    _, url, _ = served
    pieces, error = _infer(url, model, values)
    assert error is not None and expected in error and "Traceback" not in error
    ok, error = _infer(url, model, {"text_input": "", "messages": CHAT, "max_tokens": 8})
    assert error is None and "Paris" in "".join(ok)


def test_missing_input_bad_sampling_and_unknown_model_are_refused(served):
    from yitrt.errors import UsageError

    _, url, _ = served
    _, error = _infer(url, "tensorrt_llm_bls", {"max_tokens": 8})
    assert error is not None and "text_input" in error
    with pytest.raises(RequestFailedError, match="runtime_top_p"):
        chat(ChatRequest(url, QUESTION, max_tokens=4, top_k=5, temperature=0.5, seed=1, top_p=2.0))
    sampled = chat(ChatRequest(url, QUESTION, max_tokens=8, top_k=5, temperature=0.7, seed=3))
    again = chat(ChatRequest(url, QUESTION, max_tokens=8, top_k=5, temperature=0.7, seed=3))
    assert sampled.text == again.text  # sampling with a seed is reproducible
    _, error = _infer(url, "ensemble", {"text_input": PLAIN, "max_tokens": 4, "bad_words": "Paris"})
    assert error is not None and "does not support bad_words_list" in error  # refused, never silently ignored
    with pytest.raises(UsageError, match="no ready model"):
        chat(ChatRequest(url, QUESTION, model="no_such_model"))


def test_cli_serve_stops_on_sigterm_and_leaves_no_process_behind(demo_build, tmp_path):
    """`yitrt serve` of a non-streaming deployment whose BLS model is renamed: ready, answers, then SIGTERM stops every process of the server's
    group (tritonserver, Python stubs, the reference worker)."""
    import signal
    import subprocess
    import sys

    if find_tritonserver() is None or not (stub_env_dir() / "pyvenv.cfg").is_file():
        pytest.skip("no tritonserver (nvidia-pytriton) or no NumPy-1.x stub environment: run `make setup`")
    ckpt = tmp_path / "ckpt"
    convert(ConvertRequest(demo_build[0].path, ckpt))
    repo = tmp_path / "repo"
    deploy(DeployRequest(ckpt, repo, engine="reference", streaming=False, max_batch_size=4, model_name="yi"))
    http, grpc_port, metrics = _free_ports(3)
    proc = subprocess.Popen([sys.executable, "-m", "yitrt", "serve", str(repo), "--json", "--exit-timeout", "5", "--http-port", str(http),
                             "--grpc-port", str(grpc_port), "--metrics-port", str(metrics)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _check_cli_serve(proc, grpc_port)
    finally:  # a failed assertion must not leave the server running
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _check_cli_serve(proc, grpc_port: int) -> None:
    import signal
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    data = None
    while data is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            data = json.loads("".join(lines))
        except ValueError:
            continue
    assert data is not None and data["ready"], proc.stderr.read() if proc.poll() is not None else "not ready"
    answer = chat(ChatRequest(f"localhost:{grpc_port}", QUESTION, max_tokens=16))
    assert "Paris" in answer.text and not answer.streamed  # --no-streaming: one response
    assert answer.model == "yi"  # the renamed BLS entry model is found without --model
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0 and time.monotonic() - start < 30
    with pytest.raises(ProcessLookupError):
        os.killpg(data["pid"], 0)  # tritonserver ran in its own process group: nothing of it is left


def test_cli_chat_streams_reports_json_and_refuses_options_a_model_lacks(served, cli, demo_build):
    from transformers import AutoTokenizer

    _, url, _ = served
    tok = AutoTokenizer.from_pretrained(demo_build[0].path)
    turns = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    expected = len(tok(tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"])
    done = cli("chat", url, QUESTION, "--max-tokens", "24")
    assert done.returncode == 0 and "Paris" in done.stdout and "tokens, first" in done.stderr
    plain = json.loads(cli("chat", url, QUESTION, "--max-tokens", "24", "--json").stdout)
    system = json.loads(cli("chat", url, QUESTION, "--system", "Answer briefly.", "--max-tokens", "24", "--json").stdout)
    assert "Paris" in plain["text"] and plain["output_tokens"] > 0 and plain["ttft_ms"] <= plain["total_ms"]
    assert system["input_tokens"] == expected != plain["input_tokens"]  # the system turn went through the chat template
    via_ensemble = cli("chat", url, QUESTION, "--model", "ensemble", "--system", "Answer briefly.", "--max-tokens", "24", "--json")
    assert json.loads(via_ensemble.stdout)["text"] == system["text"]  # the ensemble takes messages too
    refused = cli("chat", url, QUESTION, "--model", "tensorrt_llm")
    assert refused.returncode == 2 and "not a text entry point" in refused.stderr and "Traceback" not in refused.stderr
    failed = cli("chat", url, QUESTION, "--top-p", "0.5", "--temperature", "0.001", "--max-tokens", "0")
    assert failed.returncode == 2  # --max-tokens 0 is refused by the option itself
