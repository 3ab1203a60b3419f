"""Benchmark: `yitrt quantize --device cuda` and `yitrt verify --device cuda` on a Yi-6B-shaped model, on a real GPU.

Not a test. Writes a random Hugging Face folder with Yi-6B's real layer shapes (hidden 4096, 32 heads, 4 KV heads,
head_dim 128, intermediate 11008, vocab 64000; ``--layers`` of them, 4 by default) and a BPE tokenizer, then runs
the yitrt CLI itself, in separate processes, for each case:

1. ``yitrt quantize MODEL --scheme S [--kv-cache fp8] --tp 2 --device cuda --json`` (ModelOpt calibration on the GPU,
   export at tp 2);
2. ``yitrt verify CKPT --device cuda --json`` (transformers and two reference-runtime rank processes on the GPU).

For each it records the wall time, yitrt's own figures (quantize: calibration time and torch's peak allocated GPU
memory; verify: the pipeline check against the calibrated model — top-1 agreement and perplexity delta — the
quantization loss against the original, the verdict) and the peak GPU memory in use on the whole device while it
ran (nvidia-smi sampled every 100 ms: CUDA contexts and allocator caches included, every rank process counted).
Results go to ``benchmarks/results/gpu.json`` with the exact commands.

    python benchmarks/bench_gpu.py [--layers 4] [--cases fp8+fp8kv,int4-awq] [--calib-size 128 --calib-seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yitrt.synthetic import SyntheticSpec, write_synthetic_model  # noqa: E402

#: case label → (scheme, KV-cache format): the two the issue asks for (#9 item 8)
CASES = {"fp8+fp8kv": ("fp8", "fp8"), "int4-awq": ("int4-awq", None)}


class GpuMemorySampler:
    """Peak of nvidia-smi's memory.used over every GPU while the block runs (None without nvidia-smi)."""

    def __init__(self, period_s: float = 0.1) -> None:
        self.period_s, self.peak_mib, self._stop = period_s, None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        values = [int(v) for v in out.split() if v.strip().isdigit()]
        return sum(values) if values else None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._sample()
            if value is not None:
                self.peak_mib = max(self.peak_mib or 0, value)
            self._stop.wait(self.period_s)

    def __enter__(self) -> GpuMemorySampler:
        self.baseline_mib = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_json(argv: list[str]) -> dict:
    """Run a yitrt command with --json; return its wall time, exit code, parsed JSON and GPU memory peak."""
    print("$ " + shlex.join(argv), flush=True)
    started = time.perf_counter()
    with GpuMemorySampler() as gpu:
        proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - started
    try:
        data = json.loads(proc.stdout) if proc.stdout.strip() else None
    except ValueError:
        data = None
    result = {"command": shlex.join(["yitrt", *argv[3:]]), "wall_s": round(wall, 1), "exit_code": proc.returncode,
              "gpu_memory_used_peak_mib": gpu.peak_mib, "gpu_memory_used_before_mib": gpu.baseline_mib}
    if proc.returncode not in (0, 10) or data is None:
        result["stderr_tail"] = proc.stderr.strip().splitlines()[-15:]
    print(f"  exit {proc.returncode} in {wall:.1f}s, GPU memory peak {gpu.peak_mib} MiB", flush=True)
    return result | {"json": data}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "transformers", "nvidia-modelopt", "accelerate"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _gpu_name() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _summary(case: str, quant: dict, ver: dict) -> dict:
    q, v = quant.get("json") or {}, ver.get("json") or {}
    pipeline = v.get("pipeline") or {}
    return {
        "case": case, "quant_algo": q.get("quant_algo"), "kv_cache_quant_algo": q.get("kv_cache_quant_algo"),
        "tp": q.get("tp_size"), "quantize_wall_s": quant["wall_s"], "calibration_s": q.get("calibration_seconds"),
        "quantize_peak_gpu_allocated_bytes": max(q.get("peak_device_bytes") or [0]) or None,
        "quantize_gpu_memory_used_peak_mib": quant["gpu_memory_used_peak_mib"],
        "verify_wall_s": ver["wall_s"], "verify_gpu_memory_used_peak_mib": ver["gpu_memory_used_peak_mib"],
        "verify_devices": [r.get("device") for r in v.get("ranks") or []],
        "pipeline_ran": pipeline.get("ran"), "pipeline_top1_agreement": pipeline.get("top1_agreement"),
        "pipeline_ppl_delta_pct": pipeline.get("ppl_delta_pct"), "pipeline_scales_checked": pipeline.get("scales_checked"),
        "pipeline_failures": pipeline.get("failures"), "top1_vs_original": v.get("top1_agreement"),
        "ppl_original": v.get("ppl_reference"), "ppl_checkpoint": v.get("ppl_checkpoint"), "passed": v.get("passed"),
        "verify_exit_code": ver["exit_code"], "quantize_exit_code": quant["exit_code"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="yi-6b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--calib-size", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/yitrt-bench-gpu"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "hf"
    started = time.perf_counter()
    if not (model / "config.json").is_file():
        # head_std 0.05: logits of a few units, so top-1 comparisons measure arithmetic rather than near-ties
        write_synthetic_model(model, SyntheticSpec(shape=args.shape, layers=args.layers, dtype="bfloat16", tokenizer=True,
                                                   head_std=0.05, seed=0))
    generated = time.perf_counter() - started
    yitrt = [sys.executable, "-m", "yitrt"]
    rows, runs = [], []
    for case in args.cases.split(","):
        scheme, kv = CASES[case]
        ckpt = args.work / f"q-{case}"
        quant = run_json([*yitrt, "quantize", str(model), "--scheme", scheme, *(["--kv-cache", kv] if kv else []),
                          "--tp", str(args.tp), "--device", args.device, "--calib-size", str(args.calib_size),
                          "--calib-seq-len", str(args.calib_seq_len), "--out", str(ckpt), "--force", "--json"])
        ver = run_json([*yitrt, "verify", str(ckpt), "--device", args.device, "--json"]) if quant["exit_code"] == 0 else \
            {"wall_s": None, "exit_code": None, "gpu_memory_used_peak_mib": None, "json": None}
        runs += [quant, ver]
        rows.append(_summary(case, quant, ver))
        _write(args, generated, rows, runs)  # after every case: a run cut short keeps what it measured
    print(json.dumps(rows, indent=2))


def _write(args, generated: float, rows: list[dict], runs: list[dict]) -> None:
    report = {
        "benchmark": "gpu",
        "command": shlex.join(["python", "benchmarks/bench_gpu.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"gpu": _gpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "packages": _versions()},
        "model": {"shape": args.shape, "layers": args.layers, "dtype": "bfloat16", "seconds_to_generate": round(generated, 1)},
        "calibration": {"size": args.calib_size, "seq_len": args.calib_seq_len},
        "results": rows,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
