"""Running the Python backend of the ``nvidia-pytriton`` wheel's tritonserver on a machine without the Triton
container (CPU tests and the demo).

Facts (reference/triton-repository.md §10, rechecked here): the wheel ships ``pytriton/tritonserver/bin/tritonserver``,
``backends/python/libtriton_python.so`` + ``triton_python_backend_utils.py``, one stub per Python version under
``python_backend_stubs/3.X/`` and its shared libraries in ``nvidia_pytriton.libs/``. The stub embeds whichever
``libpython3.X.so`` the loader finds and runs an isolated interpreter (PYTHONPATH ignored) whose ``sys.executable``
is the first ``python3`` on PATH — so a virtual environment whose ``bin`` leads PATH becomes the stub's environment.
That environment must hold NumPy 1.x (with NumPy 2 BYTES tensors arrive corrupted). `make setup` creates it as
``<venv>/triton-stub`` (numpy 1.26.4 only); the models then append yitrt's own site-packages after NumPy is loaded
(``YITRT_STUB_SITE_DIRS``) for transformers, and the reference slot runs torch in a worker of yitrt's interpreter.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from yitrt.errors import MissingToolError

#: The NumPy-1.x environment of the stub, inside yitrt's own virtual environment (made by `make setup`).
STUB_ENV_NAME = "triton-stub"
STUB_NUMPY = "numpy==1.26.4"


def is_wheel_server(binary: str | Path) -> bool:
    """Whether ``binary`` is the tritonserver bundled in the nvidia-pytriton wheel."""
    parts = Path(binary).resolve().parts
    return parts[-4:-1] == ("pytriton", "tritonserver", "bin")


def stub_env_dir() -> Path:
    """Where `make setup` puts the stub's NumPy-1.x environment."""
    return Path(sys.prefix) / STUB_ENV_NAME


def setup_hint() -> str:
    """The commands that create the stub environment."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    env = stub_env_dir()
    site = env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    return f"run `make setup`, or: {base} -m venv --without-pip {env} && {sys.executable} -m pip install --target {site} '{STUB_NUMPY}'"


@dataclass
class CpuStub:
    """A backend folder and the environment variables that make the wheel's Python backend work here."""

    backend_dir: Path
    env: dict[str, str]
    root: Path

    def cleanup(self) -> None:
        """Remove the temporary backend folder."""
        shutil.rmtree(self.root, ignore_errors=True)


def prepare(binary: str | Path) -> CpuStub:
    """Assemble ``backends/python`` from the wheel and the environment for its stub.

    Raises:
        MissingToolError: the stub for this Python version, the shared libpython or the NumPy-1.x environment is
            missing (with the commands that fix it).
    """
    server_root = Path(binary).resolve().parents[1]  # …/pytriton/tritonserver
    libs = server_root.parents[1] / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    backend = server_root / "backends" / "python"
    if not stub.is_file() or not (backend / "libtriton_python.so").is_file():
        raise MissingToolError(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}", "use Python 3.8-3.13")
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    if not (libdir / (sysconfig.get_config_var("INSTSONAME") or f"libpython{version}.so.1.0")).is_file():
        raise MissingToolError(f"the stub needs a shared libpython{version}, and {libdir} has none",
                               "use a Python built with --enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)")
    env_dir = stub_env_dir()
    if not (env_dir / "pyvenv.cfg").is_file() or not list(env_dir.glob("lib/python*/site-packages/numpy")):
        raise MissingToolError(f"tritonserver's Python stub needs an environment with NumPy 1.x at {env_dir}", setup_hint())
    root = Path(tempfile.mkdtemp(prefix="yitrt-triton-backends-"))
    target = root / "python"
    target.mkdir()
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copyfile(backend / name, target / name)
    shutil.copyfile(stub, target / "triton_python_backend_stub")
    (target / "triton_python_backend_stub").chmod(0o755)
    site_dirs = [p for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]} if p]
    env = {
        "PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "LD_LIBRARY_PATH": os.pathsep.join(p for p in (str(libdir), str(libs), os.environ.get("LD_LIBRARY_PATH", "")) if p),
        "YITRT_STUB_SITE_DIRS": os.pathsep.join(sorted(site_dirs)),
        "YITRT_REFERENCE_PYTHON": sys.executable,
    }
    return CpuStub(root, env, root)


def create_stub_env() -> Path:
    """Create the stub's NumPy-1.x environment (idempotent): a venv of the base interpreter without pip, NumPy
    installed into it with this interpreter's pip. Used by `make setup`.

    Raises:
        MissingToolError: the venv or pip step failed (with its output).
    """
    import subprocess

    env_dir = stub_env_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    site = env_dir / "lib" / f"python{version}" / "site-packages"
    steps = []
    if not (env_dir / "pyvenv.cfg").is_file():
        steps.append([str(Path(sys.base_prefix) / "bin" / f"python{version}"), "-m", "venv", "--without-pip", str(env_dir)])
    if not (site / "numpy").is_dir():
        steps.append([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", "--target", str(site), STUB_NUMPY])
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise MissingToolError(f"creating the stub environment failed: {' '.join(argv)}: {done.stderr.strip()[-400:]}", setup_hint())
    return env_dir


if __name__ == "__main__":
    print(f"tritonserver Python stub environment (NumPy 1.x): {create_stub_env()}")
