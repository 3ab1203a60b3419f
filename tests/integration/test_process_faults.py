"""Killed processes leave nothing behind (issue #17 item 6), on a real tritonserver (the nvidia-pytriton wheel's,
on CPU) serving the demo model with the CPU reference slot. Every case records, by pid through /proc, the whole
process tree of the yitrt process while it runs (yitrt, the launcher, tritonserver, its Python stubs, the
reference worker), kills something, and then requires that none of those pids lives (zombies are dead) and that the
server's ports no longer answer: `yitrt serve` SIGKILLed when ready and SIGTERMed before ready, the reference worker
SIGKILLed under a request, `yitrt run` SIGKILLed and SIGTERMed during its smoke stage."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.processes import TreeWatch, cmdlines, kill_all, living
from yitrt.build.environment import find_tritonserver
from yitrt.triton.cpu_stub import stub_env_dir

pytestmark = pytest.mark.integration
QUESTION = "What is the capital of France?"
SERVER = "tritonserver/bin/tritonserver"  # in tritonserver's command line, not in the launcher's (its argv[0] is python)


@pytest.fixture(scope="module")
def repo(demo_build, tmp_path_factory):
    """A streaming reference-slot repository of the demo model (tp 1), shared by the serve cases."""
    from yitrt.checkpoint.convert import ConvertRequest, convert
    from yitrt.triton.repository import DeployRequest, deploy

    if find_tritonserver() is None or not (stub_env_dir() / "pyvenv.cfg").is_file():
        pytest.skip("no tritonserver (nvidia-pytriton) or no NumPy-1.x stub environment: run `make setup`")
    work = tmp_path_factory.mktemp("faults")
    convert(ConvertRequest(demo_build[0].path, work / "ckpt"))
    deploy(DeployRequest(work / "ckpt", work / "repo", engine="reference", max_batch_size=4, max_seq_len=512))
    return work / "repo"


def _ports() -> list[int]:
    from yitrt.pipeline import free_ports

    return free_ports(3)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _ready(http: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _serve(repo: Path, ports: list[int]) -> subprocess.Popen:
    http, grpc_port, metrics = map(str, ports)
    return subprocess.Popen([sys.executable, "-m", "yitrt", "serve", str(repo), "--json", "--exit-timeout", "5", "--http-port", http,
                             "--grpc-port", grpc_port, "--metrics-port", metrics], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO_ROOT)


@contextlib.contextmanager
def _served_tree(repo: Path):
    """`yitrt serve` in a subprocess with its process tree watched: (process, watch, ports); whatever a failed
    assertion leaves is killed afterwards."""
    ports = _ports()
    proc = _serve(repo, ports)
    watch = TreeWatch(proc.pid)
    try:
        yield proc, watch, ports
    finally:
        proc.kill()
        kill_all(watch.sample())
        watch.stop()


def _wait_ready(proc: subprocess.Popen, http: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not _ready(http):
        assert proc.poll() is None, f"yitrt serve exited with {proc.returncode}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(0.25)


def _backend_dir(watch: TreeWatch) -> Path:
    """The temporary backend folder the launcher was told to remove (cpu_stub.prepare made it)."""
    launcher = watch.wait_for("yitrt.triton.launcher", timeout=60)
    argv = cmdlines({launcher})[launcher].split()
    return Path(argv[argv.index("--remove") + 1])


def _assert_nothing_left(watch: TreeWatch, ports: list[int]) -> None:
    left = watch.wait_gone(20)
    kill_all(left)  # a failing case must not leave servers on the machine
    assert not left, f"still running: {cmdlines(left)}"
    assert not any(_answers(p) for p in ports), "a server port still answers"


def test_serve_sigkilled_when_ready_leaves_nothing(repo):
    with _served_tree(repo) as (proc, watch, ports):
        _wait_ready(proc, ports[0])
        backends = _backend_dir(watch)
        watch.wait_for("yitrt.triton.reference_worker")
        names = " ".join(cmdlines(watch.sample()).values())
        assert SERVER in names and "triton_python_backend_stub" in names  # the tree is known before the kill
        proc.kill()
        proc.wait(10)
        _assert_nothing_left(watch, ports)
        assert not backends.exists()  # the launcher removed the temporary backend folder yitrt could not


def test_serve_sigtermed_before_ready_stops_cleanly_and_leaves_nothing(repo):
    with _served_tree(repo) as (proc, watch, ports):
        watch.wait_for(SERVER, timeout=60)
        assert not _ready(ports[0])  # the model loads for seconds: this SIGTERM comes before ready
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err  # a requested stop
        assert "Traceback" not in err and "stopping tritonserver" in err and not out.strip()
        _assert_nothing_left(watch, ports)


def test_reference_worker_killed_under_a_request_fails_it_cleanly_and_stop_leaves_nothing(repo):
    with _served_tree(repo) as (proc, watch, ports):
        _wait_ready(proc, ports[0])
        worker = watch.wait_for("yitrt.triton.reference_worker")
        # "running": through the BLS, streaming (end_id -1: it runs to max_tokens); "joined-bls" and "joined-ensemble"
        # join it in flight (in-flight batching) — when the worker dies, every one must end with a clean error
        urls = f"localhost:{ports[1]}"
        streaming = threading.Event()
        outcome: dict[str, str | None] = {}
        threads = [threading.Thread(target=_ask_until_final, args=(urls, model, key, outcome, event), daemon=True)
                   for key, model, event in (("running", "tensorrt_llm_bls", streaming), ("joined-bls", "tensorrt_llm_bls", None),
                                             ("joined-ensemble", "ensemble", None))]
        threads[0].start()
        assert streaming.wait(120), "no token streamed"
        for thread in threads[1:]:
            thread.start()
        time.sleep(2)  # both sent and generating beside the first
        os.kill(worker, signal.SIGKILL)  # in the middle of generating
        for thread in threads:
            thread.join(120)
        # the BLS cannot see an error response that follows streamed tokens (reference_engine.py, FAILED_LENGTH)
        assert "failed during the answer" in (outcome.get("running") or ""), outcome
        assert "failed during the answer" in (outcome.get("joined-bls") or ""), outcome
        assert "reference worker process exited" in (outcome.get("joined-ensemble") or ""), outcome
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in err, err
        _assert_nothing_left(watch, ports)


def _ask_until_final(url: str, model: str, key: str, outcome: dict, streaming: threading.Event | None) -> None:
    """A streamed request of 400 tokens that ignores the end token; ``outcome[key]``: its error text, None when it
    ended without one, "no final response" when nothing ended it in 120 s."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url)
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    inputs = []
    for name, value in (("text_input", np.array([[QUESTION.encode()]], dtype=object)), ("max_tokens", np.array([[400]], dtype=np.int32)),
                        ("end_id", np.array([[-1]], dtype=np.int32)), ("stream", np.array([[True]]))):
        tensor = grpc.InferInput(name, list(value.shape), {"O": "BYTES", "i": "INT32", "b": "BOOL"}[value.dtype.kind])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    outcome[key] = "no final response"
    try:
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        while True:
            result, error = events.get(timeout=120)
            if error is not None:
                outcome[key] = str(error)
                return
            if streaming is not None:
                streaming.set()
            if result.get_response().parameters["triton_final_response"].bool_param:
                outcome[key] = None
                return
    except Exception:  # noqa: BLE001 - the queue timed out: "no final response" stays
        return
    finally:
        client.stop_stream()


