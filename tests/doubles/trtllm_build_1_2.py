"""TEST DOUBLE of TensorRT-LLM 1.2's ``trtllm-build`` (no TensorRT, no GPU, no engine).

It tests yitrt's side of the boundary: the argv is parsed by an argparse parser written here from the reference's
1.2 flag tables (shared/reference/trtllm-checkpoint-and-build.md §4.1-4.2), independently of yitrt's own table,
so an unknown flag or a bad value fails the way the real command fails (argparse, exit 2). It then prints the
1.x banner and progress lines like the real builder, writes the engine folder *layout* (config.json and
rank{N}.engine files whose bytes say they are not engines) and the timing cache, or fails with a known error
text chosen by ``YITRT_DOUBLE_FAIL`` (oom, mpi, version, arch). Like the real command it refuses context-logit
gathering with ``--max_draft_len`` > 0 and writes the speculative mode (as its integer flag), ``max_draft_len`` and
the limits the builder derives from them (max_seq_len + max_draft_len, max_num_tokens ≥ batch·(draft + 1)), and the
LoRA settings (``lora_config``, ``plugin_config.lora_plugin``). ``YITRT_DOUBLE_ARGV`` names a file where each
call's argv is appended as a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

VERSION = "1.2.0"
DTYPE = ["auto", "float16", "float32", "bfloat16", "int32", "disable"]
FEATURE = ["enable", "disable"]
FAILURES = {
    "oom": "[TRT] [E] [virtualMemoryBuffer.cpp::resizePhysical::151] Error Code 2: OutOfMemory (Requested size was 8589934592 bytes.)\n"
           "AssertionError: Engine building failed, please check the error log.",
    "mpi": "ImportError: libmpi.so.40: cannot open shared object file: No such file or directory",
    "version": "[TRT] [E] IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization assertion "
               "stdVersionRead == kSERIALIZATION_VERSION failed.Version tag does not match.)",
    "arch": "RuntimeError: SmoothQuant is not supported on SM>=100.",
}
#: SpeculativeDecodingMode (IntFlag, auto() from 1; tensorrt_llm/models/modeling_utils.py) as config.json holds it
SPEC_MODES = {None: 1, "draft_tokens_external": 2, "medusa": 4, "lookahead_decoding": 8, "explicit_draft_tokens": 16, "eagle": 32}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trtllm-build")
    for name in ("checkpoint_dir", "model_config", "build_config", "model_cls_file", "model_cls_name", "input_timing_cache",
                 "visualize_network", "lora_ckpt_source"):
        p.add_argument(f"--{name}")
    p.add_argument("--output_dir", default="engine_outputs")
    p.add_argument("--output_timing_cache", default="model.cache")
    for name, default in (("max_batch_size", 2048), ("max_input_len", 1024), ("max_seq_len", None), ("max_beam_width", 1),
                          ("max_num_tokens", 8192), ("opt_num_tokens", None), ("max_encoder_input_len", 1024),
                          ("max_prompt_embedding_table_size", 0), ("workers", 1), ("max_draft_len", 0), ("max_lora_rank", 64)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--kv_cache_type", type=lambda v: {"continuous": "CONTINUOUS", "paged": "PAGED", "disabled": "DISABLED"}[v.lower()])
    p.add_argument("--paged_kv_cache", choices=FEATURE)
    p.add_argument("--profiling_verbosity", choices=["layer_names_only", "detailed", "none"], default="layer_names_only")
    for name in ("strip_plan", "weight_sparsity", "weight_streaming", "fast_build", "enable_debug_output", "dry_run",
                 "monitor_memory", "gather_context_logits", "gather_generation_logits", "gather_all_token_logits"):
        p.add_argument(f"--{name}", action="store_true")
    p.add_argument("--log_level", choices=["internal_error", "error", "warning", "info", "verbose", "debug", "trace"], default="info")
    p.add_argument("--logits_dtype", choices=["float16", "float32"])
    p.add_argument("--lora_dir", nargs="+")
    p.add_argument("--lora_target_modules", nargs="+")
    p.add_argument("--speculative_decoding_mode", choices=["draft_tokens_external", "lookahead_decoding", "medusa", "explicit_draft_tokens", "eagle"])
    for name, default in (("bert_attention_plugin", "auto"), ("gpt_attention_plugin", "auto"), ("fp8_rowwise_gemm_plugin", "disable"),
                          ("nccl_plugin", "auto"), ("lora_plugin", "disable"), ("moe_plugin", "auto"), ("mamba_conv1d_plugin", "auto")):
        p.add_argument(f"--{name}", choices=DTYPE, default=default)
    p.add_argument("--gemm_plugin", choices=[*DTYPE[:-1], "fp8", "nvfp4", "disable"])
    for name in ("gemm_swiglu_plugin", "low_latency_gemm_plugin", "low_latency_gemm_swiglu_plugin"):
        p.add_argument(f"--{name}", choices=["fp8", "disable"], default="disable")
    p.add_argument("--gemm_allreduce_plugin", choices=["float16", "bfloat16", "disable"], default="disable")
    for name, default in (("dora_plugin", "disable"), ("context_fmha", "enable"), ("bert_context_fmha_fp32_acc", "disable"),
                          ("remove_input_padding", "enable"), ("norm_quant_fusion", "disable"), ("reduce_fusion", "disable"),
                          ("user_buffer", "disable"), ("use_paged_context_fmha", "enable"), ("use_fp8_context_fmha", "enable"),
                          ("fuse_fp4_quant", "disable"), ("multiple_profiles", "disable"), ("paged_state", "enable"),
                          ("streamingllm", "disable"), ("use_fused_mlp", "enable"), ("pp_reduce_scatter", "disable")):
        p.add_argument(f"--{name}", choices=FEATURE, default=default)
    p.add_argument("--tokens_per_block", type=int, default=32)
    return p


def main() -> None:
    if log := os.environ.get("YITRT_DOUBLE_ARGV"):
        with open(log, "a") as fh:
            fh.write(json.dumps(sys.argv) + "\n")
    print(f"[TensorRT-LLM] TensorRT LLM version: {VERSION}", flush=True)
    args = parser().parse_args()
    if args.gather_all_token_logits:
        args.gather_context_logits = args.gather_generation_logits = True
    if args.gather_context_logits and args.max_draft_len > 0:  # commands/build.py main()
        print("RuntimeError: Gather context logits is not support with draft len > 0. If want to get the accepted tokens' "
              "logits from target model, please just enable gather_generation_logits", flush=True)
        sys.exit(1)
    failure = os.environ.get("YITRT_DOUBLE_FAIL")
    if failure:
        print("[TensorRT-LLM] [I] Set gpt_attention_plugin to auto.\n" + FAILURES[failure], flush=True)
        sys.exit(1)
    ckpt = json.loads(Path(args.checkpoint_dir, "config.json").read_text())
    world = int(ckpt["mapping"]["world_size"])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(world):
        print(f"[TensorRT-LLM] [I] Build TensorRT engine Unnamed Network {rank}", flush=True)
        print("[TRT] [I] Global timing cache in use. Profiling results in this builder pass will be stored.", flush=True)
        (out / f"rank{rank}.engine").write_bytes(f"yitrt test double: not a TensorRT engine (rank {rank})\n".encode())
        print(f"[TensorRT-LLM] [I] Total time of building Unnamed Network {rank}: 00:00:00", flush=True)
    build_config = {k: getattr(args, k) for k in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width",
                                                  "max_draft_len", "gather_context_logits", "gather_generation_logits")}
    build_config["speculative_decoding_mode"] = SPEC_MODES[args.speculative_decoding_mode]
    if args.speculative_decoding_mode is not None:  # builder.py build(): the derived limits
        build_config["max_seq_len"] += args.max_draft_len
        build_config["max_num_tokens"] = max(build_config["max_num_tokens"], args.max_batch_size * (args.max_draft_len + 1))
    build_config["kv_cache_type"] = args.kv_cache_type or "PAGED"
    build_config["plugin_config"] = {k: getattr(args, k) for k in ("gpt_attention_plugin", "gemm_plugin", "tokens_per_block",
                                                                   "use_paged_context_fmha", "remove_input_padding", "context_fmha")}
    # BuildConfig.lora_config as the builder records it (LoraConfig fields; the plugin's dtype in plugin_config, None when off)
    build_config["plugin_config"]["lora_plugin"] = None if args.lora_plugin == "disable" else args.lora_plugin
    build_config["lora_config"] = {"lora_dir": args.lora_dir or [], "lora_ckpt_source": args.lora_ckpt_source or "hf",
                                   "max_lora_rank": args.max_lora_rank, "lora_target_modules": args.lora_target_modules or []}
    (out / "config.json").write_text(json.dumps({"version": VERSION, "pretrained_config": ckpt, "build_config": build_config}))
    Path(args.output_timing_cache).write_bytes(b"yitrt test double timing cache\n")
    print("[TensorRT-LLM] [I] Total time of building all engines: 00:00:00", flush=True)


if __name__ == "__main__":
    main()
