"""Request body limits over real HTTP (raw sockets, so the test controls exactly what is sent): a declared
Content-Length above a route's limit gets 413 before any of the body is sent, and a chunked body (no
Content-Length) is cut off with 413 once it passes the limit, having been read only that far."""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.server.conftest import LiveServer, push
from update_server.api.limits import body_limit
from update_server.settings import Settings

MiB = 1024 * 1024


def _connect(live: LiveServer) -> socket.socket:
    url = urlsplit(live.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=60)
    return sock


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return int(status_line.split()[1]), headers, json.loads(body[:length] or b"{}")


def _send_chunked_until_answered(sock: socket.socket, head: bytes, total: int) -> int:
    """Send ``head`` then up to ``total`` bytes as 1 MiB chunks; stop as soon as the server answers (or stops
    accepting). Returns the body bytes sent."""
    sock.sendall(head)
    chunk = b"x" * MiB
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    while sent < total:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            break
        try:
            sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(chunk)
    else:
        sock.sendall(b"0\r\n\r\n")
    return sent


@pytest.fixture
def sqlite_server(make_server: Callable[..., LiveServer], tmp_path: Path) -> LiveServer:
    return make_server(f"sqlite:///{tmp_path / 'server.db'}", max_upload_bytes=4 * MiB)


def test_limit_of_each_route() -> None:
    s = Settings(max_upload_bytes=10, max_request_bytes=20, max_device_request_bytes=30)
    assert body_limit("POST", "/api/v1/bundles", s) == (10, "max_upload_bytes")
    assert body_limit("POST", "/api/v1/devices/enroll", s) == (30, "max_device_request_bytes")
    assert body_limit("POST", "/api/v1/devices/pi-1/checkin", s) == (30, "max_device_request_bytes")
    assert body_limit("PATCH", "/api/v1/devices/pi-1", s) == (20, "max_request_bytes")
    assert body_limit("POST", "/api/v1/rollouts", s) == (20, "max_request_bytes")
    assert body_limit("PUT", "/api/v1/admin/trust/targets", s).bytes == 5_000_000


@pytest.mark.parametrize(("path", "declared", "setting", "auth"), [
    ("/api/v1/bundles", 5_000_000_000, "max_upload_bytes", True),
    ("/api/v1/devices/enroll", 300 * MiB, "max_device_request_bytes", False),
])
def test_declared_length_over_the_limit_gets_413_without_sending_the_body(
        sqlite_server: LiveServer, path: str, declared: int, setting: str, auth: bool) -> None:
    headers = {"Content-Length": str(declared), "Content-Type": "application/octet-stream"}
    if auth:
        headers["Authorization"] = f"Bearer {sqlite_server.token}"
    with _connect(sqlite_server) as sock:
        sock.sendall(_head("POST", path, headers))  # and not one byte of the body
        status, resp_headers, body = _read_response(sock)
        assert status == 413
        assert resp_headers.get("connection") == "close"
        assert body["error"]["code"] == "body_too_large"
        assert body["error"]["detail"]["declared"] == declared
        assert setting in body["error"]["message"]
        assert sock.recv(1) == b""  # the server closed the connection instead of waiting for the body


def test_chunked_enrollment_body_is_cut_off_at_the_limit(sqlite_server: LiveServer) -> None:
    headers = {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}
    with _connect(sqlite_server) as sock:
        sent = _send_chunked_until_answered(sock, _head("POST", "/api/v1/devices/enroll", headers), 300 * MiB)
        status, _, body = _read_response(sock)
    assert status == 413
    assert body["error"]["code"] == "body_too_large"
    assert "max_device_request_bytes" in body["error"]["message"]
    assert sent < 100 * MiB  # refused early: only socket buffers' worth was in flight past the 64 KiB limit


def test_chunked_upload_over_max_upload_bytes_gets_413_and_leaves_nothing(sqlite_server: LiveServer) -> None:
    headers = {"Transfer-Encoding": "chunked", "Authorization": f"Bearer {sqlite_server.token}"}
    with _connect(sqlite_server) as sock:
        _send_chunked_until_answered(sock, _head("POST", "/api/v1/bundles", headers), 64 * MiB)
        status, _, body = _read_response(sock)
    assert status == 413
    assert "max_upload_bytes" in body["error"]["message"]
    staging = sqlite_server.ctx.storage.staging_area()
    assert list(staging.iterdir()) == []  # the partial upload was removed


def test_bodies_within_the_limits_still_work(sqlite_server: LiveServer, digits_bundles: dict) -> None:
    assert push(sqlite_server, digits_bundles["1.0.0"]).status_code == 201  # ~1 MiB bundle, 4 MiB limit
    with sqlite_server.admin as client:
        r = client.post("/api/v1/devices/pi-1/checkin", content=b"{" + b" " * 100_000 + b"}",
                        headers={"Authorization": "Bearer nope", "Content-Type": "application/json"})
        assert r.status_code == 413  # 100 kB of check-in is above the 64 KiB device limit
        r = client.post("/api/v1/devices/pi-1/checkin", json={"state": "idle"},
                        headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401  # a small one reaches the route