# -- yitrt run, killed during its smoke stage ------------------------------------------------------------------

@pytest.fixture(scope="module")
def deployed_run(demo_build, tmp_path_factory):
    """A run work folder whose stages up to deploy are done (cached for the next run): (argv of the run, work)."""
    if find_tritonserver() is None or not (stub_env_dir() / "pyvenv.cfg").is_file():
        pytest.skip("no tritonserver (nvidia-pytriton) or no NumPy-1.x stub environment: run `make setup`")
    work = tmp_path_factory.mktemp("run-faults") / "work"
    argv = [sys.executable, "-m", "yitrt", "run", "demo", "--work-dir", str(work), "--set", "model.demo=false",
            "--set", f"model.path={demo_build[0].path}", "--set", "parallelism.tp=1", "--set", "verify.enabled=false"]
    done = subprocess.run([*argv, "--until", "deploy", "--json"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return argv, work


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_run_killed_during_smoke_leaves_nothing(deployed_run, sig):
    argv, work = deployed_run
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    watch = TreeWatch(proc.pid)
    try:
        watch.wait_for(SERVER, timeout=120)  # the smoke stage is starting its server (the other stages are cached)
        watch.wait_for("triton_python_backend_stub", timeout=60)  # the processes that used to be left behind
        ports = [int(a.split("=", 1)[1]) for a in cmdlines(set(watch.find(SERVER))).popitem()[1].split()
                 if a.startswith(("--http-port=", "--grpc-port=", "--metrics-port="))]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=90)
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and err.rstrip().endswith("terminated") and "Traceback" not in err, err
        else:
            assert proc.returncode == -signal.SIGKILL
        assert not (work / ".yitrt-run" / "smoke.json").exists()  # the stage did not pass
        assert len(ports) == 3
        _assert_nothing_left(watch, ports)
    finally:
        proc.kill()
        kill_all(watch.sample())
        watch.stop()


_HOLD_RUNTIME = """
import sys, time
from yitrt.reference.runtime import ReferenceRuntime

if __name__ == "__main__":
    runtime = ReferenceRuntime(sys.argv[1], device="cpu")
    print("ready", flush=True)
    time.sleep(600)
"""


def test_tensor_parallel_ranks_die_when_their_parent_is_sigkilled(tmp_path):
    """The ranks of a tp 2 reference runtime (verify, generate, the slot's worker) are the forkserver's children, out of
    reach of daemon=True and PDEATHSIG: each watches a pipe only the parent writes, so a SIGKILLed parent leaves no
    rank, forkserver or resource tracker behind."""
    from yitrt.checkpoint.convert import ConvertRequest, convert
    from yitrt.synthetic import SyntheticSpec, write_synthetic_model

    hf = write_synthetic_model(tmp_path / "hf", SyntheticSpec(seed=5, layers=2))
    convert(ConvertRequest(hf, tmp_path / "tp2", tp=2))
    script = tmp_path / "hold.py"
    script.write_text(_HOLD_RUNTIME)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "tp2")], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    watch = TreeWatch(proc.pid)
    try:
        assert proc.stdout.readline().strip() == "ready"
        ranks = watch.find("forkserver")
        assert len(ranks) >= 3, cmdlines(set(ranks))  # the forkserver and the two ranks forked from it
        proc.kill()
        proc.wait(10)
        left = watch.wait_gone(20)
        assert not left, cmdlines(left)
    finally:
        watch.stop()
        kill_all(living(watch.seen))
