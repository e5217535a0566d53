"""A small Python client for the agent's local API (loopback TCP or Unix socket), stdlib only.

::

    from device_agent.client import AgentClient
    with AgentClient("127.0.0.1:8711") as agent:          # or AgentClient("unix:/run/edgepack/agent.sock")
        answer = agent.predict(images.tolist())
        agent.feedback(answer["prediction_id"], "7")

Errors come back as :class:`ApiError` with the HTTP status, the error code and the agent's message.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class AgentClient:
    """One keep-alive connection to the agent; not thread-safe (use one client per thread)."""

    def __init__(self, address: str = "127.0.0.1:8711", *, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.address.startswith("unix:"):
                self._conn = _UnixConnection(self.address[5:], self.timeout)
            else:
                host, _, port = self.address.rpartition(":")
                self._conn = http.client.HTTPConnection(host, int(port), timeout=self.timeout)
                self._conn.connect()
                self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._conn

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (1, 2):  # a kept-alive connection the agent closed: reconnect once
            conn = self._connection()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                break
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise
        try:
            doc = json.loads(payload) if payload else None
        except ValueError:
            doc = None
        if resp.status >= 400:
            err = (doc or {}).get("error", {}) if isinstance(doc, dict) else {}
            raise ApiError(resp.status, str(err.get("code", "error")), str(err.get("message", payload[:200])))
        return doc

    def predict(self, inputs: Any = None, *, inputs_b64: list[str] | None = None) -> dict[str, Any]:
        """Raw inputs (nested lists / list of texts / table rows) in; outputs, version and prediction id out."""
        body = {"inputs_b64": inputs_b64} if inputs_b64 is not None else {"inputs": inputs}
        result: dict[str, Any] = self.request("POST", "/v1/predict", body)
        return result

    def feedback(self, prediction_id: str, label: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/v1/feedback", {"prediction_id": prediction_id, "label": label})
        return result

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/status")
        return result

    def health(self) -> bool:
        try:
            return bool(self.request("GET", "/v1/health").get("ok"))
        except ApiError:
            return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
