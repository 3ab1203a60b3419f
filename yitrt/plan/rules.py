"""Compatibility rules as data (``rules.yaml``): evaluated against one context, every violation reported at once.

``plan``, ``quantize``, ``convert`` and ``build`` each build a context with what they know (a quantize run knows
the GPU, scheme and KV format but no plugin flags) and call ``check``; a rule whose fields are unknown does not
fire. The rules' texts carry the reason and the fix, so the caller only joins them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from yitrt.errors import ValidationError
from yitrt.plan.gpus import Gpu
from yitrt.quant.schemes import KvCacheFormat, Scheme

_MISSING = object()
_OPS = {"eq", "ne", "in", "not_in", "lt", "le", "gt", "ge", "set", "pow2", "truthy"}
_FIELD = re.compile(r"\{([a-z_][a-z0-9_.]*)\}")


@dataclass(frozen=True)
class Rule:
    """One compatibility rule: when every condition holds, the combination is refused (or warned about)."""

    id: str
    when: dict[str, Any]
    reason: str
    fix: str
    source: str
    severity: str = "error"


@dataclass(frozen=True)
class Finding:
    """A rule that fired, with its texts filled in from the context."""

    rule: str
    severity: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.message} (fix: {self.fix})"

    def to_json(self) -> dict[str, str]:
        """JSON object."""
        return {"rule": self.rule, "severity": self.severity, "message": self.message, "fix": self.fix}


@lru_cache(maxsize=1)
def load_rules() -> tuple[Rule, ...]:
    """Parse and check ``rules.yaml`` (cached).

    Raises:
        ValueError: a malformed rule (a bug in yitrt, caught by the unit tests).
    """
    raw = yaml.safe_load(resources.files("yitrt.plan").joinpath("rules.yaml").read_text())["rules"]
    rules = []
    for row in raw:
        rule = Rule(id=row["id"], when=dict(row["when"]), reason=row["reason"], fix=row["fix"], source=row["source"],
                    severity=row.get("severity", "error"))
        if rule.severity not in ("error", "warning"):
            raise ValueError(f"rule {rule.id}: severity {rule.severity!r}")
        for cond in rule.when.values():
            if isinstance(cond, dict) and set(cond) - _OPS:
                raise ValueError(f"rule {rule.id}: unknown operators {set(cond) - _OPS}")
        rules.append(rule)
    ids = [r.id for r in rules]
    if len(ids) != len(set(ids)):
        raise ValueError("rules.yaml: duplicate rule ids")
    return tuple(rules)


def _lookup(context: dict[str, Any], path: str) -> Any:
    node: Any = context
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _version(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, str):
        return None
    match = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", value.strip())
    return tuple(int(g) for g in match.groups() if g is not None) if match else None


def _compare(left: Any, right: Any, op: str) -> bool:
    lv, rv = _version(left), _version(right)
    if lv is not None and rv is not None:
        left, right = lv[: len(rv)], rv  # "1.2.0rc6" vs "1.3": compare the release line
    if left is None or right is None or isinstance(left, bool) or isinstance(right, bool):
        return False
    try:
        return {"lt": left < right, "le": left <= right, "gt": left > right, "ge": left >= right}[op]
    except TypeError:
        return False


def _holds(value: Any, cond: Any, context: dict[str, Any]) -> bool:
    def resolve(v: Any) -> Any:
        if isinstance(v, str) and v.startswith("$"):
            return _lookup(context, v[1:])
        if isinstance(v, list):
            return [resolve(x) for x in v]
        return v

    if not isinstance(cond, dict):
        cond = {"in": cond} if isinstance(cond, list) else {"eq": cond}
    if "set" in cond:
        known = value is not _MISSING and value is not None
        if known != bool(cond["set"]):
            return False
    if value is _MISSING:
        return False
    for op, raw in cond.items():
        if op == "set":
            continue
        target = resolve(raw)
        if target is _MISSING:
            return False
        if op == "eq" and value != target or op == "ne" and value == target:
            return False
        if op in ("in", "not_in"):
            members = target if isinstance(target, (list, tuple)) else [target]
            if (value in members) != (op == "in"):
                return False
        if op in ("lt", "le", "gt", "ge") and not _compare(value, target, op):
            return False
        if op == "pow2" and (isinstance(value, int) and value > 0 and value & (value - 1) == 0) != bool(target):
            return False
        if op == "truthy" and bool(value) != bool(target):
            return False
    return True


def _fill(text: str, context: dict[str, Any]) -> str:
    def sub(match: re.Match) -> str:
        value = _lookup(context, match.group(1))
        if value is _MISSING or value is None:
            return "none"
        if isinstance(value, (list, tuple)):
            return " or ".join(map(str, value))
        return str(value)

    return _FIELD.sub(sub, text)


def unmet(context: dict[str, Any], conditions: dict[str, Any]) -> list[str]:
    """The fields whose condition (in the rules' language) does not hold on the context."""
    return [path for path, cond in conditions.items() if not _holds(_lookup(context, path), cond, context)]


def check(context: dict[str, Any]) -> list[Finding]:
    """Every rule that fires on the context, errors first, in table order."""
    found = []
    for rule in load_rules():
        if all(_holds(_lookup(context, path), cond, context) for path, cond in rule.when.items()):
            found.append(Finding(rule.id, rule.severity, _fill(rule.reason, context), _fill(rule.fix, context)))
    return sorted(found, key=lambda f: f.severity != "error")


def raise_errors(findings: list[Finding], extra: list[str] | None = None, hint: str = "") -> list[str]:
    """Raise one ValidationError listing every error finding (and ``extra`` problems); return the warnings' texts.

    Raises:
        ValidationError: when any finding is an error or ``extra`` is non-empty.
    """
    errors = list(extra or []) + [str(f) for f in findings if f.severity == "error"]
    if errors:
        raise ValidationError(errors, hint or "fix every problem listed; `yitrt plan` shows what fits")
    return [str(f) for f in findings if f.severity == "warning"]


def format_problems(gpu: Gpu | None, scheme: Scheme, kv: KvCacheFormat | None, dtype: str | None, tp: int, pp: int) -> list[str]:
    """The compatibility errors a quantize/convert request can already be checked for (GPU SM × scheme × KV format
    × dtype), as one-line texts with their fix. ``dtype`` None or "auto": not yet known."""
    context = rule_context(gpu=gpu, scheme=scheme, kv=kv, dtype=None if dtype in (None, "auto") else dtype, tp=tp, pp=pp)
    return [str(f) for f in check(context) if f.severity == "error"]


def effective_paged_context_fmha(plugins: dict[str, Any], scheme: Scheme, kv: KvCacheFormat | None) -> bool:
    """Whether the build leaves paged context FMHA on: it needs context FMHA, and the build turns it off for an
    INT8 KV cache and for an FP8 KV cache without an FP8 quant_algo (reference §4.3)."""
    if plugins.get("use_paged_context_fmha") != "enable" or plugins.get("context_fmha") == "disable":
        return False
    if kv is not None and kv.kv_cache_quant_algo == "INT8":
        return False
    return not (kv is not None and kv.kv_cache_quant_algo == "FP8" and scheme.quant_algo not in ("FP8", "W4A8_AWQ"))


#: trtllm-build's defaults for the build fields rules read (reference §4.1).
BUILD_DEFAULTS = {"max_beam_width": 1, "max_draft_len": 0, "speculative_decoding_mode": None, "opt_num_tokens": None}


def _plugin_defaults(trtllm: str | None) -> dict[str, Any]:
    """The release line's plugin defaults (flags a profile leaves unset keep them); kv_cache_type defaults to paged."""
    from yitrt.build.flags import flag_table, known_line, release_line

    table = flag_table()
    line = release_line(trtllm) if trtllm else table.default_line
    defaults = table.plugin_defaults(line if known_line(line) else table.default_line)
    return {"kv_cache_type": "paged", **defaults}


def rule_context(
    *,
    gpu: Gpu | None = None,
    scheme: Scheme | None = None,
    kv: KvCacheFormat | None = None,
    dtype: str | None = None,
    tp: int | None = None,
    pp: int | None = None,
    trtllm: str | None = None,
    plugins: dict[str, Any] | None = None,
    build: dict[str, Any] | None = None,
    serve: dict[str, Any] | None = None,
    context_length: int | None = None,
) -> dict[str, Any]:
    """The context the rules read; pass what the caller knows (unknown parts make their rules silent). Plugin flags
    not given take the release line's defaults, build fields trtllm-build's."""
    ctx: dict[str, Any] = {}
    if gpu is not None:
        ctx["gpu"] = {"name": gpu.name, "sm": gpu.sm, "fp8": gpu.fp8, "nvlink_gbs": gpu.nvlink_gbs, "nvlink_gpus": gpu.nvlink_gpus}
    if scheme is not None:
        ctx["scheme"] = {"name": scheme.name, "quant_algo": scheme.quant_algo, "min_sm": scheme.min_sm,
                         "max_sm": scheme.max_sm, "dtypes": list(scheme.dtypes) if scheme.dtypes else None}
    if kv is not None:
        ctx["kv"] = {"name": kv.name, "algo": kv.kv_cache_quant_algo, "min_sm": kv.min_sm, "max_sm": kv.max_sm}
    else:
        ctx["kv"] = {"name": dtype or "model-dtype", "algo": None}
    for key, value in (("dtype", dtype), ("tp", tp), ("pp", pp), ("trtllm", trtllm)):
        if value is not None:
            ctx[key] = value
    if tp is not None and pp is not None:
        ctx["world_size"] = tp * pp
    if plugins is not None:
        ctx["plugin"] = {**_plugin_defaults(trtllm), **plugins}
        if scheme is not None:
            ctx["derived"] = {"paged_context_fmha": effective_paged_context_fmha(ctx["plugin"], scheme, kv)}
    if build is not None:
        ctx["build"] = {**BUILD_DEFAULTS, **build}
    if serve is not None:
        ctx["serve"] = dict(serve)
    if context_length is not None:
        ctx["model"] = {"context_length": context_length}
    return ctx
