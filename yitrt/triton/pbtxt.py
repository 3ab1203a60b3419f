"""Triton ``config.pbtxt`` files built as ``ModelConfig`` protobuf messages (the schema tritonclient ships), so
every file written parses by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from yitrt.errors import require
from yitrt.triton.contract import ModelContract, Tensor


def _pb():
    return require("tritonclient.grpc.model_config_pb2", "serve")


@dataclass(frozen=True)
class Header:
    """The settings above a model's tensors.

    Attributes:
        backend / platform: exactly one (``python``, ``tensorrtllm``; ``ensemble``).
        max_batch_size: Triton's batch bound.
        decoupled: model_transaction_policy.decoupled (None: no policy block).
        dynamic_batching: None (no block), "plain" (``dynamic_batching {}``) or "queue" (preferred batch size =
            max_batch_size, queue delay 0, queue size 0 — the stock templates' block).
        instance_count: instance_group count (KIND_CPU), None for ensembles.
    """

    backend: str | None = None
    platform: str | None = None
    max_batch_size: int = 0
    decoupled: bool | None = None
    dynamic_batching: str | None = None
    instance_count: int | None = 1


def _data_type(pb, value: str, types: dict[str, str]) -> int:
    if value.startswith("${"):
        var = value[2:-1]
        if var not in types:
            raise KeyError(f"data type variable {var} not filled")
        value = types[var]
    return pb.DataType.Value(value if value.startswith("TYPE_") else "TYPE_" + value)


def _add_tensor(pb, message, tensor: Tensor, types: dict[str, str], is_input: bool) -> None:
    message.name = tensor.name
    message.data_type = _data_type(pb, tensor.data_type, types)
    message.dims.extend(tensor.dims)
    if is_input:
        message.optional = tensor.optional
        message.allow_ragged_batch = tensor.ragged
        if tensor.scalar:
            message.reshape.SetInParent()  # reshape { shape: [] }: the backend reads a [1] tensor as a scalar


def build_config(name: str, model: ModelContract, header: Header, *, types: dict[str, str], parameters: dict[str, str]):
    """The ``ModelConfig`` of one model: ``header``, the contract's tensors and steps, and ``parameters``.

    Args:
        types: values of the contract's data type variables (``logits_datatype`` → ``TYPE_FP32`` …).
        parameters: every parameter key → string value (unfilled keys keep their ``${var}``).
    """
    pb = _pb()
    cfg = pb.ModelConfig(name=name, max_batch_size=header.max_batch_size)
    if header.backend:
        cfg.backend = header.backend
    if header.platform:
        cfg.platform = header.platform
    if header.decoupled is not None:
        cfg.model_transaction_policy.decoupled = header.decoupled
    if header.dynamic_batching == "plain":
        cfg.dynamic_batching.SetInParent()
    elif header.dynamic_batching == "queue":
        cfg.dynamic_batching.preferred_batch_size.append(header.max_batch_size)
        cfg.dynamic_batching.max_queue_delay_microseconds = 0
        cfg.dynamic_batching.default_queue_policy.max_queue_size = 0
    for tensor in model.inputs:
        _add_tensor(pb, cfg.input.add(), tensor, types, True)
    for tensor in model.outputs:
        _add_tensor(pb, cfg.output.add(), tensor, types, False)
    for step in model.steps:
        message = cfg.ensemble_scheduling.step.add(model_name=step.model, model_version=-1)
        message.input_map.update(step.input_map)
        message.output_map.update(step.output_map)
    if header.instance_count is not None:
        cfg.instance_group.add(count=header.instance_count, kind=pb.ModelInstanceGroup.Kind.KIND_CPU)
    for key, value in parameters.items():
        cfg.parameters[key].string_value = value
    return cfg


def to_text(cfg, comment: str = "") -> str:
    """protobuf text format, under ``# comment`` lines."""
    from google.protobuf import text_format

    head = "".join(f"# {line}\n".replace("# \n", "#\n") for line in comment.splitlines())
    return head + text_format.MessageToString(cfg)


def parse_config(text: str):
    """Parse a ``config.pbtxt`` into ``ModelConfig`` (raises ``google.protobuf.text_format.ParseError``)."""
    from google.protobuf import text_format

    return text_format.Parse(text, _pb().ModelConfig())
