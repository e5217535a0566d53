"""Server test fixtures: a live server (real uvicorn, real database, real broker) per test.

``db_url`` is parametrized over SQLite and PostgreSQL, so every test that uses it runs against both; each
test gets a fresh database (a new SQLite file, or a new PostgreSQL database on the machine's server).
Bundles are built once per session with the session key directory; every server trusts that key set.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from bundles.assemble import BundleInfo
from bundles.keys import KeyStore
from tests.support import services
from tests.support.factories import make_digits_bundle


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'server.db'}"
    else:
        with services.postgres_database() as url:
            yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    with services.postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def digits_bundles(session_keys: KeyStore, tmp_path_factory: pytest.TempPathFactory) -> dict[str, BundleInfo]:
    """digits 1.0.0 (rc 1), 1.1.0 (rc 2) and 1.2.0 (rc 3, a bad model), signed with the session keys."""
    out = tmp_path_factory.mktemp("bundles")
    return {
        "1.0.0": make_digits_bundle(session_keys, out / "digits-1.0.0.edgepack", version="1.0.0", release_counter=1),
        "1.1.0": make_digits_bundle(session_keys, out / "digits-1.1.0.edgepack", version="1.1.0", release_counter=2),
        "1.2.0": make_digits_bundle(session_keys, out / "digits-1.2.0.edgepack", version="1.2.0", release_counter=3,
                                    quality="bad"),
    }


@dataclass
class LiveServer:
    """A real uvicorn server in a thread, with an admin API token."""

    app: Any
    server: Any
    thread: threading.Thread
    url: str
    token: str
    prefix: str

    @property
    def ctx(self) -> Any:
        return self.app.state.ctx

    @property
    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(*, keys: KeyStore, data_dir: Path, db_url: str, mqtt_url: str = "", prefix: str = "",
                 **overrides: Any) -> LiveServer:
    import uvicorn

    from update_server.app import create_app
    from update_server.security import Role
    from update_server.services.tokens import create_api_token
    from update_server.settings import Settings

    port = services.free_port()
    settings = Settings(data_dir=data_dir, keys_dir=keys.directory / "online", database_url=db_url,
                        port=port, mqtt_url=mqtt_url, mqtt_topic_prefix=prefix or "edgepack/v1/devices",
                        mqtt_share_group=f"g-{uuid.uuid4().hex[:8]}",
                        mqtt_client_id=f"srv-{uuid.uuid4().hex[:8]}", gate_interval_s=0.2,
                        default_min_soak_s=0, default_min_devices=1, poll_interval_s=1, **overrides)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the update server did not start")
        time.sleep(0.02)
    with app.state.ctx.sessions() as session, session.begin():
        _, token = create_api_token(session, name="test-admin", role=Role.ADMIN, actor="tests",
                                    now=datetime.now(timezone.utc))
    live = LiveServer(app, server, thread, f"http://127.0.0.1:{port}", token, settings.mqtt_topic_prefix)
    ingester = getattr(app.state, "ingester", None)
    if ingester is not None and not ingester.connected.wait(10):
        raise RuntimeError("the ingester did not connect to the broker")
    return live


@pytest.fixture
def make_server(session_keys: KeyStore, tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def make(db_url: str, **kwargs: Any) -> LiveServer:
        live = start_server(keys=session_keys, data_dir=tmp_path / f"data{len(started)}", db_url=db_url, **kwargs)
        started.append(live)
        return live

    yield make
    for live in reversed(started):
        live.stop()


@pytest.fixture
def server(make_server: Callable[..., LiveServer], db_url: str) -> LiveServer:
    """A live server without MQTT."""
    return make_server(db_url)


@pytest.fixture
def mqtt_server(make_server: Callable[..., LiveServer], db_url: str, system_broker: str) -> LiveServer:
    """A live server ingesting from the machine's Mosquitto, on a topic prefix of its own."""
    return make_server(db_url, mqtt_url=system_broker, prefix=f"edgepack-test-{uuid.uuid4().hex[:8]}/v1/devices")


def push(live: LiveServer, bundle: BundleInfo | Path) -> httpx.Response:
    path = bundle if isinstance(bundle, Path) else bundle.path
    with live.admin as client:
        return client.post("/api/v1/bundles", content=path.read_bytes())


def enrollment_token(live: LiveServer, uses: int = 100, **extra: Any) -> str:
    with live.admin as client:
        r = client.post("/api/v1/admin/enrollment-tokens", json={"uses": uses, **extra})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)
