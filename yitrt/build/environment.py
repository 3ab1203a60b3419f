"""Probes of the machine: GPUs (nvidia-smi), CUDA driver, TensorRT-LLM / TensorRT versions, MPI, tritonserver.

Each probe runs an external command or reads package metadata, never imports the heavy packages, and answers
None (or an empty list) when the thing is absent, so `yitrt doctor` and `yitrt build` can say what is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

#: Where a Triton server binary is looked for after PATH (the NGC container's location).
TRITONSERVER_DIRS = (Path("/opt/tritonserver/bin"),)
#: Distribution names that provide TensorRT's Python package, newest first.
TENSORRT_DISTS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12")
_TIMEOUT = 20


@dataclass(frozen=True)
class GpuInfo:
    """One visible GPU as nvidia-smi reports it."""

    index: int
    name: str
    sm: int | None
    memory_total_mib: int
    memory_free_mib: int
    driver: str

    def to_json(self) -> dict:
        """JSON object."""
        return {"index": self.index, "name": self.name, "sm": self.sm, "memory_total_mib": self.memory_total_mib,
                "memory_free_mib": self.memory_free_mib, "driver": self.driver}


def _run(argv: list[str]) -> str | None:
    """stdout of a command, or None when it is missing, fails or hangs."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def detect_gpus() -> list[GpuInfo]:
    """Visible GPUs from ``nvidia-smi --query-gpu`` (empty without nvidia-smi or a driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    text = _run(["nvidia-smi", "--query-gpu=index,name,compute_cap,memory.total,memory.free,driver_version",
                 "--format=csv,noheader,nounits"])
    gpus = []
    for line in (text or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 6 or not parts[0].isdigit():
            continue
        cap = re.fullmatch(r"(\d+)\.(\d+)", parts[2])
        gpus.append(GpuInfo(int(parts[0]), parts[1], int(cap.group(1)) * 10 + int(cap.group(2)) if cap else None,
                            int(float(parts[3])) if parts[3].replace(".", "").isdigit() else 0,
                            int(float(parts[4])) if parts[4].replace(".", "").isdigit() else 0, parts[5]))
    return gpus


def cuda_driver_version() -> str | None:
    """The CUDA version the driver supports (nvidia-smi's banner), or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    match = re.search(r"CUDA Version:\s*([\d.]+)", _run(["nvidia-smi"]) or "")
    return match.group(1) if match else None


def package_version(dist: str) -> str | None:
    """Installed version of a distribution in this interpreter (metadata only, nothing imported)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _interpreter_of(script: str) -> str | None:
    """The Python a console script runs with (its shebang), so versions are read where the tool runs."""
    try:
        first = Path(script).read_bytes()[:256].split(b"\n", 1)[0].decode()
    except (OSError, UnicodeDecodeError):
        return None
    if not first.startswith("#!"):
        return None
    parts = first[2:].split()
    if parts and parts[0].endswith("/env") and len(parts) > 1:
        return shutil.which(parts[1])
    return parts[0] if parts and "python" in Path(parts[0]).name else None


_VERSIONS_SNIPPET = (
    "import importlib.metadata as m\n"
    "def v(*names):\n"
    "    for n in names:\n"
    "        try:\n"
    "            return m.version(n)\n"
    "        except m.PackageNotFoundError:\n"
    "            pass\n"
    "    return ''\n"
    "print(v('tensorrt_llm', 'tensorrt-llm')); print(v(*{dists!r}))\n"
)


@dataclass(frozen=True)
class TrtllmInstall:
    """Where ``trtllm-build`` is and the TensorRT-LLM / TensorRT versions of the Python it runs with."""

    trtllm_build: str | None
    python: str | None
    trtllm_version: str | None
    tensorrt_version: str | None

    def to_json(self) -> dict:
        """JSON object."""
        return {"trtllm_build": self.trtllm_build, "python": self.python, "trtllm_version": self.trtllm_version,
                "tensorrt_version": self.tensorrt_version}


def find_trtllm() -> TrtllmInstall:
    """Locate ``trtllm-build`` on PATH and read the versions installed beside it (package metadata)."""
    script = shutil.which("trtllm-build")
    python = _interpreter_of(script) if script else None
    trtllm = trt = None
    if python:
        out = _run([python, "-c", _VERSIONS_SNIPPET.format(dists=TENSORRT_DISTS)])
        if out is not None:
            lines = (out.splitlines() + ["", ""])[:2]
            trtllm, trt = lines[0].strip() or None, lines[1].strip() or None
    if script is None:
        trtllm = package_version("tensorrt_llm")
        trt = next((v for v in map(package_version, TENSORRT_DISTS) if v), None)
    return TrtllmInstall(script, python, trtllm, trt)


def mpirun_path() -> str | None:
    """Where mpirun is (PATH), without running it."""
    return shutil.which("mpirun")


def find_mpirun() -> tuple[str | None, str | None]:
    """(path, first line of ``mpirun --version``) or (None, None)."""
    path = mpirun_path()
    if path is None:
        return None, None
    out = _run([path, "--version"]) or ""
    return path, (out.strip().splitlines() or [None])[0]


def find_tritonserver(explicit: str | None = None, env_value: str | None = None) -> str | None:
    """A tritonserver binary: the explicit path, the ``TRITONSERVER`` value the caller read, PATH,
    /opt/tritonserver/bin, or the binary bundled in the nvidia-pytriton wheel (CPU tests)."""
    for candidate in (explicit, env_value):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    found = shutil.which("tritonserver")
    if found:
        return found
    for folder in TRITONSERVER_DIRS:
        if (folder / "tritonserver").is_file():
            return str(folder / "tritonserver")
    try:
        dist = metadata.distribution("nvidia-pytriton")
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == "tritonserver" and "bin" in file.parts:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return str(path)
    return None


def memory_available() -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo, or (None, None)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None, None
    values = {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.M)}
    return values.get("MemTotal"), values.get("MemAvailable")
