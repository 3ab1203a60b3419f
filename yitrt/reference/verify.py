"""``yitrt verify``: does a TensorRT-LLM checkpoint compute what the Hugging Face original computes?

The original runs with transformers, the checkpoint with the reference runtime (its own tensors and config,
one process per TP rank), on the same token sequences: an evaluation text cut into windows (perplexity of
both; the checkpoint reads the first half of each window in one context pass and the second half one token at
a time through its KV cache, so both engine phases and a quantized KV cache are measured) and a set of prompts
(logits at every position, then greedy continuations). Metrics are compared with
per-format thresholds (thresholds.yaml; overridable). The original runs first and is freed before the
checkpoint is loaded, so peak memory is one model, not two.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from yitrt.errors import CheckpointError, UsageError
from yitrt.models.config import ModelConfig, load_config
from yitrt.reference import COMPUTE_DTYPES, EVAL_TOKENS, EVAL_WINDOW
from yitrt.reference.layout import check_checkpoint
from yitrt.reference.spec import CheckpointSpec, emulation_notes, load_spec
from yitrt.verdict import bound_failure, measured, nothing_judged

ProgressFn = Callable[[str], None]  # a stage description
THRESHOLD_KEYS = ("min_top1", "max_ppl_delta_pct", "max_logit_diff_rel", "min_greedy")


def default_text(name: str) -> str:
    """A text shipped in ``yitrt/data`` (sources in SOURCES.txt)."""
    return resources.files("yitrt").joinpath("data", name).read_text(encoding="utf-8")


def read_prompts(path: Path | None) -> list[str]:
    """Prompts: one per line (``\\n`` = newline; blank lines skipped), or JSONL with a ``prompt``/``text`` field.

    Raises:
        UsageError: unreadable file, or no prompt in it.
    """
    import json

    from yitrt.userfiles import read_text

    text = read_text(path, "prompts file", fix="pass a UTF-8 text file with one prompt per line") if path else default_text("prompts.txt")
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path and path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
                prompts.append(str(obj.get("prompt", obj.get("text"))) if isinstance(obj, dict) and ("prompt" in obj or "text" in obj) else None)
            except (ValueError, RecursionError):
                prompts.append(None)
            if prompts[-1] is None:
                raise UsageError(f"{path}:{n}: not a JSON object with a 'prompt' or 'text' field", "fix the line or use a plain text file")
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise UsageError(f"no prompts in {path}", "write one prompt per line")
    return prompts


def read_eval_text(path: Path | None) -> str | None:
    """The evaluation text of a file (None: use the shipped one).

    Raises:
        UsageError: unreadable or not UTF-8.
    """
    from yitrt.userfiles import read_text

    if path is None:
        return None
    text = read_text(path, "evaluation text", fix="pass a UTF-8 text file")
    if not text.strip():
        raise UsageError(f"evaluation text {path} is empty", "pass a UTF-8 text file with enough text to score")
    return text


def load_thresholds() -> dict[str, Any]:
    """The shipped threshold table."""
    return yaml.safe_load(resources.files("yitrt.reference").joinpath("thresholds.yaml").read_text())


def pipeline_thresholds() -> dict[str, float]:
    """Bounds on the pipeline error: the checkpoint, run by the reference runtime, against the calibrated
    fake-quant model that produced it (thresholds.yaml ``pipeline``)."""
    return dict(load_thresholds()["pipeline"])


def thresholds_for(spec: CheckpointSpec, overrides: dict[str, float | None] | None = None) -> dict[str, float | None]:
    """Thresholds for a checkpoint's formats: the scheme's row, widened for a quantized KV cache, then
    the user's overrides."""
    table = load_thresholds()
    row = dict(table["schemes"].get(spec.quant_algo or "none") or table["schemes"]["none"])
    if spec.kv_cache_quant_algo:
        extra = table["kv_cache"][spec.kv_cache_quant_algo]
        row["min_top1"] = row["min_top1"] - extra["top1"] if row["min_top1"] is not None else None
        row["max_ppl_delta_pct"] = row["max_ppl_delta_pct"] + extra["ppl_pct"] if row["max_ppl_delta_pct"] is not None else None
        row["max_logit_diff_rel"] = None  # quantized K/V is not bit-faithful to the original's
        row["min_greedy"] = None
    for key, value in (overrides or {}).items():
        if key not in THRESHOLD_KEYS:
            raise UsageError(f"unknown threshold {key!r}", "use one of: " + ", ".join(THRESHOLD_KEYS))
        if value is not None and (not measured(value) or value < 0):
            raise UsageError(f"threshold {key} must be a non-negative number, got {value!r}", "pass a finite bound")
        if value is not None:
            row[key] = value
    return row


