"""TEST DOUBLE of Triton's metrics endpoint (Prometheus text on ``/metrics``), in-process, for yitrt bench's unit
tests: ``with MetricsDouble(body) as m: m.url``, where ``body()`` returns the text of each scrape (so a test can
script what the counters do between scrapes, or read them from the gRPC double). ``m.scrapes`` counts the reads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KV = "nv_trt_llm_kv_cache_block_metrics"


def exposition(kv: dict[str, float], requests: dict[str, float] | None = None, models=(("tensorrt_llm", "1"),)) -> str:
    """Prometheus text as Triton writes it: the KV family with ``kv`` split evenly over ``models`` (label sets that
    the bench must sum), the request family, and an unrelated family with the same label names."""
    lines = ["# HELP nv_inference_request_success Number of successful inference requests",
             "# TYPE nv_inference_request_success counter",
             'nv_inference_request_success{model="tensorrt_llm",version="1"} 999']
    if kv:
        lines += [f"# HELP {KV} TRT LLM KV cache block metrics", f"# TYPE {KV} gauge"]
        for model, version in models:
            for kind, value in kv.items():
                lines.append(f'{KV}{{kv_cache_block_type="{kind}",model="{model}",version="{version}"}} {value / len(models)}')
    for kind, value in (requests or {}).items():
        lines.append(f'nv_trt_llm_request_metrics{{model="tensorrt_llm",request_type="{kind}",version="1"}} {value}')
    return "\n".join(lines) + "\n"


class MetricsDouble:
    """The in-process endpoint; a context manager. ``status`` other than 200 makes every scrape fail."""

    def __init__(self, body: Callable[[], str], status: int = 200) -> None:
        self.body, self.status, self.scrapes = body, status, 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner.scrapes += 1
                data = owner.body().encode() if owner.status == 200 else b"no"
                self.send_response(owner.status if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/metrics"

    def __enter__(self) -> MetricsDouble:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
