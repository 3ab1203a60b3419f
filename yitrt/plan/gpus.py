"""The GPU table (``gpus.yaml``): what a target GPU holds and can run."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from yitrt.errors import UsageError

MIB = 1 << 20
#: Compute capabilities an ``smNN`` target may name: NVIDIA's data-center and workstation architectures from Volta
#: on (7.0 Volta, 7.2 Xavier, 7.5 Turing, 8.0/8.6/8.7 Ampere, 8.9 Ada, 9.0 Hopper, 10.0/10.3 Blackwell B200/B300,
#: 11.0 Thor, 12.0/12.1 Blackwell RTX/DGX Spark; CUDA programming guide, "Compute Capabilities").
KNOWN_SMS = frozenset({70, 72, 75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121})


@dataclass(frozen=True)
class Gpu:
    """One GPU model.

    Attributes:
        name: canonical name (as in gpus.yaml).
        sm: compute capability as an integer (8.9 → 89).
        memory_mib: total memory per GPU as nvidia-smi reports it, MiB (0 for an anonymous ``smNN`` target).
        bandwidth_gbs: memory bandwidth, GB/s.
        fp8 / fp4: hardware FP8 / FP4 tensor cores.
        nvlink_gbs: NVLink bandwidth per GPU, GB/s (0: PCIe only).
        nvlink_gpus: GPUs joined by one NVLink domain.
        aiconfigurator: AIConfigurator's system name for the GPU (None: no performance data).
    """

    name: str
    sm: int
    memory_mib: int = 0
    bandwidth_gbs: float = 0.0
    fp8: bool = False
    fp4: bool = False
    nvlink_gbs: float = 0.0
    nvlink_gpus: int = 1
    aiconfigurator: str | None = None

    @property
    def memory_bytes(self) -> int:
        """Total memory per GPU in bytes."""
        return self.memory_mib * MIB

    @property
    def memory_gb(self) -> float:
        """Total memory per GPU in GB (10^9 bytes)."""
        return self.memory_bytes / 1e9

    def to_json(self) -> dict:
        """The row as JSON."""
        return {"name": self.name, "sm": self.sm, "memory_mib": self.memory_mib, "memory_gb": round(self.memory_gb, 2),
                "bandwidth_gbs": self.bandwidth_gbs, "fp8": self.fp8, "fp4": self.fp4, "nvlink_gbs": self.nvlink_gbs,
                "nvlink_gpus": self.nvlink_gpus}


@lru_cache(maxsize=1)
def _table() -> dict[str, Gpu]:
    raw = yaml.safe_load(resources.files("yitrt.plan").joinpath("gpus.yaml").read_text())["gpus"]
    table: dict[str, Gpu] = {}
    for name, row in raw.items():
        gpu = Gpu(name, int(row["sm"]), int(row["memory_mib"]), float(row["bandwidth_gbs"]), bool(row["fp8"]),
                  bool(row["fp4"]), float(row["nvlink_gbs"]), int(row["nvlink_gpus"]), row.get("aiconfigurator"))
        for key in (name, *row.get("aliases", [])):
            table[_key(key)] = gpu
    return table


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "-").replace("_", "-")


def known_gpus() -> list[str]:
    """Canonical GPU names, in table order."""
    return list(dict.fromkeys(g.name for g in _table().values()))


def all_gpus() -> list[Gpu]:
    """Every GPU row, in table order."""
    return list({g.name: g for g in _table().values()}.values())


def get_gpu(name: str) -> Gpu:
    """Look up a GPU by name or alias (case-insensitive); ``sm89``-style names give an anonymous GPU of that SM.

    Raises:
        UsageError: unknown name (the message lists the known ones).
    """
    key = _key(name)
    if key in _table():
        return _table()[key]
    if key.startswith("sm") and key[2:].isdigit():
        sm = int(key[2:])
        if sm not in KNOWN_SMS:
            raise UsageError(f"unknown GPU architecture {name!r}", "use one of: " + ", ".join(f"sm{s}" for s in sorted(KNOWN_SMS)))
        return Gpu(key.upper(), sm, fp8=sm >= 89, fp4=sm >= 100)
    raise UsageError(f"unknown GPU {name!r}", "use one of: " + ", ".join(known_gpus()) + " (or smNN, e.g. sm89)")


def match_gpu(reported_name: str, sm: int | None = None) -> Gpu | None:
    """The table row for a name nvidia-smi reports (e.g. "NVIDIA H100 80GB HBM3"), or None when unknown.

    nvidia-smi names carry a vendor prefix and a memory/format suffix; the longest table name or alias whose
    words all appear in the reported name wins, and an SM, when given, must agree.
    """
    words = set(_key(reported_name.replace("NVIDIA", "")).replace("-", " ").split())
    joined = _key(reported_name.replace("NVIDIA", "")).strip("-")
    best: tuple[int, Gpu] | None = None
    for key, gpu in _table().items():
        parts = key.split("-")
        if (key == joined or all(p in words for p in parts)) and (sm is None or gpu.sm == sm):
            score = len(key)
            if best is None or score > best[0]:
                best = (score, gpu)
    return best[1] if best else None