@dataclass(frozen=True)
class VerifyRequest:
    """What to verify and how.

    Attributes:
        checkpoint: TensorRT-LLM checkpoint folder.
        model: the HF original (local folder).
        prompts: prompts for logits and greedy checks (None: the shipped bilingual set).
        eval_text: evaluation text (None: the shipped bilingual text).
        max_new_tokens: greedy continuation length per prompt.
        eval_tokens: at most this many tokens of the evaluation text are scored.
        window: tokens per evaluation window.
        device: ``auto``, ``cpu`` or ``cuda``.
        compute_dtype: the reference runtime's (and the original's) arithmetic dtype.
        thresholds: overrides of the threshold table.
        allow_pickle: let transformers load ``.bin`` weights of the original.
        tokenizer: tokenizer folder (default: the model folder).
        lora: a converted LoRA adapter (``yitrt lora convert`` output) to verify on the checkpoint, compared with
            transformers + peft (``yitrt.reference.verify_lora``); None: the base model.
    """

    checkpoint: Path
    model: Path
    prompts: tuple[str, ...] | None = None
    eval_text: str | None = None
    max_new_tokens: int = 16
    eval_tokens: int = EVAL_TOKENS
    window: int = EVAL_WINDOW
    device: str = "auto"
    compute_dtype: str = "float32"
    thresholds: dict[str, float | None] = field(default_factory=dict)
    allow_pickle: bool = False
    tokenizer: Path | None = None
    lora: Path | None = None


