"""TEST DOUBLE of a Triton gRPC server holding one decoupled yitrt BLS-like model, in-process, for yitrt bench's
unit tests (no tritonserver, no model): ``with TritonDouble() as server: server.url``.

It speaks the real protocol (tritonclient's own generated service, so the bench's client code runs unchanged):
ServerReady, RepositoryIndex, ModelConfig, ModelStatistics and ModelStreamInfer. Every request is logged
(``server.received``: request id, text_input, max_tokens) and answered with known text: ``answer(n)`` for the n-th
request, streamed as two pieces and then an empty response flagged final (as the BLS model does).

``server.kv`` models the KV-cache counters the metrics double exports: each request's text_input is cut into blocks
of ``BLOCK_CHARS`` characters; a block whose whole prefix (the text up to its end) was seen before is reused, the
others are new (a character-level stand-in for TensorRT-LLM's token-block radix tree, exact by construction).
"""

from __future__ import annotations

import struct
import threading
from concurrent import futures

import grpc
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

MODEL = "tensorrt_llm_bls"
BLOCK_CHARS = 16
INPUTS = {"text_input": "TYPE_STRING", "max_tokens": "TYPE_INT32", "stream": "TYPE_BOOL", "end_id": "TYPE_INT32"}


def answer(n: int) -> str:
    """The text the double answers its n-th request (0-based) with."""
    return f" reply{n} done"


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
            name=MODEL, version="1", state="READY")])

    def ModelConfig(self, request, context):
        if request.name != MODEL:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.name}' is not found")
        config = model_config_pb2.ModelConfig(
            name=MODEL, backend="python",
            input=[model_config_pb2.ModelInput(name=n, data_type=model_config_pb2.DataType.Value(t), dims=[1])
                   for n, t in INPUTS.items()],
            model_transaction_policy=model_config_pb2.ModelTransactionPolicy(decoupled=True))
        return service_pb2.ModelConfigResponse(config=config)

    def ModelStatistics(self, request, context):
        with self.owner.lock:
            count = len(self.owner.received)
        stats = service_pb2.ModelStatistics(name=MODEL, version="1", inference_stats=service_pb2.InferStatistics(
            success=service_pb2.StatisticDuration(count=count), fail=service_pb2.StatisticDuration(count=0)))
        return service_pb2.ModelStatisticsResponse(model_stats=[stats])

    def ModelStreamInfer(self, request_iterator, context):
        for request in request_iterator:
            values = {}
            for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
                values[tensor.name] = (_bytes_elements(raw)[0].decode() if tensor.datatype == "BYTES"
                                       else struct.unpack("<i", raw[:4])[0] if tensor.datatype == "INT32" else raw)
            n = self.owner.receive(request.id, values["text_input"], values["max_tokens"])
            text = answer(n)
            cut = len(text) // 2
            for piece, final in ((text[:cut], False), (text[cut:], False), ("", True)):
                response = service_pb2.ModelInferResponse(model_name=MODEL, id=request.id)
                if piece:
                    tensor, raw = _text_tensor(piece)
                    response.outputs.append(tensor)
                    response.raw_output_contents.append(raw)
                response.parameters["triton_final_response"].bool_param = final
                yield service_pb2.ModelStreamInferResponse(infer_response=response)


class TritonDouble:
    """The in-process server; a context manager (started on enter, stopped on exit)."""

    def __init__(self) -> None:
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

    def receive(self, request_id: str, text: str, max_tokens: int) -> int:
        """Log one request, count its KV blocks; returns its number."""
        with self.lock:
            blocks = [text[:end] for end in range(BLOCK_CHARS, len(text) + 1, BLOCK_CHARS)] or [text]
            reused = sum(1 for b in blocks if b in self.seen_blocks)
            self.seen_blocks.update(blocks)
            self.kv["reused"] += reused
            self.kv["alloc_new"] += len(blocks) - reused
            self.kv["alloc_total"] += len(blocks)
            self.received.append({"request_id": request_id, "text_input": text, "max_tokens": max_tokens,
                                  "reused": reused, "blocks": len(blocks)})
            return len(self.received) - 1

    def __enter__(self) -> TritonDouble:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=None)
