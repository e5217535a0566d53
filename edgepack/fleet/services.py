"""The real services a simulated run talks to: a key directory and signed bundles, Mosquitto, the server.

The update server runs as its own process (``python -m update_server.cli serve``), so its CPU can be
measured apart from the simulated devices (psutil on its pid) and it competes with them as it would on a
real host. The broker is a private ``mosquitto`` by default: the agents publish on the protocol's fixed
topics, which a shared broker would mix with other runs' devices.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from edgepack._local import Broker, free_port, start_mosquitto
from edgepack.fleet.scenario import BundleSpec, Scenario, ScenarioError

PG_ADMIN_URL = os.environ.get("EDGEPACK_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


class ServiceError(RuntimeError):
    """A service the run needs did not start or answer; the message says which and how to check it."""


# ---- keys and bundles -------------------------------------------------------------------------------------
def _digits_factory() -> Any:
    """``tests.support.factories.make_digits_bundle`` (a real model, real signatures), from the checkout."""
    try:
        from tests.support.factories import make_digits_bundle
    except ModuleNotFoundError as exc:
        root = Path(__file__).resolve().parents[2]
        if not (root / "tests" / "support" / "factories.py").is_file():
            raise ScenarioError("built-in digits bundles need the source checkout (tests/support/factories.py); "
                                "give each bundle a `file = \"...edgepack\"` and the top-level `keys` instead") from exc
        sys.path.insert(0, str(root))
        from tests.support.factories import make_digits_bundle
    return make_digits_bundle


def prepare_bundles(scn: Scenario, work: Path) -> tuple[Any, dict[str, Path]]:
    """The key store and one signed ``.edgepack`` per scenario bundle (built unless given as files)."""
    from bundles.keys import KeyStore

    keys = KeyStore.load(Path(scn.keys)) if scn.keys else KeyStore.init(work / "keys")
    out: dict[str, Path] = {}
    for version, spec in sorted(scn.bundles.items(), key=lambda kv: kv[1].release_counter):
        out[version] = Path(spec.file) if spec.file else _build(keys, spec, work / "bundles")
    return keys, out


def _build(keys: Any, spec: BundleSpec, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    info = _digits_factory()(keys, out / f"digits-{spec.version}.edgepack", version=spec.version,
                             release_counter=spec.release_counter, quality=spec.quality)
    return Path(info.path)


# ---- broker -------------------------------------------------------------------------------------------------
def start_private_broker(work: Path, tls_files: Any) -> Broker:
    """A private mosquitto on free ports, as in production: dynamic security (every device enrolls for its own
    account), TLS with the run's CA, deep queues; no persistence (a run is one-off)."""
    try:
        return start_mosquitto(work / "broker", persistence=False, tls_files=tls_files)
    except RuntimeError as exc:
        raise ServiceError(f"{exc}; or set [server] broker = \"mqtt://host:port\"") from exc


# ---- database -----------------------------------------------------------------------------------------------
class Database:
    """``sqlite`` (a file in the run's directory), ``postgresql`` (a fresh database, dropped after) or a URL."""

    def __init__(self, spec: str, work: Path) -> None:
        self.spec = spec
        self.created: str | None = None
        if spec == "sqlite":
            self.url = f"sqlite:///{work / 'server.db'}"
        elif spec == "postgresql":
            import psycopg

            name = f"edgepack_fleet_{uuid.uuid4().hex[:10]}"
            try:
                with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
            except psycopg.OperationalError as exc:
                raise ServiceError(f"PostgreSQL at {PG_ADMIN_URL} is not available ({exc}); set "
                                   "EDGEPACK_TEST_PG or use database = \"sqlite\"") from exc
            self.created = name
            base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
            self.url = f"{base}/{name}"
        elif "://" in spec:
            self.url = spec
        else:
            raise ScenarioError(f"[server] database must be sqlite, postgresql or a SQLAlchemy URL, found {spec!r}")

    def drop(self) -> None:
        if self.created:
            import psycopg

            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.created}" WITH (FORCE)')


# ---- the update server --------------------------------------------------------------------------------------
class ServerProcess:
    """``edgepack-server serve`` in a child process (HTTPS with ``tls_files``), with an admin token created
    through its own CLI. ``broker`` (ours) gives it the broker's URL, CA and accounts; ``mqtt_url`` is an
    external broker without accounts (loopback only)."""

    def __init__(self, scn: Scenario, work: Path, *, keys_dir: Path, database_url: str, broker: Broker | None = None,
                 mqtt_url: str = "", tls_files: Any = None) -> None:
        self.port = free_port()
        self.ca_file: Path | None = tls_files.ca_cert if tls_files is not None else None
        self.url = f"{'https' if tls_files is not None else 'http'}://127.0.0.1:{self.port}"
        self.log_path = work / "server.log"
        tls = {} if tls_files is None else {"tls_cert": tls_files.cert("server"), "tls_key": tls_files.key("server")}
        mqtt = broker.server_settings() if broker is not None else {"mqtt_url": mqtt_url}
        settings: dict[str, Any] = {
            "data_dir": work / "server", "keys_dir": keys_dir / "online", "database_url": database_url,
            "port": self.port, "host": "127.0.0.1", **mqtt, **tls, "poll_interval_s": scn.fleet.poll_interval_s,
            "gate_interval_s": scn.server.gate_interval_s, "mqtt_share_group": f"fleet-{uuid.uuid4().hex[:8]}",
            "mqtt_client_id": f"fleet-server-{uuid.uuid4().hex[:8]}", "default_min_soak_s": 0,
            "default_min_devices": 1, **scn.server.settings}
        self.env = {**os.environ, **{f"EDGEPACK_{k.upper()}": str(v) for k, v in settings.items() if v is not None}}
        self.env.pop("EDGEPACK_CONFIG", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""

    def start(self, timeout: float = 90.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "update_server.cli"]
        made = subprocess.run([*cmd, "create-token", "--name", "fleet-sim"], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if made.returncode != 0:
            raise ServiceError(f"edgepack-server create-token failed:\n{made.stderr[-2000:]}")
        self.token = made.stdout.strip().splitlines()[-1]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        self.proc = subprocess.Popen([*cmd, "serve", "--log-level", "warning"], env=self.env, stdout=log,
                                     stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServiceError(f"the update server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2, verify=self._verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServiceError(f"the update server did not become ready in {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.2)

    @property
    def _verify(self) -> str | bool:
        return str(self.ca_file) if self.ca_file else True

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60,
                            verify=self._verify)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def default_state_root(configured: str) -> Path:
    """Device state on tmpfs when available: 1,000 devices' fsyncs would otherwise measure the host's disk."""
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        return path
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="edgepack-fleet-", dir=base))