def load_tokenizer(folder: Path):
    """transformers' tokenizer of a folder, without remote code.

    Raises:
        UsageError: the folder has no loadable tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"no tokenizer could be loaded from {folder} ({first})", "pass a folder with the tokenizer files via --tokenizer") from None


@dataclass
class LogitComparison:
    """Running comparison of two models' logits over many positions. A NaN/Inf logit on either side makes the
    maxima NaN (Python's ``max`` would drop it) and is counted in ``nonfinite``."""

    positions: int = 0
    top1_equal: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    scale: float = 0.0  # max |reference logit|
    nonfinite: int = 0  # positions where either model's logits are not all finite

    def add(self, ref, got) -> None:
        """Accumulate one sequence's float32 logits [len, vocab]."""
        import torch

        diff = (ref - got).abs()
        self.positions += ref.shape[0]
        self.top1_equal += int((ref.argmax(-1) == got.argmax(-1)).sum())
        self.nonfinite += int((~torch.isfinite(ref).all(-1) | ~torch.isfinite(got).all(-1)).sum())
        self.max_abs = _max_keeping_nan(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.mean(dim=-1).sum())
        self.scale = _max_keeping_nan(self.scale, float(ref.abs().max()))

    @property
    def top1(self) -> float:
        """Fraction of positions whose top-1 tokens agree (NaN when none were compared)."""
        return self.top1_equal / self.positions if self.positions else math.nan

    @property
    def rel_max(self) -> float:
        """max |Δlogit| / max |reference logit| (NaN when there is no scale)."""
        return self.max_abs / self.scale if self.scale else math.nan


def _max_keeping_nan(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def perplexity(logits_list, sequences: list[list[int]]) -> float:
    """exp of the mean next-token negative log-likelihood over all windows."""
    import torch

    nll, count = 0.0, 0
    for logits, seq in zip(logits_list, sequences, strict=True):
        targets = torch.tensor(seq[1:])
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum"))
        count += len(seq) - 1
    if not count or not math.isfinite(nll):
        return math.nan  # nothing scored, or NaN/Inf logits: a figure the judges refuse
    return math.exp(min(nll / count, 700.0))  # exp(700) is finite; beyond it the model predicts nothing


def matched_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):  # lengths may differ
        if x != y:
            break
        n += 1
    return n


@dataclass
class PipelineCheck:
    """The checkpoint against the calibrated model it was exported from (``yitrt quantize``'s record).

    Two parts, both exact in principle, so any real difference is a pipeline error (a wrong export, packing,
    scale, split or config): the stored weights run with unquantized activations must predict what the
    calibrated model predicts with its weight quantizers alone, and every activation and KV-cache scale in the
    files must be the one its quantizer calibrated. ``ran`` is False (with the reason) when the checkpoint has
    no record or the evaluation differs from the recorded one.
    """

    ran: bool
    reason: str = ""
    ppl_recorded: float | None = None
    ppl_checkpoint: float | None = None
    top1_agreement: float | None = None
    positions: int = 0
    scales_checked: int = 0
    thresholds: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ppl_delta_pct(self) -> float | None:
        """Relative perplexity difference checkpoint vs calibrated model (weights only), percent (None before
        the check ran; NaN when either perplexity is not a positive finite number)."""
        if not self.ran:
            return None
        if not (measured(self.ppl_checkpoint) and measured(self.ppl_recorded)) or self.ppl_recorded <= 0:
            return math.nan
        return 100.0 * (self.ppl_checkpoint - self.ppl_recorded) / self.ppl_recorded

    def judge(self, scale_problems: list[str]) -> None:
        """Fill ``failures`` from the thresholds and the scale comparison (``yitrt.verdict``: a figure that is not
        a number, or no position compared, fails)."""
        t, delta = self.thresholds, self.ppl_delta_pct
        checks = [
            nothing_judged("positions compared with the calibrated model", self.positions),
            bound_failure(f"perplexity delta vs the calibrated model ({self.ppl_checkpoint!r} vs {self.ppl_recorded!r})", delta,
                          maximum=t.get("max_ppl_delta_pct"), magnitude=True, fmt="+.3f", unit="%"),
            bound_failure("top-1 agreement with the calibrated model", self.top1_agreement, minimum=t.get("min_top1")),
        ]
        self.failures += [f"pipeline error: {c}" for c in checks if c]
        if scale_problems:
            more = f" (and {len(scale_problems) - 3} more)" if len(scale_problems) > 3 else ""
            self.failures.append("pipeline error: scales differ from the calibrated ones: " + "; ".join(scale_problems[:3]) + more)

    def to_json(self) -> dict[str, Any]:
        """JSON for ``--json``."""
        return {
            "ran": self.ran, "reason": self.reason, "ppl_recorded": self.ppl_recorded, "ppl_checkpoint": self.ppl_checkpoint,
            "ppl_delta_pct": self.ppl_delta_pct, "top1_agreement": self.top1_agreement, "positions": self.positions,
            "scales_checked": self.scales_checked, "thresholds": self.thresholds, "failures": self.failures,
        }


def fake_quant_record(checkpoint: Path) -> dict[str, Any] | None:
    """The calibrated model's evaluation that ``yitrt quantize`` stored in the manifest (None: none).

    Raises:
        CheckpointError: a record is there but damaged (wrong types), so the pipeline check cannot be trusted.
    """
    from yitrt.manifest import read_manifest

    manifest = read_manifest(checkpoint)
    record = (manifest.extra or {}).get("fake_quant") if manifest else None
    if record is None:
        return None
    weights = record.get("weights_only") if isinstance(record, dict) else None
    scales = record.get("scales") if isinstance(record, dict) else None
    ok = (isinstance(weights, dict) and isinstance(scales, dict) and isinstance(weights.get("top1"), list)
          and all(isinstance(row, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in row) for row in weights["top1"])
          and isinstance(weights.get("ppl"), int | float) and not isinstance(weights.get("ppl"), bool)
          and all(isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) for k, v in scales.items()))
    if not ok:
        raise CheckpointError(f"{checkpoint}: the manifest's record of the calibrated model is damaged", "re-create the checkpoint (yitrt quantize --force)")
    return record


