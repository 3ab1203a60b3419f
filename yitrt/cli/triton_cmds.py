"""Commands `deploy`, `serve` and `chat` (registered on the main app by ``register``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from yitrt.cli import render
from yitrt.cli.options import EXISTING_DIR, ForceOpt, JsonOpt, check_distinct_ports, port_option
from yitrt.lora import (
    DEFAULT_GPU_MEMORY_FRACTION,
    DEFAULT_HOST_MEMORY_BYTES,
    DEFAULT_MAX_ADAPTER_SIZE,
    DEFAULT_OPTIMAL_ADAPTER_SIZE,
)


def _ids(text: str | None, option: str) -> tuple[int, ...] | None:
    """``"0,1"`` → (0, 1)."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        from yitrt.errors import UsageError

        raise UsageError(f"{option} {text!r} is not a list of GPU ids", f"write {option} 0,1") from None


def _lora_request(options: list[str] | None, optimal: int, maximum: int, fraction: float, host: int, prefetch: bool):
    """``--lora NAME=DIR[:TASK_ID]`` options and the cache options → a LoraRequest (None: no --lora)."""
    from yitrt.errors import UsageError
    from yitrt.triton.lora import LoraRequest, parse_adapter_option

    if not options:
        if prefetch:
            raise UsageError("--lora-prefetch preloads the --lora adapters, and none is given", "add --lora NAME=DIR")
        return None
    return LoraRequest(tuple(parse_adapter_option(o) for o in options), optimal, maximum, fraction, host, prefetch)


