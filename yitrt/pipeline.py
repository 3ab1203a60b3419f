"""`yitrt run`: a recipe through fetch → convert/quantize → verify → plan → build → deploy → smoke, cached.

Each stage calls the same library function as its command and writes one artifact folder under the work folder
(``model/``, ``checkpoint/``, ``verify/``, ``plan/``, ``engine/``, ``triton-repo/``, ``smoke/``). A stage's *key* is a
digest of the recipe settings it reads and the content digests of the artifacts it consumes; the key, the
artifact and its digest are recorded in ``.yitrt-run/<stage>.json`` once the stage has finished. A later run
whose key matches, and whose artifact is still complete with the recorded digest, skips the stage without
calling anything ("cached"). So a second run with nothing changed does no work, a changed build limit re-runs
build and what consumes the engine, and a run that was killed resumes at the stage it was in: the stages before
it are cached, and the killed stage's half-written ``<artifact>.partial-<pid>`` is removed when it runs again.

The stages are one table (``STAGE_TABLE``). A recipe whose ``speculative:`` section has a draft-target draft adds
three rows — ``fetch-draft``, ``convert-draft`` (the draft's own precision and tp, optionally its first
``layers``) and ``build-draft`` — whose artifacts plan, build and deploy then consume (the pair is planned and
built for the same GPUs, and deployed as ``tensorrt_llm_draft``); lookahead passes its (W, N, G) to plan, build and
deploy. A recipe with a ``lora:`` section adds ``convert-lora``: every adapter converted for the checkpoint (fetched
first when it is a Hub repo) into ``lora-adapters/<name>/``, each cached by its own inputs (a changed adapter is
converted again, the others are not), and an index artifact ``lora/adapters.json`` whose digest plan, build and deploy
consume: the plan sizes the adapter cache, the build gets the LoRA plugin and flags, deploy copies the adapters in;
and ``verify-lora`` (with ``verify.enabled``): each converted adapter applied by the reference runtime on the
checkpoint and compared with transformers + peft on the original (`yitrt verify --lora`).
A recipe without speculation or LoRA has the stages, and the keys, it always had.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from yitrt.errors import (
    ArtifactError,
    MissingToolError,
    SmokeFailedError,
    UsageError,
    ValidationError,
    VerifyFailedError,
    YitrtError,
    os_error,
)
from yitrt.manifest import (
    ArtifactWriter,
    artifact_digest,
    artifact_key,
    find_reusable,
    fingerprint_files,
    read_manifest,
    recipe_context,
    settle_output,
)
from yitrt.pipeline_lora import LoraStages, local_adapter_fingerprints
from yitrt.recipe import LoadedRecipe, Recipe


@dataclass(frozen=True)
class StageRow:
    """One stage of a run.

    Attributes:
        name: the stage (``--from``/``--until`` take it; ``_stage_<name>`` runs it).
        folder: its artifact folder under the work folder.
        inputs: the stages whose artifacts it consumes (their digests enter its key).
        draft: only recipes with a draft-target draft have it (the draft model's fetch, convert and build); other
            recipes neither run nor report it, and no key reads it.
        lora: only recipes with a ``lora:`` section have it (the adapters' conversion), like ``draft``.
    """

    name: str
    folder: str
    inputs: tuple[str, ...] = ()
    draft: bool = False
    lora: bool = False


#: the stages in run order: one row each (the draft of draft-target speculation is three more rows)
STAGE_TABLE = (
    StageRow("fetch", "model"),
    StageRow("convert", "checkpoint", ("fetch",)),
    StageRow("verify", "verify", ("fetch", "convert")),
    StageRow("convert-lora", "lora", ("convert",), lora=True),
    StageRow("verify-lora", "verify-lora", ("fetch", "convert", "convert-lora"), lora=True),
    StageRow("fetch-draft", "draft-model", (), draft=True),
    StageRow("convert-draft", "draft-checkpoint", ("fetch-draft",), draft=True),
    StageRow("plan", "plan", ("convert", "convert-draft", "convert-lora")),
    StageRow("build-draft", "draft-engine", ("convert-draft", "convert"), draft=True),
    StageRow("build", "engine", ("convert", "convert-draft", "convert-lora")),
    StageRow("deploy", "triton-repo", ("fetch", "convert", "plan", "build", "convert-draft", "build-draft", "convert-lora")),
    StageRow("smoke", "smoke", ("deploy",)),
)
STAGES = tuple(row.name for row in STAGE_TABLE)
_ROWS = {row.name: row for row in STAGE_TABLE}
#: artifact folder of each stage, under the work folder
FOLDERS = {row.name: row.folder for row in STAGE_TABLE}
STATE_DIR = ".yitrt-run"
#: progress(stage, kind) → a context manager yielding the stage function's progress callback (or None);
#: kind is "bytes" (fetch, convert), "steps" (quantize, build) or "phase" (verify).
ProgressFactory = Callable[[str, str], contextlib.AbstractContextManager]
#: on_stage(report) is called when a stage starts (status "running") and when it ends.
StageListener = Callable[["StageReport"], None]


@dataclass
class RunOptions:
    """How to run a recipe.

    Attributes:
        work_dir: folder holding every stage's artifact and the run state.
        from_stage: run from this stage; earlier stages' artifacts must exist in ``work_dir`` (not re-checked).
        until_stage: stop after this stage.
        force: redo the stages that run, even when cached.
        progress: progress callbacks per stage (None: silent).
        on_stage: called as each stage starts and ends.
    """

    work_dir: Path
    from_stage: str | None = None
    until_stage: str | None = None
    force: bool = False
    progress: ProgressFactory | None = None
    on_stage: StageListener | None = None


@dataclass
class StageReport:
    """What one stage did.

    ``status``: ``ran`` (did work), ``cached`` (key and artifact unchanged: nothing called), ``reused`` (the
    stage function found its artifact up to date), ``skipped`` (outside --from/--until, or disabled in the recipe),
    ``not-applicable`` (build for the reference slot), ``blocked`` (build on a machine without TensorRT-LLM),
    ``failed``, or ``running`` while it runs.
    """

    stage: str
    status: str
    seconds: float = 0.0
    artifact: str | None = None
    digest: str | None = None
    key: str | None = None
    detail: str = ""
    warnings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON object of the stage in `yitrt run --json`."""
        return {"stage": self.stage, "status": self.status, "seconds": round(self.seconds, 3), "artifact": self.artifact,
                "digest": self.digest, "key": self.key, "detail": self.detail, "warnings": self.warnings, "data": self.data}


@dataclass
class RunReport:
    """The whole run."""

    recipe: str
    recipe_path: str
    work_dir: Path
    stages: list[StageReport]
    seconds: float = 0.0
    error: YitrtError | None = None

    @property
    def ok(self) -> bool:
        """Every stage that was due finished."""
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """JSON of `yitrt run --json` (also written to ``<work>/run.json``)."""
        out = {"ok": self.ok, "recipe": self.recipe, "recipe_path": self.recipe_path, "work_dir": str(self.work_dir),
               "seconds": round(self.seconds, 3), "stages": [s.to_json() for s in self.stages],
               "did_work": [s.stage for s in self.stages if s.status == "ran"]}
        if self.error is not None:
            out["error"] = {"type": type(self.error).__name__, "message": self.error.message, "hint": self.error.hint,
                            "exit_code": self.error.exit_code, "problems": getattr(self.error, "problems", [self.error.message])}
        return out


class RunFailed(YitrtError):
    """A stage failed; carries the run report (``report``) and the stage's own error (``cause``)."""

    def __init__(self, cause: YitrtError, report: RunReport) -> None:
        super().__init__(cause.message, cause.hint)
        self.cause = cause
        self.report = report
        self.exit_code = cause.exit_code
        self.problems = getattr(cause, "problems", [cause.message])


def stage_index(name: str | None, option: str) -> int | None:
    """Position of a stage name (None passes through).

    Raises:
        UsageError: unknown stage.
    """
    if name is None:
        return None
    if name not in STAGES:
        raise UsageError(f"{option} {name!r} is not a stage", "stages: " + ", ".join(STAGES))
    return STAGES.index(name)


def stage_range(from_stage: str | None, until_stage: str | None) -> tuple[int, int]:
    """(first, last) stage positions of ``--from``/``--until`` (the whole pipeline by default).

    Raises:
        UsageError: an unknown stage, or ``--from`` after ``--until``.
    """
    first = stage_index(from_stage, "--from") or 0
    last = stage_index(until_stage, "--until")
    last = len(STAGES) - 1 if last is None else last
    if first > last:
        raise UsageError(f"--from {STAGES[first]} comes after --until {STAGES[last]}", "stage order: " + " → ".join(STAGES))
    return first, last


# -- stage keys ------------------------------------------------------------------------------------------------------


def has_draft(spec: Recipe) -> bool:
    """Whether the recipe's speculative decoding has a draft model (draft-target)."""
    return spec.speculative is not None and spec.speculative.mode == "draft-target" and spec.speculative.draft is not None


def recipe_stages(spec: Recipe) -> tuple[str, ...]:
    """The stages a recipe runs, in order (the draft's rows only with a draft, the adapters' only with LoRA)."""
    return tuple(row.name for row in STAGE_TABLE if (not row.draft or has_draft(spec)) and (not row.lora or spec.lora is not None))


def stage_inputs(spec: Recipe, stage: str) -> tuple[str, ...]:
    """The stages whose artifacts ``stage`` consumes in this recipe."""
    present = recipe_stages(spec)
    return tuple(s for s in _ROWS[stage].inputs if s in present)


def stage_parameters(spec: Recipe, stage: str) -> dict[str, Any]:
    """The recipe settings a stage reads: only these (and its inputs' digests) enter its key. A recipe without
    speculation reads what it always did (so its keys, and its cached stages, do not change)."""
    r = spec.resolved()
    target, serve, speculative = r["target"], r["serve"], r.get("speculative")
    spec_keys = {"speculative": speculative} if speculative is not None else {}
    lora = r.get("lora")
    if lora is not None:  # what the engine and the repository read of the section (the adapters' bytes come as inputs)
        spec_keys["lora"] = lora
    limits_source = {"gpu": target["gpu"], "trtllm_version": target["trtllm_version"], "workload": r["workload"],
                     "kv_fraction": serve["kv_fraction"]}
    draft = (speculative or {}).get("draft") or {}
    by_stage = {
        "fetch": r["model"],
        "convert": {"precision": r["precision"], "parallelism": r["parallelism"]},
        "verify": r["verify"],
        "verify-lora": r["verify"] if lora is not None else {},
        "convert-lora": ({"adapters": lora["adapters"], "max_rank": lora["max_rank"], "target_modules": lora["target_modules"]}
                         if lora is not None else {}),
        "fetch-draft": draft.get("model") or {},
        "convert-draft": ({"precision": draft.get("precision"), "tp": spec.draft_tp, "layers": draft.get("layers"),
                           "gpu": target["gpu"], "parallel_embedding": r["parallelism"]["parallel_embedding"]} if draft else {}),
        "plan": {**limits_source, "slo": r["slo"], **spec_keys},
        "build-draft": {**limits_source, "build": r["build"], **spec_keys} if draft else {},
        "build": {**limits_source, "build": r["build"], **spec_keys},
        # the reference slot takes its limits from the recipe's build section (an engine has its own)
        "deploy": {"target": target, "serve": {k: v for k, v in serve.items() if k != "smoke"},
                   **({"build": r["build"]} if target["engine"] == "reference" else {}), **spec_keys},
        "smoke": serve["smoke"],
    }
    return by_stage[stage]


#: the artifacts each stage may consume (by producing stage); ``stage_inputs`` says which a recipe has
STAGE_INPUTS = {row.name: row.inputs for row in STAGE_TABLE}


def folder_digest(folder: Path) -> str:
    """Content identity of an artifact: its manifest's file hashes, or (a user's model folder, no manifest) the
    names, sizes and times of its files."""
    digest = artifact_digest(folder)
    if digest is not None:
        return digest
    return fingerprint_files(folder, [p.name for p in Path(folder).iterdir() if p.is_file()])


# -- the run ---------------------------------------------------------------------------------------------------------


class _Run(LoraStages):
    def __init__(self, loaded: LoadedRecipe, opts: RunOptions) -> None:
        self.loaded = loaded
        self.spec = loaded.spec
        self.opts = opts
        self.work = Path(opts.work_dir).absolute()
        self.state = self.work / STATE_DIR
        self.artifacts: dict[str, Path] = {}
        self.digests: dict[str, str] = {}
        self.reports: list[StageReport] = []

    # records -------------------------------------------------------------------------------------------------------
    def _record_path(self, stage: str) -> Path:
        return self.state / f"{stage}.json"

    def _read_record(self, stage: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self._record_path(stage).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None  # a hand-edited record is no record

    def _write_record(self, stage: str, report: StageReport) -> None:
        _write_json(self._record_path(stage), {"stage": stage, "key": report.key, "artifact": report.artifact, "digest": report.digest,
                                               "status": report.status, "detail": report.detail, "data": report.data,
                                               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def _intact(self, record: dict[str, Any] | None) -> bool:
        """The recorded artifact is still there, complete, with the recorded content."""
        if not record or not record.get("artifact"):
            return bool(record) and record.get("artifact") is None and record.get("status") in ("not-applicable", "skipped")
        folder = Path(record["artifact"])
        settle_output(folder)  # a stale partial or a replacement killed half-way, even when the stage is cached
        if not folder.is_dir():
            return False
        manifest = read_manifest(folder)
        if manifest is not None and find_reusable(folder, manifest.stage, manifest.key) is None:
            return False
        return folder_digest(folder) == record.get("digest")

    # stages --------------------------------------------------------------------------------------------------------
    def key(self, stage: str) -> str:
        inputs = {s: self.digests.get(s) or "" for s in stage_inputs(self.spec, stage)}
        if stage == "convert-lora":  # a local adapter folder is read in place: its files are an input like an artifact
            inputs |= {f"adapter:{name}": fp for name, fp in local_adapter_fingerprints(self.spec).items()}
        return artifact_key(f"run:{stage}", stage_parameters(self.spec, stage), inputs)

    def progress(self, stage: str, kind: str) -> contextlib.AbstractContextManager:
        return self.opts.progress(stage, kind) if self.opts.progress else contextlib.nullcontext(None)

    def out(self, stage: str) -> Path:
        return self.work / FOLDERS[stage]

    def execute(self) -> RunReport:
        start = time.monotonic()
        first, last = stage_range(self.opts.from_stage, self.opts.until_stage)
        present = recipe_stages(self.spec)
        report = RunReport(self.spec.name, str(self.loaded.path), self.work, self.reports)
        try:
            for index, stage in enumerate(STAGES):
                if stage not in present:
                    continue
                if index < first:
                    self._take_earlier(stage)
                elif index > last:
                    self._emit(StageReport(stage, "skipped", detail=f"after --until {STAGES[last]}"))
                else:
                    self._run_stage(stage)
        except YitrtError as exc:
            report.error = exc
        report.seconds = time.monotonic() - start
        _write_json(self.work / "run.json", report.to_json())
        if report.error is not None:
            raise RunFailed(report.error, report)
        return report

    def _emit(self, report: StageReport) -> None:
        self.reports.append(report)
        if self.opts.on_stage:
            self.opts.on_stage(report)

    def _take_earlier(self, stage: str) -> None:
        """A stage before --from: its artifact from an earlier run is used as it is."""
        record = self._read_record(stage)
        if record is None or not self._intact(record):
            raise UsageError(f"--from {self.opts.from_stage} needs the {stage} stage's artifact from an earlier run in {self.work}, "
                             "and there is none (or it changed)", "run without --from first (or with an earlier --from)")
        warnings = []
        if record.get("key") != self.key(stage):
            warnings.append(f"{stage}: the recorded artifact was made with other settings than this recipe's; used as it is (--from)")
        self._accept(stage, record.get("artifact"), record.get("digest"))
        self._emit(StageReport(stage, "skipped", artifact=record.get("artifact"), digest=record.get("digest"), key=record.get("key"),
                               detail=f"before --from {self.opts.from_stage}: artifact of an earlier run", warnings=warnings))

    def _accept(self, stage: str, artifact: str | None, digest: str | None) -> None:
        if artifact:
            self.artifacts[stage] = Path(artifact)
        if digest:
            self.digests[stage] = digest

    def _run_stage(self, stage: str) -> None:
        key = self.key(stage)
        record = self._read_record(stage)
        if not self.opts.force and record and record.get("key") == key and self._intact(record):
            self._accept(stage, record.get("artifact"), record.get("digest"))
            self._emit(StageReport(stage, "cached", artifact=record.get("artifact"), digest=record.get("digest"), key=key,
                                   detail=record.get("detail", ""), data=record.get("data") or {}))
            return
        running = StageReport(stage, "running", key=key)
        if self.opts.on_stage:
            self.opts.on_stage(running)
        started = time.monotonic()
        try:
            outcome = getattr(self, f"_stage_{stage.replace('-', '_')}")()
        except (YitrtError, OSError) as exc:
            if isinstance(exc, OSError):  # the environment refused a write outside an artifact (a log, a record)
                exc = os_error(exc, self.work, f"run the {stage} stage in")
            status = "blocked" if isinstance(exc, MissingToolError) and stage in ("build", "build-draft") else "failed"
            self._emit(StageReport(stage, status, time.monotonic() - started, key=key, detail=exc.message))
            raise exc from None
        artifact = outcome.pop("artifact", None)
        digest = folder_digest(Path(artifact)) if artifact else None
        done = StageReport(stage, outcome.pop("status", "ran"), time.monotonic() - started, str(artifact) if artifact else None,
                           digest, key, outcome.pop("detail", ""), outcome.pop("warnings", []), outcome.pop("data", {}))
        self._accept(stage, done.artifact, digest)
        if done.status in ("ran", "reused", "not-applicable", "skipped"):
            self._write_record(stage, done)
        self._emit(done)

    # one function per stage: each returns {"artifact", "status", "detail", "warnings", "data"} -----------------------
    def _stage_fetch(self) -> dict[str, Any]:
        return self._fetch("fetch", self.spec.model)

    def _stage_fetch_draft(self) -> dict[str, Any]:
        draft = self.spec.speculative.draft.model
        if draft.model_dump() == self.spec.model.model_dump():  # a truncated self-draft: the target's own folder
            return {"artifact": self.artifacts["fetch"], "detail": "the target's model (the draft keeps its first layers)"}
        result = self._fetch("fetch-draft", draft)
        from yitrt.models.draft_pairing import require_draft_pair

        # both folders are here now: the tokenizers must be the same (recipe validation could only compare local ones)
        require_draft_pair(Path(self.artifacts["fetch"]), Path(result["artifact"]), target_repo=self.spec.model.repo,
                           draft_repo=draft.repo, what="speculative.draft")
        return result

    def _fetch(self, stage: str, model) -> dict[str, Any]:
        out = self.out(stage)
        if model.demo:
            from yitrt.demo import materialize_demo_model

            with self.progress(stage, "bytes") as cb:
                result = materialize_demo_model(out, force=self.opts.force, progress=cb)
            return {"artifact": out, "status": "reused" if result.reused else "ran",
                    "detail": f"demo model {'up to date' if result.reused else 'materialised'} from {result.gguf.name}"}
        if model.path is not None:
            folder = Path(model.path).expanduser().absolute()
            if not (folder / "config.json").is_file():
                raise UsageError(f"model.path {folder} holds no config.json", "point model.path at a Hugging Face model folder")
            return {"artifact": folder, "detail": f"local folder {folder} (used in place)"}
        from yitrt.hub import fetch_model

        with self.progress(stage, "bytes") as cb:
            result = fetch_model(model.repo, revision=model.revision, out=out, allow_pickle=model.allow_pickle,
                                 force=self.opts.force, progress=cb)
        return {"artifact": out, "status": "reused" if result.reused else "ran",
                "detail": f"{model.repo}@{result.revision[:12]}", "data": {"revision": result.revision, "bytes": result.bytes}}

    def _stage_convert(self) -> dict[str, Any]:
        par = self.spec.parallelism
        return self._convert("convert", self.artifacts["fetch"], self.spec.model, self.spec.precision, par.tp, par.pp)

    def _stage_convert_draft(self) -> dict[str, Any]:
        draft = self.spec.speculative.draft
        return self._convert("convert-draft", self.artifacts["fetch-draft"], draft.model, draft.precision, self.spec.draft_tp, 1,
                             keep_layers=draft.layers)

    def _convert(self, stage: str, model_dir: Path, model, prec, tp: int, pp: int, keep_layers: int | None = None) -> dict[str, Any]:
        """Convert (data-free schemes) or quantize (calibrated) one model; ``keep_layers``: its first N layers only."""
        from yitrt.quant.schemes import SCHEMES

        par = self.spec.parallelism
        out = self.out(stage)
        calibrated = SCHEMES[prec.scheme].calibrated
        # quantize has no layer selection: a truncated calibrated draft is quantized whole, then truncated
        written = self.work / f"{FOLDERS[stage]}-full" if calibrated and keep_layers else out
        common = {"model_dir": model_dir, "out": written, "dtype": prec.dtype, "tp": tp, "pp": pp,
                  "kv_cache": prec.kv_cache, "allow_pickle": model.allow_pickle, "force": self.opts.force,
                  "model_ref": model.repo, "gpu": self.spec.target.gpu}
        if calibrated:
            from yitrt.quant.calibrate import QuantizeRequest, quantize

            cal = prec.calibration
            request = QuantizeRequest(scheme=prec.scheme, calib=cal.data, calib_size=cal.size, calib_seq_len=cal.seq_len,
                                      calib_batch_size=cal.batch_size or 0, awq_block_size=cal.awq_block_size, seed=cal.seed,
                                      device=cal.device, **common)
            with self.progress(stage, "steps") as cb:
                result = quantize(request, cb)
        else:
            from yitrt.checkpoint.convert import ConvertRequest, convert

            request = ConvertRequest(scheme=prec.scheme, parallel_embedding=par.parallel_embedding, keep_layers=keep_layers, **common)
            with self.progress(stage, "bytes") as cb:
                result = convert(request, cb)
        cfg, warnings, reused = result.config, list(result.warnings), result.reused
        if written != out:
            from yitrt.checkpoint.truncate import truncate_checkpoint

            cut = truncate_checkpoint(written, out, keep_layers, force=self.opts.force)
            warnings += cut.warnings
            reused = reused and cut.reused
        quant = cfg.get("quantization") or {}
        layers = f", first {keep_layers} layers" if keep_layers else ""
        return {"artifact": out, "status": "reused" if reused else "ran", "warnings": warnings,
                "detail": f"{cfg.get('dtype')}, quant {quant.get('quant_algo') or 'none'}, KV {quant.get('kv_cache_quant_algo') or cfg.get('dtype')}, "
                          f"tp {tp} × pp {pp}{layers}"}

    def _verify_request(self, lora: Path | None = None):
        """The recipe's verify settings as a ``VerifyRequest`` of the run's checkpoint (with ``lora``: that converted
        adapter applied)."""
        from yitrt.reference import EVAL_TOKENS
        from yitrt.reference.verify import VerifyRequest

        v = self.spec.verify
        return VerifyRequest(checkpoint=self.artifacts["convert"], model=self.artifacts["fetch"], max_new_tokens=v.max_new_tokens,
                             eval_tokens=v.eval_tokens or EVAL_TOKENS, device=v.device, allow_pickle=self.spec.model.allow_pickle,
                             thresholds={"min_top1": v.min_top1, "max_ppl_delta_pct": v.max_ppl_delta}, lora=lora)

    def _stage_verify(self) -> dict[str, Any]:
        v = self.spec.verify
        if not v.enabled:
            return {"status": "skipped", "detail": "verify.enabled is false"}
        from yitrt.reference.verify import verify

        request = self._verify_request()
        with self.progress("verify", "phase") as cb:
            report = verify(request, cb)
        data = report.to_json()
        summary = {k: data[k] for k in ("top1_agreement", "ppl_reference", "ppl_checkpoint", "ppl_delta_pct", "greedy_match_frac", "passed")}
        if not report.passed:
            failed = self.work / "verify.failed.json"
            _write_json(failed, data)
            raise VerifyFailedError(f"verify failed: {'; '.join(report.failures)} (report: {failed})",
                                    "see the report; a quantized checkpoint may need another scheme or calibration data")
        out = self.out("verify")
        with ArtifactWriter(out, "verify", {"verify": stage_parameters(self.spec, "verify")},
                            {"checkpoint": self.digests["convert"], "model": self.digests["fetch"]}) as art:
            _write_json(art.path / "report.json", data)
        return {"artifact": out, "warnings": list(report.warnings), "data": summary,
                "detail": f"top-1 {summary['top1_agreement']:.3f}, perplexity {summary['ppl_checkpoint']:.3f} "
                          f"({summary['ppl_delta_pct']:+.2f}%), greedy {summary['greedy_match_frac']:.2f}"}

    def _stage_plan(self) -> dict[str, Any]:
        from yitrt.plan.memory import DEFAULT_KV_FRACTION, Workload
        from yitrt.plan.planner import PlanOptions, plan

        spec = self.spec
        workload = Workload(isl=spec.workload.isl, osl=spec.workload.osl, kv_fraction=spec.serve.kv_fraction or DEFAULT_KV_FRACTION)
        sp = spec.speculative
        speculative = ({"draft": str(self.artifacts["convert-draft"]), "max_draft_len": sp.max_draft_len} if has_draft(spec) else
                       {"lookahead": sp.lookahead} if sp is not None and sp.mode == "lookahead" else {})
        lora = self._lora_build()
        opts = PlanOptions(gpu=spec.target.gpu, workload=workload, trtllm_version=spec.target.trtllm_version, **speculative,
                           lora=lora.cache if lora is not None else None)
        report = plan(str(self.artifacts["convert"]), opts)
        warnings = list(report.warnings)
        data = report.to_json()
        if spec.slo is not None:
            data["slo"] = _slo_estimate(self.artifacts["convert"], opts, spec, warnings)
        cand = report.primary
        if not cand.ok:
            raise ValidationError([f"the checkpoint does not fit {report.gpu.name}: " + "; ".join(cand.plan.problems if cand.plan else [])]
                                  + report.suggestions, "change the recipe's parallelism or precision (`yitrt plan --compare`)")
        out = self.out("plan")
        inputs = {"checkpoint": self.digests["convert"], **({"draft": self.digests["convert-draft"]} if has_draft(spec) else {}),
                  **({"lora": self.digests["convert-lora"]} if spec.lora is not None else {})}
        with ArtifactWriter(out, "plan", {"plan": stage_parameters(spec, "plan")}, inputs) as art:
            _write_json(art.path / "plan.json", data)
        p = cand.plan
        return {"artifact": out, "warnings": warnings, "data": {"limits": p.limits.to_json(), "max_concurrent": p.max_concurrent,
                                                                "kv_tokens": p.kv_tokens},
                "detail": f"{report.gpu.name}: KV for {p.max_concurrent} sequences of {spec.workload.isl + spec.workload.osl} tokens; "
                          f"auto limits {p.limits.to_json()} (the recipe's build limits override them)"}

    def _stage_build(self) -> dict[str, Any]:
        return self._build("build")

    def _stage_build_draft(self) -> dict[str, Any]:
        return self._build("build-draft")

    def _speculative_build(self, stage: str) -> dict[str, Any]:
        """The BuildRequest fields of speculative decoding: the target with its draft's checkpoint (the pair is planned
        on the same GPUs), the draft with its target's, a lookahead engine with its (W, N, G)."""
        sp = self.spec.speculative
        if sp is None:
            return {}
        if sp.mode == "lookahead":
            w = sp.lookahead
            return {"speculative": "lookahead", "lookahead": f"{w.window},{w.ngram},{w.verification_set}"}
        pair = self.artifacts["convert" if stage == "build-draft" else "convert-draft"]
        return {"speculative": "draft-target", "max_draft_len": sp.max_draft_len, "pair_checkpoint": pair,
                "draft_engine": stage == "build-draft", "use_draft_logits": sp.use_draft_logits and stage == "build-draft"}

    def _build(self, stage: str) -> dict[str, Any]:
        spec = self.spec
        if spec.target.engine == "reference":
            return {"status": "not-applicable", "detail": "target.engine is reference: the checkpoint is served by the reference runtime"}
        from yitrt.build.runner import BuildRequest, build_engine

        b = spec.build
        checkpoint = self.artifacts["convert-draft" if stage == "build-draft" else "convert"]
        request = BuildRequest(checkpoint=checkpoint, out=self.out(stage), gpu=spec.target.gpu, plugins=b.plugins,
                               max_batch_size=b.max_batch_size, max_seq_len=b.max_seq_len, max_num_tokens=b.max_num_tokens,
                               workers=b.workers, trtllm_version=spec.target.trtllm_version, force=self.opts.force,
                               isl=spec.workload.isl, osl=spec.workload.osl, kv_fraction=spec.serve.kv_fraction,
                               **self._speculative_build(stage), lora=self._lora_build() if stage == "build" else None)
        try:
            with self.progress(stage, "steps") as cb:
                result = build_engine(request, cb)
        except MissingToolError as exc:  # build_engine refuses before any work: say what this run has done
            done = ", ".join(s.stage for s in self.reports if s.status in ("ran", "cached", "reused"))
            raise MissingToolError(f"stopped before {stage}: {exc.message}; the stages before it are done ({done}) in {self.work}",
                                   exc.hint + f"; the done stages are cached there (or copy the work folder and use --from {stage})") from None
        limits = result.spec.build_config()
        return {"artifact": result.out, "status": "reused" if result.reused else "ran", "warnings": result.warnings,
                "detail": f"trtllm-build {result.engine.get('trtllm_version', '')} for {result.engine.get('gpu', spec.target.gpu)}",
                "data": {"build_config": limits}}

    def _stage_deploy(self) -> dict[str, Any]:
        from yitrt.triton.repository import DeployRequest, deploy

        spec, s = self.spec, self.spec.serve
        reference = spec.target.engine == "reference"
        limits = {}
        if reference:  # the slot's limits: the recipe's, else the plan's
            planned = (self._read_record("plan") or {}).get("data", {}).get("limits", {})
            limits = {"max_seq_len": spec.build.max_seq_len or planned.get("max_seq_len"),
                      "max_batch_size": s.max_batch_size or spec.build.max_batch_size or planned.get("max_batch_size")}
        request = DeployRequest(source=self.artifacts["convert" if reference else "build"], out=self.out("deploy"),
                                tokenizer=self.artifacts["fetch"], engine=spec.target.engine, trtllm_version=spec.target.trtllm_version,
                                streaming=s.streaming, max_batch_size=limits.get("max_batch_size") or s.max_batch_size,
                                kv_fraction=s.kv_fraction, max_kv_tokens=s.max_kv_tokens, kv_reuse=s.kv_reuse,
                                chunked_context=s.chunked_context, kv_host_cache=s.kv_host_cache, scheduler_policy=s.scheduler_policy,
                                max_num_tokens=s.max_num_tokens, tokens_per_block=s.tokens_per_block, kv_cache_bytes=s.kv_cache_bytes,
                                instances=s.instances, model_name=s.model_name,
                                max_seq_len=limits.get("max_seq_len"), force=self.opts.force, **self._speculative_deploy(reference),
                                **self._lora_deploy())
        result = deploy(request)
        speculation = f"; {result.speculation.describe()}" if result.speculation else ""
        return {"artifact": result.out, "status": "reused" if result.reused else "ran", "warnings": list(result.warnings),
                "detail": f"Triton repository ({result.engine.kind} slot, TensorRT-LLM {result.line} contract, entry model {s.model_name}"
                          f"{speculation})",
                "data": result.summary}

    def _speculative_deploy(self, reference: bool) -> dict[str, Any]:
        """The DeployRequest fields of speculative decoding: the draft's engine (its checkpoint for the reference slot),
        K and draft logits; lookahead's (W, N, G)."""
        sp = self.spec.speculative
        if sp is None:
            return {}
        if sp.mode == "lookahead":
            return {"speculative": "lookahead", "lookahead": sp.lookahead}
        return {"speculative": "draft-target", "draft": self.artifacts["convert-draft" if reference else "build-draft"],
                "num_draft_tokens": sp.max_draft_len, "use_draft_logits": sp.use_draft_logits, "draft_kv_fraction": sp.draft.kv_fraction}

    def _stage_smoke(self) -> dict[str, Any]:
        smoke = self.spec.serve.smoke
        if not smoke.enabled:
            return {"status": "skipped", "detail": "serve.smoke.enabled is false"}
        from yitrt.triton.client import ChatRequest, chat
        from yitrt.triton.server import Ports, ServeRequest, start_server

        repo = self.artifacts["deploy"]
        ports = Ports(*free_ports(3))
        server = start_server(ServeRequest(repo=repo, ports=ports, ready_timeout=smoke.ready_timeout,
                                           log_file=self.work / "smoke.server.log", exit_timeout=10))
        try:
            result = chat(ChatRequest(url=f"localhost:{ports.grpc}", message=smoke.message, max_tokens=smoke.max_tokens,
                                      model=self.spec.serve.model_name))
        finally:
            server.stop()
        answer = result.to_json()
        if not result.text.strip():  # nothing answered is never a passing smoke test, with or without `expect`
            raise SmokeFailedError(f"the smoke chat got an empty answer ({result.output_tokens} tokens)",
                                   f"read {self.work / 'smoke.server.log'}")
        if smoke.expect and smoke.expect.lower() not in result.text.lower():
            raise SmokeFailedError(f"the smoke chat answered {result.text.strip()!r}, which does not contain {smoke.expect!r}",
                                   f"read {self.work / 'smoke.server.log'}; change serve.smoke.expect if the answer is right")
        out = self.out("smoke")
        with ArtifactWriter(out, "smoke", {"smoke": stage_parameters(self.spec, "smoke")}, {"repository": self.digests["deploy"]}) as art:
            _write_json(art.path / "answer.json", {"message": smoke.message, **answer})
        return {"artifact": out, "data": answer,
                "detail": f"{result.output_tokens} tokens in {result.total_s:.2f}s: {result.text.strip()[:80]!r}"}


def _slo_estimate(checkpoint: Path, opts, spec: Recipe, warnings: list[str]) -> dict[str, Any] | None:
    """AIConfigurator's estimate of the recipe's configuration under its SLO (a warning when it cannot say)."""
    from dataclasses import replace

    from yitrt.errors import MissingDependencyError
    from yitrt.plan.perf import choose_under_slo
    from yitrt.plan.planner import plan

    try:
        result = choose_under_slo(plan(str(checkpoint), replace(opts, compare=True)), spec.slo.ttft_ms, spec.slo.tpot_ms)
    except MissingDependencyError as exc:
        warnings.append(f"slo: not estimated ({exc.message})")
        return None
    if result.get("error"):
        warnings.append(f"slo: not estimated ({result['error']})")
    elif result.get("best") is None:
        warnings.append(f"slo: no estimated operating point meets TTFT {spec.slo.ttft_ms} ms and TPOT {spec.slo.tpot_ms} ms; "
                        "measure with `yitrt bench`")
    return result


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on localhost right now."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _write_text(path: Path, text: str) -> None:
    """Write a file of the run state whole (a temporary sibling renamed over it), removing the temporary on failure."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, default=str) + "\n")


@contextlib.contextmanager
def _work_lock(work: Path) -> Iterator[None]:
    """One `yitrt run` per work folder at a time."""
    state = work / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArtifactError(f"another yitrt run is using {work}", "wait for it, or pass another --work-dir") from None
        yield


def check_work_dir(work: Path) -> None:
    """Refuse a work folder that is a file, or a non-empty folder yitrt did not make.

    Raises:
        ArtifactError: as above.
    """
    if work.exists() and not work.is_dir():
        raise ArtifactError(f"--work-dir {work} is a file", "give a folder")
    if work.is_dir() and any(work.iterdir()) and not (work / STATE_DIR).is_dir():
        raise ArtifactError(f"--work-dir {work} is not empty and was not made by yitrt run", "give an empty or new folder")


def prepare_work_dir(work: Path) -> Path:
    """Check a work folder and create it with its state folder, before any output (so that a folder that cannot be
    written is the run's only message). What this call created is removed again when it fails.

    Raises:
        ArtifactError: a file, a foreign non-empty folder, or not writable (read-only, full, a parent is a file ...).
    """
    work = Path(os.path.normpath(Path(work).absolute()))
    check_work_dir(work)
    missing = []
    folder = work
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    try:
        (work / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        for made in missing:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(made)
        raise os_error(exc, work, "write the work folder") from None
    return work


def run_recipe(loaded: LoadedRecipe, opts: RunOptions) -> RunReport:
    """Run a validated recipe through its stages (see the module docstring).

    Args:
        loaded: the recipe, validated whole by :func:`yitrt.recipe.load_recipe`.
        opts: work folder, stage range, force, progress.

    Returns:
        The per-stage report (also written to ``<work>/run.json``).

    Raises:
        UsageError: bad stage names or range; --from without the earlier artifacts.
        ArtifactError: an unusable work folder, or another run holds it.
        RunFailed: a stage failed; ``.report`` has every stage so far, ``.cause`` the stage's error (its exit code is
            the cause's; a machine without TensorRT-LLM stops before build with MissingToolError's).
    """
    stage_range(opts.from_stage, opts.until_stage)
    present = recipe_stages(loaded.spec)
    for option, name in (("--from", opts.from_stage), ("--until", opts.until_stage)):
        if name is not None and name not in present:
            why = "no lora section" if _ROWS[name].lora else "no draft-target draft"
            raise UsageError(f"{option} {name}: recipe {loaded.spec.name} has no {name} stage (it has {why})",
                             "its stages: " + ", ".join(present))
    work = Path(os.path.normpath(Path(opts.work_dir).absolute()))
    created = not os.path.lexists(work)
    prepare_work_dir(work)
    try:
        with _work_lock(work):
            resolved = {**loaded.spec.resolved(), "_source": str(loaded.path), "_overrides": loaded.overrides}
            _write_text(work / "recipe.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
            with recipe_context(resolved):
                return _Run(loaded, opts).execute()
    except OSError as exc:  # the work folder itself cannot be written (read-only, full, a parent that is a file)
        if created:  # nothing of a run that could not start stays behind
            shutil.rmtree(work, ignore_errors=True)
        raise os_error(exc, work, "write the work folder") from None