def scale_problems(spec: CheckpointSpec, recorded: dict[str, float], rel_tol: float = 1e-5) -> list[str]:
    """Compare the checkpoint's activation/KV scales with the recorded ones, on every rank that holds them.

    Keys are ``"{global layer}.{module}.{tensor}"``; a KV scale may be stored as ``kv_cache_scaling_factor`` or
    as separate k/v factors, which the build merges as max(k, v) (reference §3.2).
    """
    from yitrt.checkpoint.safetensors_io import SafetensorsReader

    problems = []
    for pp_rank in range(spec.pp):
        layers = list(spec.stage_layers(pp_rank))
        wanted = {k: v for k, v in recorded.items() if int(k.split(".", 1)[0]) in layers}
        for tp_rank in range(spec.tp):
            rank = pp_rank * spec.tp + tp_rank
            with SafetensorsReader(Path(spec.path) / f"rank{rank}.safetensors") as f:
                names = set(f.tensors)
                for key, value in wanted.items():
                    layer, tensor = key.split(".", 1)
                    local = f"transformer.layers.{layers.index(int(layer))}.{tensor}"
                    got = _stored_scale(f, names, local)
                    if got is None:
                        problems.append(f"rank{rank}: {local} is missing")
                    elif not (measured(got) and measured(value)) or abs(got - value) > rel_tol * abs(value):
                        problems.append(f"rank{rank}: {local} = {got:.6g}, calibrated {value:.6g}")
    return problems


def _stored_scale(f, names: set[str], name: str) -> float | None:
    if name in names:
        return float(f.read(name).float().max())
    if name.endswith("kv_cache_scaling_factor"):
        parts = [name.replace("kv_cache", side) for side in ("k_cache", "v_cache")]
        if all(p in names for p in parts):
            return max(float(f.read(p).float().max()) for p in parts)
    return None


def check_pipeline(runtime, spec: CheckpointSpec, windows: list[list[int]], record: dict[str, Any] | None) -> PipelineCheck:
    """Score the evaluation windows with the stored weights and unquantized activations and compare with the
    record; compare every stored activation/KV scale with the calibrated one."""
    import torch

    if record is None:
        return PipelineCheck(False, "no calibrated-model record in the manifest (not made by yitrt quantize)")
    if record.get("windows_digest") != windows_digest(windows):
        return PipelineCheck(
            False,
            f"the evaluation differs from the one recorded at quantize time (shipped text, {record.get('eval_tokens')} tokens, "
            f"windows of {record.get('window')}); pass those --eval-tokens/--window and no --eval-text/--tokenizer to run it",
        )
    logits = runtime.score(windows, weights_only=True)
    recorded = record["weights_only"]
    if [len(row) for row in recorded["top1"]] != [len(w) for w in windows]:
        check = PipelineCheck(True, "", float(recorded["ppl"]), perplexity(logits, windows), math.nan, 0, len(record["scales"]),
                              pipeline_thresholds(), ["pipeline error: the record's top-1 predictions do not match the evaluation windows (damaged manifest)"])
        return check
    agree = sum(int((got.argmax(-1) == torch.tensor(top1)).sum()) for got, top1 in zip(logits, recorded["top1"], strict=True))
    agree -= sum(int((~torch.isfinite(got).all(-1)).sum()) for got in logits)  # a NaN row's argmax agrees with nothing
    positions = sum(len(w) for w in windows)
    check = PipelineCheck(True, "", float(recorded["ppl"]), perplexity(logits, windows), max(agree, 0) / positions if positions else math.nan,
                          positions, len(record["scales"]), pipeline_thresholds())
    check.judge(scale_problems(spec, record["scales"]))
    return check


