"""Fidelity of every checkpoint format yitrt can write, on the demo model: `yitrt verify` figures per scheme.

For each scheme the demo model (SmolLM2-135M-Instruct) is converted at tp 1 and verified against the original
with the default settings (the shipped bilingual evaluation text, 1024 tokens in windows of 512 whose second
halves go through the KV cache; the shipped prompts, 16 greedy tokens each). Results go to
benchmarks/results/fidelity.json.

    python benchmarks/bench_fidelity.py [--tp N] [--schemes none,w8a16,...]
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
from yitrt.reference.verify import VerifyRequest, verify

ROOT = Path(__file__).resolve().parent
#: (label, scheme, KV-cache format) — every format the project writes without calibration
CASES = (
    ("bf16", "none", None),
    ("w8a16", "w8a16", None),
    ("w4a16", "w4a16", None),
    ("fp8-rowwise", "fp8-rowwise", None),
    ("bf16 + fp8 KV", "none", "fp8"),
    ("fp8-rowwise + fp8 KV", "fp8-rowwise", "fp8"),
)
KEYS = ("top1_agreement", "max_abs_logit_diff", "mean_abs_logit_diff", "ppl_reference", "ppl_checkpoint", "ppl_delta_pct",
        "greedy_match_frac", "passed", "failures", "thresholds", "eval_tokens", "positions_compared", "seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--schemes", default=",".join(label for label, _, _ in CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "fidelity.json")
    args = parser.parse_args()
    wanted = args.schemes.split(",")
    import os

    model = materialize_demo_model(demo_cache_dir(os.environ)).path
    work = ROOT / "work" / "fidelity"
    rows = []
    for label, scheme, kv in CASES:
        if label not in wanted:
            continue
        ckpt = work / label.replace(" + ", "-").replace(" ", "-")
        convert(ConvertRequest(model, ckpt, tp=args.tp, scheme=scheme, kv_cache=kv))
        report = verify(VerifyRequest(ckpt, model, device="cpu")).to_json()
        row = {"scheme": label, "quant_algo": report["quant_algo"], "kv_cache_quant_algo": report["kv_cache_quant_algo"],
               **{k: report[k] for k in KEYS}}
        rows.append(row)
        print(f"{label:22s} top1 {row['top1_agreement']:.4f}  ppl {row['ppl_reference']:.3f} → {row['ppl_checkpoint']:.3f} "
              f"({row['ppl_delta_pct']:+.2f}%)  greedy {row['greedy_match_frac']:.3f}  {'PASS' if row['passed'] else 'FAIL'}", flush=True)
    result = {
        "benchmark": "fidelity",
        "command": "make bench-fidelity",
        "model": "SmolLM2-135M-Instruct (demo model, bf16)",
        "tp": args.tp,
        "yitrt": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "settings": "verify defaults: 1024 eval tokens (windows of 512, second halves decoded through the KV cache), "
                    "8 prompts × 16 greedy tokens, float32 arithmetic on both sides",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
