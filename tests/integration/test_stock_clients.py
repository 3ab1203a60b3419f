"""The stock NVIDIA clients' requests against a yitrt repository on a real tritonserver (CPU reference slot).

Each test sends exactly what a stock client sends (tensor names, shapes, types; written here from the contract in
reference/triton-repository.md and the stock clients' behaviour, not copied from them) and reads the answer the way
that client reads it:
- ``end_to_end_grpc_client.py`` (ensemble, gRPC stream): ``text_input``/``max_tokens``/``bad_words``/``stop_words``
  as [1, 1], ``""`` for no words; reads ``as_numpy("text_output")[0].decode()`` — a 1-D [1] answer;
- ``inflight_batcher_llm_client.py`` (``tensorrt_llm`` directly): ids [1, N], lengths [1, 1], words lists through the
  stock preprocessing's ``""`` format ``[[[0], [-1]]]``; reads ``output_ids[0][0]``; stops a request by sending
  ``stop`` = true (input_lengths 0, request_output_len 0) with the same request id (by default the empty one);
- ``benchmark_core_model.py``: random input ids — ids outside the vocab get a clean error;
- genai-perf (kserve, tensorrtllm backend, streaming: ``text_input``, ``max_tokens``, ``exclude_input_in_output``,
  ``stream``) — ``min_length`` is not an input of the 1.2 contract; ``min_tokens`` gives deterministic lengths;
- non-streaming clients: unary ModelInfer (gRPC and HTTP) on a ``--no-streaming`` deployment's ensemble and BLS.
"""

from __future__ import annotations

import queue
import time
from pathlib import Path

import numpy as np
import pytest

from tests.integration.test_triton_server import PLAIN
from yitrt.manifest import read_manifest
from yitrt.triton.repository import TOKENIZER_FOLDER

BLS = "tensorrt_llm_bls"


def _tensor(module, name: str, value) -> object:
    """A [1, 1] input (a batch of one), or the array as given when ``value`` is an ndarray."""
    array = value if isinstance(value, np.ndarray) else np.array([[value]])
    if array.dtype.kind in "US":
        array = array.astype(np.object_)
    dtype = {"O": "BYTES", "b": "BOOL"}.get(array.dtype.kind) or {"int32": "INT32", "float32": "FP32", "uint64": "UINT64"}[array.dtype.name]
    tensor = module.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def _e2e_inputs(grpc, prompt: str, max_tokens: int, stream: bool, **extra) -> list:
    """What the stock end-to-end client sends to the ensemble (words as "" when none are given)."""
    values = {"text_input": prompt, "max_tokens": np.int32(max_tokens), "bad_words": "", "stop_words": "",
              "stream": stream, **extra}
    return [_tensor(grpc, name, value if isinstance(value, np.ndarray) else np.array([[value]])) for name, value in values.items()]


class Stream:
    """One gRPC stream; responses by request id, as the stock clients collect them."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpc

        self.client = grpc.InferenceServerClient(url)
        self.events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.events.put((result, error)))

    def send(self, model: str, inputs: list, request_id: str = "") -> None:
        self.client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)

    def until_final(self, request_ids: set[str], timeout: float = 120) -> dict[str, list]:
        """Every response (result or error string) of each request until its final one."""
        got: dict[str, list] = {key: [] for key in request_ids}
        open_ids = set(request_ids)
        deadline = time.monotonic() + timeout
        while open_ids:
            result, error = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:  # errors end a request; the stock clients print them
                key = next(iter(open_ids)) if len(open_ids) == 1 else None
                assert key is not None, f"an error on a stream with several open requests: {error}"
                got[key].append(str(error))
                open_ids.discard(key)
                continue
            response = result.get_response()
            got[response.id].append(result)
            if response.parameters["triton_final_response"].bool_param:
                open_ids.discard(response.id)
        return got

    def close(self) -> None:
        self.client.stop_stream()


@pytest.fixture
def stream(served):
    s = Stream(served[1])
    yield s
    s.close()


def _texts(results) -> list[str]:
    """The stock e2e client's reading of each response: text_output[0].decode() (fails on a [1, 1] answer)."""
    out = []
    for result in results:
        value = result.as_numpy("text_output")
        if value is not None and value.size:
            assert value.shape == (1,), f"text_output must be 1-D [1] like the stock models', got {value.shape}"
            out.append(value[0].decode())
    return out