@dataclass
class VerifyReport:
    """The verdict and the figures behind it."""

    checkpoint: Path
    model: Path
    spec: CheckpointSpec
    comparison: LogitComparison
    ppl_reference: float
    ppl_checkpoint: float
    greedy: list[dict[str, Any]]
    thresholds: dict[str, float | None]
    failures: list[str]
    ranks: list[dict[str, Any]]
    eval_tokens: int
    seconds: float
    warnings: list[str]
    pipeline: PipelineCheck = field(default_factory=lambda: PipelineCheck(False, "not run"))
    lora: dict[str, Any] | None = None  # the adapter verified (AdapterUnderTest.to_json), None: the base model

    @property
    def passed(self) -> bool:
        """Whether every threshold held."""
        return not self.failures

    @property
    def ppl_delta_pct(self) -> float:
        """Relative perplexity change, percent (NaN when either perplexity is not a positive finite number)."""
        if not (measured(self.ppl_checkpoint) and measured(self.ppl_reference)) or self.ppl_reference <= 0:
            return math.nan
        return 100.0 * (self.ppl_checkpoint - self.ppl_reference) / self.ppl_reference

    @property
    def greedy_match_frac(self) -> float:
        """Matched greedy tokens / generated tokens (NaN when nothing was generated)."""
        total = sum(g["generated"] for g in self.greedy)
        return sum(g["matched"] for g in self.greedy) / total if total else math.nan

    def to_json(self) -> dict[str, Any]:
        """JSON for ``--json``."""
        c = self.comparison
        return {
            "checkpoint": str(self.checkpoint),
            "model": str(self.model),
            "quant_algo": self.spec.quant_algo,
            "kv_cache_quant_algo": self.spec.kv_cache_quant_algo,
            "tp_size": self.spec.tp,
            "pp_size": self.spec.pp,
            "ranks": self.ranks,
            "positions_compared": c.positions,
            "nonfinite_positions": c.nonfinite,
            "top1_agreement": c.top1,
            "max_abs_logit_diff": c.max_abs,
            "mean_abs_logit_diff": c.sum_abs / c.positions if c.positions else math.nan,
            "logit_scale": c.scale,
            "max_rel_logit_diff": c.rel_max,
            "eval_tokens": self.eval_tokens,
            "ppl_reference": self.ppl_reference,
            "ppl_checkpoint": self.ppl_checkpoint,
            "ppl_delta_pct": self.ppl_delta_pct,
            "greedy_match": self.greedy,
            "greedy_match_frac": self.greedy_match_frac,
            "thresholds": self.thresholds,
            "pipeline": self.pipeline.to_json(),
            "quantization_loss_judged_as": "warning" if self.pipeline.ran else "failure",
            "failures": self.failures,
            "passed": self.passed,
            "seconds": round(self.seconds, 2),
            "warnings": self.warnings,
            "lora": self.lora,
        }


def _judge(report: VerifyReport) -> tuple[list[str], list[str]]:
    """(failures no threshold and no pipeline record may waive: positions were compared, every logit of both
    models is finite, a threshold was judged; the threshold failures, each judged by ``yitrt.verdict``: a figure
    that is NaN/None fails its bound)."""
    t, c = report.thresholds, report.comparison
    judged = {
        "min_top1": lambda b: bound_failure("top-1 agreement", c.top1, minimum=b),
        "max_ppl_delta_pct": lambda b: bound_failure(f"perplexity delta ({report.ppl_reference:.4g} → {report.ppl_checkpoint:.4g})",
                                                     report.ppl_delta_pct, maximum=b, magnitude=True, fmt="+.3f", unit="%"),
        "max_logit_diff_rel": lambda b: bound_failure(f"max |Δlogit| {c.max_abs:.4g} relative to the logit scale {c.scale:.4g}", c.rel_max, maximum=b),
        "min_greedy": lambda b: bound_failure("greedy tokens matched", report.greedy_match_frac, minimum=b, fmt=".3f"),
    }
    hard = [f for f in (nothing_judged("positions compared", c.positions),) if f]
    if c.nonfinite:
        hard.append(f"logits are NaN or Inf at {c.nonfinite} of {c.positions} positions")
    bounds = {key: t[key] for key in THRESHOLD_KEYS if t.get(key) is not None}
    if not bounds:
        hard.append("nothing was judged: every threshold is off")
    return hard, [f for key, bound in bounds.items() if (f := judged[key](bound))]


