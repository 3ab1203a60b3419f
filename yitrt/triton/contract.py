"""The ``inflight_batcher_llm`` repository contract per TensorRT-LLM release line, read from ``contract.yaml``.

One table holds the newest templates' tensors, parameter keys and ensemble wiring; annotations on a tensor say how
older lines differ (``since``, ``old`` name, ``oldtype``, ``olddims``). ``contract(line)`` resolves the table for one
line, so the repository writer and the tests read the same facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, lru_cache
from importlib import resources
from typing import Any

import yaml

from yitrt.build.flags import release_line
from yitrt.errors import UsageError

_FLAGS = {"opt", "ragged", "scalar", "yitrt"}
#: a model dtype → its Triton config data_type (the tensor-table dtypes a Yi engine can have)
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}


def _key(line: str) -> tuple[int, int]:
    major, minor = line.split(".")[:2]
    return int(major), int(minor)


@dataclass(frozen=True)
class Tensor:
    """One input or output of a model as a line writes it.

    Attributes:
        name, data_type ("INT32", "STRING", or "${var}" for a type deploy fills), dims.
        optional, ragged (allow_ragged_batch), scalar (reshape to []), yitrt (our addition, not stock).
    """

    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False
    ragged: bool = False
    scalar: bool = False
    yitrt: bool = False


@dataclass(frozen=True)
class Step:
    """One ensemble step: model input ← ensemble tensor, model output → ensemble tensor."""

    model: str
    input_map: dict[str, str]
    output_map: dict[str, str]


@dataclass(frozen=True)
class ModelContract:
    """What one model of the repository declares on one release line."""

    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    parameters: dict[str, str] = field(default_factory=dict)
    steps: tuple[Step, ...] = ()

    def input(self, name: str) -> Tensor | None:
        """The input called ``name`` (None when the line has none)."""
        return next((t for t in self.inputs if t.name == name), None)


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.strip("[]").split(",") if d.strip())


def _tensor(spec: str, line: tuple[int, int]) -> tuple[Tensor | None, str | None]:
    """(the tensor on ``line`` or None if it does not exist there, its newest name)."""
    name, data_type, dims, *rest = spec.split()
    newest = name
    flags = {r for r in rest if r in _FLAGS}
    for note in (r for r in rest if r not in _FLAGS):
        what, _, value = note.partition("=")
        old, _, since = value.rpartition("@")
        if what == "since":
            if line < _key(value):
                return None, newest
            continue
        if line >= _key(since):
            continue
        if what == "old":
            name = old
        elif what == "oldtype":
            data_type = old
        elif what == "olddims":
            dims = old
        else:
            raise ValueError(f"contract.yaml: unknown annotation {note!r} on {spec!r}")
    return Tensor(name, data_type, _dims(dims), "opt" in flags, "ragged" in flags, "scalar" in flags, "yitrt" in flags), newest


@lru_cache(maxsize=1)
def _raw() -> dict[str, Any]:
    return yaml.safe_load(resources.files("yitrt.triton").joinpath("contract.yaml").read_text())


def known_lines() -> tuple[str, ...]:
    """The release lines the table covers, oldest first."""
    return tuple(_raw()["lines"])


def model_names() -> tuple[str, ...]:
    """The repository's models, in the table's order (the stock names)."""
    return tuple(_raw()["models"])


def default_line() -> str:
    """The line written when none is asked for (the last engine line)."""
    return _raw()["default_line"]


def resolve_line(version: str | None) -> str:
    """The release line of a TensorRT-LLM version ("1.2.1" → "1.2"), checked against the table.

    Raises:
        UsageError: a version the contract table does not cover (named with the lines it does).
    """
    if not version:
        return default_line()
    line = release_line(version)
    if line not in known_lines():
        newest = known_lines()[-1]
        fix = ("TensorRT-LLM 1.3 and later have no engines: serve them with Triton's llmapi model instead"
               if _key(line) > _key(newest) else "build with, and deploy for, one of these lines")
        raise UsageError(f"yitrt deploy writes repositories for TensorRT-LLM {', '.join(known_lines())}, not {version}", fix)
    return line


@cache
def contract(line: str) -> dict[str, ModelContract]:
    """Every model's contract on ``line`` ("1.2"), tensors renamed/retyped/dropped as that line had them."""
    at = _key(line)
    models: dict[str, ModelContract] = {}
    for name, raw in _raw()["models"].items():
        tensors: dict[str, list[Tensor]] = {"inputs": [], "outputs": []}
        for kind in tensors:
            for spec in raw.get(kind, ()):
                tensor, _ = _tensor(spec, at)
                if tensor is not None:
                    tensors[kind].append(tensor)
        models[name] = ModelContract(name, tuple(tensors["inputs"]), tuple(tensors["outputs"]),
                                     dict(raw.get("parameters") or {}), tuple(_steps(raw.get("steps") or (), at)))
    return models


def _steps(raw_steps: list[dict[str, Any]], at: tuple[int, int]) -> list[Step]:
    """Ensemble steps on a line: map entries whose tensors the line lacks are dropped, renamed ones renamed."""
    lookup = _all_renames(at)
    steps = []
    for raw in raw_steps:
        maps = []
        for key in ("input_map", "output_map"):
            entries = {}
            for model_side, ensemble_side in raw[key].items():
                model_name, ensemble_name = lookup.get(model_side, model_side), lookup.get(ensemble_side, ensemble_side)
                if model_name is not None and ensemble_name is not None:
                    entries[model_name] = ensemble_name
            maps.append(entries)
        steps.append(Step(raw["model"], maps[0], maps[1]))
    return steps


def _all_renames(at: tuple[int, int]) -> dict[str, str | None]:
    """Newest tensor name → its name on the line (None: absent there), over every model."""
    out: dict[str, str | None] = {}
    for raw in _raw()["models"].values():
        for kind in ("inputs", "outputs"):
            for spec in raw.get(kind, ()):
                tensor, newest = _tensor(spec, at)
                if tensor is None or tensor.name != newest:
                    out[newest] = None if tensor is None else tensor.name
    return out
