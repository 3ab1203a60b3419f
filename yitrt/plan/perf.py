"""SLO-aware choice with NVIDIA's AIConfigurator (extra ``yitrt[plan]``): the seed's "max throughput while
latency <= T".

For every candidate the memory planner says fits (tp × scheme) and every batch size up to the sequences its KV
pool holds, AIConfigurator estimates TTFT, TPOT and tokens/s per GPU for in-flight-batched (aggregated) serving
from NVIDIA's measured kernel data; the candidate with the most tokens/s per GPU that meets both bounds wins
(among measured estimates when any meets them).

What the estimates are: AIConfigurator 0.12 models TensorRT-LLM's current release line (1.3, PyTorch backend) on
H100/H200/B200/GB200/L40S/RTX PRO 6000 and 1.0 on A100; the 1.2 engine path uses the same GEMM and attention
kernels for these formats but is not what was measured, so read the figures as a ranking and a ballpark, and
measure the chosen deployment with `yitrt bench`. Formats without measured data on a system (e.g. INT4 AWQ or
SmoothQuant on Hopper) fall back to AIConfigurator's formula mode and are marked "formula".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yitrt.errors import require

if TYPE_CHECKING:
    from yitrt.plan.planner import PlanReport

#: yitrt scheme → AIConfigurator GEMM quant mode (None: AIConfigurator has no model of the format).
GEMM_MODES = {"none": "bfloat16", "fp8": "fp8", "int8-sq": "sq", "int4-awq": "int4_wo", "w8a16": "int8_wo",
              "w4a16": "int4_wo", "fp8-rowwise": None, "w4a8-awq": None}
#: yitrt KV-cache format (None: model dtype) → AIConfigurator KV quant mode.
KV_MODES = {None: "bfloat16", "fp8": "fp8", "int8": "int8"}
#: Batch sizes tried per candidate (capped by what its KV pool holds).
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _model_dir(cfg, folder: Path) -> Path:
    """A minimal HF config.json for AIConfigurator (it reads dims only; no network for local folders)."""
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": cfg.num_layers,
           "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
           "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
           "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
           "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


@contextlib.contextmanager
def _quiet():
    """AIConfigurator logs fallback notices as warnings; keep them off the user's terminal during the sweep."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def estimate(estimator, model_dir: Path, system: str, scheme: str, kv: str | None, tp: int, batch: int, isl: int, osl: int) -> dict[str, Any]:
    """One AIConfigurator estimate; measured data first, formula mode where a format has none.

    Raises:
        Exception: AIConfigurator's own error when neither mode can estimate the case.
    """
    fmha = "fp8" if scheme == "fp8" and kv == "fp8" else None  # FP8 context FMHA (the fp8 profiles enable it)
    kwargs = dict(mode="agg", backend_name="trtllm", backend_version="current", isl=isl, osl=osl, batch_size=batch,
                  tp_size=tp, gemm_quant_mode=GEMM_MODES[scheme], kvcache_quant_mode=KV_MODES[kv], fmha_quant_mode=fmha)
    try:
        result, data = estimator(str(model_dir), system, database_mode="SILICON", **kwargs), "measured"
    except Exception as exc:  # PerfDataNotAvailableError and friends: AIConfigurator's types, not ours
        if "OOM" in str(exc):
            raise
        result, data = estimator(str(model_dir), system, database_mode="HYBRID", **kwargs), "formula"
    return {"ttft_ms": float(result.ttft), "tpot_ms": float(result.tpot),
            "tokens_per_s_per_gpu": float(result.tokens_per_second_per_gpu), "data": data,
            "backend_version": str((result.raw or {}).get("version") or result.backend_version)}


def choose_under_slo(report: PlanReport, slo_ttft_ms: float, slo_tpot_ms: float) -> dict[str, Any]:
    """Estimate every fitting candidate of a `--compare` report and pick the best one under both bounds.

    Returns:
        ``{"system", "backend_version", "slo_ttft_ms", "slo_tpot_ms", "candidates": [...], "best": {...} | None,
        "notes": [...]}``, or ``{"error": ...}`` when AIConfigurator has no data for the GPU.

    Raises:
        MissingDependencyError: AIConfigurator is not installed (the hint says ``pip install 'yitrt[plan]'``).
    """
    os.environ.setdefault("MPLCONFIGDIR", str(Path(tempfile.gettempdir()) / "yitrt-mplconfig"))  # it imports matplotlib
    api = require("aiconfigurator.cli.api", "plan")
    from yitrt.plan.gpus import all_gpus

    system = report.gpu.aiconfigurator
    if system is None:
        covered = ", ".join(g.name for g in all_gpus() if g.aiconfigurator)
        return {"error": f"AIConfigurator has no performance data for {report.gpu.name}; it covers {covered}"}
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    opts = report.options
    version = ""
    with tempfile.TemporaryDirectory(prefix="yitrt-aic-") as tmp, _quiet():
        model_dir = _model_dir(report.source.cfg, Path(tmp))
        for cand in report.candidates:
            if not cand.ok or cand.pp != 1:
                continue
            if GEMM_MODES.get(cand.scheme) is None:
                note = f"{cand.scheme}: AIConfigurator has no model of this format; not estimated"
                notes += [] if note in notes else [note]
                continue
            for batch in (b for b in BATCHES if b <= cand.plan.max_concurrent):
                try:
                    est = estimate(api.cli_estimate, model_dir, system, cand.scheme, cand.kv, cand.tp, batch, opts.workload.isl, opts.workload.osl)
                except Exception as exc:  # noqa: BLE001 - AIConfigurator raises many types; the note keeps its text
                    notes.append(f"{cand.scheme} tp {cand.tp} batch {batch}: not estimated ({str(exc).splitlines()[0][:160]})")
                    break
                version = est.pop("backend_version")
                meets = est["ttft_ms"] <= slo_ttft_ms and est["tpot_ms"] <= slo_tpot_ms
                rows.append({"scheme": cand.scheme, "kv_cache": cand.kv, "tp": cand.tp, "batch": batch, **est, "meets_slo": meets})
    # measured estimates are preferred: a formula-only figure wins only where no measured candidate meets the SLO
    passing = [r for r in rows if r["meets_slo"]]
    measured = [r for r in passing if r["data"] == "measured"]
    best = max(measured or passing, key=lambda r: r["tokens_per_s_per_gpu"]) if passing else None
    formula_best = max((r for r in passing if r["data"] == "formula"), key=lambda r: r["tokens_per_s_per_gpu"], default=None)
    if measured and formula_best and formula_best["tokens_per_s_per_gpu"] > best["tokens_per_s_per_gpu"]:
        notes.append(f"{formula_best['scheme']} tp {formula_best['tp']} batch {formula_best['batch']} estimates "
                     f"{formula_best['tokens_per_s_per_gpu']:.0f} tokens/s/GPU from formulas only (no measured data on {system}); "
                     "not chosen over measured candidates — measure it with `yitrt bench` if it matters")
    return {"system": system, "backend_version": version or "current", "slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms,
            "isl": opts.workload.isl, "osl": opts.workload.osl, "candidates": rows, "best": best, "notes": notes}