def check_same_model(spec: CheckpointSpec, cfg: ModelConfig, model: Path) -> None:
    """Refuse to compare a checkpoint with a model it was not made from (by shape).

    Raises:
        CheckpointError: the dims differ (each difference listed).
    """
    pairs = {
        "vocab_size": (spec.vocab_size, cfg.vocab_size), "hidden_size": (spec.hidden_size, cfg.hidden_size),
        "layers": (spec.num_layers, cfg.num_layers), "heads": (spec.num_heads, cfg.num_heads),
        "kv_heads": (spec.num_kv_heads, cfg.num_kv_heads), "intermediate_size": (spec.intermediate_size, cfg.intermediate_size),
    }
    diffs = [f"{k} {a} vs {b}" for k, (a, b) in pairs.items() if a != b]
    if diffs:
        raise CheckpointError(f"{spec.path} was not made from {model}: " + ", ".join(diffs), "pass the model the checkpoint was converted from with --against")


def evaluation_windows(tokenizer, text: str | None, eval_tokens: int, window: int) -> list[list[int]]:
    """The evaluation text (None: the shipped one) tokenized without special tokens, cut to ``eval_tokens``
    and split into windows of ``window`` tokens (a last window shorter than two tokens is dropped).

    Raises:
        UsageError: the text gives fewer than two tokens.
    """
    text = text if text is not None else default_text("eval_text.txt")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:eval_tokens]
    if len(ids) < 2:
        raise UsageError("the evaluation text is shorter than two tokens", "pass a longer --eval-text")
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    return [w for w in windows if len(w) >= 2]