@pytest.mark.parametrize("model", ["ensemble", BLS])
def test_end_to_end_client_streams_1d_text_with_empty_words(served, stream, model):
    import tritonclient.grpc as grpc

    stream.send(model, _e2e_inputs(grpc, PLAIN, 12, True), "1")
    pieces = _texts(stream.until_final({"1"})["1"])
    assert pieces and "Paris" in "".join(pieces)


def _engine_inputs(grpc, ids: list[int], max_new: int, streaming: bool, **extra) -> list:
    """What the stock inflight_batcher_llm_client sends to tensorrt_llm (sampling at neutral values, logits off)."""
    values = {
        "input_ids": np.array([ids], dtype=np.int32), "input_lengths": np.array([[len(ids)]], dtype=np.int32),
        "request_output_len": np.array([[max_new]], dtype=np.int32), "end_id": np.array([[2]], dtype=np.int32),
        "pad_id": np.array([[2]], dtype=np.int32), "beam_width": np.array([[1]], dtype=np.int32),
        "temperature": np.array([[1.0]], dtype=np.float32), "runtime_top_k": np.array([[1]], dtype=np.int32),
        "runtime_top_p": np.array([[0.0]], dtype=np.float32), "len_penalty": np.array([[1.0]], dtype=np.float32),
        "repetition_penalty": np.array([[1.0]], dtype=np.float32), "streaming": np.array([[streaming]], dtype=np.bool_),
        "return_log_probs": np.array([[False]]), "return_context_logits": np.array([[False]]),
        "return_generation_logits": np.array([[False]]),
        # the stock preprocessing's encoding of "" (no words): one padded slot, offset -1
        "bad_words_list": np.array([[[0], [-1]]], dtype=np.int32), "stop_words_list": np.array([[[0], [-1]]], dtype=np.int32),
        **extra,
    }
    return [_tensor(grpc, name, value) for name, value in values.items()]


@pytest.fixture(scope="module")
def prompt_ids(served):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served[2] / TOKENIZER_FOLDER)
    return tokenizer(PLAIN)["input_ids"], tokenizer


def test_inflight_batcher_client_reads_output_ids_and_stops_a_request_by_id(served, stream, prompt_ids):
    import tritonclient.grpc as grpc

    ids, tokenizer = prompt_ids
    stream.send("tensorrt_llm", _engine_inputs(grpc, ids, 6, True), "a")
    tokens = [int(t) for r in stream.until_final({"a"})["a"] if r.as_numpy("output_ids") is not None
              for t in r.as_numpy("output_ids")[0][0]]
    assert len(tokens) == 6 and "Paris" in tokenizer.decode(tokens)  # [batch, beam, tokens] like the C++ backend

    # a long request that only a stop can end early (end_id -1: no end token), then the stock stop request (empty
    # prompt, 0 tokens) with the same request id — the stock client's default, the empty one; both end with a final
    # response carrying that id
    stream.send("tensorrt_llm", _engine_inputs(grpc, ids, 300, True, end_id=np.array([[-1]], dtype=np.int32)))
    first, _ = stream.events.get(timeout=120)  # its first token: it is running
    assert first is not None and first.get_response().id == ""
    stop = [_tensor(grpc, "input_ids", np.array([[0]], dtype=np.int32)), _tensor(grpc, "input_lengths", np.array([[0]], dtype=np.int32)),
            _tensor(grpc, "request_output_len", np.array([[0]], dtype=np.int32)), _tensor(grpc, "stop", np.array([[True]]))]
    stream.send("tensorrt_llm", stop)
    finals, generated = 0, first.as_numpy("output_ids")[0][0].size
    while finals < 2:
        result, error = stream.events.get(timeout=120)
        assert error is None, error  # the stop request is answered, not refused ("empty prompt")
        ids_out = result.as_numpy("output_ids")
        generated += 0 if ids_out is None else ids_out[0][0].size
        finals += result.get_response().parameters["triton_final_response"].bool_param
    assert generated < 300  # stopped early, not run to request_output_len
    stream.send("tensorrt_llm", stop, "nothing-runs-with-this-id")  # a stop that matches nothing: an empty final answer
    (answer,) = stream.until_final({"nothing-runs-with-this-id"})["nothing-runs-with-this-id"]
    assert not isinstance(answer, str) and answer.as_numpy("output_ids") is None