def register(app: typer.Typer) -> None:
    """Add the Triton commands to ``app``."""

    @app.command()
    def deploy(
        engine_dir: Annotated[Path, typer.Argument(help="Engine folder (yitrt build), or a checkpoint with --engine reference.", show_default=False, **EXISTING_DIR)],
        out: Annotated[Path, typer.Option("--out", "-o", help="Repository folder to write.", show_default=False)],
        tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="HF model folder with the tokenizer [default: the one the checkpoint records].", show_default=False, **EXISTING_DIR)] = None,
        engine: Annotated[str, typer.Option("--engine", help="trtllm (a TensorRT-LLM engine) or reference (CPU reference slot over a checkpoint: tests and the demo only).")] = "trtllm",
        trtllm_version: Annotated[str | None, typer.Option("--trtllm-version", help="Contract line [default: the engine's, else 1.2].", show_default=False)] = None,
        streaming: Annotated[bool, typer.Option("--streaming/--no-streaming", help="Decoupled models (token streaming).")] = True,
        max_batch_size: Annotated[int | None, typer.Option("--max-batch-size", min=1, help="Triton batch size [default: the engine's].", show_default=False)] = None,
        kv_fraction: Annotated[float | None, typer.Option("--kv-fraction", min=0.01, max=1.0, help="kv_cache_free_gpu_mem_fraction [default: the plan's].", show_default=False)] = None,
        max_kv_tokens: Annotated[int | None, typer.Option("--max-kv-tokens", min=1, help="max_tokens_in_paged_kv_cache [default: the plan's].", show_default=False)] = None,
        kv_reuse: Annotated[bool | None, typer.Option("--kv-reuse/--no-kv-reuse", help="KV-cache block reuse (needs paged context FMHA) [default: on where the engine allows it].", show_default=False)] = None,
        chunked_context: Annotated[bool, typer.Option("--chunked-context", help="Enable chunked context (needs paged context FMHA).")] = False,
        kv_host_cache: Annotated[int, typer.Option("--kv-host-cache", min=0, help="kv_cache_host_memory_bytes: host pool for evicted KV blocks, in bytes (0: none).")] = 0,
        scheduler_policy: Annotated[str, typer.Option("--scheduler-policy", help="batch_scheduler_policy: guaranteed_no_evict or max_utilization.")] = "guaranteed_no_evict",
        max_num_tokens: Annotated[int | None, typer.Option("--max-num-tokens", min=1, help="Reference slot only: tokens per iteration [default: 8192].", show_default=False)] = None,
        tokens_per_block: Annotated[int | None, typer.Option("--tokens-per-block", min=2, help="Reference slot only: tokens per KV block, a power of two [default: 32].", show_default=False)] = None,
        kv_cache_bytes: Annotated[int | None, typer.Option("--kv-cache-bytes", min=1, help="Reference slot only: the KV pool's byte budget [default: 1 GiB].", show_default=False)] = None,
        instances: Annotated[int, typer.Option("--instances", min=1, help="Instances of the Python models.")] = 1,
        model_name: Annotated[str, typer.Option("--model-name", help="Name of the BLS entry model.")] = "tensorrt_llm_bls",
        max_input_len: Annotated[int | None, typer.Option("--max-input-len", min=1, help="Reference slot only: longest prompt [default: context - 1].", show_default=False)] = None,
        max_seq_len: Annotated[int | None, typer.Option("--max-seq-len", min=2, help="Reference slot only: longest sequence [default: the model's context].", show_default=False)] = None,
        words_encoding: Annotated[str, typer.Option("--words-encoding", help="Stop/bad words: with_space (each word also after a space) or stock (alone, as NVIDIA's preprocessing).")] = "with_space",
        speculative: Annotated[str | None, typer.Option("--speculative", help="Speculative decoding: draft-target (with --draft) or lookahead; checked against the engines.", show_default=False)] = None,
        draft: Annotated[Path | None, typer.Option("--draft", help="Draft-target: the draft engine folder (the draft checkpoint with --engine reference).", show_default=False, **EXISTING_DIR)] = None,
        num_draft_tokens: Annotated[int | None, typer.Option("--num-draft-tokens", min=1, help="Draft-target: draft tokens per round when a request names none [default: the target engine's max_draft_len; required for --engine reference].", show_default=False)] = None,
        use_draft_logits: Annotated[bool, typer.Option("--use-draft-logits", help="Draft-target: accept with the draft's logits by default (the draft engine needs generation logits).")] = False,
        lookahead: Annotated[str | None, typer.Option("--lookahead", help="Lookahead: window,ngram,verification_set, e.g. 4,3,4 [default: 4,3,4]; an engine's max_draft_len must be theirs.", show_default=False)] = None,
        draft_kv_fraction: Annotated[float | None, typer.Option("--draft-kv-fraction", min=0.01, max=1.0, help="Draft-target: the draft's kv_cache_free_gpu_mem_fraction [default: half the plan's when both share GPUs].", show_default=False)] = None,
        gpu_ids: Annotated[str | None, typer.Option("--gpu-ids", help="Draft-target engines: the target's GPUs, one per rank, e.g. 0,1 [default: the first tp×pp].", show_default=False)] = None,
        draft_gpu_ids: Annotated[str | None, typer.Option("--draft-gpu-ids", help="Draft-target engines: the draft's GPUs, one per rank [default: the first tp×pp, shared with the target].", show_default=False)] = None,
        lora: Annotated[list[str] | None, typer.Option("--lora", help="A LoRA adapter the repository serves: NAME=DIR or NAME=DIR:TASK_ID (DIR: `yitrt lora convert` output; repeat for more; task ids default to the smallest free ones, 1..N).", show_default=False)] = None,
        lora_cache_fraction: Annotated[float, typer.Option("--lora-cache-fraction", min=0.0, max=1.0, help="lora_cache_gpu_memory_fraction: of the GPU memory left after the engine and the KV pool.")] = DEFAULT_GPU_MEMORY_FRACTION,
        lora_host_cache: Annotated[int, typer.Option("--lora-host-cache", min=1, help="lora_cache_host_memory_bytes.")] = DEFAULT_HOST_MEMORY_BYTES,
        lora_max_adapter_size: Annotated[int, typer.Option("--lora-max-adapter-size", min=1, help="lora_cache_max_adapter_size (clamped to the engine's max_lora_rank).")] = DEFAULT_MAX_ADAPTER_SIZE,
        lora_optimal_adapter_size: Annotated[int, typer.Option("--lora-optimal-adapter-size", min=1, help="lora_cache_optimal_adapter_size (clamped to the engine's max_lora_rank).")] = DEFAULT_OPTIMAL_ADAPTER_SIZE,
        lora_prefetch: Annotated[bool, typer.Option("--lora-prefetch", help="Preload every adapter at start (lora_prefetch_dir); refused for bf16 engines (backend #791).")] = False,
        force: ForceOpt = False,
        json_: JsonOpt = False,
    ) -> None:
        """Write a Triton model repository (in-flight batching) for an engine, checked against the engine."""
        from yitrt.speculation import parse_lookahead
        from yitrt.triton.repository import DeployRequest
        from yitrt.triton.repository import deploy as run_deploy

        result = run_deploy(DeployRequest(
            engine_dir, out, tokenizer=tokenizer, engine=engine, trtllm_version=trtllm_version, streaming=streaming,
            max_batch_size=max_batch_size, kv_fraction=kv_fraction, max_kv_tokens=max_kv_tokens, kv_reuse=kv_reuse,
            chunked_context=chunked_context, kv_host_cache=kv_host_cache, scheduler_policy=scheduler_policy,
            max_num_tokens=max_num_tokens, tokens_per_block=tokens_per_block, kv_cache_bytes=kv_cache_bytes,
            instances=instances, model_name=model_name, max_input_len=max_input_len,
            max_seq_len=max_seq_len, words_encoding=words_encoding, speculative=speculative, draft=draft,
            num_draft_tokens=num_draft_tokens, use_draft_logits=use_draft_logits,
            lookahead=parse_lookahead(lookahead) if lookahead is not None else None, draft_kv_fraction=draft_kv_fraction,
            gpu_ids=_ids(gpu_ids, "--gpu-ids"), draft_gpu_ids=_ids(draft_gpu_ids, "--draft-gpu-ids"), force=force,
            lora=_lora_request(lora, lora_optimal_adapter_size, lora_max_adapter_size, lora_cache_fraction, lora_host_cache, lora_prefetch)))
        data = result.to_json()
        if json_:
            render.emit_json(data)
            return
        for warning in result.warnings:
            render.warn(warning)
        verb = "unchanged (same inputs)" if result.reused else "written"
        render.out.print(f"repository {result.out}: {verb}")
        spec = data.get("speculative")
        if data.get("lora"):
            render.out.print("  LoRA adapters (task id): " + ", ".join(f"{a['name']} ({a['task_id']})" for a in data["lora"])
                             + f"; listed in {result.out / 'lora_adapters.json'}")
        ranks = (f"world size {data['world_size']} (tp {data['tp']} × pp {data['pp']})" if data["engine"] == "trtllm" else
                 f"one tritonserver; the reference worker runs tp {data['tp']} × pp {data['pp']} in its own processes")
        if data.get("orchestrator"):
            ranks = f"orchestrator mode (--multi-model): one tritonserver, each engine model spawns its ranks (target tp {data['tp']} × pp {data['pp']})"
        render.out.print(f"  TensorRT-LLM {result.line} contract; engine {data['engine']} {data['source']}; {ranks}")
        render.out.print(f"  entry model {data['entry_model']} (and ensemble); max batch {data['max_batch_size']}; streaming {data['streaming']}; "
                         f"end id {data['end_id']}, stop ids {data['stop_ids'] or 'none'}")
        render.out.print(f"  KV reuse {'on' if data['kv_reuse'] else 'off'}; chunked context {'on' if data['chunked_context'] else 'off'}; "
                         f"scheduler {data['scheduler_policy']}")
        if spec is not None:
            render.out.print(f"  speculation: {result.speculation.describe()}")
            for note in spec["notes"]:
                render.out.print(f"  note: {note}")
        render.out.print(f"  start: yitrt serve {result.out}   (or {result.out}/launch.sh)")

    @app.command()
    def serve(
        repo: Annotated[Path, typer.Argument(help="Repository written by yitrt deploy.", show_default=False, **EXISTING_DIR)],
        http_port: Annotated[int, port_option("--http-port", "HTTP port (1-65535).")] = 8000,
        grpc_port: Annotated[int, port_option("--grpc-port", "gRPC port (1-65535).")] = 8001,
        metrics_port: Annotated[int, port_option("--metrics-port", "Prometheus metrics port (1-65535).")] = 8002,
        tritonserver: Annotated[str | None, typer.Option("--tritonserver", help="tritonserver binary [default: TRITONSERVER, PATH, /opt/tritonserver/bin, nvidia-pytriton].", show_default=False)] = None,
        log_file: Annotated[Path | None, typer.Option("--log-file", help="Server log [default: REPO.server.log beside the repository].", show_default=False)] = None,
        exit_timeout: Annotated[int, typer.Option("--exit-timeout", min=0, help="Seconds in-flight requests get when stopping.")] = 30,
        quiet: Annotated[bool, typer.Option("--quiet", help="Do not forward the server's log to stderr.")] = False,
        json_: JsonOpt = False,
    ) -> None:
        """Run tritonserver for a repository (mpirun with tp×pp ranks when needed) until Ctrl-C or SIGTERM."""
        from yitrt.triton.server import Ports, ServeRequest, server_summary, start_server

        check_distinct_ports({"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port})
        forward = None if quiet or json_ else (lambda line: print(line, file=sys.stderr, flush=True))
        req = ServeRequest(repo, Ports(http_port, grpc_port, metrics_port), tritonserver, os.environ.get("TRITONSERVER"), log_file,
                           exit_timeout=exit_timeout)
        # SIGTERM raises KeyboardInterrupt here (yitrt.cli.signals, for every command): a requested stop, exit 0
        server = None
        try:
            server = start_server(req, forward)
            data = server_summary(server)
            if json_:
                render.emit_json({"ready": True, **data})
            else:
                render.out.print(f"ready: HTTP {data['endpoints']['http']}  gRPC {data['endpoints']['grpc']}  metrics {data['endpoints']['metrics']}")
                render.out.print(f"  models {', '.join(data['models'])}; world size {data['world_size']}; log {data['log']}; Ctrl-C stops")
            sys.stdout.flush()
            code = server.process.wait()
            render.err.print(f"tritonserver exited with code {code}")
            raise typer.Exit(code or 0)
        except KeyboardInterrupt:
            render.err.print("stopping tritonserver ...")
        finally:
            if server is not None:
                server.stop()

    @app.command()
    def chat(
        url: Annotated[str, typer.Argument(help="gRPC endpoint, host:port (yitrt serve prints it).", show_default=False)],
        message: Annotated[str, typer.Argument(help="The user's message.", show_default=False)],
        model: Annotated[str | None, typer.Option("--model", help="Model to ask [default: the deployment's BLS entry model]; or ensemble.", show_default=False)] = None,
        system: Annotated[str | None, typer.Option("--system", help="System message.", show_default=False)] = None,
        max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens to generate.")] = 256,
        stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop word (repeatable).", show_default=False)] = None,
        no_stream: Annotated[bool, typer.Option("--no-stream", help="Ask for the whole answer at once.")] = False,
        temperature: Annotated[float | None, typer.Option("--temperature", min=0.0, help="Sampling temperature [default: greedy].", show_default=False)] = None,
        top_k: Annotated[int | None, typer.Option("--top-k", min=0, show_default=False)] = None,
        top_p: Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0, show_default=False)] = None,
        seed: Annotated[int | None, typer.Option("--seed", min=0, show_default=False)] = None,
        num_draft_tokens: Annotated[int | None, typer.Option("--num-draft-tokens", min=0, help="Draft-target deployments: draft tokens per round [default: the deployment's]; 0 turns speculation off.", show_default=False)] = None,
        timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds to wait for the answer.")] = 300.0,
        lora: Annotated[str | None, typer.Option("--lora", help="Answer with this LoRA adapter of the repository (its lora_adapters.json; needs --repo).", show_default=False)] = None,
        repo: Annotated[Path | None, typer.Option("--repo", help="The deployed repository (the folder yitrt deploy wrote): where --lora names are looked up [default: the current folder, when it is one].", show_default=False, **EXISTING_DIR)] = None,
        lora_weights: Annotated[bool, typer.Option("--lora-weights/--no-lora-weights", help="Send the adapter's weights with the request; --no-lora-weights sends its task id alone (sent again with the weights if the server does not hold it).")] = True,
        json_: JsonOpt = False,
    ) -> None:
        """Ask a deployed model one chat turn over gRPC; the answer streams as it is generated."""
        from yitrt.triton.client import ChatRequest
        from yitrt.triton.client import chat as run_chat
        from yitrt.triton.lora_client import ADAPTERS_FILE

        if lora is not None and repo is None and Path(ADAPTERS_FILE).is_file():
            repo = Path(".")  # run from inside the repository, as its README's examples are
        req = ChatRequest(url, message, model=model, system=system, max_tokens=max_tokens, stop_words=tuple(stop or ()),
                          stream=False if no_stream else None, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          num_draft_tokens=num_draft_tokens, timeout=timeout, lora=lora, repo=repo, lora_weights=lora_weights)
        printer = None if json_ else (lambda piece: (render.out.file.write(piece), render.out.file.flush()))
        result = run_chat(req, printer)
        if json_:
            render.emit_json(result.to_json())
            return
        render.out.print("")
        data = result.to_json()
        lora_note = ""
        if data["adapter"]:
            lora_note = f", adapter {data['adapter']['name']} (task {data['adapter']['task_id']})" + (", weights re-sent" if result.lora_resent else "")
        render.err.print(f"[{data['output_tokens'] or '?'} tokens, first {data['ttft_ms']} ms, total {data['total_ms']} ms, "
                         f"{'streamed' if result.streamed else 'not streamed'}{lora_note}]")
        if data["speculation"]:
            s = data["speculation"]
            render.err.print(f"[speculation: {s['accepted_draft_tokens']} of {s['draft_tokens']} draft tokens accepted "
                             f"({s['acceptance_rate']:.0%}), {s['accepted_per_step']} per target step over {s['target_steps']} steps]")
