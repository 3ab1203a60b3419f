"""Streaming HF → TensorRT-LLM checkpoint conversion (bf16/fp16 and the data-free quantization schemes).

The whole request is validated before any weight is read: TP/PP against the model, the scheme and KV format,
the output folder, then every source tensor against the config (missing, mis-shaped, unknown). Conversion then
streams: for each tensor of the table, each rank's piece is read (only its rows where the split allows),
encoded and appended to that rank's file, whose header was written first. Peak memory is about one tensor.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yitrt import __version__
from yitrt.checkpoint.finite import tensor_has_nonfinite
from yitrt.checkpoint.safetensors_io import CODES, DTYPES
from yitrt.checkpoint.safetensors_writer import NonFiniteTensor, PlannedTensor, StreamingWriter, WriteQueue
from yitrt.checkpoint.sharding import Mapping, local_shape, pp_problems, tp_problems
from yitrt.checkpoint.source import INDEX_NAME, SourceCheckpoint
from yitrt.checkpoint.streaming import copy_pieces, keep_freed_memory_for_reuse, stream_pieces
from yitrt.checkpoint.trtllm_config import TARGET_TRTLLM, build_config, resolve_dtype
from yitrt.checkpoint.truncate import keep_layers_problems
from yitrt.errors import ArtifactError, CheckpointError, UnsupportedModelError, ValidationError
from yitrt.manifest import ArtifactWriter, artifact_key, check_output_folder, find_reusable, fingerprint_files
from yitrt.models.config import ModelConfig, load_config
from yitrt.models.llama import Kind, ResolvedTensor, resolve_tensors
from yitrt.models.registry import load_registry, request_pitfalls
from yitrt.plan.gpus import get_gpu
from yitrt.plan.rules import format_problems
from yitrt.quant.data_free import encode_linear, plan_linear
from yitrt.quant.rules import padding_problems
from yitrt.quant.schemes import (
    KV_CACHE_FORMATS,
    Encoding,
    Scheme,
    data_free_schemes,
    get_kv_cache,
    get_scheme,
)

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)
STAGE = "convert"
_FLOAT_CODES = {"BF16", "F16", "F32"}


@dataclass(frozen=True)
class ConvertRequest:
    """What to convert and how.

    Attributes:
        model_dir: local HF model folder.
        out: output artifact folder.
        dtype: ``auto``, ``bfloat16``, ``float16`` or ``float32``.
        tp, pp: tensor- and pipeline-parallel sizes.
        scheme: a data-free scheme name from ``yitrt.quant.schemes`` (``none`` = plain dtype conversion).
        kv_cache: KV-cache format name (``fp8``) or None.
        parallel_embedding: split the embedding by vocab rows across TP ranks (saves (tp-1)/tp of it per GPU).
        allow_pickle: accept ``.bin`` weights (loaded with ``weights_only=True``).
        allow_nonfinite: keep NaN/Inf weights (and casts that overflow to Inf) instead of refusing them; each such
            tensor is reported as a warning.
        force: redo the work even when an identical artifact exists.
        model_ref: the HF repo id the folder came from, if any (registry lookup, manifest).
        gpu: the target GPU (checked against the scheme and KV format), or None.
        keep_layers: write only the first N decoder layers (with the embedding, final norm and lm_head): a truncated
            self-draft for draft-target decoding (``num_hidden_layers`` = N); None: all.
    """

    model_dir: Path
    out: Path
    dtype: str = "auto"
    tp: int = 1
    pp: int = 1
    scheme: str = "none"
    kv_cache: str | None = None
    parallel_embedding: bool = True
    allow_pickle: bool = False
    force: bool = False
    model_ref: str | None = None
    gpu: str | None = None
    allow_nonfinite: bool = False
    keep_layers: int | None = None


@dataclass
class ConvertResult:
    """What a conversion produced."""

    out: Path
    reused: bool
    seconds: float
    world_size: int
    bytes_written: int
    files: list[str]
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    peak_rss_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON summary for ``--json``."""
        return {
            "out": str(self.out),
            "reused": self.reused,
            "seconds": round(self.seconds, 3),
            "world_size": self.world_size,
            "tp_size": self.config["mapping"]["tp_size"],
            "pp_size": self.config["mapping"]["pp_size"],
            "dtype": self.config["dtype"],
            "quant_algo": self.config["quantization"]["quant_algo"],
            "kv_cache_quant_algo": self.config["quantization"]["kv_cache_quant_algo"],
            "bytes_written": self.bytes_written,
            "files": self.files,
            "warnings": self.warnings,
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def check_source(cfg: ModelConfig, model_dir: Path, model_ref: str | None) -> None:
    """Refuse known-unconvertible repos and pre-quantized weights.

    Raises:
        UnsupportedModelError: with the reason and the repo to use instead.
    """
    registry = load_registry()
    if model_ref and model_ref.lower() in registry.unsupported:
        raise UnsupportedModelError(f"{model_ref}: {registry.unsupported[model_ref.lower()]}")
    if cfg.source_quantization:
        raise UnsupportedModelError(
            f"{model_dir}: the weights are pre-quantized ({cfg.source_quantization})",
            "convert the full-precision checkpoint and pick a --scheme instead",
        )


def kept_config(cfg: ModelConfig, keep_layers: int | None) -> ModelConfig:
    """The config of the checkpoint written: ``num_layers`` = ``keep_layers`` when layers are dropped."""
    from dataclasses import replace

    return cfg if keep_layers is None else replace(cfg, num_layers=keep_layers)


def validate_request(req: ConvertRequest, cfg: ModelConfig) -> tuple[Scheme, Any, Mapping, list[str]]:
    """Check everything about a request that needs only the config; raise with every problem at once.

    ``cfg`` is the source's config; with ``keep_layers`` the checks run on the truncated model's (``kept_config``).

    Returns:
        (scheme, kv format or None, mapping, warnings).

    Raises:
        UnsupportedModelError: the repo is a known unsupported one or pre-quantized.
        ValidationError: every other problem, listed together.
    """
    check_source(cfg, req.model_dir, req.model_ref)
    scheme = get_scheme(req.scheme)
    kv = get_kv_cache(req.kv_cache)
    mapping = Mapping(req.tp, req.pp)
    problems = keep_layers_problems(cfg.num_layers, req.keep_layers)
    if not problems:
        cfg = kept_config(cfg, req.keep_layers)
    problems += tp_problems(cfg, req.tp) + pp_problems(cfg, req.pp)
    hints = ["valid tp/pp sizes are listed by `yitrt inspect MODEL`"] if problems else []
    if scheme.calibrated:
        problems.append(f"scheme {scheme.name} needs calibration: run `yitrt quantize MODEL --scheme {scheme.name}`")
    if kv is not None and not kv.data_free:
        problems.append(f"KV cache {kv.name} needs calibrated scales; only {', '.join(k for k, f in KV_CACHE_FORMATS.items() if f.data_free)} is written data-free")
    if scheme.calibrated or (kv is not None and not kv.data_free):
        hints.append("calibrate with `yitrt quantize`; data-free schemes: " + ", ".join(data_free_schemes()))
    if sm := format_problems(get_gpu(req.gpu) if req.gpu else None, scheme, kv, req.dtype, req.tp, req.pp):
        problems += sm
    if not problems and (width := padding_problems(cfg, scheme, mapping.tp)):
        problems += width
        hints.append("choose another tp size or scheme")
    if problems:
        raise ValidationError(problems, "; ".join(hints))
    warnings = request_pitfalls(cfg, req.model_ref, {"pp": req.pp, "kv_cache": req.kv_cache, "scheme": req.scheme})
    return scheme, kv, mapping, warnings


@dataclass
class _Job:
    """One resolved tensor (or a generated one) with the rank files and local names it goes to."""

    tensor: ResolvedTensor | None
    stage: int
    local_name: str
    planned: list[list[PlannedTensor]]  # per tp rank


def _plan(cfg: ModelConfig, resolved: list[ResolvedTensor], mapping: Mapping, scheme: Scheme, kv, dtype_code: str) -> list[_Job]:
    jobs = []
    for tensor in resolved:
        for stage in mapping.stages_holding(cfg, tensor):
            name = mapping.local_name(cfg, tensor)
            shape = local_shape(cfg, tensor, mapping.tp)
            if tensor.rule.kind is Kind.LINEAR:
                planned = plan_linear(scheme, name, shape, dtype_code)
            else:
                planned = [PlannedTensor(name, dtype_code, shape)]
            jobs.append(_Job(tensor, stage, name, [planned] * mapping.tp))
    if kv is not None:
        # TensorRT-LLM's own converter writes a scale of 1.0 per layer for data-free FP8 KV (models/llama/convert.py);
        # the build derives kv_cache_rcp_scaling_factor from it.
        for layer in range(cfg.num_layers):
            stage, local = mapping.stage_of(cfg, layer)
            name = f"transformer.layers.{local}.attention.kv_cache_scaling_factor"
            jobs.append(_Job(None, stage, name, [[PlannedTensor(name, "F32", (1,))]] * mapping.tp))
    return jobs


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def convert(req: ConvertRequest, progress: ProgressFn | None = None) -> ConvertResult:
    """Convert an HF model folder into a TensorRT-LLM checkpoint artifact.

    Args:
        req: the request.
        progress: optional callback receiving (bytes written, bytes total).

    Returns:
        The result; ``reused`` is True when an identical artifact already existed.

    Raises:
        ValidationError, UnsupportedModelError, CheckpointError, ArtifactError: nothing is written in these cases
            (CheckpointError also for NaN/Inf in a weight, or a cast that overflows, unless ``allow_nonfinite``).
    """
    started = time.perf_counter()
    source_cfg = load_config(req.model_dir)
    scheme, kv, mapping, warnings = validate_request(req, source_cfg)
    cfg = kept_config(source_cfg, req.keep_layers)
    check_output_folder(req.out, STAGE)
    if Path(req.out).resolve() == Path(req.model_dir).resolve():
        raise ArtifactError(f"{req.out} is the model folder itself", "write the checkpoint to another --out")
    with SourceCheckpoint(req.model_dir, allow_pickle=req.allow_pickle) as source:
        available = {n: t.shape for n, t in source.tensors.items()}
        # every source tensor is checked against the whole model; only the kept layers are then read
        resolved = [t for t in resolve_tensors(source_cfg, available) if t.layer is None or t.layer < cfg.num_layers]
        non_float = sorted({source.tensors[p.name].dtype for t in resolved for p in t.parts} - _FLOAT_CODES)
        if non_float:
            raise CheckpointError(f"{req.model_dir}: weights of dtype {', '.join(non_float)} are not floating point", "convert a full-precision checkpoint")
        first_dtype = DTYPES[source.tensors[resolved[0].parts[0].name].dtype][0]
        dtype = resolve_dtype(req.dtype, cfg, first_dtype)
        trt_config = build_config(cfg, mapping, dtype, scheme, kv, req.parallel_embedding)
        if not req.parallel_embedding:
            resolved = [_replicated_embedding(t) for t in resolved]
        params = {
            "dtype": dtype,
            "tp": req.tp,
            "pp": req.pp,
            "scheme": scheme.name,
            "kv_cache": kv.name if kv else None,
            "parallel_embedding": req.parallel_embedding,
            "target_trtllm": TARGET_TRTLLM,
            "model_ref": req.model_ref,
        }
        if req.allow_nonfinite:  # part of the key: an artifact that kept NaN/Inf is never reused by a strict run
            params["allow_nonfinite"] = True
        if req.keep_layers is not None:
            params["keep_layers"] = req.keep_layers
        names = ["config.json", *source.files] + ([INDEX_NAME] if (req.model_dir / INDEX_NAME).is_file() else [])
        inputs = {"model": fingerprint_files(req.model_dir, names, source.header_bytes)}
        key = artifact_key(STAGE, params, inputs)
        if not req.force and (manifest := find_reusable(req.out, STAGE, key)) is not None:
            return ConvertResult(
                req.out, True, time.perf_counter() - started, mapping.world_size,
                0, [f["path"] for f in manifest.files], trt_config, warnings, _peak_rss(),
            )
        dtype_code = CODES[dtype]
        jobs = _plan(cfg, resolved, mapping, scheme, kv, dtype_code)
        tools = {"yitrt": __version__, "safetensors-writer": "yitrt", "target_trtllm": TARGET_TRTLLM}
        with ArtifactWriter(req.out, STAGE, params, inputs, tools) as art:
            art.extra = {"model_ref": req.model_ref, "source": str(req.model_dir.absolute()), "warnings": warnings}
            total, nonfinite = _write_ranks(art, cfg, jobs, mapping, scheme, dtype, source, progress, req.allow_nonfinite)
            source.check_unchanged()  # the bytes copied are the bytes validated
            if nonfinite:
                art.extra["nonfinite_tensors"] = nonfinite
                shown = ", ".join(sorted(nonfinite)[:3])
                warnings.append(f"{len(nonfinite)} tensor(s) hold NaN or Inf and were kept (--allow-nonfinite): {shown}"
                                + (" …" if len(nonfinite) > 3 else ""))
            (art.path / "config.json").write_text(json.dumps(trt_config, indent=2) + "\n")
        files = [f["path"] for f in art.manifest.files]
    return ConvertResult(
        req.out, False, time.perf_counter() - started, mapping.world_size, total, files, trt_config, warnings, _peak_rss()
    )


def _replicated_embedding(tensor: ResolvedTensor) -> ResolvedTensor:
    """Without parallel embedding every first-stage rank holds the whole table."""
    from dataclasses import replace

    from yitrt.models.llama import Split

    if tensor.rule.kind is Kind.EMBEDDING:
        return replace(tensor, rule=replace(tensor.rule, split=Split.REPLICATE))
    return tensor


def _passes_through(job: _Job, source: SourceCheckpoint, scheme: Scheme, dtype_code: str) -> bool:
    """Whether a job's bytes are copied unchanged: same dtype, no encoding, weights in safetensors files."""
    tensor = job.tensor
    if tensor.rule.kind is Kind.LINEAR and scheme.encoding is not Encoding.FULL_PRECISION:
        return False
    return all(source.tensors[p.name].dtype == dtype_code and source.location(p.name) is not None for p in tensor.parts)


def _write_ranks(art, cfg, jobs, mapping: Mapping, scheme: Scheme, dtype: str, source: SourceCheckpoint, progress,
                 allow_nonfinite: bool = False) -> tuple[int, dict[str, int]]:
    """Write every job into the rank files; return the bytes of the rank files and the tensors kept with NaN/Inf
    ("rank{r}.safetensors:{name}" → first bad element; empty unless ``allow_nonfinite``).

    Unchanged bytes are copied inside the kernel; transformed tensors (dtype cast, FP8) stream in row chunks,
    their writes overlapping the next chunk's reading on a background thread. Every floating-point tensor written
    is checked for NaN/Inf as the output is hashed (``StreamingWriter``); encoders that could hide them (FP8's
    clamp) are checked on their input chunks.

    Raises:
        CheckpointError: NaN/Inf in a source tensor or a cast that overflows (named by ``_explain``).
    """
    import numpy as np

    plans: dict[int, list[PlannedTensor]] = {rank: [] for rank, _, _ in mapping.ranks()}
    for job in jobs:
        for tp_rank in range(mapping.tp):
            plans[job.stage * mapping.tp + tp_rank].extend(job.planned[tp_rank])
    metadata = {"format": "pt", "producer": "yitrt"}
    dtype_code = CODES[dtype]
    keep_freed_memory_for_reuse()
    queue = WriteQueue()
    writers = {
        rank: StreamingWriter(art.path / f"rank{rank}.safetensors", plan, metadata, queue, allow_nonfinite)
        for rank, plan in plans.items()
    }
    total = sum(w.size for w in writers.values())
    done = 0
    try:
        for job in jobs:
            stage_writers = [writers[job.stage * mapping.tp + r] for r in range(mapping.tp)]
            if job.tensor is None:  # generated: the FP8 KV-cache scale
                for writer in stage_writers:
                    writer.write_at(job.local_name, 0, np.ones(1, dtype=np.float32))
            elif _passes_through(job, source, scheme, dtype_code):
                done += copy_pieces(cfg, job.tensor, mapping.tp, source, stage_writers, job.local_name)
            else:
                done += _encode_pieces(cfg, job, mapping.tp, source, scheme, dtype, stage_writers, allow_nonfinite)
            for tp_rank, writer in enumerate(stage_writers):
                writer.hash_through(writer.end_of(job.planned[tp_rank][-1].name))
            if progress:
                progress(done, total)
        for rank, writer in writers.items():
            art.record_file(f"rank{rank}.safetensors", *writer.close())
    except NonFiniteTensor as exc:
        for writer in writers.values():
            writer.abort()
        raise _explain(exc, jobs, writers, mapping, source, dtype) from None
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        queue.close()
    nonfinite = {f"rank{rank}.safetensors:{name}": element for rank, w in writers.items() for name, element in w.nonfinite.items()}
    return total, nonfinite


def _explain(exc: NonFiniteTensor, jobs: list[_Job], writers: dict, mapping: Mapping, source: SourceCheckpoint, dtype: str):
    """The error for NaN/Inf found in an output tensor: the source tensor and file that hold them, or the source
    tensor whose cast to ``dtype`` overflowed (the output's own name when neither can be found)."""
    rank = next((r for r, w in writers.items() if w.path == exc.file), None)
    stage = rank // mapping.tp if rank is not None else None
    for job in jobs:
        names = {p.name for planned in job.planned for p in planned}
        if job.tensor is not None and job.stage == stage and exc.tensor in names:
            found = source.nonfinite_error([p.name for p in job.tensor.parts], dtype)
            return found or exc
    return exc


def _encode_pieces(cfg, job: _Job, tp: int, source: SourceCheckpoint, scheme: Scheme, dtype: str, writers: list,
                   allow_nonfinite: bool = False) -> int:
    """Stream a job's pieces in row chunks through the dtype cast or the scheme's encoder; return bytes written.

    A plain cast keeps NaN/Inf (and shows an overflow as Inf), which the writer's check sees in the output; an
    encoder may not (FP8 rowwise clamps ±Inf to ±1200), so its input chunks are checked here, in memory.
    """
    import torch

    torch_dtype = getattr(torch, dtype)
    linear = job.tensor.rule.kind is Kind.LINEAR
    check_input = linear and scheme.encoding is not Encoding.FULL_PRECISION
    trailing: dict[int, list[list]] = {r: [[] for _ in job.planned[r][1:]] for r in range(tp)}
    written = 0
    for tp_rank, chunk in stream_pieces(cfg, job.tensor, tp, source):
        if check_input and job.local_name not in writers[tp_rank].nonfinite and tensor_has_nonfinite(chunk):
            if not allow_nonfinite:
                raise NonFiniteTensor(writers[tp_rank].path, job.local_name, 0)
            writers[tp_rank].nonfinite[job.local_name] = 0
        outputs = encode_linear(scheme, chunk, torch_dtype) if linear else [chunk.to(torch_dtype)]
        writers[tp_rank].append(job.local_name, outputs[0])
        for k, extra in enumerate(outputs[1:]):  # e.g. per-channel scales, written after the weight
            trailing[tp_rank][k].append(extra)
        written += outputs[0].numel() * outputs[0].element_size()
    for tp_rank, extras in trailing.items():
        for planned, pieces in zip(job.planned[tp_rank][1:], extras, strict=True):
            writers[tp_rank].write(planned.name, torch.cat(pieces))
    return written
