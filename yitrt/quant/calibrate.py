"""Calibrated quantization with NVIDIA ModelOpt: HF model → calibrated fake-quant model → TensorRT-LLM checkpoint.

The request is validated from the config alone first (tp/pp and the GQA rule, AWQ groups per split, what the
target GPU can run, the calibration file), so a request that cannot work fails in seconds with nothing loaded
or written. Then: load with transformers (CPU in float32, or the GPUs in the model dtype, spread with
``device_map`` over several), ``mtq.quantize`` with the scheme's preset (KV-cache quantizers merged in), export
with ModelOpt's TensorRT-LLM exporter into the artifact's staging folder, complete the exported config, evaluate
the fake-quantized model on the verification text (the record ``yitrt verify`` compares the checkpoint
against, which separates pipeline error from quantization loss), check every rank file against the config,
and publish atomically with the manifest.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from yitrt import __version__
from yitrt.checkpoint.convert import check_source
from yitrt.checkpoint.sharding import Mapping, pp_problems, tp_problems
from yitrt.checkpoint.source import INDEX_NAME, SourceCheckpoint
from yitrt.checkpoint.trtllm_config import TARGET_TRTLLM, build_config, resolve_dtype
from yitrt.errors import ArtifactError, CheckpointError, QuantizationError, UsageError, ValidationError
from yitrt.manifest import ArtifactWriter, artifact_key, check_output_folder, find_reusable, fingerprint_files
from yitrt.models.config import ModelConfig, load_config
from yitrt.models.registry import request_pitfalls
from yitrt.plan.gpus import Gpu, get_gpu
from yitrt.plan.rules import format_problems
from yitrt.quant.calib_data import (
    CALIB_DEFAULTS,
    CalibrationSet,
    batch_size_for,
    load_calibration,
    read_documents,
)
from yitrt.quant.data_free import FP8_MAX
from yitrt.quant.record import evaluate_calibrated
from yitrt.quant.rules import group_size_problems, padding_problems
from yitrt.quant.schemes import KvCacheFormat, Scheme, calibrated_schemes, get_kv_cache, get_scheme
from yitrt.reference import DEVICES, EVAL_TOKENS, EVAL_WINDOW

STAGE = "quantize"
ProgressFn = Callable[[str, int | None, int | None], None]  # (phase, done, total); None = indeterminate



@dataclass(frozen=True)
class QuantizeRequest:
    """What to calibrate and how.

    Attributes:
        model_dir: local HF model folder.
        out: output artifact folder.
        scheme: a calibrated scheme name (``yitrt schemes``).
        kv_cache: KV-cache format (``fp8``, ``int8``) or None.
        tp, pp: tensor- and pipeline-parallel sizes of the checkpoint.
        dtype: ``auto``, ``bfloat16`` or ``float16`` (the checkpoint's model dtype).
        calib: calibration file (None: the shipped bilingual set).
        calib_size: calibration sequences (None: ``CALIB_DEFAULTS`` for the device).
        calib_seq_len: tokens per calibration sequence (None: ``CALIB_DEFAULTS`` for the device).
        calib_batch_size: sequences per forward pass (0: as many as fit the device).
        awq_block_size: AWQ group size (None: the scheme's default).
        seed: order in which calibration documents are drawn.
        device: ``auto``, ``cpu`` or ``cuda``.
        gpu: the target GPU the engine will be built for (checked against the scheme), or None.
        allow_pickle: let transformers load ``.bin`` weights.
        force: redo the work even when an identical artifact exists.
        model_ref: the HF repo id the folder came from, if any.
        eval_tokens, eval_window: the evaluation recorded for ``yitrt verify`` (its ``--eval-tokens`` and
            ``--window``; the defaults are verify's, so a plain ``yitrt verify`` runs the pipeline check).
        allow_nonfinite: keep NaN/Inf in the loaded weights and the exported files instead of refusing them
            (each is reported as a warning).
    """

    model_dir: Path
    out: Path
    scheme: str
    kv_cache: str | None = None
    tp: int = 1
    pp: int = 1
    dtype: str = "auto"
    calib: Path | None = None
    calib_size: int | None = None
    calib_seq_len: int | None = None
    calib_batch_size: int = 0
    awq_block_size: int | None = None
    seed: int = 0
    device: str = "auto"
    gpu: str | None = None
    allow_pickle: bool = False
    force: bool = False
    model_ref: str | None = None
    eval_tokens: int = EVAL_TOKENS
    eval_window: int = EVAL_WINDOW
    allow_nonfinite: bool = False


@dataclass
class Plan:
    """A validated request: the registry entries and layout it resolved to."""

    scheme: Scheme
    kv: KvCacheFormat | None
    mapping: Mapping
    group_size: int | None
    gpu: Gpu | None
    warnings: list[str] = field(default_factory=list)


@dataclass
class QuantizeResult:
    """What a calibrated quantization produced, and what it cost."""

    out: Path
    reused: bool
    seconds: float
    config: dict[str, Any]
    files: list[str]
    warnings: list[str]
    peak_rss_bytes: int
    calibration: dict[str, Any] = field(default_factory=dict)
    fake_quant: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    peak_device_bytes: list[int] = field(default_factory=list)
    bytes_written: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON summary for ``--json``."""
        q = self.config["quantization"]
        return {
            "out": str(self.out),
            "reused": self.reused,
            "seconds": round(self.seconds, 3),
            "world_size": self.config["mapping"]["world_size"],
            "tp_size": self.config["mapping"]["tp_size"],
            "pp_size": self.config["mapping"]["pp_size"],
            "dtype": self.config["dtype"],
            "quant_algo": q.get("quant_algo"),
            "kv_cache_quant_algo": q.get("kv_cache_quant_algo"),
            "group_size": q.get("group_size"),
            "calibration": self.calibration,
            "calibration_seconds": round(self.timings.get("calibrate", 0.0), 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "fake_quant_ppl": self.fake_quant.get("ppl"),
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_device_bytes": self.peak_device_bytes or None,
            "bytes_written": self.bytes_written,
            "files": self.files,
            "warnings": self.warnings,
        }


def validate_quantize(req: QuantizeRequest, cfg: ModelConfig) -> Plan:
    """Check everything about a request that needs only the config, the tables and the calibration file.

    Raises:
        UnsupportedModelError: a known unconvertible repo or pre-quantized weights.
        UsageError: unknown scheme/KV format/GPU.
        ValidationError: every other problem, listed together.
    """
    check_source(cfg, req.model_dir, req.model_ref)
    scheme = get_scheme(req.scheme)
    kv = get_kv_cache(req.kv_cache)
    gpu = get_gpu(req.gpu) if req.gpu else None
    if not scheme.calibrated:
        raise UsageError(f"scheme {scheme.name} is data-free", f"`yitrt quantize --scheme {scheme.name}` writes it with the converter; calibrated: {', '.join(calibrated_schemes())}")
    problems = tp_problems(cfg, req.tp) + pp_problems(cfg, req.pp)
    hints = ["valid tp/pp sizes are listed by `yitrt inspect MODEL`"] if problems else []
    group_problems = group_size_problems(scheme, req.awq_block_size)
    problems += group_problems
    group_size = req.awq_block_size or scheme.group_size
    if not problems and (padded := padding_problems(cfg, scheme, req.tp, group_size)):
        problems += padded
        hints.append("choose another tp size" + (f" or --awq-block-size {min(scheme.group_sizes)}" if scheme.group_sizes and group_size != min(scheme.group_sizes) else ""))
    if sized := format_problems(gpu, scheme, kv, req.dtype, req.tp, req.pp):
        problems += sized
        hints.append("`yitrt schemes` lists what each GPU generation runs")
    if (req.calib_size or 1) < 1 or (req.calib_seq_len or 8) < 8 or req.calib_batch_size < 0:
        problems.append("--calib-size must be >= 1, --calib-seq-len >= 8 and --calib-batch-size >= 0")
    if req.device not in DEVICES:
        problems.append(f"unknown device {req.device!r} ({', '.join(DEVICES)})")
    if problems:
        raise ValidationError(problems, "; ".join(hints) or "fix the options above")
    read_documents(req.calib)  # a bad calibration file fails now, not after the model is loaded
    pitfalls = request_pitfalls(cfg, req.model_ref, {"pp": req.pp, "kv_cache": req.kv_cache, "scheme": req.scheme})
    return Plan(scheme, kv, Mapping(req.tp, req.pp), group_size, gpu, pitfalls)


def quant_config(scheme: Scheme, kv: KvCacheFormat | None, group_size: int | None) -> dict[str, Any]:
    """The ``mtq.quantize`` config: the scheme's ModelOpt preset with the AWQ block size applied and the
    KV-cache quantizers appended (ModelOpt's own recipe merges its KV preset the same way)."""
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, scheme.modelopt_config))
    entries = config["quant_cfg"]
    if group_size and group_size != scheme.group_size:
        for cfg in _weight_cfgs(entries):
            if "block_sizes" in cfg:
                cfg["block_sizes"] = {**cfg["block_sizes"], -1: group_size}
    if kv is not None:
        kv_entries = copy.deepcopy(getattr(mtq, kv.modelopt_config)["quant_cfg"]) if kv.modelopt_config else [
            {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": kv.num_bits, "axis": None}}
        ]
        if isinstance(entries, dict):  # older ModelOpt: a dict of pattern → cfg
            entries.update(kv_entries if isinstance(kv_entries, dict) else {e["quantizer_name"]: e["cfg"] for e in kv_entries})
        else:
            entries.extend(kv_entries if isinstance(kv_entries, list) else [{"quantizer_name": k, "cfg": v} for k, v in kv_entries.items()])
    return config


def _weight_cfgs(entries) -> list[dict]:
    """The weight-quantizer cfg dicts of a preset (a list of entries, or an older pattern → cfg dict)."""
    if isinstance(entries, dict):
        found = [v for k, v in entries.items() if k == "*weight_quantizer"]
    else:
        found = [e.get("cfg") for e in entries if e.get("quantizer_name") == "*weight_quantizer"]
    flat = []
    for cfg in found:
        flat += cfg if isinstance(cfg, list) else [cfg]
    return [c for c in flat if isinstance(c, dict)]


def merge_kv_scales(model, kv: KvCacheFormat) -> int:
    """Give each attention's K and V quantizers the scale the engine will use; return how many were set.

    trtllm-build merges the exported K and V scales into one, max(k, v) (reference §3.2), and ModelOpt's
    exporter raises FP8 KV scales to at least 1.0 (``get_kv_cache_scaling_factor``). Setting both amaxes to
    that value before evaluation and export makes the fake-quantized model compute what the engine computes.
    """
    import torch

    merged = 0
    for module in model.modules():
        k, v = getattr(module, "k_bmm_quantizer", None), getattr(module, "v_bmm_quantizer", None)
        if k is None or v is None or not k.is_enabled or k.amax is None or v.amax is None:
            continue
        amax = torch.maximum(k.amax.max(), v.amax.max()).reshape(k.amax.shape)
        if kv.kv_cache_quant_algo == "FP8":
            amax = torch.clamp(amax, min=FP8_MAX)
        k.amax, v.amax = amax.clone(), amax.clone()
        merged += 1
    return merged


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _first_float_dtype(source: SourceCheckpoint) -> str | None:
    from yitrt.checkpoint.safetensors_io import DTYPES

    for info in source.tensors.values():
        if info.dtype in ("BF16", "F16", "F32"):
            return DTYPES[info.dtype][0]
    return None


def quantize(req: QuantizeRequest, progress: ProgressFn | None = None) -> QuantizeResult:
    """Calibrate an HF model with ModelOpt and write a TensorRT-LLM checkpoint artifact.

    Args:
        req: the request.
        progress: optional callback (phase, done, total) for loading, calibration batches and export.

    Returns:
        The result; ``reused`` is True when an identical artifact already existed.

    Raises:
        ValidationError, UsageError, UnsupportedModelError: before anything is loaded or written.
        MissingDependencyError: nvidia-modelopt or transformers is not installed.
        CheckpointError: the export does not match its own config (nothing is published).
    """
    from yitrt.errors import require
    from yitrt.reference.runtime import resolve_device

    started = time.perf_counter()
    say = progress or (lambda _phase, _done, _total: None)
    cfg = load_config(req.model_dir)
    plan = validate_quantize(req, cfg)
    check_output_folder(req.out, STAGE)
    if Path(req.out).resolve() == Path(req.model_dir).resolve():
        raise ArtifactError(f"{req.out} is the model folder itself", "write the checkpoint to another --out")
    require("modelopt", "quant")
    require("transformers", "quant")
    with SourceCheckpoint(req.model_dir, allow_pickle=req.allow_pickle) as source:
        stored = _first_float_dtype(source)
        names = ["config.json", *source.files] + ([INDEX_NAME] if (req.model_dir / INDEX_NAME).is_file() else [])
        model_fingerprint = fingerprint_files(req.model_dir, names, source.header_bytes)
    dtype = plan.scheme.dtypes[0] if plan.scheme.dtypes and req.dtype == "auto" else resolve_dtype(req.dtype, cfg, stored)
    if dtype == "float32":
        raise ValidationError([f"{plan.scheme.name} checkpoints are float16 or bfloat16, not float32"], "pass --dtype bfloat16 or float16")
    _, calib_source, calib_digest = read_documents(req.calib)
    device = resolve_device(req.device)
    default_size, default_len = CALIB_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    req = replace(req, calib_size=req.calib_size or default_size, calib_seq_len=req.calib_seq_len or default_len)
    params = {
        "eval_tokens": req.eval_tokens, "eval_window": req.eval_window,
        "scheme": plan.scheme.name, "kv_cache": plan.kv.name if plan.kv else None, "tp": req.tp, "pp": req.pp,
        "dtype": dtype, "group_size": plan.group_size if plan.scheme.group_size else None,
        "calib_size": req.calib_size, "calib_seq_len": req.calib_seq_len, "seed": req.seed,
        "target_trtllm": TARGET_TRTLLM, "model_ref": req.model_ref,
    }
    if req.allow_nonfinite:  # part of the key: an artifact that kept NaN/Inf is never reused by a strict run
        params["allow_nonfinite"] = True
    inputs = {"model": model_fingerprint, "calibration": calib_digest}
    key = artifact_key(STAGE, params, inputs)
    if not req.force and (manifest := find_reusable(req.out, STAGE, key)) is not None:
        config = json.loads((Path(req.out) / "config.json").read_text())
        extra = manifest.extra or {}
        return QuantizeResult(
            req.out, True, time.perf_counter() - started, config, [f["path"] for f in manifest.files], plan.warnings,
            _peak_rss(), extra.get("calibration", {}), extra.get("fake_quant", {}),
        )
    return _run(req, cfg, plan, dtype, params, inputs, calib_source, say, started, device)


def _run(req, cfg, plan: Plan, dtype: str, params, inputs, calib_source: str, say: ProgressFn, started: float, device) -> QuantizeResult:
    import torch

    from yitrt.reference.original import load_original
    from yitrt.reference.verify import evaluation_windows, load_tokenizer, windows_digest

    timings: dict[str, float] = {}
    tokenizer = load_tokenizer(req.model_dir)
    calib = load_calibration(req.calib, tokenizer, req.calib_size, req.calib_seq_len, req.seed)
    windows = evaluation_windows(tokenizer, None, req.eval_tokens, req.eval_window)
    notes = list(plan.warnings)
    if len(calib.sequences) < req.calib_size:
        notes.append(f"{calib_source} gives {len(calib.sequences)} sequences of {req.calib_seq_len} tokens, fewer than the {req.calib_size} asked for")

    say("loading the model with transformers", None, None)
    t0 = time.perf_counter()
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    load_dtype = getattr(torch, dtype) if device.type == "cuda" else torch.float32  # CPU: exact float32 arithmetic
    model = load_original(req.model_dir, device, load_dtype, req.allow_pickle, device_map="auto" if gpus > 1 else None)
    notes += check_finite_parameters(model, req.model_dir, str(load_dtype).removeprefix("torch."), req.allow_nonfinite, req.allow_pickle)
    timings["load"] = time.perf_counter() - t0

    batch = req.calib_batch_size or _auto_batch(cfg, req.calib_seq_len, device)
    t0 = time.perf_counter()
    _calibrate(model, plan, calib, batch, say)
    timings["calibrate"] = time.perf_counter() - t0

    tools = {"yitrt": __version__, "modelopt": _version("nvidia-modelopt"), "transformers": _version("transformers"),
             "torch": torch.__version__, "target_trtllm": TARGET_TRTLLM}
    with ArtifactWriter(req.out, STAGE, params, inputs, tools) as art:
        say("exporting with ModelOpt", None, None)
        t0 = time.perf_counter()
        _export(model, art.path, dtype, req.tp, req.pp)
        config = _complete_config(art.path, cfg, plan, dtype)
        _restore_vocab(art.path, config, cfg.vocab_size)
        timings["export"] = time.perf_counter() - t0
        # evaluated after the export: the exporter fuses q/k/v (and FP8 gate/up) quantizers in place
        # (ModelOpt preprocess_linear_fusion), so only now does the in-memory model compute what the files hold
        say("evaluating the fake-quantized model", None, None)
        t0 = time.perf_counter()
        fake_quant = evaluate_calibrated(model, windows, windows_digest(windows), req.eval_tokens, req.eval_window, dtype)
        timings["evaluate"] = time.perf_counter() - t0
        say("checking the export against its config", None, None)
        notes += _check_export(art.path, plan, dtype, req.allow_nonfinite)
        calibration = {
            "source": calib_source, "documents": calib.documents, "documents_used": calib.documents_used,
            "sequences": len(calib.sequences), "seq_len": req.calib_seq_len, "tokens": sum(map(len, calib.sequences)),
            "batch_size": batch, "seed": req.seed, "device": str(device) if gpus <= 1 else f"cuda × {gpus}",
            "modelopt_config": plan.scheme.modelopt_config, "seconds": round(timings["calibrate"], 3),
        }
        art.extra = {
            "model_ref": req.model_ref, "source": str(Path(req.model_dir).absolute()), "warnings": notes,
            "calibration": calibration, "fake_quant": fake_quant,
        }
    del model
    files = [f["path"] for f in art.manifest.files]
    written = sum(f["size"] for f in art.manifest.files)
    peak_device = [torch.cuda.max_memory_allocated(i) for i in range(gpus)] if gpus else []
    return QuantizeResult(
        req.out, False, time.perf_counter() - started, config, files, notes, _peak_rss(), calibration, fake_quant,
        timings, peak_device, written,
    )


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _auto_batch(cfg: ModelConfig, seq_len: int, device) -> int:
    """Calibration batch size that fits: free GPU memory, or a CPU budget (batches beyond a few sequences do
    not speed up CPU matmuls, so CPU batches stay small)."""
    import torch

    if device.type == "cuda":
        free = min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        return batch_size_for(seq_len, cfg.hidden_size, cfg.intermediate_size, free)
    return batch_size_for(seq_len, cfg.hidden_size, cfg.intermediate_size, 2 << 30, limit=8)


def _calibrate(model, plan: Plan, calib: CalibrationSet, batch: int, say: ProgressFn) -> None:
    """``mtq.quantize`` with the forward loop over the calibration batches (ModelOpt may run it more than
    once: AWQ searches its scales in a second pass)."""
    import torch

    with _modelopt_quiet():
        import modelopt.torch.quantization as mtq
    decoder = model.get_decoder()  # lm_head is never quantized: the logits need not be computed
    first = model.get_input_embeddings().weight.device
    batches = [calib.sequences[i : i + batch] for i in range(0, len(calib.sequences), batch)]
    passes = 0

    @torch.no_grad()
    def forward_loop(_model) -> None:
        nonlocal passes
        passes += 1
        label = "calibrating" + (f" (pass {passes})" if passes > 1 else "")
        for n, rows in enumerate(batches, 1):
            decoder(input_ids=torch.tensor(rows, device=first), use_cache=False)
            say(label, n, len(batches))

    with _modelopt_quiet():
        mtq.quantize(model, quant_config(plan.scheme, plan.kv, plan.group_size), forward_loop)
    if plan.kv is not None and merge_kv_scales(model, plan.kv) == 0:
        raise QuantizationError("ModelOpt inserted no K/V quantizers into this model's attention", "quantize without --kv-cache")


@contextlib.contextmanager
def _modelopt_quiet():
    """ModelOpt prints progress to stdout and warns (e.g. "No module named 'tensorrt_llm'" on every export).
    stdout is reserved for ``--json`` and the terminal for yitrt's own progress, so its output is kept aside:
    attached to the exception when the step fails, shown on stderr as it comes with ``YITRT_DEBUG=1``."""
    if os.environ.get("YITRT_DEBUG") == "1":
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except Exception as exc:  # keep what ModelOpt said with the error (YITRT_DEBUG=1 shows it)
            said = buffer.getvalue() + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
            if said.strip():
                exc.add_note("ModelOpt output:\n" + said[-4000:])
            raise


def _export(model, folder: Path, dtype: str, tp: int, pp: int) -> None:
    import torch

    with _modelopt_quiet():
        from modelopt.torch.export import export_tensorrt_llm_checkpoint

        export_tensorrt_llm_checkpoint(
            model, "llama", getattr(torch, dtype), export_dir=folder, inference_tensor_parallel=tp, inference_pipeline_parallel=pp,
        )


#: Keys of the exported config.json that yitrt sets from the HF config (ModelOpt 0.47 omits ``rotary_base``,
#: so TensorRT-LLM would default to 10000 — wrong for every Yi; it copies the HF architecture name, which is
#: ``YiForCausalLM`` for legacy folders; it writes float16 logits for bfloat16 models).
_OWN_KEYS = ("architecture", "rotary_base", "rotary_scaling", "position_embedding_type", "max_position_embeddings",
             "norm_epsilon", "logits_dtype")


def _complete_config(folder: Path, cfg: ModelConfig, plan: Plan, dtype: str) -> dict[str, Any]:
    from yitrt.quant.schemes import SCHEMES

    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"ModelOpt's export wrote no readable config.json ({exc})", "re-run with YITRT_DEBUG=1 and report it") from None
    ours = build_config(cfg, plan.mapping, dtype, SCHEMES["none"], None, config.get("use_parallel_embedding", True))
    for key in _OWN_KEYS:
        config[key] = ours[key]
    path.write_text(json.dumps(config, indent=2) + "\n")
    return config


_VOCAB_TENSORS = ("transformer.vocab_embedding.weight", "lm_head.weight")


def _restore_vocab(folder: Path, config: dict[str, Any], vocab_size: int) -> None:
    """Undo the vocab padding ModelOpt's exporter adds for AWQ/W4A8 (to a multiple of 64, with ``vocab_size``
    raised to match): the padded rows would be real tokens to the engine — an lm_head row of zeros scores 0,
    which can beat every real token — and the checkpoint would no longer match its tokenizer. The table is cut
    back to the model's vocab and re-split as TensorRT-LLM splits it (zero rows only up to a multiple of tp)."""
    import torch
    from safetensors.torch import save_file

    from yitrt.checkpoint.safetensors_io import SafetensorsReader, load_safetensors

    if config["vocab_size"] == vocab_size:
        return
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
    by_rows = config.get("use_parallel_embedding", True) and config.get("embedding_sharding_dim", 0) == 0
    for name, stage in zip(_VOCAB_TENSORS, (0, pp - 1), strict=True):
        ranks = [stage * tp + r for r in range(tp)]
        split = tp > 1 and (name == "lm_head.weight" or by_rows)
        pieces = []
        for rank in ranks if split else ranks[:1]:
            with SafetensorsReader(folder / f"rank{rank}.safetensors") as f:
                if name not in f.tensors:
                    break
                pieces.append(f.read(name))
        if not pieces:
            continue
        table = torch.cat(pieces)[:vocab_size]
        if split:
            rows = -(-vocab_size // tp)
            table = torch.cat([table, table.new_zeros(rows * tp - vocab_size, table.shape[1])])
        for i, rank in enumerate(ranks):
            path = folder / f"rank{rank}.safetensors"
            tensors = load_safetensors(path)
            tensors[name] = (table.chunk(tp)[i] if split else table).contiguous()
            save_file(tensors, str(path), metadata={"format": "pt"})
    config["vocab_size"] = vocab_size
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _check_export(folder: Path, plan: Plan, dtype: str, allow_nonfinite: bool = False) -> list[str]:
    """Every expected tensor per rank present with the right shape and dtype, no NaN/Inf in any floating-point
    tensor (a diverged scale), and the config saying what was asked for; returns the warnings.

    Raises:
        CheckpointError: the export differs from its config or from the request.
        QuantizationError: a tensor holds NaN/Inf (unless ``allow_nonfinite``).
    """
    from yitrt.reference.layout import check_checkpoint
    from yitrt.reference.spec import load_spec

    spec = load_spec(folder)
    wanted = {"quant_algo": plan.scheme.quant_algo, "kv_cache_quant_algo": plan.kv.kv_cache_quant_algo if plan.kv else None,
              "dtype": dtype, "tp": plan.mapping.tp, "pp": plan.mapping.pp}
    if plan.scheme.group_size:
        wanted["group_size"] = plan.group_size
    got = {k: getattr(spec, k) for k in wanted}
    if got != wanted:
        diffs = ", ".join(f"{k} {got[k]} (asked {wanted[k]})" for k in wanted if got[k] != wanted[k])
        raise CheckpointError(f"ModelOpt's export does not match the request: {diffs}", "report it with the ModelOpt version (yitrt --version)")
    warnings = check_checkpoint(spec)
    return warnings + _check_export_finite(folder, spec.world_size, allow_nonfinite)


def _check_export_finite(folder: Path, world_size: int, allow_nonfinite: bool) -> list[str]:
    """No NaN/Inf in the exported rank files (read back while they are in the page cache; calibration, not this
    read, dominates quantize's time)."""
    from yitrt.checkpoint.finite import has_nonfinite
    from yitrt.checkpoint.safetensors_io import SafetensorsReader

    kept = []
    for rank in range(world_size):
        with SafetensorsReader(folder / f"rank{rank}.safetensors") as reader:
            for name, info in reader.tensors.items():
                if has_nonfinite(reader.read(name).reshape(-1).view(_torch().uint8).numpy(), info.dtype):
                    if not allow_nonfinite:
                        raise QuantizationError(f"ModelOpt's export holds NaN or Inf in rank{rank}.safetensors tensor {name} (calibration diverged)",
                                                "try another --calib or scheme; --allow-nonfinite keeps the values")
                    kept.append(f"rank{rank}:{name}")
    return [f"{len(kept)} exported tensor(s) hold NaN or Inf and were kept (--allow-nonfinite): {', '.join(kept[:3])}"] if kept else []


def _torch():
    import torch

    return torch


def check_finite_parameters(model, model_dir: Path, loaded_dtype: str, allow_nonfinite: bool, allow_pickle: bool = False) -> list[str]:
    """Refuse NaN/Inf in a loaded model's parameters (in memory: no extra read of the weights), naming the source
    tensor and file that hold them, or the one whose values overflowed ``loaded_dtype``.

    Returns:
        Warnings (the parameters kept with NaN/Inf when ``allow_nonfinite``).

    Raises:
        CheckpointError: a parameter is not finite and ``allow_nonfinite`` is False.
    """
    from yitrt.checkpoint.finite import tensor_has_nonfinite
    from yitrt.checkpoint.source import NONFINITE_HINT
    from yitrt.reference.original import LEGACY_RENAMES

    bad = [name for name, param in model.named_parameters() if tensor_has_nonfinite(param.data)]
    if not bad:
        return []
    if allow_nonfinite:
        return [f"{len(bad)} weight(s) hold NaN or Inf and were kept (--allow-nonfinite): {', '.join(bad[:3])}"]
    candidates = [bad[0]] + [bad[0].replace(new, old) for old, new in LEGACY_RENAMES if bad[0].endswith(new)]
    with SourceCheckpoint(model_dir, allow_pickle=allow_pickle) as source:
        names = [n for n in candidates if n in source.tensors]
        if bad[0] == "lm_head.weight" and not names and "model.embed_tokens.weight" in source.tensors:
            names = ["model.embed_tokens.weight"]  # tied
        found = source.nonfinite_error(names, loaded_dtype) if names else None
    raise found or CheckpointError(f"{model_dir}: weight {bad[0]} holds NaN or Inf once loaded", NONFINITE_HINT)
