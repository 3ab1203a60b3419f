"""`yitrt build`: run ``trtllm-build`` for a checked spec and publish the engine folder with its manifest.

The build runs in the artifact's staging folder (``<out>.partial-<pid>``), so a failed or interrupted build
never leaves a folder that looks like an engine and never touches the previous one. Output is streamed to
``build.log`` (kept with the engine; on failure copied to ``<out>.build-failed.log``) while a progress callback
sees each rank's phase. The TensorRT timing cache lives in the engine folder and seeds the next build of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from yitrt.build import environment as env
from yitrt.build.argv import TIMING_CACHE, BuildSpec, assemble
from yitrt.build.flags import banner_version, release_line
from yitrt.build.lora import LoraBuild
from yitrt.build.speculative import engine_speculation, speculative_build
from yitrt.errors import BuildError, MissingToolError, UsageError, ValidationError
from yitrt.manifest import ArtifactWriter, artifact_digest, artifact_key, find_reusable, fingerprint_files
from yitrt.plan.gpus import Gpu, get_gpu, match_gpu
from yitrt.plan.memory import DEFAULT_KV_FRACTION

#: Target used by ``--dry-run`` when no --gpu is given and no GPU is visible (said in a warning).
DRY_RUN_GPU = "H100-SXM"
STAGE = "build"
#: Log lines that mark progress of one rank's build (TensorRT-LLM builder.py / TensorRT), in order.
_PHASES = (
    ("load", re.compile(r"Loading (?:checkpoint|weights)|from_checkpoint|Set \w+ to", re.I)),
    ("network", re.compile(r"Build TensorRT engine|\[MemUsageChange\] Init builder|Total optimization profiles", re.I)),
    ("tactics", re.compile(r"Global timing cache|Detected \d+ inputs|Total Host Persistent Memory|tactic", re.I)),
    ("serialize", re.compile(r"Serializ|Engine generation completed|Total time of building", re.I)),
)
_RANK_DONE = re.compile(r"Total time of building (?:Unnamed Network|all engines)|Engine serialized|Serialized \d+ bytes", re.I)

Progress = Callable[[str, int, int], None]  # (phase, ranks done, ranks total)


@dataclass(frozen=True)
class FailurePattern:
    """A known failure text and what it means."""

    id: str
    patterns: tuple[re.Pattern, ...]
    cause: str
    fix: str


@lru_cache(maxsize=1)
def failure_patterns() -> tuple[FailurePattern, ...]:
    """The known failures (``failures.yaml``), in match order."""
    raw = yaml.safe_load(resources.files("yitrt.build").joinpath("failures.yaml").read_text())["failures"]
    return tuple(FailurePattern(r["id"], tuple(re.compile(p, re.I) for p in r["patterns"]), r["cause"], r["fix"]) for r in raw)


def diagnose(log_text: str) -> FailurePattern | None:
    """The first known failure whose pattern appears in a build log."""
    for failure in failure_patterns():
        if any(p.search(log_text) for p in failure.patterns):
            return failure
    return None


@dataclass
class BuildRequest:
    """Options of `yitrt build`."""

    checkpoint: Path
    out: Path
    gpu: str | None = None
    plugins: str | None = None
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    workers: int | None = None
    trtllm_version: str | None = None
    dry_run: bool = False
    force: bool = False
    #: the workload `auto` limits are planned for (a recipe's `workload` and `serve.kv_fraction`)
    isl: int = 1024
    osl: int = 512
    kv_fraction: float | None = None  # None: DEFAULT_KV_FRACTION
    #: speculative decoding (``yitrt.build.speculative.speculative_build`` checks them together): ``draft-target`` or
    #: ``lookahead``; K; "W,N,G"; build the pair's draft; the draft's logits are used; the other model's checkpoint
    speculative: str | None = None
    max_draft_len: int | None = None
    lookahead: str | tuple[int, int, int] | None = None
    draft_engine: bool = False
    use_draft_logits: bool = False
    pair_checkpoint: Path | None = None
    max_beam_width: int = 1
    #: LoRA adapters the engine serves (``yitrt.build.lora.lora_build``: converted adapters, max rank, target modules)
    lora: LoraBuild | None = None


@dataclass
class BuildResult:
    """What a build (or dry run) produced."""

    spec: BuildSpec
    argv: list[str]
    out: Path
    dry_run: bool
    reused: bool = False
    seconds: float = 0.0
    log: str | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON object of `yitrt build --json`."""
        return {"out": str(self.out), "dry_run": self.dry_run, "reused": self.reused, "seconds": round(self.seconds, 2),
                "argv": self.argv, "build_config": self.spec.build_config(), "log": self.log, "engine": self.engine,
                "warnings": self.warnings}


