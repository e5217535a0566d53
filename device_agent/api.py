"""The local prediction API: HTTP/1.1 on loopback or a Unix socket, stdlib only.

=====================  ============================================================================
``POST /v1/predict``   ``{"inputs": [...]}`` (or ``{"inputs_b64": [...]}`` for encoded images) ->
                       ``{"prediction_id", "model": {name, version, release_counter, variant},
                       "outputs": {...}, "predictions": [...]}``; 400 for input that does not fit the
                       model (with what was expected and found), 503 while no model can serve.
``POST /v1/feedback``  ``{"prediction_id", "label"}`` -> ``{"correct": [...]}``: accuracy telemetry.
``GET /v1/health``     200 when a model is serving, 503 otherwise.
``GET /v1/status``     state machine state, serving/previous bundle, worker, outbox size.
``GET /metrics``       Prometheus metrics (device_agent/metrics.py) when ``[api] metrics = true``; only
                       to loopback and Unix-socket clients (403 otherwise), 404 when off.
=====================  ============================================================================

Errors are ``{"error": {"code", "message"}}``. Keep-alive connections and ``TCP_NODELAY`` keep the
overhead per request well under a millisecond (bench/bench_agent.py measures it).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Backend(Protocol):
    def predict(self, body: bytes) -> tuple[int, bytes]: ...
    def feedback(self, body: bytes) -> tuple[int, bytes]: ...
    def status(self) -> dict[str, Any]: ...


def _err(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "edgepack-agent"
    backend: Backend
    max_body: int
    metrics: Callable[[], bytes] | None = None

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def address_string(self) -> str:
        return str(self.client_address[0]) if isinstance(self.client_address, tuple) else "unix"

    def _send(self, status: int, body: bytes) -> None:
        head = (f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self.wfile.write(head + body)  # one write: no Nagle/delayed-ACK stall between head and body
        self.log_request(status, len(body))

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._send(411, _err("length_required", "send the JSON body with a Content-Length header"))
            self.close_connection = True
            return None
        n = int(length)
        if n > self.max_body:
            self._send(413, _err("too_large", f"request body of {n} bytes exceeds the limit of {self.max_body}"))
            self.close_connection = True
            return None
        return self.rfile.read(n)

    def do_POST(self) -> None:
        route = self.path.split("?", 1)[0]
        body = self._body()  # read it whatever the route: the connection stays usable for the next request
        if body is None:
            return
        if route not in ("/v1/predict", "/v1/feedback"):
            self._send(404, _err("not_found", f"no endpoint {route}; see POST /v1/predict, POST /v1/feedback"))
            return
        try:
            status, payload = (self.backend.predict if route == "/v1/predict" else self.backend.feedback)(body)
        except Exception as exc:  # never let one request take the server down
            log.exception("local API request failed")
            status, payload = 500, _err("internal", f"{type(exc).__name__}: {exc}")
        self._send(status, payload)

    def do_GET(self) -> None:
        route = self.path.split("?", 1)[0]
        if route == "/v1/status":
            self._send(200, json.dumps(self.backend.status()).encode())
        elif route == "/metrics":
            self._metrics()
        elif route == "/v1/health":
            st = self.backend.status()
            ok = st.get("serving") is not None and st.get("worker", {}).get("alive")
            self._send(200 if ok else 503, json.dumps({"ok": bool(ok), "state": st.get("state"),
                                                       "serving": st.get("serving")}).encode())
        else:
            self._send(404, _err("not_found", f"no endpoint {route}; see GET /v1/status, GET /v1/health"))


    def _metrics(self) -> None:
        if self.metrics is None:
            self._send(404, _err("not_found", "metrics are off; set [api] metrics = true in agent.toml"))
            return
        host = self.client_address[0] if isinstance(self.client_address, tuple) else "unix"
        if host != "unix" and not ipaddress.ip_address(host.removeprefix("::ffff:")).is_loopback:
            self._send(403, _err("forbidden", f"GET /metrics answers loopback clients only, not {host}"))
            return
        body = self.metrics()
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.wfile.write(head + body)
        self.log_request(200, len(body))


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _TcpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class LocalApi:
    """Serves :class:`Backend` on ``listen`` (``HOST:PORT`` or ``unix:/path``) in a background thread."""

    def __init__(self, backend: Backend, listen: str, *, max_body: int = 8 * 1024 * 1024,
                 metrics: Callable[[], bytes] | None = None) -> None:
        unix = listen.startswith("unix:")
        handler = type("BoundHandler", (Handler,), {"backend": backend, "max_body": max_body,
                                                    "metrics": staticmethod(metrics) if metrics else None,
                                                    "disable_nagle_algorithm": not unix})
        self.listen = listen
        self.server: socketserver.BaseServer
        if listen.startswith("unix:"):
            path = Path(listen[5:])
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_socket():
                path.unlink()  # left by a killed agent
            self.server = _UnixServer(str(path), handler)
            os.chmod(path, 0o660)
        else:
            host, _, port = listen.rpartition(":")
            self.server = _TcpServer((host, int(port)), handler)
        self._thread = threading.Thread(target=self.server.serve_forever, name="local-api", daemon=True)

    @property
    def address(self) -> str:
        if self.listen.startswith("unix:"):
            return self.listen
        address: Any = self.server.server_address
        return f"{address[0]}:{address[1]}"

    def start(self) -> LocalApi:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.listen.startswith("unix:"):
            Path(self.listen[5:]).unlink(missing_ok=True)
