"""Fidelity of every checkpoint format yitrt can write, on the demo model: `yitrt verify` figures per scheme.

For each scheme the demo model (SmolLM2-135M-Instruct) is converted (data-free schemes) or calibrated with
ModelOpt on the shipped calibration set (calibrated schemes: 16 sequences of 128 tokens, seed 0) at tp 1 and
verified against the original with the default settings (the shipped bilingual evaluation text, 1024 tokens in
windows of 512 whose second halves go through the KV cache; the shipped prompts, 16 greedy tokens each). For
calibrated checkpoints the pipeline error (checkpoint vs the calibrated model) is reported next to the
quantization loss (checkpoint vs original). Rows of schemes not re-run are kept. Results go to
benchmarks/results/fidelity.json.

    python benchmarks/bench_fidelity.py [--tp N] [--schemes bf16,w8a16,fp8,...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from yitrt import __version__
from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.demo import demo_cache_dir, materialize_demo_model
from yitrt.errors import ValidationError
from yitrt.quant.calibrate import QuantizeRequest, quantize
from yitrt.quant.schemes import SCHEMES
from yitrt.reference.verify import VerifyRequest, verify

ROOT = Path(__file__).resolve().parent
#: (label, scheme, KV-cache format, AWQ block size) — every format the project writes
CASES = (
    ("bf16", "none", None, None),
    ("w8a16", "w8a16", None, None),
    ("w4a16", "w4a16", None, None),
    ("fp8-rowwise", "fp8-rowwise", None, None),
    ("bf16 + fp8 KV", "none", "fp8", None),
    ("fp8-rowwise + fp8 KV", "fp8-rowwise", "fp8", None),
    ("fp8", "fp8", None, None),
    ("fp8 + fp8 KV", "fp8", "fp8", None),
    ("int8-sq", "int8-sq", None, None),
    ("int8-sq + int8 KV", "int8-sq", "int8", None),
    ("int4-awq (block 64)", "int4-awq", None, 64),
    ("w4a8-awq", "w4a8-awq", None, None),
)
CALIB = {"calib_size": 16, "calib_seq_len": 128, "seed": 0}
KEYS = ("top1_agreement", "max_abs_logit_diff", "mean_abs_logit_diff", "ppl_reference", "ppl_checkpoint", "ppl_delta_pct",
        "greedy_match_frac", "passed", "failures", "thresholds", "eval_tokens", "positions_compared", "seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--schemes", default=",".join(label for label, *_ in CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "fidelity.json")
    args = parser.parse_args()
    wanted = args.schemes.split(",")
    import os

    model = materialize_demo_model(demo_cache_dir(os.environ)).path
    work = ROOT / "work" / "fidelity"
    previous = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    rows = {row["scheme"]: row for row in previous}
    for label, scheme, kv, block in CASES:
        if label not in wanted:
            continue
        ckpt = work / label.replace(" + ", "-").replace(" ", "-").replace("(", "").replace(")", "")
        extra = {}
        if SCHEMES[scheme].calibrated:
            try:
                result = quantize(QuantizeRequest(model, ckpt, scheme, kv, tp=args.tp, awq_block_size=block, device="cpu", **CALIB))
            except ValidationError as exc:  # e.g. W4A8 on hidden 576: TensorRT-LLM would pad the layers
                rows[label] = {"scheme": label, "refused": exc.problems}
                print(f"{label:22s} refused: {'; '.join(exc.problems)}", flush=True)
                continue
            extra = {"calibration_seconds": round(result.timings["calibrate"], 1), "calibration": result.calibration,
                     "fake_quant_ppl": result.fake_quant["ppl"]}
        else:
            convert(ConvertRequest(model, ckpt, tp=args.tp, scheme=scheme, kv_cache=kv))
        report = verify(VerifyRequest(ckpt, model, device="cpu")).to_json()
        row = {"scheme": label, "quant_algo": report["quant_algo"], "kv_cache_quant_algo": report["kv_cache_quant_algo"],
               **{k: report[k] for k in KEYS}, "warnings": report["warnings"], **extra}
        if report["pipeline"]["ran"]:
            row["pipeline"] = report["pipeline"]
        rows[label] = row
        pipe = f"  pipeline top1 {row['pipeline']['top1_agreement']:.4f} ppl {row['pipeline']['ppl_delta_pct']:+.3f}%" if "pipeline" in row else ""
        print(f"{label:22s} top1 {row['top1_agreement']:.4f}  ppl {row['ppl_reference']:.3f} → {row['ppl_checkpoint']:.3f} "
              f"({row['ppl_delta_pct']:+.2f}%)  greedy {row['greedy_match_frac']:.3f}{pipe}  {'PASS' if row['passed'] else 'FAIL'}", flush=True)
    order = [label for label, *_ in CASES]
    rows = sorted(rows.values(), key=lambda r: order.index(r["scheme"]) if r["scheme"] in order else len(order))
    result = {
        "benchmark": "fidelity",
        "command": "make bench-fidelity",
        "model": "SmolLM2-135M-Instruct (demo model, bf16)",
        "tp": args.tp,
        "yitrt": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "settings": "verify defaults: 1024 eval tokens (windows of 512, second halves decoded through the KV cache), "
                    "8 prompts × 16 greedy tokens, float32 arithmetic on both sides; calibrated schemes: ModelOpt on CPU, "
                    "shipped calibration set, 16 × 128 tokens, seed 0",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
