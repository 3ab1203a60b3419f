"""`yitrt serve`: find tritonserver, launch it for a repository (one process per rank through mpirun when the world
size is > 1), wait until it is ready, and stop it with every rank and stub process.

The launch line follows TensorRT-LLM's ``launch_triton_server.py`` (reference/triton-repository.md §5): with world
size W, one ``mpirun --allow-run-as-root`` with W app contexts ``-n 1 tritonserver …``, each with its own Python-
backend shared-memory prefix; ranks other than 0 load only ``tensorrt_llm`` (they never return from its init).
The same function writes the repository's ``launch.sh``.

On a machine without a GPU, the tritonserver bundled in the ``nvidia-pytriton`` wheel serves repositories whose
``tensorrt_llm`` is the CPU reference slot; its Python stub needs an interpreter with NumPy 1.x (``cpu_stub``).

yitrt never spawns tritonserver directly: ``launcher`` runs it and makes sure no rank, stub or worker outlives yitrt,
whether yitrt exits, is stopped by a signal or is SIGKILLed.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from yitrt.errors import MissingToolError, ServerError, UsageError
from yitrt.manifest import read_manifest


@dataclass(frozen=True)
class Ports:
    """HTTP, gRPC and metrics ports (ints, or shell variables in launch.sh)."""

    http: int | str = 8000
    grpc: int | str = 8001
    metrics: int | str = 8002


#: The environment of TensorRT-LLM's orchestrator mode (``launch_triton_server.py --multi-model``, spawning on):
#: each engine model spawns its own executor worker ranks (reference/triton-repository.md §5).
ORCHESTRATOR_ENV = {"TRTLLM_ORCHESTRATOR": "1", "TRTLLM_ORCHESTRATOR_SPAWN_PROCESSES": "1"}


def launch_argv(repo: Path | str, world_size: int, tritonserver: str, ports: Ports, *, mpirun: str = "mpirun",
                backend_dir: Path | None = None, engine_model: str = "tensorrt_llm", extra: tuple[str, ...] = (),
                orchestrator_gpus: list[int] | None = None) -> list[str]:
    """The command that starts Triton for a repository: tritonserver alone for world size 1, else mpirun with
    exactly ``world_size`` ranks (``extra`` arguments go to every rank).

    ``orchestrator_gpus`` (the GPUs the engine models use): TensorRT-LLM's orchestrator mode, as
    ``launch_triton_server.py --multi-model`` starts it — one tritonserver under ``mpirun -n 1`` (run with
    ``ORCHESTRATOR_ENV``) that gives CUDA memory pools to nobody (``--pinned-memory-pool-byte-size=0
    --enable-peer-access=false --cuda-memory-pool-byte-size=ID:0`` per GPU), since the spawned ranks use the GPUs.
    """

    def rank(i: int) -> list[str]:
        args = [tritonserver, f"--model-repository={repo}", f"--http-port={ports.http}", f"--grpc-port={ports.grpc}",
                f"--metrics-port={ports.metrics}", "--disable-auto-complete-config",
                f"--backend-config=python,shm-region-prefix-name=prefix{i}_"]
        if backend_dir is not None:
            args.append(f"--backend-directory={backend_dir}")
        args += list(extra)
        if i > 0:
            args += ["--model-control-mode=explicit", f"--load-model={engine_model}"]
        return args

    if orchestrator_gpus is not None:
        if world_size != 1:
            raise ValueError("orchestrator mode runs one tritonserver (world size 1)")
        pools = [f"--cuda-memory-pool-byte-size={gpu}:0" for gpu in orchestrator_gpus]
        return [mpirun, "--allow-run-as-root", "-n", "1", *rank(0), "--pinned-memory-pool-byte-size=0", "--enable-peer-access=false", *pools]
    if world_size <= 1:
        return rank(0)
    argv = [mpirun, "--allow-run-as-root"]
    for i in range(world_size):
        argv += ["-n", "1", *rank(i)] + ([":"] if i < world_size - 1 else [])
    return argv


def shell_line(argv: list[str]) -> str:
    """argv as a shell line; arguments naming shell variables stay expandable (double quotes)."""
    return " ".join(f'"{a}"' if "$" in a else shlex.quote(a) for a in argv)


@dataclass(frozen=True)
class ServeRequest:
    """How to serve a repository.

    Attributes:
        repo: repository written by `yitrt deploy`.
        ports: HTTP/gRPC/metrics ports.
        tritonserver: explicit binary (else TRITONSERVER, PATH, /opt/tritonserver/bin, the nvidia-pytriton wheel).
        env_tritonserver: the caller's TRITONSERVER value (the library never reads os.environ for defaults).
        log_file: where the server's output goes (also forwarded to ``on_log``).
        ready_timeout: seconds to wait for readiness.
        exit_timeout: seconds tritonserver gives in-flight requests when stopped (its --exit-timeout-secs; then
            the whole process group is killed).
    """

    repo: Path
    ports: Ports = field(default_factory=Ports)
    tritonserver: str | None = None
    env_tritonserver: str | None = None
    log_file: Path | None = None
    ready_timeout: float = 600.0
    exit_timeout: int = 30


@dataclass
class Server:
    """A running tritonserver (and its ranks) started by ``start_server``."""

    process: subprocess.Popen
    argv: list[str]
    ports: Ports
    log_file: Path
    world_size: int
    models: list[str]
    exit_timeout: float = 30.0
    cleanup: Callable[[], None] | None = None
    tail: deque = field(default_factory=lambda: deque(maxlen=40))
    forwarder: threading.Thread | None = None

    @property
    def endpoints(self) -> dict[str, str]:
        """URLs of the three endpoints."""
        return {"http": f"http://localhost:{self.ports.http}", "grpc": f"localhost:{self.ports.grpc}",
                "metrics": f"http://localhost:{self.ports.metrics}/metrics"}

    def ready(self) -> bool:
        """Whether ``/v2/health/ready`` answers 200."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.http}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        """Block until ready.

        Raises:
            ServerError: the server exited or did not become ready in time (with its last log lines).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"tritonserver exited with code {self.process.returncode} before it was ready")
            if self.ready():
                return
            time.sleep(0.5)
        self._fail(f"tritonserver was not ready after {timeout:.0f} s")

    def _fail(self, what: str) -> NoReturn:
        """Stop the server and raise ``what`` with its last log lines; the forwarding thread is drained first,
        because a process that died at once can exit before its last lines were read from the pipe."""
        self.stop()
        if self.forwarder is not None:
            self.forwarder.join(timeout=5)
        raise ServerError(f"{what}:\n  " + "\n  ".join(list(self.tail)[-12:]), f"full log: {self.log_file}")

    def stop(self) -> int | None:
        """SIGTERM to the whole process group (launcher, every rank, stub and worker), SIGKILL when the launcher has
        not exited a few seconds after tritonserver's own exit timeout (a decoupled model can hold it past that);
        then wait until no process of the group, nor any descendant seen before the stop, is left (the stubs and
        workers too, not only tritonserver)."""
        from yitrt.triton.launcher import descendants

        tree = descendants(self.process.pid)  # by pid: a descendant that left the group is still ours
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(self.exit_timeout + 5)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        _signal_group(self.process.pid, signal.SIGKILL)  # stragglers of the group (stub processes, workers)
        _wait_gone(self.process.pid, tree)
        if self.cleanup is not None:
            self.cleanup()
            self.cleanup = None
        return self.process.returncode


