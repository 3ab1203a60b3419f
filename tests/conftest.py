"""Shared fixtures: tiny synthetic Llama/Yi folders written in-process (no network, no downloads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from yitrt.synthetic import SyntheticSpec, write_synthetic_model

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def make_model(tmp_path):
    """Factory: ``make_model(name="hf", **SyntheticSpec fields)`` → folder of a random tiny model."""

    def make(name: str = "hf", **fields) -> Path:
        overrides = fields.pop("overrides", {})
        spec = SyntheticSpec(**fields, overrides=tuple(overrides.items()))
        return write_synthetic_model(tmp_path / name, spec)

    return make


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m yitrt ARGS`` in a subprocess (a real process: exit codes, stdout/stderr separation)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("YITRT_DEBUG", None) if env is None or "YITRT_DEBUG" not in env else None
    return subprocess.run(
        [sys.executable, "-m", "yitrt", *args], capture_output=True, text=True, env=full_env, cwd=cwd or REPO_ROOT, timeout=300,
    )


@pytest.fixture
def cli(capsys):
    """Run the CLI's ``main`` in this process (no interpreter start-up): ``cli(*args)`` → CompletedProcess-like
    (returncode, stdout, stderr). For commands whose subject is not process behaviour (see ``run_cli``)."""

    def call(*args: str) -> subprocess.CompletedProcess:
        from yitrt.cli.app import main

        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(["yitrt", *args], code, captured.out, captured.err)

    return call


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory):
    """The demo model materialised once per test session into a fresh folder: (result, progress reports).

    Skips when the demo model's wheel is not installed.
    """
    from yitrt.demo import DemoModelUnavailableError, find_demo_gguf, materialize_demo_model

    try:
        find_demo_gguf()
    except DemoModelUnavailableError as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"{exc} ({exc.hint})")
    out = tmp_path_factory.mktemp("demo") / "smollm2"
    reports: list[tuple[int, int]] = []
    result = materialize_demo_model(out, progress=lambda done, total: reports.append((done, total)))
    return result, reports


def _write_tool(folder: Path, name: str, module: str) -> None:
    script = folder / name
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\n"
                      f"from tests.doubles.{module} import main\nmain()\n")
    script.chmod(0o755)


@pytest.fixture
def tool_doubles(tmp_path, monkeypatch):
    """Put TEST DOUBLES of ``trtllm-build`` (TensorRT-LLM 1.2's flags) and/or ``nvidia-smi`` (a real H100's answer)
    first on PATH: ``tool_doubles(trtllm=True, gpu=True, only=False)`` → the bin folder."""

    def install(trtllm: bool = True, gpu: bool = True, only: bool = False) -> Path:
        folder = tmp_path / "double-bin"
        folder.mkdir(exist_ok=True)
        if trtllm:
            _write_tool(folder, "trtllm-build", "trtllm_build_1_2")
        if gpu:
            _write_tool(folder, "nvidia-smi", "nvidia_smi")
        # only=True: nothing else on PATH, so a real trtllm-build or nvidia-smi elsewhere cannot answer
        monkeypatch.setenv("PATH", str(folder) if only else f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
        return folder

    return install


#: The longest prompt (tokens) the ``served`` deployment takes.
SERVED_MAX_INPUT = 200


@pytest.fixture(scope="session")
def served(demo_build, tmp_path_factory):
    """(server, grpc url, repository): a real tritonserver serving the demo model's repository with the CPU reference
    engine slot, streaming; one per session (the Triton and bench tests share it)."""
    from yitrt.build.environment import find_tritonserver
    from yitrt.checkpoint.convert import ConvertRequest, convert
    from yitrt.pipeline import free_ports
    from yitrt.triton.cpu_stub import stub_env_dir
    from yitrt.triton.repository import DeployRequest, deploy
    from yitrt.triton.server import Ports, ServeRequest, start_server

    if find_tritonserver() is None or not (stub_env_dir() / "pyvenv.cfg").is_file():
        pytest.skip("no tritonserver (nvidia-pytriton) or no NumPy-1.x stub environment: run `make setup`")
    work = tmp_path_factory.mktemp("triton")
    ckpt = work / "ckpt"
    convert(ConvertRequest(demo_build[0].path, ckpt))
    repo = work / "repo"
    deploy(DeployRequest(ckpt, repo, engine="reference", max_batch_size=32, max_input_len=SERVED_MAX_INPUT, max_seq_len=512))
    http, grpc_port, metrics = free_ports(3)
    server = start_server(ServeRequest(repo, Ports(http, grpc_port, metrics), exit_timeout=5, ready_timeout=300))
    yield server, f"localhost:{grpc_port}", repo
    server.stop()


def weightless_tiny_model(folder: Path) -> Path:
    """A tiny model folder without weights: config.json (a tiny Llama, vocab 512) + the test BPE tokenizer with the
    demo's ChatML template (what tokenizer comparisons and recipe checks read)."""
    import json

    from yitrt.synthetic import SyntheticSpec, hf_config, write_tokenizer

    folder.mkdir(parents=True)
    write_tokenizer(folder, 512)
    (folder / "config.json").write_text(json.dumps(hf_config(SyntheticSpec())))
    return folder
