"""TEST DOUBLE of a Triton gRPC server holding one decoupled yitrt BLS-like model, in-process, for yitrt bench's
unit tests (no tritonserver, no model): ``with TritonDouble() as server: server.url``.

It speaks the real protocol (tritonclient's own generated service, so the bench's client code runs unchanged):
ServerReady, RepositoryIndex, ModelConfig, ModelStatistics and ModelStreamInfer. Every request is logged
(``server.received``: model, request id, text_input, max_tokens, and ``inputs``: every input tensor decoded to a
list of values) and answered with known text: ``answer(n)`` for the n-th request, streamed as two pieces and then an
empty response flagged final (as the BLS model does).

``TritonDouble(models={name: inputs}, respond=fn)`` serves other models (e.g. a ``tensorrt_llm``-like one taking
``input_ids``) and crafted responses: ``fn(n, model, inputs)`` returns the n-th request's :class:`Reply` list (text,
token ids, extra output tensors such as the speculative-decoding outputs, the final flag).

``server.kv`` models the KV-cache counters the metrics double exports: each request's text_input is cut into blocks
of ``BLOCK_CHARS`` characters; a block whose whole prefix (the text up to its end) was seen before is reused, the
others are new (a character-level stand-in for TensorRT-LLM's token-block radix tree, exact by construction).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

MODEL = "tensorrt_llm_bls"
BLOCK_CHARS = 16
INPUTS = {"text_input": "TYPE_STRING", "max_tokens": "TYPE_INT32", "stream": "TYPE_BOOL", "end_id": "TYPE_INT32"}
#: a tensorrt_llm-like model asked directly: token ids in, token ids out, the lookahead and perf-metrics inputs
ENGINE = "tensorrt_llm"
ENGINE_INPUTS = {"input_ids": "TYPE_INT32", "input_lengths": "TYPE_INT32", "request_output_len": "TYPE_INT32",
                 "streaming": "TYPE_BOOL", "end_id": "TYPE_INT32", "exclude_input_in_output": "TYPE_BOOL",
                 "return_perf_metrics": "TYPE_BOOL", "lookahead_window_size": "TYPE_INT32",
                 "lookahead_ngram_size": "TYPE_INT32", "lookahead_verification_set_size": "TYPE_INT32"}
#: struct formats of the raw tensor contents this double reads and writes
_FORMATS = {"INT32": "i", "INT64": "q", "UINT64": "Q", "FP32": "f", "BOOL": "?"}


def answer(n: int) -> str:
    """The text the double answers its n-th request (0-based) with."""
    return f" reply{n} done"


@dataclass
class Reply:
    """One crafted response: ``text`` (a text_output, when not empty), ``ids`` (output_ids [1, 1, n] and
    sequence_length, when not None), ``outputs`` (name → (datatype, values), sent as [1, len(values)]), ``final``."""

    text: str = ""
    ids: list[int] | None = None
    outputs: dict[str, tuple[str, list]] = field(default_factory=dict)
    final: bool = False


def default_replies(n: int, model: str, inputs: dict[str, list]) -> list[Reply]:
    """``answer(n)`` in two pieces, then an empty final response."""
    text = answer(n)
    cut = len(text) // 2
    return [Reply(text[:cut]), Reply(text[cut:]), Reply(final=True)]


def _tensor(name: str, datatype: str, shape: list[int], values: list) -> tuple[service_pb2.ModelInferResponse.InferOutputTensor, bytes]:
    tensor = service_pb2.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=shape)
    return tensor, struct.pack(f"<{len(values)}{_FORMATS[datatype]}", *values)


def _decode(tensor, raw: bytes) -> list:
    if tensor.datatype == "BYTES":
        return [b.decode() for b in _bytes_elements(raw)]
    fmt = _FORMATS[tensor.datatype]
    return list(struct.unpack(f"<{len(raw) // struct.calcsize(fmt)}{fmt}", raw))


def _bytes_elements(raw: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        (size,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4:i + 4 + size])
        i += 4 + size
    return out


def _text_tensor(text: str) -> tuple[service_pb2.ModelInferResponse.InferOutputTensor, bytes]:
    data = text.encode()
    tensor = service_pb2.ModelInferResponse.InferOutputTensor(name="text_output", datatype="BYTES", shape=[1, 1])
    return tensor, struct.pack("<I", len(data)) + data


class _Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, owner: TritonDouble) -> None:
        self.owner = owner

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def RepositoryIndex(self, request, context):
        return service_pb2.RepositoryIndexResponse(models=[service_pb2.RepositoryIndexResponse.ModelIndex(
            name=name, version="1", state="READY") for name in self.owner.models])

    def ModelConfig(self, request, context):
        if request.name not in self.owner.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.name}' is not found")
        config = model_config_pb2.ModelConfig(
            name=request.name, backend="python",
            input=[model_config_pb2.ModelInput(name=n, data_type=model_config_pb2.DataType.Value(t), dims=[-1 if n == "input_ids" else 1])
                   for n, t in self.owner.models[request.name].items()],
            model_transaction_policy=model_config_pb2.ModelTransactionPolicy(decoupled=True))
        return service_pb2.ModelConfigResponse(config=config)

    def ModelStatistics(self, request, context):
        with self.owner.lock:
            count = sum(1 for r in self.owner.received if r["model"] == (request.name or MODEL))
        stats = service_pb2.ModelStatistics(name=request.name or MODEL, version="1", inference_stats=service_pb2.InferStatistics(
            success=service_pb2.StatisticDuration(count=count), fail=service_pb2.StatisticDuration(count=0)))
        return service_pb2.ModelStatisticsResponse(model_stats=[stats])

    def ModelStreamInfer(self, request_iterator, context):
        for request in request_iterator:
            values = {tensor.name: _decode(tensor, raw) for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True)}
            text = values.get("text_input", [""])[0]
            max_tokens = (values.get("max_tokens") or values.get("request_output_len") or [None])[0]
            n = self.owner.receive(request.id, text, max_tokens, request.model_name, values)
            for reply in self.owner.respond(n, request.model_name, values):
                response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
                tensors = []
                if reply.text:
                    tensors.append(_text_tensor(reply.text))
                if reply.ids is not None:
                    tensors.append(_tensor("output_ids", "INT32", [1, 1, len(reply.ids)], reply.ids))
                    tensors.append(_tensor("sequence_length", "INT32", [1, 1], [len(reply.ids)]))
                tensors += [_tensor(name, datatype, [1, len(vals)], vals) for name, (datatype, vals) in reply.outputs.items()]
                for tensor, raw in tensors:
                    response.outputs.append(tensor)
                    response.raw_output_contents.append(raw)
                response.parameters["triton_final_response"].bool_param = reply.final
                yield service_pb2.ModelStreamInferResponse(infer_response=response)


class TritonDouble:
    """The in-process server; a context manager (started on enter, stopped on exit)."""

    def __init__(self, models: dict[str, dict[str, str]] | None = None,
                 respond: Callable[[int, str, dict[str, list]], list[Reply]] | None = None) -> None:
        self.models = models if models is not None else {MODEL: INPUTS}
        self.respond = respond or default_replies
        self.lock = threading.Lock()
        self.received: list[dict] = []
        self.seen_blocks: set[str] = set()
        self.kv = {"reused": 0, "alloc_new": 0, "alloc_total": 0}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(self), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def receive(self, request_id: str, text: str, max_tokens: int | None, model: str = MODEL,
                inputs: dict[str, list] | None = None) -> int:
        """Log one request, count its KV blocks; returns its number."""
        with self.lock:
            blocks = [text[:end] for end in range(BLOCK_CHARS, len(text) + 1, BLOCK_CHARS)] or [text]
            reused = sum(1 for b in blocks if b in self.seen_blocks)
            self.seen_blocks.update(blocks)
            self.kv["reused"] += reused
            self.kv["alloc_new"] += len(blocks) - reused
            self.kv["alloc_total"] += len(blocks)
            self.received.append({"request_id": request_id, "text_input": text, "max_tokens": max_tokens,
                                  "reused": reused, "blocks": len(blocks), "model": model, "inputs": inputs or {}})
            return len(self.received) - 1

    def __enter__(self) -> TritonDouble:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=None)
