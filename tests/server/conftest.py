"""Server test fixtures: a live server (real uvicorn, real database, real broker) per test.

``db_url`` is parametrized over SQLite and PostgreSQL, so every test that uses it runs against both; each
test gets a fresh database (a new SQLite file, or a new PostgreSQL database on the machine's server).
Bundles are built once per session with the session key directory; every server trusts that key set.
"""

from __future__ import annotations

import contextlib
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
    broker: Any = None
    """The broker it ingests from (``services.Mosquitto``), or None."""
    ca_file: Path | None = None
    """The CA of its HTTPS certificate; None for plain HTTP on loopback."""

    @property
    def ctx(self) -> Any:
        return self.app.state.ctx

    @property
    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60,
                            verify=str(self.ca_file) if self.ca_file else True)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(*, keys: KeyStore, data_dir: Path, db_url: str, mqtt_url: str = "", prefix: str = "",
                 broker: Any = None, account_prefix: str = "", tls_files: Any = None, **overrides: Any) -> LiveServer:
    """Start a server; ``overrides`` are Settings fields. With ``broker`` (a ``services.Mosquitto``) it uses
    the broker's TLS and accounts (dynamic security), its own accounts prefixed with ``account_prefix``
    (default: unique), so servers sharing a broker stay apart. With ``tls_files`` (``edgepack.tls``) it
    serves HTTPS with their server certificate."""
    import uvicorn

    from update_server.app import create_app
    from update_server.security import Role
    from update_server.services.tokens import create_api_token
    from update_server.settings import Settings

    port = services.free_port()
    values: dict[str, Any] = dict(
        data_dir=data_dir, keys_dir=keys.directory / "online", database_url=db_url, port=port, mqtt_url=mqtt_url,
        mqtt_topic_prefix=prefix or "edgepack/v1/devices", mqtt_share_group=f"g-{uuid.uuid4().hex[:8]}",
        mqtt_client_id=f"srv-{uuid.uuid4().hex[:8]}", gate_interval_s=0.2, default_min_soak_s=0,
        default_min_devices=1, poll_interval_s=1,
        broker_check=False)  # the start-up broker probe (1,500 messages) has its own tests: test_broker_check.py
    if broker is not None:
        values.update(broker.server_settings(account_prefix=account_prefix or f"t{uuid.uuid4().hex[:8]}-"))
    ssl: dict[str, Any] = {}
    if tls_files is not None:
        values.update(tls_cert=tls_files.cert("server"), tls_key=tls_files.key("server"))
        ssl = {"ssl_certfile": str(tls_files.cert("server")), "ssl_keyfile": str(tls_files.key("server"))}
    settings = Settings(**{**values, **overrides})
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                           **ssl))
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
    scheme = "https" if tls_files is not None else "http"
    live = LiveServer(app, server, thread, f"{scheme}://127.0.0.1:{port}", token, settings.mqtt_topic_prefix, broker,
                      tls_files.ca_cert if tls_files is not None else None)
    ingester = getattr(app.state, "ingester", None)
    if ingester is not None and not ingester.connected.wait(10):
        raise RuntimeError("the ingester did not connect to the broker")
    return live


@pytest.fixture
def make_server(session_keys: KeyStore, tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def make(db_url: str, **kwargs: Any) -> LiveServer:
        kwargs.setdefault("data_dir", tmp_path / f"data{len(started)}")
        live = start_server(keys=session_keys, db_url=db_url, **kwargs)
        started.append(live)
        return live

    yield make
    for live in reversed(started):
        live.stop()


@pytest.fixture
def server(db_url: str, make_server: Callable[..., LiveServer]) -> LiveServer:
    """A live server without MQTT."""
    return make_server(db_url)


@pytest.fixture
def mqtt_server(db_url: str, session_broker: Any, make_server: Callable[..., LiveServer]) -> LiveServer:
    """A live server ingesting from this worker's broker (TLS, dynamic security; devices get accounts at
    enrollment), on a topic prefix and account prefix of its own."""
    return make_server(db_url, broker=session_broker, prefix=f"edgepack-test-{uuid.uuid4().hex[:8]}/v1/devices")


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


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb + pg_ctl on a free port), which it may stop and start."""

    def __init__(self) -> None:
        import shutil
        import subprocess
        import tempfile

        self.bin = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
        if self.bin is None or shutil.which("runuser") is None:
            services.service_missing("PostgreSQL server binaries (/usr/lib/postgresql/*/bin)")
        self.root = Path(tempfile.mkdtemp(prefix="edgepack-pg-"))  # pytest's tmp dirs are 0700 (root only)
        self.root.chmod(0o755)
        self.dir = self.root / "pg"
        self.dir.mkdir()
        shutil.chown(self.dir, "postgres", "postgres")
        self.port = services.free_port()
        self._run([str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres"])
        self._subprocess = subprocess

    def _run(self, args: list[str]) -> None:
        import os
        import subprocess

        prefix = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
        subprocess.run(prefix + args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-w", "-l", str(self.dir / "log"),
                   "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start"])

    def stop(self) -> None:
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-w", "-m", "fast", "stop"])

    def _processes(self) -> list[Any]:
        import psutil

        pid_file = self.dir / "data" / "postmaster.pid"
        if not pid_file.is_file():
            return []
        try:
            main = psutil.Process(int(pid_file.read_text().split()[0]))
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def freeze(self) -> None:
        """SIGSTOP the postmaster, then every backend and helper: a hung database (it accepts connections and
        acknowledges bytes in the kernel, but never answers). Always :meth:`thaw` afterwards (in a finally)."""
        import signal

        import psutil

        procs = self._processes()
        if not procs:
            raise RuntimeError("the private PostgreSQL is not running")
        procs[0].send_signal(signal.SIGSTOP)  # first, so it forks nothing new while the children stop
        for proc in procs[0].children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT every process of the cluster (harmless when none is stopped)."""
        import signal

        import psutil

        for proc in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    import shutil

    pg = PrivatePostgres()
    pg.start()
    try:
        yield pg
    finally:
        with contextlib.suppress(Exception):
            pg.thaw()  # a test that froze it and failed must not leave a stopped cluster behind
        with contextlib.suppress(Exception):
            pg.stop()
        shutil.rmtree(pg.root, ignore_errors=True)


@pytest.fixture(scope="session")
def dashboard_scenario(session_keys: KeyStore, digits_bundles: dict[str, BundleInfo], session_broker: Any,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The dashboard's small real scenario (tests/server/dashboard_scenario.py), built once per worker and shared
    by the browser and monitoring tests: a rollout halted by its crash gate, one running, telemetry flowing."""
    from tests.server.dashboard_scenario import build

    scenario = build(session_keys, digits_bundles, tmp_path_factory.mktemp("dashboard"), session_broker)
    try:
        yield scenario
    finally:
        for device in scenario.devices:
            device.close()
        scenario.live.stop()
