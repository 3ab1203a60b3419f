"""`yitrt bench compare A.json B.json`: two reports side by side, load point by load point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from yitrt.bench.runner import REPORT_KIND, REPORT_NAME
from yitrt.errors import UsageError

#: (name, where in a point, True when higher is better)
METRICS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("output tok/s", ("output_token_throughput",), True),
    ("req/s", ("request_throughput",), True),
    ("goodput req/s", ("goodput",), True),
    ("TTFT p50 ms", ("ttft_ms", "p50"), False),
    ("TTFT p90 ms", ("ttft_ms", "p90"), False),
    ("TTFT p99 ms", ("ttft_ms", "p99"), False),
    # beside TTFT: a reuse-on vs reuse-off comparison shows the TTFT change next to what the prefix cache served
    ("KV hit rate", ("kv_cache", "hit_rate"), True),
    ("KV reused blocks", ("kv_cache", "reused_blocks"), True),
    ("TPOT p50 ms", ("tpot_ms", "p50"), False),
    ("TPOT p90 ms", ("tpot_ms", "p90"), False),
    ("TPOT p99 ms", ("tpot_ms", "p99"), False),
    ("E2E p50 ms", ("e2e_ms", "p50"), False),
    ("E2E p99 ms", ("e2e_ms", "p99"), False),
    ("errors", ("counts", "errors"), False),
    # speculative decoding: what the draft bought (None on a point that measured no speculation)
    ("accepted draft tokens/step", ("speculation", "mean_accepted_per_step"), True),
    ("acceptance rate", ("speculation", "acceptance_rate"), True),
    ("tokens/target step", ("speculation", "tokens_per_step"), True),
)
#: (key in a speed-up row, where in a point): B / A of each
RATIOS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("output_throughput_ratio", ("output_token_throughput",)),
    ("tpot_p50_ratio", ("tpot_ms", "p50")),
    ("ttft_p50_ratio", ("ttft_ms", "p50")),
)
#: the acceptance figures a speed-up row shows for each side
ACCEPTANCE = ("measured", "mean_accepted_per_step", "acceptance_rate", "tokens_per_step", "target_steps")


def load_report(path: Path) -> dict[str, Any]:
    """A bench.json (or the folder holding one).

    Raises:
        UsageError: missing, not JSON, or not a yitrt bench report.
    """
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    from yitrt.userfiles import DATA_CAP, read_json

    report = read_json(path, "bench report", DATA_CAP, fix="pass a bench.json written by yitrt bench (or its folder)")
    if not isinstance(report, dict) or report.get("kind") != REPORT_KIND or not isinstance(report.get("points"), list):
        raise UsageError(f"{path} is not a yitrt bench report", "pass a bench.json written by yitrt bench")
    return report


def _value(point: dict[str, Any], where: tuple[str, ...]) -> float | None:
    value: Any = point
    for key in where:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def compare_reports(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Each load point both reports ran, metric by metric: A, B, B's change in percent and which is better.

    Returns:
        ``{"points": [{"load", "rows": [{"metric", "a", "b", "change_pct", "better"}]}], "only_a", "only_b",
        "best": {"a", "b"}, "best_rows", "speedup" (:func:`speedup_rows`, when either run is speculative; else []),
        "warnings"}``.
    """
    warnings = []
    if a.get("mode") != b.get("mode"):
        warnings.append(f"A ran {a.get('mode')} points and B {b.get('mode')} points: only the best points compare")
    for what, key in (("workload", "workload"), ("SLO", "slo")):
        left, right = a.get(key) or {}, b.get(key) or {}
        if key == "workload":
            left, right = ({k: v for k, v in d.items() if k in ("dataset", "isl", "osl", "ignore_eos", "prefix", "multiturn")} for d in (left, right))
        if left != right:
            warnings.append(f"the runs used different {what} settings: {left} vs {right}")
    by_label = {p["load"]["label"]: p for p in b["points"]}
    points = []
    for pa in a["points"]:
        pb = by_label.get(pa["load"]["label"])
        if pb is not None:
            points.append({"load": pa["load"]["label"], "rows": [_row(name, where, higher, pa, pb) for name, where, higher in METRICS]})
    labels_a = {p["load"]["label"] for p in a["points"]}
    best = {side: (None if r.get("best") is None else r["points"][r["best"]]["load"]["label"]) for side, r in (("a", a), ("b", b))}
    speedup = speedup_rows(a, b) if _speculative(a) or _speculative(b) else []
    if speedup and _measured(a) and not _measured(b):
        warnings.append("A measured speculation and B did not: the speed-up ratios are B / A, so pass the baseline first "
                        "(yitrt bench compare BASELINE SPECULATIVE)")
    return {"points": points, "only_a": sorted(labels_a - set(by_label)), "only_b": sorted(set(by_label) - labels_a),
            "best": best, "best_rows": _best_rows(a, b), "speedup": speedup, "warnings": warnings}


def _measured(report: dict[str, Any]) -> bool:
    return any((p.get("speculation") or {}).get("measured") for p in report["points"])


def _speculative(report: dict[str, Any]) -> bool:
    """A run that sent speculation inputs or measured speculation at some point."""
    return bool((report.get("speculation") or {}).get("requested")) or _measured(report)


def _ratio(va: Any, vb: Any) -> float | None:
    if not isinstance(va, (int, float)) or not isinstance(vb, (int, float)) or va == 0:
        return None
    return round(vb / va, 4)


def speedup_rows(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Per load point both ran: B / A of output throughput, TPOT p50 and TTFT p50 (B the speculative run, A its
    baseline: a throughput ratio > 1 and latency ratios < 1 are B's speed-up), with both sides' acceptance.

    Returns:
        ``[{"load", "output_throughput_ratio", "tpot_p50_ratio", "ttft_p50_ratio", "a_speculation",
        "b_speculation"}]``; a ratio is None when either side lacks the figure or A's is 0.
    """
    by_label = {p["load"]["label"]: p for p in b["points"]}
    rows = []
    for pa in a["points"]:
        pb = by_label.get(pa["load"]["label"])
        if pb is None:
            continue
        row: dict[str, Any] = {"load": pa["load"]["label"]}
        row.update({key: _ratio(_value(pa, where), _value(pb, where)) for key, where in RATIOS})
        for side, point in (("a", pa), ("b", pb)):
            spec = point.get("speculation") or {}
            row[f"{side}_speculation"] = {k: spec.get(k, False if k == "measured" else None) for k in ACCEPTANCE}
        rows.append(row)
    return rows


def _row(name: str, where: tuple[str, ...], higher: bool, pa: dict[str, Any], pb: dict[str, Any]) -> dict[str, Any]:
    va, vb = _value(pa, where), _value(pb, where)
    change = None if va is None or vb is None or va == 0 else round((vb - va) / abs(va) * 100, 1)
    better = None if va is None or vb is None or va == vb else ("b" if (vb > va) == higher else "a")
    return {"metric": name, "a": va, "b": vb, "change_pct": change, "better": better}


def _best_rows(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The two best points against each other (what the SLO objective compares), when both runs have one."""
    if a.get("best") is None or b.get("best") is None:
        return None
    pa, pb = a["points"][a["best"]], b["points"][b["best"]]
    return [_row(name, where, higher, pa, pb) for name, where, higher in METRICS]