def test_benchmark_client_ids_outside_the_vocab_get_a_clean_error(served, stream, prompt_ids):
    import tritonclient.grpc as grpc

    ids, tokenizer = prompt_ids
    stream.send("tensorrt_llm", _engine_inputs(grpc, [*ids, len(tokenizer) + 1000], 4, True), "oov")
    (error,) = stream.until_final({"oov"})["oov"]
    assert isinstance(error, str) and f"token id {len(tokenizer) + 1000}, outside the vocab" in error and "IndexError" not in error
    stream.send("tensorrt_llm", _engine_inputs(grpc, ids, 2, True), "after")  # the slot keeps serving
    assert any(r.as_numpy("output_ids") is not None for r in stream.until_final({"after"})["after"])


def test_malformed_words_list_is_a_clean_error(served, stream, prompt_ids):
    import tritonclient.grpc as grpc

    ids, _ = prompt_ids
    bad = np.array([[[5, 6], [3, -1]]], dtype=np.int32)  # offset 3 past the two ids
    stream.send("tensorrt_llm", _engine_inputs(grpc, ids, 2, True, stop_words_list=bad), "w")
    (error,) = stream.until_final({"w"})["w"]
    assert isinstance(error, str) and "stop_words_list" in error and "increasing positions" in error


def test_genai_perf_min_length_is_not_an_input_and_min_tokens_gives_deterministic_lengths(served, stream):
    """genai-perf 0.0.16's --output-tokens-mean-deterministic sends min_length, which the 1.2 contract calls
    min_tokens; the README says to pass --extra-inputs min_tokens:N instead (what genai-perf then sends is this)."""
    import tritonclient.grpc as grpc

    stream.send("ensemble", _e2e_inputs(grpc, PLAIN, 8, True, min_length=np.array([[8]], dtype=np.int32)), "m")
    (error,) = stream.until_final({"m"})["m"]
    assert isinstance(error, str) and "min_length" in error
    # a chat turn that ends quickly (<|im_end|>) unless min_tokens holds the end id back
    prompt = "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n"
    counts = {}
    for key, extra in (("free", {}), ("held", {"min_tokens": np.array([[24]], dtype=np.int32)})):
        extra = {**extra, "return_num_output_tokens": np.array([[True]]), "exclude_input_in_output": np.array([[True]])}
        stream.send("ensemble", _e2e_inputs(grpc, prompt, 24, True, **extra), key)
        got = stream.until_final({key})[key]
        assert all(not isinstance(r, str) for r in got), got
        counts[key] = [int(r.as_numpy("num_output_tokens").reshape(-1)[0]) for r in got if r.as_numpy("num_output_tokens") is not None][-1]
    assert counts["free"] < 24 and counts["held"] == 24  # exactly max_tokens with min_tokens = max_tokens


