"""TensorRT-LLM plugin profiles (``yitrt/plugins/*.yaml``, also reachable as ``plugins/`` at the repo root).

A profile lists the plugin/feature flags it sets, each with why, the conditions it requires (in the rules'
condition language, ``yitrt/plan/rules.yaml``), the (scheme, SM) pairs it is picked for automatically, extra flags
for multi-GPU engines and, optionally, build-limit hints. Opt-in profiles (``extends: auto``) start from the
profile picked for the (GPU, scheme) and change a few flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from yitrt import safe_yaml
from yitrt.errors import UsageError
from yitrt.plan.gpus import Gpu
from yitrt.quant.schemes import Scheme

_KEYS = {"name", "summary", "select", "requires", "flags", "multi_gpu", "limits", "extends"}
_LIMITS = {"max_batch_size", "max_num_tokens", "max_seq_len", "max_input_len"}


@dataclass(frozen=True)
class Profile:
    """A parsed plugin profile."""

    name: str
    summary: str
    flags: dict[str, Any]
    why: dict[str, str]
    multi_gpu: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)
    requires: dict[str, Any] = field(default_factory=dict)
    schemes: tuple[str, ...] = ()
    sm_range: tuple[int, int] | None = None
    extends: str | None = None
    path: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON object of the profile."""
        return {"name": self.name, "summary": self.summary, "path": self.path, "extends": self.extends,
                "select": {"schemes": list(self.schemes), "sm": list(self.sm_range)} if self.sm_range else None,
                "requires": self.requires, "flags": self.flags, "multi_gpu": self.multi_gpu, "limits": self.limits,
                "why": self.why}


def _split(block: dict[str, Any] | None, where: str) -> tuple[dict[str, Any], dict[str, str]]:
    values, why = {}, {}
    if block is not None and not isinstance(block, dict):
        raise UsageError(f"{where}: expected a mapping of flag: {{value: ..., why: ...}}, got a {type(block).__name__}",
                         "see yitrt/plugins/default.yaml")
    for flag, row in (block or {}).items():
        if not isinstance(row, dict) or "value" not in row or "why" not in row:
            raise UsageError(f"{where}: flag {flag!r} needs {{value: ..., why: ...}}", "see yitrt/plugins/default.yaml")
        values[flag], why[flag] = row["value"], row["why"]
    return values, why


def parse_profile(raw: Any, where: str) -> Profile:
    """Check and parse one profile document.

    Raises:
        UsageError: unknown keys, a flag without value or reason, bad limits.
    """
    if not isinstance(raw, dict) or "name" not in raw:
        raise UsageError(f"{where}: not a plugin profile (no 'name')", "see yitrt/plugins/default.yaml for the format")
    unknown = set(raw) - _KEYS
    if unknown:
        raise UsageError(f"{where}: unknown keys {sorted(unknown)}", f"allowed: {sorted(_KEYS)}")
    flags, why = _split(raw.get("flags"), where)
    multi, multi_why = _split(raw.get("multi_gpu"), where)
    limits, limit_why = _split(raw.get("limits"), where)
    if set(limits) - _LIMITS or not all(type(v) is int and v > 0 for v in limits.values()):
        raise UsageError(f"{where}: limits must be positive integers among {sorted(_LIMITS)}", "fix the profile")
    select = raw.get("select") or {}
    sm = select.get("sm") if isinstance(select, dict) else None
    schemes = select.get("schemes") if isinstance(select, dict) else None
    if not isinstance(select, dict) or not (sm is None or (isinstance(sm, list) and len(sm) == 2 and all(type(v) is int for v in sm))) \
            or not (schemes is None or (isinstance(schemes, list) and all(isinstance(v, str) for v in schemes))):
        raise UsageError(f"{where}: select must be {{schemes: [names], sm: [low, high]}}", "see yitrt/plugins/default.yaml")
    for key in ("requires",):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise UsageError(f"{where}: {key} must be a mapping", "see yitrt/plugins/default.yaml")
    if raw.get("extends") is not None and not isinstance(raw["extends"], str):
        raise UsageError(f"{where}: extends must be 'auto' or a profile name", "see yitrt/plugins/default.yaml")
    return Profile(
        name=str(raw["name"]), summary=str(raw.get("summary", "")), flags=flags,
        why={**why, **{f"{k} (tp > 1)": v for k, v in multi_why.items()}, **limit_why}, multi_gpu=multi,
        limits=limits, requires=dict(raw.get("requires") or {}), schemes=tuple(select.get("schemes") or ()),
        sm_range=(int(sm[0]), int(sm[1])) if sm else None, extends=raw.get("extends"), path=where,
    )


@lru_cache(maxsize=1)
def builtin_profiles() -> dict[str, Profile]:
    """The shipped profiles by name (cached)."""
    folder = resources.files("yitrt").joinpath("plugins")
    out = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            where = f"plugins/{entry.name}"
            profile = parse_profile(safe_yaml.loads(entry.read_text(encoding="utf-8"), where), where)
            out[profile.name] = profile
    return out


def load_profile(name_or_file: str) -> Profile:
    """A built-in profile by name, or a profile YAML file.

    Raises:
        UsageError: unknown name, unreadable or malformed file.
    """
    if name_or_file in builtin_profiles():
        return builtin_profiles()[name_or_file]
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml") or os.path.lexists(path):
        # yitrt's safe YAML loader: one line for a missing/non-regular/non-UTF-8 file, an alias bomb, a duplicate flag
        raw = safe_yaml.load_file(path, "plugin profile", error=UsageError, fix="pass a profile name or a YAML file "
                                  "(see yitrt/plugins/default.yaml for the format)")
        return parse_profile(raw, str(path))
    raise UsageError(f"unknown plugin profile {name_or_file!r}", "use one of: " + ", ".join(builtin_profiles()) + " (or a YAML file)")


def pick_profile(gpu: Gpu, scheme: Scheme) -> Profile:
    """The built-in profile selected for (GPU, scheme): among those whose ``select`` covers both, the one with
    the narrowest SM range; ``default`` when none does."""
    fitting = [p for p in builtin_profiles().values()
               if p.sm_range and scheme.name in p.schemes and p.sm_range[0] <= gpu.sm <= p.sm_range[1]]
    if not fitting:
        return builtin_profiles()["default"]
    return min(fitting, key=lambda p: p.sm_range[1] - p.sm_range[0])


def resolve_flags(profile: Profile, gpu: Gpu, scheme: Scheme, tp: int) -> tuple[dict[str, Any], dict[str, int], list[str]]:
    """The flags and limit hints a profile sets for this build, with the names of the profiles applied.

    An ``extends: auto`` profile is laid over the profile picked for (GPU, scheme); ``multi_gpu`` flags apply
    when tp > 1.
    """
    chain = [profile]
    if profile.extends:
        base = pick_profile(gpu, scheme) if profile.extends == "auto" else load_profile(profile.extends)
        chain.insert(0, base)
    flags: dict[str, Any] = {}
    limits: dict[str, int] = {}
    for p in chain:
        flags.update(p.flags)
        if tp > 1:
            flags.update(p.multi_gpu)
        limits.update(p.limits)
    return flags, limits, [p.name for p in chain]