def checkpoint_digest(checkpoint: Path) -> str:
    """Identity of the checkpoint: its yitrt manifest's file hashes, else names/sizes/mtimes of its files."""
    digest = artifact_digest(checkpoint)
    if digest is not None:
        return digest
    names = [p.name for p in Path(checkpoint).iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json")]
    return fingerprint_files(Path(checkpoint), names)


def _target_gpu(req: BuildRequest, visible: list[env.GpuInfo]) -> tuple[Gpu, list[str]]:
    warnings = []
    if req.gpu:
        gpu = get_gpu(req.gpu)
        sms = {g.sm for g in visible if g.sm is not None}
        if not req.dry_run and sms and gpu.sm not in sms:
            raise ValidationError([f"--gpu {gpu.name} is SM {gpu.sm} but this machine's GPUs are SM {', '.join(map(str, sorted(sms)))}; "
                                   "an engine runs only on the architecture it was built on"], "build on the target GPU, or drop --gpu")
        return gpu, warnings
    if visible:
        found = match_gpu(visible[0].name, visible[0].sm)
        if found is None:
            raise UsageError(f"this machine's GPU {visible[0].name!r} is not in yitrt's GPU table", "pass --gpu NAME (a GPU of `yitrt gpus`)")
        return found, warnings
    # only a dry run gets here without a GPU (build_engine refuses earlier otherwise)
    warnings.append(f"no GPU visible and no --gpu: planned for {DRY_RUN_GPU}; pass --gpu for your target")
    return get_gpu(DRY_RUN_GPU), warnings


def _stream(argv: list[str], cwd: Path, log_path: Path, world: int, progress: Progress | None) -> tuple[int, str]:
    """Run the build, writing every line to the log and reporting phases; return (exit code, log head)."""
    done = 0
    phase = "start"
    head: list[str] = []
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(argv) + "\n")
        # a session of its own: --workers spawns one child per rank, and an interrupt must stop them all
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                bufsize=1, start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if len(head) < 50:
                    head.append(line)
                for name, pattern in _PHASES:
                    if pattern.search(line):
                        phase = name
                if _RANK_DONE.search(line):
                    done = min(world, done + 1)
                if progress:
                    progress(phase, done, world)
            code = proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return code, "".join(head)