@pytest.fixture(scope="module")
def unary(served, tmp_path_factory):
    """A --no-streaming deployment (non-decoupled models) of the served checkpoint on its own tritonserver:
    (grpc url, http url, repository)."""
    from yitrt.pipeline import free_ports
    from yitrt.triton.repository import DeployRequest, deploy
    from yitrt.triton.server import Ports, ServeRequest, start_server

    work = tmp_path_factory.mktemp("unary")
    checkpoint = read_manifest(served[2]).extra["deploy"]["source"]  # the session's converted demo checkpoint
    deploy(DeployRequest(Path(checkpoint), work / "repo", engine="reference", streaming=False, max_batch_size=4,
                         words_encoding="stock"))
    http, grpc_port, metrics = free_ports(3)
    server = start_server(ServeRequest(work / "repo", Ports(http, grpc_port, metrics), exit_timeout=5, ready_timeout=300))
    yield f"localhost:{grpc_port}", f"localhost:{http}", work / "repo"
    server.stop()


@pytest.mark.parametrize("model", ["ensemble", BLS])
def test_non_streaming_deployment_answers_unary_model_infer_over_grpc_and_http(unary, model):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    answer = grpc.InferenceServerClient(unary[0]).infer(model, _e2e_inputs(grpc, PLAIN, 10, False))
    (text,) = _texts([answer])
    assert "Paris" in text
    answer = http.InferenceServerClient(unary[1]).infer(model, _e2e_inputs(http, PLAIN, 10, False))
    value = answer.as_numpy("text_output")
    assert value.shape == (1,) and value[0].decode() == text  # the same greedy answer both ways


def test_exclude_input_in_output_false_gives_the_prompt_back_through_ensemble_and_bls(unary):
    """The stock e2e client sends exclude_input_in_output false unless told otherwise: both entry models then answer
    prompt + continuation (the model-level default of yitrt's tensorrt_llm is true)."""
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(unary[0])
    flag = {"exclude_input_in_output": np.array([[False]])}
    texts = [_texts([client.infer(model, _e2e_inputs(grpc, PLAIN, 8, False, **flag))])[0] for model in ("ensemble", BLS)]
    clean = _texts([client.infer(BLS, _e2e_inputs(grpc, PLAIN, 8, False))])[0]
    assert texts[0] == texts[1] == PLAIN + clean and "Paris" in clean


def test_stock_words_encoding_is_what_the_deployment_says(unary):
    """deploy --words-encoding stock: the preprocessing encodes a stop word alone, as NVIDIA's does (the default
    adds its leading-space variant: tests/unit/test_triton_text.py)."""
    import tritonclient.grpc as grpc
    from transformers import AutoTokenizer

    config = (unary[2] / "preprocessing" / "config.pbtxt").read_text()
    assert 'key: "yitrt_words_encoding"\n  value {\n    string_value: "stock"' in config and "Differs from the stock model" in config
    inputs = [_tensor(grpc, "QUERY", np.array([["hi"]], dtype=np.object_)), _tensor(grpc, "REQUEST_OUTPUT_LEN", np.array([[4]], dtype=np.int32)),
              _tensor(grpc, "STOP_WORDS_DICT", np.array([["Paris"]], dtype=np.object_))]
    answer = grpc.InferenceServerClient(unary[0]).infer("preprocessing", inputs)
    words = answer.as_numpy("STOP_WORDS_IDS")[0]
    alone = AutoTokenizer.from_pretrained(unary[2] / TOKENIZER_FOLDER)("Paris", add_special_tokens=False)["input_ids"]
    assert words[0][: len(alone)].tolist() == alone and words[1][0] == len(alone)
    extra_stops = [line for line in config.splitlines() if "stop_token_ids" in line]
    stop_ids = config.split('key: "stop_token_ids"')[1].split('"')[1].split(",") if extra_stops else []
    assert len([o for o in words[1] if o >= 0]) == 1 + len(stop_ids)  # "Paris" and the model's extra stop ids, no " Paris"
