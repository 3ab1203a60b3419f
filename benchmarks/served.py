"""What the serving benchmarks share: yitrt commands run and recorded, `yitrt serve` on free ports for the length of a
`with`, and the demo model converted at tp 1 (the reference slot's fastest form on this machine).

Each benchmark passes its own name, which starts every message it stops with.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from yitrt.pipeline import free_ports

#: the CLI of the environment running the benchmark (`make bench-*` runs .venv/bin/python)
YITRT = [str(Path(sys.executable).parent / "yitrt")]
READY_TIMEOUT_S = 300


def run(argv: list[str], commands: list[str], name: str, **kwargs) -> subprocess.CompletedProcess:
    """Run one yitrt command (recorded in ``commands``); stop the benchmark ``name`` when it fails."""
    commands.append(shlex.join(argv))
    done = subprocess.run(argv, text=True, capture_output=True, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"{name}: `{shlex.join(argv)}` failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done


def demo_checkpoint(work: Path, commands: list[str]) -> Path:
    """The demo model converted at tp 1 under ``work``, made once."""
    from yitrt.checkpoint.convert import ConvertRequest, convert
    from yitrt.demo import materialize_demo_model

    checkpoint = work / "checkpoint"
    if not (checkpoint / "yitrt-manifest.json").is_file():
        model = materialize_demo_model(work / "hf")
        commands.append(f"python: convert(ConvertRequest({model.path}, {checkpoint}))  # tp 1")
        convert(ConvertRequest(model.path, checkpoint))
    return checkpoint


class Served:
    """`yitrt serve REPO` on free ports until the context exits (SIGTERM, then wait)."""

    def __init__(self, repo: Path, commands: list[str], log: Path, name: str) -> None:
        self.http, self.grpc, self.metrics = free_ports(3)
        argv = [*YITRT, "serve", str(repo), "--quiet", "--exit-timeout", "5", "--http-port", str(self.http),
                "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics)]
        commands.append(shlex.join(argv))
        self.log, self.name = log, name
        self.process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)

    def __enter__(self) -> Served:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:  # `yitrt serve` prints a line starting with "ready" once it serves
            if any(line.startswith("ready") for line in self.log.read_text().splitlines()):
                return self
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name}: yitrt serve exited {self.process.returncode}: {self.log.read_text()[-2000:]}")
            time.sleep(1)
        self.__exit__()
        raise SystemExit(f"{self.name}: the server was not ready within {READY_TIMEOUT_S} s (log: {self.log})")

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
