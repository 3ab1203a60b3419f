"""Benchmark: streaming conversion of a Yi-6B-shaped checkpoint at tp 2 against `cp` and ModelOpt's path.

Not a test. Generates a random bf16 HF folder with Yi-6B's real shapes (``--layers`` for a quicker run), then
measures in separate processes, each with its own wall time and peak RSS (from wait4's rusage):

1. ``cp`` of the same safetensors bytes (the floor for moving the data once);
2. ``yitrt convert --tp 2``;
3. ModelOpt's path: transformers ``from_pretrained`` + ``export_tensorrt_llm_checkpoint(inference_tensor_parallel=2)``.

The source is read once before the runs so every method starts from the same page-cache state, each run starts
after ``sync`` (no dirty pages left by the previous one), cp and yitrt alternate ``--repeats`` times and the
median of each is compared (this machine's I/O varies by 2x between identical runs). Results go to
``benchmarks/results/convert.json``. Targets (issue #2): yitrt wall <= 1.5x cp, peak RSS <= 1.5 GB (full shape).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yitrt.synthetic import SyntheticSpec, hf_config  # noqa: E402

MODELOPT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from modelopt.torch.export import export_tensorrt_llm_checkpoint
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
export_tensorrt_llm_checkpoint(model, decoder_type="llama", dtype=torch.bfloat16, export_dir=sys.argv[2], inference_tensor_parallel=2)
"""


def _vm_hwm(pid: int) -> int | None:
    """The process's resident-set high-water mark (VmHWM) in bytes, or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure(cmd: list[str], label: str) -> dict:
    """Run a command; return wall seconds, peak RSS bytes and exit status.

    Peak RSS is the child's own VmHWM, sampled every 20 ms until it exits (VmHWM only grows, and it is reset
    at exec, unlike wait4's ru_maxrss, which inherits the parent's high-water mark across fork+exec).
    """
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _vm_hwm(proc.pid) or 0)
        time.sleep(0.02)
    wall = time.perf_counter() - started
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = proc.returncode
    result = {"label": label, "wall_s": round(wall, 2), "peak_rss_bytes": peak, "exit_code": code}
    if code != 0:
        result["error_tail"] = stderr.strip().splitlines()[-3:]
    print(f"{label:10s} wall {wall:8.2f}s  peak RSS {peak / 1e9:8.3f} GB  exit {code}", flush=True)
    return result


def dir_bytes(path: Path) -> int:
    """Total size of files under a folder."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="layer count (default: Yi-6B's 32)")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    parser.add_argument("--skip-modelopt", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="runs of cp and of yitrt (the median is reported)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "convert.json")
    args = parser.parse_args()

    spec = SyntheticSpec(shape="yi-6b", layers=args.layers, shards=3, seed=1)
    src = args.work / f"yi-6b-L{args.layers or 32}"
    marker = src / ".complete"
    if not marker.exists():
        shutil.rmtree(src, ignore_errors=True)
        t = time.perf_counter()
        # in a child process, so this process stays small while it measures the others
        code = f"from yitrt.synthetic import *; write_synthetic_model({str(src)!r}, {spec!r})"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        marker.write_text(json.dumps(hf_config(spec)))
        print(f"generated {src} in {time.perf_counter() - t:.1f}s", flush=True)
    weights = sorted(src.glob("*.safetensors"))
    nbytes = sum(p.stat().st_size for p in weights)
    for p in weights:  # same page-cache state for every method
        with open(p, "rb") as fh:
            while fh.read(64 << 20):
                pass

    copy_dst, ours, theirs = args.work / "cp-out", args.work / "yitrt-out", args.work / "modelopt-out"
    commands = {
        "cp": ["cp", *map(str, weights), str(copy_dst)],
        "yitrt": [sys.executable, "-m", "yitrt", "convert", str(src), "--tp", "2", "--out", str(ours), "--json"],
        "modelopt": [sys.executable, "-c", MODELOPT_SCRIPT, str(src), str(theirs)],
    }
    outputs = {"cp": copy_dst, "yitrt": ours, "modelopt": theirs}
    order = ["cp", "yitrt"] * args.repeats + ([] if args.skip_modelopt else ["modelopt"])
    runs = []
    for label in order:  # alternate cp and yitrt so both see the same machine state
        shutil.rmtree(outputs[label], ignore_errors=True)
        if label == "cp":
            copy_dst.mkdir(parents=True)
        subprocess.run(["sync"], check=False)  # start each run with no dirty pages from the previous one
        run = measure(commands[label], label)
        run["output_bytes"] = dir_bytes(outputs[label]) if outputs[label].exists() else 0
        runs.append(run)
        shutil.rmtree(outputs[label], ignore_errors=True)

    def median_run(label: str) -> dict:
        mine = sorted((r for r in runs if r["label"] == label), key=lambda r: r["wall_s"])
        return mine[len(mine) // 2]

    by = {label: median_run(label) for label in dict.fromkeys(order)}
    summary = {
        "yitrt_wall_vs_cp": round(by["yitrt"]["wall_s"] / by["cp"]["wall_s"], 3),
        "yitrt_peak_rss_gb": round(by["yitrt"]["peak_rss_bytes"] / 1e9, 3),
        "target_wall_vs_cp": 1.5,
        "target_peak_rss_gb": 1.5,
    }
    if "modelopt" in by and by["modelopt"]["exit_code"] == 0:
        summary["modelopt_wall_vs_yitrt"] = round(by["modelopt"]["wall_s"] / by["yitrt"]["wall_s"], 3)
        summary["modelopt_rss_vs_yitrt"] = round(by["modelopt"]["peak_rss_bytes"] / by["yitrt"]["peak_rss_bytes"], 3)
    result = {
        "benchmark": "convert",
        "command": "make bench-convert" + (f" LAYERS={args.layers}" if args.layers else ""),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": {"shape": "yi-6b", "layers": args.layers or 32, "dtype": "bfloat16", "tp": 2, "source_bytes": nbytes, "shards": len(weights)},
        "runs": runs,
        "median": by,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
