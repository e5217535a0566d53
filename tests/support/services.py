"""Real services for tests: PostgreSQL databases and Mosquitto brokers.

In CI (``CI`` set) a missing service is a failure, never a skip: ``.ci/run`` lists what must be running.
Tests that stop or restart a broker start their own ``mosquitto`` on a free port (:class:`Mosquitto`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("EDGEPACK_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
SYSTEM_BROKER = os.environ.get("EDGEPACK_TEST_MQTT", "127.0.0.1:1883")


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def service_missing(what: str) -> None:
    """Fail in CI, skip with the reason elsewhere."""
    msg = f"{what} is not available"
    if in_ci():
        pytest.fail(f"{msg}; CI must provide it (see .ci/run)")
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Mosquitto:
    """A private mosquitto broker on a free port, which tests may stop and start again."""

    def __init__(self, port: int | None = None, persistence: bool = True) -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mosq-"))
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 "max_queued_messages 1000000", "max_inflight_messages 0"]
        if persistence:
            lines += ["persistence true", f"persistence_location {self.dir}/"]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        if not os.path.exists(self.binary):
            service_missing("the mosquitto binary")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def mosquitto(persistence: bool = True) -> Iterator[Mosquitto]:
    broker = Mosquitto(persistence=persistence).start()
    try:
        yield broker
    finally:
        broker.close()


def system_broker_url() -> str:
    host, port = SYSTEM_BROKER.rsplit(":", 1)
    if not port_open(host, int(port)):
        service_missing(f"Mosquitto on {SYSTEM_BROKER}")
    return f"mqtt://{SYSTEM_BROKER}"


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test module; dropped afterwards.

    Yields a SQLAlchemy URL (``postgresql+psycopg://...``).
    """
    try:
        import psycopg
    except ImportError:
        service_missing("psycopg")
        raise
    name = f"edgepack_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        service_missing(f"PostgreSQL at {PG_ADMIN_URL} ({exc})")
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
