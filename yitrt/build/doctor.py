"""`yitrt doctor`: what this machine has, and which stages it can run.

It reports GPUs (nvidia-smi), SM, driver and CUDA, TensorRT-LLM / TensorRT versions beside ``trtllm-build``,
MPI, tritonserver, the Python packages each stage uses, free disk and memory; and, given an engine folder,
whether this machine matches the versions and GPU the engine was built for (an engine is tied to both).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yitrt.build import environment as env
from yitrt.manifest import read_manifest
from yitrt.plan.gpus import match_gpu

#: Python distributions (metadata names) whose presence decides what the stages can do here.
PACKAGES = ("torch", "safetensors", "huggingface_hub", "transformers", "nvidia-modelopt", "tritonclient", "nvidia-pytriton",
            "aiconfigurator")


@dataclass
class StageStatus:
    """Whether a stage can run here, and why not."""

    stage: str
    ready: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        """JSON object."""
        return {"stage": self.stage, "ready": self.ready, "detail": self.detail}


@dataclass
class DoctorReport:
    """Everything `yitrt doctor` shows."""

    gpus: list[env.GpuInfo]
    cuda: str | None
    trtllm: env.TrtllmInstall
    mpirun: tuple[str | None, str | None]
    tritonserver: str | None
    packages: dict[str, str | None]
    disk_free: int
    disk_path: str
    memory_total: int | None
    memory_available: int | None
    stages: list[StageStatus] = field(default_factory=list)
    engine: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON object of `yitrt doctor --json`."""
        return {
            "gpus": [{**g.to_json(), "known_as": (match_gpu(g.name, g.sm).name if match_gpu(g.name, g.sm) else None)} for g in self.gpus],
            "cuda_driver": self.cuda, "tensorrt_llm": self.trtllm.to_json(),
            "mpirun": {"path": self.mpirun[0], "version": self.mpirun[1]}, "tritonserver": self.tritonserver,
            "packages": self.packages, "disk": {"path": self.disk_path, "free_bytes": self.disk_free},
            "memory": {"total_bytes": self.memory_total, "available_bytes": self.memory_available},
            "stages": [s.to_json() for s in self.stages], "engine": self.engine,
        }


def _stages(r: DoctorReport) -> list[StageStatus]:
    has = {name: version is not None for name, version in r.packages.items()}
    gpu = bool(r.gpus)
    build_ready = bool(r.trtllm.trtllm_build) and gpu
    build_why = ("trtllm-build " + (r.trtllm.trtllm_version or "(version unknown)") if build_ready else
                 "needs trtllm-build (TensorRT-LLM 1.2.x, e.g. the tritonserver:<yy.mm>-trtllm-python-py3 container)"
                 + ("" if gpu else " and an NVIDIA GPU"))
    quant = has["transformers"] and has["nvidia-modelopt"]
    return [
        StageStatus("fetch", has["huggingface_hub"], "huggingface_hub"),
        StageStatus("convert", has["torch"] and has["safetensors"], "torch + safetensors (CPU is enough)"),
        StageStatus("quantize", quant, ("ModelOpt on " + ("GPU" if gpu else "CPU (slow: small calibration sets)"))
                    if quant else "needs pip install 'yitrt[quant]'"),
        StageStatus("verify", has["torch"] and has["transformers"], "reference runtime on " + ("GPU" if gpu else "CPU")),
        StageStatus("plan", True, "memory plan" + (" + SLO estimates (aiconfigurator)" if has["aiconfigurator"] else
                                                   "; SLO estimates need pip install 'yitrt[plan]'")),
        StageStatus("build", build_ready, build_why),
        StageStatus("deploy", has["tritonclient"], "tritonclient's model_config schema" if has["tritonclient"] else "needs pip install 'yitrt[serve]'"),
        _serve_status(r.tritonserver),
        StageStatus("bench", has["tritonclient"], "tritonclient gRPC" if has["tritonclient"] else "needs pip install 'yitrt[serve]'"),
    ]


def _serve_status(tritonserver: str | None) -> StageStatus:
    from yitrt.triton import cpu_stub

    if tritonserver is None:
        return StageStatus("serve", False, "needs tritonserver (Triton container, or nvidia-pytriton's bundled server for CPU tests)")
    if not cpu_stub.is_wheel_server(tritonserver):
        return StageStatus("serve", True, tritonserver)
    if not (cpu_stub.stub_env_dir() / "pyvenv.cfg").is_file():
        return StageStatus("serve", False, f"{tritonserver} (nvidia-pytriton) needs its Python stub's NumPy-1.x environment: {cpu_stub.setup_hint()}")
    return StageStatus("serve", True, f"{tritonserver} (nvidia-pytriton, CPU: repositories with the reference engine slot)")


def engine_match(engine_dir: Path, report: DoctorReport) -> dict[str, Any]:
    """Compare an engine folder's build facts with this machine: TensorRT-LLM and TensorRT versions and GPU SM."""
    manifest = read_manifest(engine_dir)
    built: dict[str, Any] = dict(manifest.extra.get("engine", {})) if manifest else {}
    if not built:
        from yitrt.errors import YitrtError
        from yitrt.userfiles import read_json

        try:
            built = {"trtllm_version": read_json(Path(engine_dir) / "config.json", "config.json").get("version")}
        except YitrtError:
            return {"path": str(engine_dir), "error": "no yitrt manifest and no readable config.json"}
    checks = []
    for key, here in (("trtllm_version", report.trtllm.trtllm_version), ("tensorrt_version", report.trtllm.tensorrt_version)):
        want = built.get(key)
        if want:
            checks.append({"what": key, "engine": want, "here": here, "match": here == want})
    sm = built.get("gpu_sm")
    if sm is not None:
        here_sms = sorted({g.sm for g in report.gpus if g.sm is not None})
        checks.append({"what": "gpu_sm", "engine": sm, "here": here_sms, "match": sm in here_sms})
    return {"path": str(engine_dir), "built": built, "checks": checks, "match": all(c["match"] for c in checks)}


def run_doctor(disk_path: Path = Path("."), engine_dir: Path | None = None) -> DoctorReport:
    """Probe this machine.

    Args:
        disk_path: folder whose free disk space is reported (where artifacts go).
        engine_dir: an engine folder to compare with this machine.
    """
    total, available = env.memory_available()
    report = DoctorReport(
        gpus=env.detect_gpus(), cuda=env.cuda_driver_version(), trtllm=env.find_trtllm(), mpirun=env.find_mpirun(),
        tritonserver=env.find_tritonserver(), packages={name: env.package_version(name) for name in PACKAGES},
        disk_free=shutil.disk_usage(disk_path).free, disk_path=str(Path(disk_path).resolve()), memory_total=total,
        memory_available=available,
    )
    report.stages = _stages(report)
    if engine_dir is not None:
        report.engine = engine_match(Path(engine_dir), report)
    return report