def windows_digest(windows: list[list[int]]) -> str:
    """sha256 of the token windows: equal digests mean the same text, tokenizer, length and windowing."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(windows, separators=(",", ":")).encode()).hexdigest()


def _token_inputs(tokenizer, req: VerifyRequest, vocab_size: int) -> tuple[list[list[int]], list[list[int]], list[str]]:
    windows = evaluation_windows(tokenizer, req.eval_text, req.eval_tokens, req.window)
    prompts_text = list(req.prompts) if req.prompts else read_prompts(None)
    prompts = [tokenizer(p)["input_ids"] for p in prompts_text]
    if any(not p for p in prompts):
        raise UsageError("a prompt tokenizes to nothing", "remove empty prompts")
    top = max(max(s) for s in windows + prompts)
    if top >= vocab_size:
        raise UsageError(f"the tokenizer produced id {top}, beyond the model's vocab of {vocab_size}", "pass the model's own tokenizer with --tokenizer")
    return windows, prompts, prompts_text


def verify(req: VerifyRequest, progress: ProgressFn | None = None) -> VerifyReport:
    """Compare a checkpoint with its original.

    Args:
        req: the request.
        progress: called with a short description as each phase starts.

    Returns:
        The report (``passed`` says whether every threshold held).

    Raises:
        CheckpointError / UnsupportedModelError: the checkpoint is malformed, was made from another model, or
            uses a format the reference runtime refuses.
        UsageError: bad options or inputs.
        LoraError: ``req.lora`` is not a converted adapter the checkpoint's engine would take.
    """
    from yitrt.reference.original import check_original, greedy_original, load_original, score_original
    from yitrt.reference.runtime import TORCH_DTYPES, ReferenceRuntime, Sampling, check_tokens, resolve_device

    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    if req.max_new_tokens < 1 or req.eval_tokens < 2 or req.window < 2:
        raise UsageError("max_new_tokens must be >= 1, eval_tokens and window >= 2", "pass positive sizes")
    if req.compute_dtype not in COMPUTE_DTYPES:
        raise UsageError(f"unknown compute dtype {req.compute_dtype!r}", "use one of: " + ", ".join(COMPUTE_DTYPES))
    spec = load_spec(req.checkpoint)
    warnings = check_checkpoint(spec) + emulation_notes(spec)  # fail in seconds, before any model is loaded
    cfg = load_config(req.model)
    check_same_model(spec, cfg, req.model)
    check_original(req.model)  # its shards' headers and index, before the tokenizer or transformers touch the folder
    thresholds = thresholds_for(spec, req.thresholds)
    record = fake_quant_record(req.checkpoint)
    device = resolve_device(req.device)
    adapter = None
    if req.lora is not None:  # checked whole before any model is loaded
        from yitrt.reference.verify_lora import VERIFY_TASK_ID, read_adapter, with_peft

        adapter = read_adapter(req.lora, spec, req.checkpoint, req.model)
        warnings += list(adapter.warnings)
    task = VERIFY_TASK_ID if adapter else None

    tokenizer = load_tokenizer(req.tokenizer or req.model)
    windows, prompts, prompts_text = _token_inputs(tokenizer, req, spec.vocab_size)
    check_tokens(spec, prompts, req.max_new_tokens)  # before either model runs: continuations must fit the context

    say("running the original with transformers")
    original = load_original(req.model, device, TORCH_DTYPES[req.compute_dtype], req.allow_pickle)
    if adapter is not None:
        original = with_peft(original, adapter)
    ref_windows = score_original(original, windows)
    ref_prompts = score_original(original, prompts)
    ref_greedy = [greedy_original(original, p, req.max_new_tokens) for p in prompts]
    del original
    gc.collect()

    say(f"running the checkpoint with the reference runtime (tp {spec.tp}, pp {spec.pp})")
    with ReferenceRuntime(req.checkpoint, req.device, req.compute_dtype) as runtime:
        ranks = runtime.ranks
        if adapter is not None:  # the converted arrays, as a request would bring them
            runtime.load_adapter(task, adapter.weights, adapter.config)
        # the second half of each window goes through the KV cache one token at a time, so a quantized KV cache
        # (and the generation path) shows in the figures; the prompts take the context path
        got = runtime.score(windows, decode_tail=req.window // 2, adapter=task) + runtime.score(prompts, adapter=task)
        got_greedy = runtime.generate(prompts, req.max_new_tokens, Sampling(greedy=True), adapter=task)
        say("comparing with the calibrated model's record")  # of the base checkpoint: the record has no adapter
        pipeline = check_pipeline(runtime, spec, windows, record)
    got_windows, got_prompts = got[: len(windows)], got[len(windows):]

    say("comparing")
    comparison = LogitComparison()
    for ref, out in zip(ref_windows + ref_prompts, got_windows + got_prompts, strict=True):
        comparison.add(ref, out)
    greedy = [
        {"prompt": text[:60], "matched": matched_prefix(a, b), "generated": len(a)}
        for text, a, b in zip(prompts_text, ref_greedy, got_greedy, strict=True)
    ]
    report = VerifyReport(
        req.checkpoint, req.model, spec, comparison,
        perplexity(ref_windows, windows), perplexity(got_windows, windows), greedy, thresholds, [], ranks,
        sum(len(w) for w in windows), 0.0, warnings, pipeline, adapter.to_json() if adapter else None,
    )
    hard, loss = _judge(report)
    if pipeline.ran:
        # the checkpoint reproduces its calibrated model, so what separates it from the original is the cost of
        # the quantization itself: reported against the scheme's warning bounds, not failed
        report.warnings += [f"quantization loss: {f} (the scheme's warning bound)" for f in loss]
        report.failures = hard + list(pipeline.failures)
    else:
        report.failures = hard + loss
    report.seconds = time.perf_counter() - started
    return report
