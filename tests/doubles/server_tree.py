"""TEST DOUBLE of tritonserver's process tree, for the launcher's tests: ``python server_tree.py STATE_DIR``.

It starts a grandchild that sleeps (standing in for a Python backend stub) in a session of its own, so that only
a search of the process tree, not a process-group signal, can find it; writes ``pids.json`` ({"server", "stub"})
into STATE_DIR; sleeps. On SIGTERM it writes ``sigterm`` into STATE_DIR and exits 7 without stopping its stub —
as a server that leaves a stub behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EXIT_ON_SIGTERM = 7


def main() -> None:
    state = Path(sys.argv[1])
    stub = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)

    def on_term(signum, frame) -> None:
        (state / "sigterm").write_text("1")
        os._exit(EXIT_ON_SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    tmp = state / "pids.json.tmp"
    tmp.write_text(json.dumps({"server": os.getpid(), "stub": stub.pid}))
    tmp.replace(state / "pids.json")
    time.sleep(600)


if __name__ == "__main__":
    main()
