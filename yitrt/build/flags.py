"""The per-version ``trtllm-build`` flag table (``trtllm_flags.yaml``): which flags a release line has, their
accepted values and defaults. Every argv yitrt emits is checked against it, so no flag reaches a version that
lacks it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from yitrt.errors import UsageError

SUPPRESSED = "suppressed"


@dataclass(frozen=True)
class FlagSpec:
    """One flag as a release line has it."""

    name: str
    kind: str
    choices: tuple[str, ...] | None
    default: Any
    plugin: bool
    deprecated: str | None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not accepted for this flag (None: accepted)."""
        if self.kind == "flag":
            return None if isinstance(value, bool) else f"--{self.name} is a switch (true/false), not {value!r}"
        if self.kind == "int":
            return None if isinstance(value, int) and not isinstance(value, bool) else f"--{self.name} takes an integer, not {value!r}"
        if self.choices is not None and str(value) not in self.choices:
            return f"--{self.name} takes {', '.join(self.choices)}, not {value!r}"
        return None


@dataclass(frozen=True)
class FlagTable:
    """The parsed table."""

    lines: tuple[str, ...]
    default_line: str
    tensorrt: dict[str, str]
    raw: dict[str, dict[str, Any]]
    dtype_choices: tuple[str, ...]
    feature_choices: tuple[str, ...]

    def _at(self, value: Any, line: str) -> Any:
        """A per-line value ({line: value} from that line on) resolved for a line."""
        if not isinstance(value, dict):
            return value
        chosen = None
        for start, v in value.items():
            if _key(start) <= _key(line):
                chosen = v
        return chosen

    def flags(self, line: str) -> dict[str, FlagSpec]:
        """Every flag the line has, by name."""
        out = {}
        for name, row in self.raw.items():
            if "since" in row and _key(line) < _key(row["since"]) or "until" in row and _key(line) > _key(row["until"]):
                continue
            kind = row["kind"]
            choices = self._at(row.get("choices"), line)
            if kind == "dtype":
                choices = self.dtype_choices
            elif kind == "feature":
                choices = self.feature_choices
            out[name] = FlagSpec(name, kind, tuple(choices) if choices else None, self._at(row.get("default"), line),
                                 bool(row.get("plugin")), row.get("deprecated"))
        return out

    def plugin_defaults(self, line: str) -> dict[str, Any]:
        """The plugin/feature flags that have a default value on a line, with it."""
        return {name: spec.default for name, spec in self.flags(line).items()
                if spec.plugin and spec.default not in (None, SUPPRESSED)}


def _key(line: str) -> tuple[int, int]:
    major, minor = line.split(".")[:2]
    return int(major), int(minor)


@lru_cache(maxsize=1)
def flag_table() -> FlagTable:
    """Load ``trtllm_flags.yaml`` (cached)."""
    raw = yaml.safe_load(resources.files("yitrt.build").joinpath("trtllm_flags.yaml").read_text())
    return FlagTable(tuple(raw["lines"]), raw["default_line"], dict(raw["tensorrt"]), raw["flags"],
                     tuple(raw["dtype_choices"]), tuple(raw["feature_choices"]))


def release_line(version: str) -> str:
    """The release line ("1.2") of a TensorRT-LLM version ("1.2", "1.2.0", "1.2.0rc6", "0.19.0.post1").

    Raises:
        UsageError: not a version.
    """
    match = re.match(r"^\s*v?(\d+)\.(\d+)", version or "")
    if not match:
        raise UsageError(f"{version!r} is not a TensorRT-LLM version", "use e.g. 1.2 or 1.2.0")
    return f"{int(match.group(1))}.{int(match.group(2))}"


def known_line(line: str) -> bool:
    """Whether the table covers a release line."""
    return line in flag_table().lines


#: The startup banner ``import tensorrt_llm`` prints ("TensorRT-LLM version" in 0.x, "TensorRT LLM version" in 1.x).
BANNER = re.compile(r"TensorRT[- ]LLM version:\s*([0-9][0-9A-Za-z.+-]*)")


def banner_version(text: str) -> str | None:
    """The TensorRT-LLM version announced in a log's banner, or None."""
    match = BANNER.search(text)
    return match.group(1) if match else None