def _engine_facts(folder: Path, spec: BuildSpec) -> dict[str, Any]:
    """Check the engine folder: config.json and rank{r}.engine for every rank. Returns the engine config's facts."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raise BuildError("trtllm-build exited 0 but wrote no readable config.json", "see the build log", cause_id="incomplete") from None
    missing = [f"rank{r}.engine" for r in range(spec.world_size) if not (folder / f"rank{r}.engine").is_file()]
    if missing:
        raise BuildError(f"trtllm-build exited 0 but {', '.join(missing)} are missing", "see the build log", cause_id="incomplete")
    pretrained = config.get("pretrained_config", {})
    mapping = pretrained.get("mapping", {})
    if mapping and int(mapping.get("world_size", spec.world_size)) != spec.world_size:
        raise BuildError(f"the engine's mapping says world size {mapping.get('world_size')}, the checkpoint {spec.world_size}", "see the build log", cause_id="incomplete")
    build_config = config.get("build_config", {})
    if spec.speculation is not None and build_config:
        mode, draft = engine_speculation(build_config)
        if (mode, draft) != (spec.speculation.mode, spec.speculation.engine_draft_len):
            raise BuildError(f"the engine says speculative_decoding_mode {mode}, max_draft_len {draft}; the argv asked for "
                             f"{spec.speculation.mode}, {spec.speculation.engine_draft_len}", "see the build log", cause_id="incomplete")
    return {"version": config.get("version"), "build_config": build_config}


def build_engine(req: BuildRequest, progress: Progress | None = None) -> BuildResult:
    """Plan, check and run a build (or only print it, ``dry_run``).

    Raises:
        UsageError / ValidationError: bad options, or a combination that cannot work (every reason).
        MissingToolError: no trtllm-build or no GPU (never a fake engine).
        BuildError: trtllm-build failed; names the likely cause and the log.
    """
    speculation = speculative_build(req.speculative, max_draft_len=req.max_draft_len, lookahead=req.lookahead,
                                    draft_engine=req.draft_engine, use_draft_logits=req.use_draft_logits,
                                    pair=req.pair_checkpoint, max_beam_width=req.max_beam_width)
    visible = [] if req.dry_run and req.gpu else env.detect_gpus()
    install = env.TrtllmInstall(None, None, None, None) if req.dry_run else env.find_trtllm()
    if not req.dry_run:
        missing = ([] if install.trtllm_build else ["trtllm-build (TensorRT-LLM 1.2.x)"]) + ([] if visible else ["an NVIDIA GPU"])
        if missing:
            raise MissingToolError(f"building engines needs {' and '.join(missing)}, which this machine lacks (never a fake engine)",
                                   "run inside the Triton TRT-LLM container (nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3) on the target GPU "
                                   "(26.04-26.07 ship TensorRT-LLM 1.2); `yitrt build --dry-run --gpu NAME` prints the command anywhere")
    gpu, warnings = _target_gpu(req, visible)
    version = req.trtllm_version or install.trtllm_version
    if req.trtllm_version and install.trtllm_version and release_line(req.trtllm_version) != release_line(install.trtllm_version):
        raise ValidationError([f"--trtllm-version {req.trtllm_version} but this machine has TensorRT-LLM {install.trtllm_version}"],
                              "drop --trtllm-version to build for the installed one")
    spec = assemble(req.checkpoint, gpu, plugins=req.plugins, trtllm_version=version, max_batch_size=req.max_batch_size,
                    max_seq_len=req.max_seq_len, max_num_tokens=req.max_num_tokens, workers=req.workers,
                    isl=req.isl, osl=req.osl, kv_fraction=req.kv_fraction or DEFAULT_KV_FRACTION,
                    speculation=speculation, max_beam_width=req.max_beam_width, lora=req.lora)
    warnings += [str(f) for f in spec.findings if f.severity == "warning"]
    warnings += [f"plan: {n}" for n in spec.plan.notes] + spec.notes
    out = Path(req.out).absolute()
    if req.dry_run:
        return BuildResult(spec, spec.argv(out), out, True, warnings=warnings)
    digest = checkpoint_digest(req.checkpoint)
    params = {"argv": spec.argv(Path("ENGINE_DIR")), "gpu": gpu.name, "gpu_sm": gpu.sm,
              "trtllm_version": install.trtllm_version, "tensorrt_version": install.tensorrt_version}
    inputs = {"checkpoint": digest}
    if req.pair_checkpoint is not None:  # the pair plan (KV split recorded in the engine manifest) depends on the other model
        inputs["pair_checkpoint"] = checkpoint_digest(req.pair_checkpoint)
    if not req.force:
        reused = find_reusable(out, STAGE, artifact_key(STAGE, params, inputs))
        if reused is not None:
            return BuildResult(spec, spec.argv(out), out, False, reused=True, engine=reused.extra.get("engine", {}), warnings=warnings)
    start = time.monotonic()
    tools = {"trtllm-build": install.trtllm_build or "", "tensorrt_llm": install.trtllm_version or "unknown",
             "tensorrt": install.tensorrt_version or "unknown"}
    failed_log = out.parent / f"{out.name}.build-failed.log"
    with ArtifactWriter(out, STAGE, params, inputs, tools) as art:
        old_cache = out / TIMING_CACHE
        seed = None
        if old_cache.is_file():
            seed = art.path / "timing.seed.cache"
            shutil.copyfile(old_cache, seed)
        argv = spec.argv(art.path, seed, program=install.trtllm_build)
        log_path = art.path / "build.log"
        code, head = _stream(argv, art.path, log_path, spec.world_size, progress)
        if code != 0:
            shutil.copyfile(log_path, failed_log)
            known = diagnose(log_path.read_text(errors="replace"))
            cause = known.cause if known else "no known failure text in the log"
            raise BuildError(f"trtllm-build failed (exit {code}): {cause}; log: {failed_log}",
                             known.fix if known else f"read {failed_log}", str(failed_log), known.id if known else None)
        if seed is not None:
            seed.unlink()
        facts = _engine_facts(art.path, spec)
        if facts["version"] and release_line(facts["version"]) != spec.line:
            raise BuildError(f"the engine says TensorRT-LLM {facts['version']}, the argv was made for {spec.line}",
                             "pass --trtllm-version matching the installed TensorRT-LLM", cause_id="version-mismatch")
        engine = {"trtllm_version": facts["version"] or banner_version(head) or install.trtllm_version, "tensorrt_version": install.tensorrt_version,
                  "gpu_name": visible[0].name if visible else gpu.name, "gpu": gpu.name, "gpu_sm": gpu.sm,
                  "argv": spec.argv(out, program=install.trtllm_build), "checkpoint": str(Path(req.checkpoint).absolute()),
                  "checkpoint_digest": digest, "world_size": spec.world_size, "profiles": spec.profiles,
                  "build_config": spec.build_config()}
        art.extra["engine"] = engine
    failed_log.unlink(missing_ok=True)
    return BuildResult(spec, engine["argv"], out, False, seconds=time.monotonic() - start, log=str(out / "build.log"),
                       engine=engine, warnings=warnings)
