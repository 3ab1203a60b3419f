"""Commands `plan`, `build`, `plugins list|show` and `doctor` (registered on the main app by ``register``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from yitrt.cli import render, render_plan
from yitrt.cli.options import CheckpointArg, ForceOpt, JsonOpt, KvCacheOpt, OutOpt, RevisionOpt
from yitrt.lora import (
    DEFAULT_GPU_MEMORY_FRACTION,
    DEFAULT_HOST_MEMORY_BYTES,
    DEFAULT_MAX_ADAPTER_SIZE,
)
from yitrt.plan.memory import DEFAULT_KV_FRACTION, DEFAULT_TOKENS_PER_BLOCK

PLAN_DOES_NOT_FIT_EXIT = 13  # the plan ran and the configuration does not fit (not a usage error)

GpuRequired = Annotated[str, typer.Option("--gpu", help="Target GPU (e.g. H100, H200, L40S, A100-80GB, L4; `yitrt gpus` lists them).", show_default=False)]
MaxBatchOpt = Annotated[int | None, typer.Option("--max-batch-size", min=1, help="Build limit [default: the sequences the KV pool holds].", show_default=False)]
MaxSeqOpt = Annotated[int | None, typer.Option("--max-seq-len", min=2, help="Longest sequence, prompt + output [default: the model's context, shortened to fit].", show_default=False)]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-num-tokens", min=1, help="Tokens per engine step [default: 8192].", show_default=False)]
MaxDraftLenOpt = Annotated[int | None, typer.Option("--max-draft-len", help="Draft-target: K, draft tokens per round (the target's --max_draft_len; 1-64).", show_default=False)]
LookaheadOpt = Annotated[str | None, typer.Option("--lookahead", help="Lookahead decoding: W,N,G (window, ngram, verification set), e.g. 4,3,4; max_draft_len is derived.", show_default=False)]
VersionOpt = Annotated[str | None, typer.Option("--trtllm-version", help="TensorRT-LLM version the argv is for [default: the installed one, else 1.2].", show_default=False)]


def _lora_cache(rank: int | None, modules: str | None, fraction: float, host: int, max_adapter_size: int):
    """`yitrt plan`'s LoRA options → the adapter cache to plan (None without --lora-rank).

    Raises:
        UsageError: --lora-modules without --lora-rank, or names that are not Yi's TensorRT-LLM modules.
    """
    from yitrt.errors import UsageError

    if rank is None:
        if modules is not None:
            raise UsageError("--lora-modules needs --lora-rank (the engine's max_lora_rank)", "add --lora-rank R")
        return None
    from yitrt.build.lora import engine_target_modules, target_module_problems
    from yitrt.lora.modules import LORA_MODULES
    from yitrt.plan.lora import LoraCacheRequest

    names = [m.strip() for m in modules.split(",") if m.strip()] if modules is not None else [m.trtllm for m in LORA_MODULES]
    if problems := target_module_problems(names):
        raise UsageError(f"--lora-modules: {'; '.join(problems)}", "give TensorRT-LLM names, e.g. attn_q,attn_v,mlp_h_to_4h")
    return LoraCacheRequest(tuple(engine_target_modules(names)), rank, max_adapter_size=max_adapter_size, gpu_memory_fraction=fraction,
                            host_memory_bytes=host)


def register(app: typer.Typer) -> None:
    """Add the plan/build commands to ``app``."""

    @app.command()
    def plan(
        model: Annotated[str, typer.Argument(help="A TensorRT-LLM checkpoint folder, a HF model folder, or a Hub repo id (known Yi ids need no download).", show_default=False)],
        gpu: GpuRequired,
        tp: Annotated[list[int] | None, typer.Option("--tp", min=1, help="Tensor-parallel size (repeat with --compare).", show_default=False)] = None,
        pp: Annotated[int | None, typer.Option("--pp", min=1, help="Pipeline-parallel size [default: 1].", show_default=False)] = None,
        scheme: Annotated[list[str] | None, typer.Option("--scheme", help="Quantization scheme (repeat with --compare) [default: none].", show_default=False)] = None,
        kv_cache: KvCacheOpt = None,
        isl: Annotated[int, typer.Option("--isl", min=1, help="Typical input tokens per request.")] = 1024,
        osl: Annotated[int, typer.Option("--osl", min=1, help="Typical output tokens per request.")] = 512,
        max_seq_len: MaxSeqOpt = None,
        max_batch_size: MaxBatchOpt = None,
        max_num_tokens: MaxTokensOpt = None,
        kv_fraction: Annotated[float, typer.Option("--kv-fraction", min=0.05, max=0.99, help="kv_cache_free_gpu_mem_fraction.")] = DEFAULT_KV_FRACTION,
        tokens_per_block: Annotated[int, typer.Option("--tokens-per-block", min=1, help="KV page size.")] = DEFAULT_TOKENS_PER_BLOCK,
        prefix_tokens: Annotated[int, typer.Option("--prefix-tokens", min=1, help="Shared system-prompt length for the prefix-cache capacity.")] = 256,
        trtllm_version: Annotated[str, typer.Option("--trtllm-version", help="TensorRT-LLM version the rules check.")] = "1.2",
        compare: Annotated[bool, typer.Option("--compare", help="Plan every tp × scheme candidate side by side.")] = False,
        slo_ttft: Annotated[float | None, typer.Option("--slo-ttft", min=0.1, help="Time-to-first-token bound, ms (needs yitrt[plan]).", show_default=False)] = None,
        slo_tpot: Annotated[float | None, typer.Option("--slo-tpot", min=0.01, help="Time-per-output-token bound, ms (needs yitrt[plan]).", show_default=False)] = None,
        draft: Annotated[str | None, typer.Option("--draft", help="Draft-target: the draft model (checkpoint, HF folder or repo id), planned beside the target on the same GPUs.", show_default=False)] = None,
        max_draft_len: MaxDraftLenOpt = None,
        draft_tp: Annotated[int | None, typer.Option("--draft-tp", min=1, help="The draft's tensor-parallel size [default: the target's].", show_default=False)] = None,
        draft_scheme: Annotated[str | None, typer.Option("--draft-scheme", help="The draft's quantization scheme [default: the target's].", show_default=False)] = None,
        draft_kv_cache: Annotated[str | None, typer.Option("--draft-kv-cache", help="The draft's KV-cache format [default: the target's].", show_default=False)] = None,
        draft_layers: Annotated[int | None, typer.Option("--draft-layers", min=1, help="Plan the draft's first N decoder layers only (a truncated self-draft: `yitrt truncate`, `convert --keep-layers`).", show_default=False)] = None,
        lookahead: LookaheadOpt = None,
        lora_rank: Annotated[int | None, typer.Option("--lora-rank", min=1, help="LoRA: the engine's max_lora_rank; plans the adapter cache.", show_default=False)] = None,
        lora_modules: Annotated[str | None, typer.Option("--lora-modules", help="LoRA: TensorRT-LLM target modules, comma-separated [default: all seven Yi modules].", show_default=False)] = None,
        lora_cache_fraction: Annotated[float, typer.Option("--lora-cache-fraction", min=0.0, max=1.0, help="LoRA: lora_cache_gpu_memory_fraction.")] = DEFAULT_GPU_MEMORY_FRACTION,
        lora_host_cache: Annotated[int, typer.Option("--lora-host-cache", min=1, help="LoRA: lora_cache_host_memory_bytes.")] = DEFAULT_HOST_MEMORY_BYTES,
        lora_max_adapter_size: Annotated[int, typer.Option("--lora-max-adapter-size", min=1, help="LoRA: lora_cache_max_adapter_size (clamped to --lora-rank).")] = DEFAULT_MAX_ADAPTER_SIZE,
        revision: RevisionOpt = None,
        json_: JsonOpt = False,
    ) -> None:
        """Plan GPU memory: weights, KV bytes/token, KV capacity, concurrent sequences, build limits, Triton KV settings.

        With --draft and --max-draft-len: a draft-target pair on the same GPUs (both weights, two KV pools, the two
        models' Triton KV settings). With --lookahead W,N,G: a lookahead engine (its max_draft_len, D+1 tokens per step).
        With --lora-rank R [--lora-modules ...]: the LoRA adapter cache beside the KV pool.
        """
        from yitrt.build.speculative import parse_lookahead
        from yitrt.errors import UsageError
        from yitrt.plan.memory import Workload
        from yitrt.plan.planner import PlanOptions
        from yitrt.plan.planner import plan as run_plan

        if (slo_ttft is None) != (slo_tpot is None):
            raise UsageError("--slo-ttft and --slo-tpot go together", "give both bounds")
        workload = Workload(isl=isl, osl=osl, max_seq_len=max_seq_len, max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                            kv_fraction=kv_fraction, tokens_per_block=tokens_per_block, prefix_tokens=prefix_tokens)
        opts = PlanOptions(gpu=gpu, tp=tuple(tp or ()), pp=pp, schemes=tuple(scheme or ()), kv_cache=kv_cache.value if kv_cache else None,
                           workload=workload, trtllm_version=trtllm_version,
                           compare=compare or slo_ttft is not None, draft=draft, max_draft_len=max_draft_len, draft_tp=draft_tp,
                           draft_scheme=draft_scheme, draft_kv_cache=draft_kv_cache, draft_layers=draft_layers,
                           lookahead=parse_lookahead(lookahead),
                           lora=_lora_cache(lora_rank, lora_modules, lora_cache_fraction, lora_host_cache, lora_max_adapter_size))
        report = run_plan(model, opts, revision)
        if slo_ttft is not None:
            from yitrt.plan.perf import choose_under_slo

            report.slo = choose_under_slo(report, slo_ttft, slo_tpot)
        data = report.to_json()
        if json_:
            render.emit_json(data)
        elif opts.compare:
            render_plan.compare_report(data)
            if report.slo:
                render_plan.slo_report(report.slo)
        else:
            render_plan.plan_report(data)
        if not opts.compare and not report.fits:
            sys.exit(PLAN_DOES_NOT_FIT_EXIT)

    @app.command()
    def build(
        checkpoint: CheckpointArg,
        out: OutOpt,
        gpu: Annotated[str | None, typer.Option("--gpu", help="Target GPU [default: this machine's].", show_default=False)] = None,
        plugins: Annotated[str | None, typer.Option("--plugins", help="Plugin profile name or YAML file [default: picked from GPU and scheme].", show_default=False)] = None,
        max_batch_size: MaxBatchOpt = None,
        max_seq_len: MaxSeqOpt = None,
        max_num_tokens: MaxTokensOpt = None,
        workers: Annotated[int | None, typer.Option("--workers", min=1, help="Ranks built in parallel (one GPU each) [default: 1].", show_default=False)] = None,
        trtllm_version: VersionOpt = None,
        speculative: Annotated[str | None, typer.Option("--speculative", help="Speculative decoding: draft-target (this checkpoint is the target; with --draft-engine, the draft) or lookahead.", show_default=False)] = None,
        max_draft_len: MaxDraftLenOpt = None,
        lookahead: LookaheadOpt = None,
        draft_engine: Annotated[bool, typer.Option("--draft-engine", help="Build the draft of a draft-target pair (an ordinary engine with paged context FMHA).")] = False,
        use_draft_logits: Annotated[bool, typer.Option("--use-draft-logits", help="With --draft-engine: the draft returns its logits (probabilistic acceptance): adds --gather_generation_logits.")] = False,
        draft: Annotated[Path | None, typer.Option("--draft", help="Target build: the draft's checkpoint, to plan both engines on the same GPUs.", show_default=False, exists=True, file_okay=False)] = None,
        target: Annotated[Path | None, typer.Option("--target", help="Draft build: the target's checkpoint (with its --max-draft-len), to plan both engines on the same GPUs.", show_default=False, exists=True, file_okay=False)] = None,
        max_beam_width: Annotated[int, typer.Option("--max-beam-width", min=1, help="Beams per request (speculative decoding needs 1).")] = 1,
        lora: Annotated[list[Path] | None, typer.Option("--lora", help="A `yitrt lora convert` folder the engine serves (repeat for more): adds the LoRA plugin in the engine's dtype, its target modules, max rank and --lora_dir.", show_default=False, exists=True, file_okay=False)] = None,
        max_lora_rank: Annotated[int | None, typer.Option("--max-lora-rank", min=1, help="With --lora: --max_lora_rank [default: the largest adapter rank].", show_default=False)] = None,
        lora_target_modules: Annotated[str | None, typer.Option("--lora-target-modules", help="With --lora: TensorRT-LLM module names, comma-separated [default: every module an adapter adapts; attn_q/k/v all or none].", show_default=False)] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the argv and resolved build config; run nothing (any machine).")] = False,
        force: ForceOpt = False,
        json_: JsonOpt = False,
    ) -> None:
        """Build TensorRT-LLM engines with trtllm-build: argv from the checkpoint, the plan and a plugin profile.

        Speculative decoding: `--speculative draft-target --max-draft-len K [--draft DRAFT_CKPT]` builds the target,
        `--draft-engine [--use-draft-logits] [--target TARGET_CKPT --max-draft-len K]` its draft, `--speculative
        lookahead --lookahead W,N,G` a lookahead engine. LoRA: `--lora CONVERTED_ADAPTER` (repeatable).
        """
        from yitrt.build.lora import lora_build
        from yitrt.build.runner import BuildRequest, build_engine
        from yitrt.errors import UsageError

        if draft is not None and target is not None:
            raise UsageError("--draft and --target name the other model of the pair: a target build takes --draft, a draft build --target",
                             "pass one of them")
        if draft is not None and draft_engine:
            raise UsageError("--draft-engine builds the draft; its other model is --target TARGET_CKPT", "use --target")
        if target is not None and not draft_engine:
            raise UsageError("--target is for the draft build (--draft-engine); a target build takes --draft DRAFT_CKPT", "use --draft")
        req = BuildRequest(checkpoint=checkpoint, out=out, gpu=gpu, plugins=plugins, max_batch_size=max_batch_size,
                           max_seq_len=max_seq_len, max_num_tokens=max_num_tokens, workers=workers,
                           trtllm_version=trtllm_version, dry_run=dry_run, force=force, speculative=speculative,
                           max_draft_len=max_draft_len, lookahead=lookahead, draft_engine=draft_engine,
                           use_draft_logits=use_draft_logits, pair_checkpoint=draft or target, max_beam_width=max_beam_width,
                           lora=lora_build(lora or [], max_lora_rank, [m.strip() for m in lora_target_modules.split(",") if m.strip()]
                                           if lora_target_modules is not None else None))
        with render.stage_progress(not json_ and not dry_run) as progress:
            result = build_engine(req, progress)
        data = result.to_json()
        if json_:
            render.emit_json(data)
        else:
            render_plan.build_report(data)

    plugins_app = typer.Typer(help="TensorRT-LLM plugin profiles (plugins/*.yaml).", no_args_is_help=True, add_completion=False)
    app.add_typer(plugins_app, name="plugins")

    @plugins_app.command("list")
    def plugins_list(json_: JsonOpt = False) -> None:
        """List the plugin profiles and what each is picked for."""
        from yitrt.build.profiles import builtin_profiles

        rows = [p.to_json() for p in builtin_profiles().values()]
        if json_:
            render.emit_json({"profiles": rows})
            return
        render_plan.plugins_table(rows)

    @plugins_app.command("show")
    def plugins_show(
        name: Annotated[str, typer.Argument(help="Profile name or YAML file.", show_default=False)],
        json_: JsonOpt = False,
    ) -> None:
        """Show a profile's flags, requirements and why."""
        from yitrt.build.profiles import load_profile

        data = load_profile(name).to_json()
        if json_:
            render.emit_json(data)
            return
        render_plan.plugin_profile(data)

    @app.command()
    def gpus(json_: JsonOpt = False) -> None:
        """List the GPUs yitrt plans for (memory, bandwidth, SM, FP8/FP4, NVLink)."""
        from yitrt.plan.gpus import all_gpus

        rows = [g.to_json() for g in all_gpus()]
        if json_:
            render.emit_json({"gpus": rows})
            return
        render.out.print(render.table("GPUs", ["name", "SM", "memory", "bandwidth", "FP8", "FP4", "NVLink"], [
            [g["name"], g["sm"], f"{g['memory_gb']:.1f} GB", f"{g['bandwidth_gbs']:.0f} GB/s", "yes" if g["fp8"] else "no",
             "yes" if g["fp4"] else "no", f"{g['nvlink_gbs']:.0f} GB/s × {g['nvlink_gpus']}" if g["nvlink_gbs"] else "no"] for g in rows]))

    @app.command()
    def doctor(
        engine: Annotated[Path | None, typer.Option("--engine", help="An engine folder to check against this machine.", show_default=False)] = None,
        disk: Annotated[Path, typer.Option("--disk", help="Folder whose free space is reported.")] = Path("."),
        json_: JsonOpt = False,
    ) -> None:
        """What this machine has (GPUs, driver, CUDA, TensorRT-LLM, MPI, tritonserver, disk, memory) and which stages it can run."""
        from yitrt.build.doctor import run_doctor

        data = run_doctor(disk, engine).to_json()
        if json_:
            render.emit_json(data)
            return
        render_plan.doctor_report(data)
