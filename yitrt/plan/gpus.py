"""The GPU table (``gpus.yaml``): what a declared target GPU can run."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from yitrt.errors import UsageError


@dataclass(frozen=True)
class Gpu:
    """One GPU model.

    Attributes:
        name: canonical name (as in gpus.yaml).
        sm: compute capability as an integer (8.9 → 89).
        memory_gb: memory per GPU, GB (10^9 bytes).
    """

    name: str
    sm: int
    memory_gb: float


@lru_cache(maxsize=1)
def _table() -> dict[str, Gpu]:
    raw = yaml.safe_load(resources.files("yitrt.plan").joinpath("gpus.yaml").read_text())["gpus"]
    table: dict[str, Gpu] = {}
    for name, row in raw.items():
        gpu = Gpu(name, int(row["sm"]), float(row["memory_gb"]))
        for key in (name, *row.get("aliases", [])):
            table[key.lower()] = gpu
    return table


def known_gpus() -> list[str]:
    """Canonical GPU names, in table order."""
    return list(dict.fromkeys(g.name for g in _table().values()))


def get_gpu(name: str) -> Gpu:
    """Look up a GPU by name or alias (case-insensitive); ``sm89``-style names give an anonymous GPU of that SM.

    Raises:
        UsageError: unknown name (the message lists the known ones).
    """
    key = name.strip().lower().replace(" ", "-").replace("_", "-")
    if key in _table():
        return _table()[key]
    if key.startswith("sm") and key[2:].isdigit():
        return Gpu(key.upper(), int(key[2:]), 0.0)
    raise UsageError(f"unknown GPU {name!r}", "use one of: " + ", ".join(known_gpus()) + " (or smNN, e.g. sm89)")
