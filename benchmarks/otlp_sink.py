"""Tracing switched on for the gateways a benchmark starts: LLMGW_OTEL=1, spans exported over OTLP/HTTP to a local
sink that accepts and counts them (so the measurement includes the real exporter's work, not a collector's).

    with traced_gateways(True) as sink:      # gateways started inside inherit the environment
        ...
    sink.requests, sink.bytes                # OTLP export requests received
"""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
from collections.abc import Iterator

TRACING_ENV = ("LLMGW_OTEL", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME")


class OtlpSink:
    """An OTLP/HTTP endpoint on loopback (an ephemeral port) answering 200 to every export."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the http.server interface names it
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                sink.requests += 1
                sink.bytes += len(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-sink", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


@contextlib.contextmanager
def traced_gateways(on: bool) -> Iterator[OtlpSink | None]:
    """Within: processes started inherit tracing on (exporting to a fresh OtlpSink, yielded) or explicitly off."""
    saved = {name: os.environ.get(name) for name in TRACING_ENV}
    sink = OtlpSink() if on else None
    try:
        if sink is not None:
            os.environ.update(LLMGW_OTEL="1", OTEL_TRACES_EXPORTER="otlp", OTEL_SERVICE_NAME="llmgw-bench",
                              OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=sink.endpoint)
        else:
            os.environ["LLMGW_OTEL"] = "0"
        yield sink
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if sink is not None:
            sink.close()