def _wait_gone(pgid: int, pids: list[int], timeout: float = 10.0) -> None:
    """SIGKILL the group ``pgid`` and ``pids`` until none of them is alive (zombies are dead), at most ``timeout`` s."""
    from yitrt.triton.launcher import alive, read_processes

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        table = read_processes()
        left = alive(pids, table) + [pid for pid, (_, pgrp, state) in table.items() if pgrp == pgid and state != "Z"]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT leftovers do not count
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def repository_facts(repo: Path) -> dict[str, Any]:
    """What `yitrt deploy` recorded about a repository (world size, models, entry model, engine kind).

    Raises:
        UsageError: not a repository written by `yitrt deploy`.
    """
    manifest = read_manifest(Path(repo))
    if manifest is None or manifest.stage != "deploy":
        raise UsageError(f"{repo} is not a repository written by yitrt deploy", "run yitrt deploy first, or start the repository's launch.sh")
    return dict(manifest.extra.get("deploy", {}))


def start_server(req: ServeRequest, on_log: Callable[[str], None] | None = None) -> Server:
    """Launch tritonserver for a repository and wait until it is ready.

    Raises:
        UsageError: not a deploy repository. MissingToolError: no tritonserver, or no mpirun where ranks need it.
        ServerError: the server failed to start (its last log lines in the message).
    """
    from yitrt.build import environment as env
    from yitrt.triton import cpu_stub

    repo = Path(req.repo).absolute()
    facts = repository_facts(repo)
    binary = env.find_tritonserver(req.tritonserver, req.env_tritonserver)
    if binary is None:
        raise MissingToolError("no tritonserver found (option --tritonserver, TRITONSERVER, PATH, /opt/tritonserver/bin, nvidia-pytriton)",
                               "run inside the Triton TRT-LLM container, or `pip install --no-deps nvidia-pytriton==0.7.0` for CPU tests")
    world = int(facts.get("world_size", 1))
    orchestrator = [int(g) for g in facts.get("orchestrator_gpus", [])] if facts.get("orchestrator") else None
    mpirun = "mpirun"
    if world > 1 or orchestrator is not None:
        mpirun = env.mpirun_path() or ""  # serving needs the path only; doctor reports the version
        if not mpirun:
            need = f"{world} ranks (tp×pp)" if orchestrator is None else "TensorRT-LLM's orchestrator mode (two engine models) under mpirun -n 1"
            raise MissingToolError(f"this repository needs {need} and there is no mpirun", "install Open MPI (the Triton TRT-LLM container has it)")
    busy = [f"{name} port {port}" for name, port in (("HTTP", req.ports.http), ("gRPC", req.ports.grpc), ("metrics", req.ports.metrics))
            if not _port_free(int(port))]
    if busy:
        raise UsageError(f"{', '.join(busy)} already in use (another tritonserver?)", "pass free ports: --http-port/--grpc-port/--metrics-port")
    stub = cpu_stub.prepare(binary) if cpu_stub.is_wheel_server(binary) else None
    argv = launch_argv(repo, world, binary, req.ports, mpirun=mpirun, backend_dir=stub.backend_dir if stub else None,
                       extra=(f"--exit-timeout-secs={req.exit_timeout}",), orchestrator_gpus=orchestrator)
    environ = dict(os.environ)
    if orchestrator is not None:
        environ.update(ORCHESTRATOR_ENV)
    if stub is not None:
        environ.update(stub.env)
    log_file = Path(req.log_file) if req.log_file else repo.parent / f"{repo.name}.server.log"
    log = open(log_file, "w")  # noqa: SIM115 - closed by the forwarding thread
    # The launcher (yitrt/triton/launcher.py) runs argv and guarantees that nothing it started outlives this process,
    # even a SIGKILLed one; launch.sh runs the same argv directly.
    launcher = [sys.executable, "-m", "yitrt.triton.launcher", "--parent", str(os.getpid())]
    if stub is not None:
        launcher += ["--remove", str(stub.root)]  # the temporary backend folder goes with the server, however it ends
    try:
        process = subprocess.Popen([*launcher, "--", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", env=environ, start_new_session=True)
    except OSError as exc:
        log.close()
        if stub is not None:
            stub.cleanup()
        raise ServerError(f"cannot start {argv[0]}: {exc}", "check the binary (--tritonserver) and its permissions") from None
    server = Server(process, argv, req.ports, log_file, world, list(facts.get("models", [])), req.exit_timeout,
                    cleanup=stub.cleanup if stub else None)

    def forward() -> None:
        with log:
            for line in process.stdout:
                log.write(line)
                log.flush()
                server.tail.append(line.rstrip())
                if on_log is not None:
                    on_log(line.rstrip())

    forwarding = False
    try:
        server.forwarder = threading.Thread(target=forward, daemon=True)
        server.forwarder.start()
        forwarding = True
        server.wait_ready(req.ready_timeout)
    except BaseException:  # a timeout, or Ctrl-C/SIGTERM while waiting: the caller never gets a server to stop
        server.stop()
        if not forwarding:
            log.close()
        raise
    return server


def server_summary(server: Server) -> dict[str, Any]:
    """JSON description of a running server."""
    # pid: the launcher's, the leader of the server's process group
    return {"endpoints": server.endpoints, "pid": server.process.pid, "world_size": server.world_size,
            "models": server.models, "log": str(server.log_file), "argv": server.argv}

