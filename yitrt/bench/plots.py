"""The report's PNG plots (matplotlib, drawn off-screen): throughput against TTFT and TPOT with the SLO bounds, and
the latency-throughput curve (output tokens/s against tokens/s each user sees, 1/TPOT) with the SLO bound marked.
The best point meeting the SLO is starred on each. When the server's metrics gave a KV-cache hit rate, TTFT (p50)
against the prefix hit rate too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from yitrt.errors import require

#: file name → (x metric, its label, SLO key or None)
_LATENCY_PLOTS = {
    "throughput_vs_ttft.png": ("ttft_ms", "TTFT (ms)", "ttft_ms"),
    "throughput_vs_tpot.png": ("tpot_ms", "TPOT (ms)", "tpot_ms"),
}
CURVE_PLOT = "latency_throughput.png"
HIT_RATE_PLOT = "ttft_vs_hit_rate.png"


def write_plots(folder: Path, report: dict[str, Any]) -> list[str]:
    """Draw the plots of a report into ``folder``; returns their file names."""
    matplotlib = require("matplotlib", "bench")
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    points, best, slo = report["points"], report["best"], report["slo"] or {}
    key = f"p{(slo.get('percentile') or 90):g}"
    labels = [p["load"]["label"] for p in points]
    throughput = [p["output_token_throughput"] for p in points]
    written = []
    for name, (metric, title, bound_key) in _LATENCY_PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for stat, style in (("p50", "o-"), (key, "s--")):
            xs = [p[metric][stat] for p in points]
            _line(ax, xs, throughput, style, f"{stat} {title.split()[0]}")
        _annotate(ax, [p[metric]["p50"] for p in points], throughput, labels)
        if slo.get(bound_key) is not None:
            ax.axvline(slo[bound_key], color="red", linestyle=":", label=f"SLO {slo[bound_key]:g} ms")
        _star(ax, best, [p[metric][key] for p in points], throughput, slo)
        ax.set(xlabel=title, ylabel="output tokens/s", title=f"Throughput vs {title.split()[0]} ({report['target']['model']})")
        _save(fig, ax, folder / name)
        written.append(name)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    per_user = [1000 / p["tpot_ms"][key] if p["tpot_ms"][key] else None for p in points]
    _line(ax, per_user, throughput, "o-", f"1 / {key} TPOT")
    _annotate(ax, per_user, throughput, labels)
    _star(ax, best, per_user, throughput, slo)
    if slo.get("tpot_ms") is not None:
        bound = 1000 / slo["tpot_ms"]
        ax.axvline(bound, color="red", linestyle=":", label=f"SLO: TPOT {slo['tpot_ms']:g} ms")
        low, high = ax.get_xlim()
        ax.axvspan(bound, max(high, bound), color="green", alpha=0.08, label="within the TPOT bound")
        ax.set_xlim(min(low, bound), max(high, bound))
    ax.set(xlabel="output tokens/s per user", ylabel="output tokens/s (total)", title="Latency-throughput curve")
    _save(fig, ax, folder / CURVE_PLOT)
    written.append(CURVE_PLOT)
    if _hit_rate_plot(folder / HIT_RATE_PLOT, report):
        written.append(HIT_RATE_PLOT)
    return written


def _hit_rate_plot(path: Path, report: dict[str, Any]) -> bool:
    """TTFT p50 against the KV-cache prefix hit rate per point; False (nothing drawn) when no point measured one."""
    import matplotlib.pyplot as plt

    points = report["points"]
    rates = [None if (p.get("kv_cache") or {}).get("hit_rate") is None else 100 * p["kv_cache"]["hit_rate"] for p in points]
    if all(r is None for r in rates):
        return False
    ttft = [p["ttft_ms"]["p50"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _line(ax, rates, ttft, "o", "TTFT p50")
    _annotate(ax, rates, ttft, [p["load"]["label"] for p in points])
    ax.set_xlim(-5, 105)
    ax.set(xlabel="KV-cache prefix hit rate (% of allocated blocks reused)", ylabel="TTFT p50 (ms)",
           title=f"TTFT vs prefix hit rate ({report['target']['model']})")
    _save(fig, ax, path)
    return True


def _line(ax, xs, ys, style, label) -> None:
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
    if pairs:
        ax.plot(*zip(*pairs, strict=True), style, label=label)


def _annotate(ax, xs, ys, labels) -> None:
    for x, y, text in zip(xs, ys, labels, strict=True):
        if x is not None and y is not None:
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)


def _star(ax, best, xs, ys, slo: dict) -> None:
    if best is not None and xs[best] is not None and ys[best] is not None:
        ax.plot([xs[best]], [ys[best]], marker="*", markersize=16, color="gold", markeredgecolor="black", linestyle="none",
                label="best under the SLO" if slo else "best (no SLO given)")


def _save(fig, ax, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
