"""Real services for tests: PostgreSQL databases and Mosquitto brokers.

In CI (``CI`` set) a missing service is a failure, never a skip: ``.ci/run`` lists what must be running.
Brokers are the product's own launcher (``edgepack._local.MosquittoBroker``): dynamic security, TLS with a
local CA, persistence. Each xdist worker shares one such broker between its tests (``session_broker``;
servers keep their accounts apart with an account prefix and their topics with a topic prefix); tests that
stop or restart a broker start their own (:class:`Mosquitto`).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edgepack._local import MosquittoBroker

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


class Mosquitto(MosquittoBroker):
    """A private mosquitto (``edgepack._local.MosquittoBroker``: dynamic security and TLS by default) in a
    temporary directory, on free ports; tests may stop and start it again (same ports, same state)."""

    def __init__(self, *, persistence: bool = True, auth: str = "dynsec", tls: bool = True,
                 plain_listener: bool = False, max_queued_messages: int = 1_000_000) -> None:
        if shutil.which("mosquitto") is None and not os.path.exists("/usr/sbin/mosquitto"):
            service_missing("the mosquitto binary")
        super().__init__(Path(tempfile.mkdtemp(prefix="mosq-")), auth=auth, tls=tls, persistence=persistence,
                         plain_listener=plain_listener, max_queued_messages=max_queued_messages)


@contextmanager
def mosquitto(**options: Any) -> Iterator[Mosquitto]:
    broker = Mosquitto(**options).start()
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
