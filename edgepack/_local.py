"""Local services for the demo and the fleet simulator: a broker, the update server, simulated devices.

Everything here runs the real code: mosquitto (or amqtt, a pure-Python broker, when mosquitto is not
installed), the real FastAPI update server under uvicorn, and real agents (`device_agent.machine.Agent`)
each with its own state directory, credential, worker process and local prediction API.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


class Broker:
    """An MQTT broker of our own. ``protocol`` is "5" (mosquitto) or "3.1.1" (amqtt).

    ``url`` is what clients use; ``ca_file`` the CA of its TLS certificate (None: plain); ``auth`` names how
    clients get accounts (``dynsec``, ``files`` or ``none``), and :meth:`server_settings` gives an update
    server everything it needs to use this broker (URL, CA, its admin and ingest accounts)."""

    kind = "broker"
    protocol = "5"
    auth = "none"
    url = ""
    ca_file: Path | None = None
    pid: int | None = None
    """The broker's process (mosquitto), for CPU measurements; None when it runs in this process."""

    def server_settings(self, *, account_prefix: str = "") -> dict[str, Any]:
        values: dict[str, Any] = {"mqtt_url": self.url}
        if self.protocol != "5":
            values["mqtt_protocol"] = self.protocol
        return values

    def stop(self) -> None:
        raise NotImplementedError


def _mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


def start_broker(workdir: Path, kind: str = "auto", *, tls_files: Any = None) -> Broker:
    """mosquitto (dynamic security + TLS) on free ports when installed (or ``kind="mosquitto"``), otherwise
    amqtt in-process (MQTT 3.1.1, password file + topic ACLs, plain on loopback)."""
    binary = _mosquitto_binary()
    if kind == "mosquitto" and not binary:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto), or use --broker amqtt")
    if binary and kind != "amqtt":
        return start_mosquitto(workdir, tls_files=tls_files)
    return _start_amqtt(free_port())


class MosquittoBroker(Broker):
    """A private mosquitto on free loopback ports, configured as the product needs it
    (update_server/broker/setup.py): dynamic security or password/ACL files, a TLS listener, persistence,
    deep queues. It can be stopped and started again on the same ports with the same state (outage tests).

    The demo, the fleet simulator, the tests and the benchmarks all start brokers through this class."""

    kind = "mosquitto"

    def __init__(self, workdir: Path, *, auth: str = "dynsec", tls: bool = True, tls_files: Any = None,
                 persistence: bool = True, plain_listener: bool = False, max_queued_messages: int = 1_000_000,
                 devices: int | Sequence[str] = (), topic_prefix: str = "edgepack/v1/devices",
                 share_group: str = "edgepack-server", extra: tuple[str, ...] = ()) -> None:
        """``devices`` (dynsec): device ids (or a count: ``dev-00000``...) whose accounts exist from the start,
        with the server's ingest and notify accounts, for ``topic_prefix``/``share_group``; their
        credentials are in :attr:`device_accounts` (benchmarks with thousands of authenticated devices)."""
        from update_server.broker.setup import MosquittoConfig, TlsFiles, current_user, write_dynsec

        binary = _mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        if auth not in ("dynsec", "files", "none"):
            raise ValueError(f"auth must be dynsec, files or none, found {auth!r}")
        self.binary = binary
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.admin_username, self.admin_password = "edgepack-server", secrets.token_urlsafe(24)
        self.ingest_password = secrets.token_urlsafe(24)
        self.tls_port = free_port() if tls else None
        self.plain_port = free_port() if (plain_listener or not tls) else None
        self.tls_files = None
        tls_conf = None
        if tls:
            from edgepack import tls as tls_mod

            self.tls_files = tls_files or tls_mod.init(self.dir / "tls", hosts=["127.0.0.1", "localhost"])
            self.ca_file = self.tls_files.ca_cert
            tls_conf = TlsFiles(self.tls_files.ca_cert, self.tls_files.cert("broker"), self.tls_files.key("broker"))
        conf = MosquittoConfig(tls_port=self.tls_port, tls_bind="127.0.0.1", tls=tls_conf, plain_port=self.plain_port,
                               anonymous=auth == "none", run_as=current_user(),
                               persistence_dir=self.dir / "data" if persistence else None,
                               pid_file=self.dir / "mosquitto.pid", log_file=self.dir / "mosquitto.log",
                               max_queued_messages=max_queued_messages, extra=list(extra))
        self.device_accounts: dict[str, Any] = {}
        if auth == "dynsec":
            conf.dynsec_file = self.dir / "dynamic-security.json"
            provision: dict[str, Any] = {}
            ids = [f"dev-{i:05d}" for i in range(devices)] if isinstance(devices, int) else list(devices)
            if ids:
                from update_server.broker import DeviceAccount
                from update_server.broker.acl import BrokerPolicy

                policy = BrokerPolicy(topic_prefix=topic_prefix, admin_username=self.admin_username,
                                      ingest_subscription=f"$share/{share_group}/{topic_prefix}/+/telemetry/#")
                passwords = {d: secrets.token_urlsafe(16) for d in ids}
                self.device_accounts = {d: DeviceAccount(policy.device_username(d), pw, policy.device_client_id(d))
                                        for d, pw in passwords.items()}
                provision = {"policy": policy, "ingest_password": self.ingest_password, "devices": passwords}
            write_dynsec(conf.dynsec_file, self.admin_username, self.admin_password, **provision)
        elif auth == "files":
            from update_server.broker.files import write_initial_files

            files_dir = self.dir / "broker-files"
            conf.password_file, conf.acl_file = write_initial_files(files_dir)
            self.files_dir = files_dir
        if persistence:
            (self.dir / "data").mkdir(exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(conf.render())
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:  # type: ignore[override]
        if self.tls_port is not None:
            return f"mqtts://127.0.0.1:{self.tls_port}"
        return f"mqtt://127.0.0.1:{self.plain_port}"

    @property
    def port(self) -> int:
        return int(self.tls_port or self.plain_port or 0)

    @property
    def plain_url(self) -> str | None:
        return f"mqtt://127.0.0.1:{self.plain_port}" if self.plain_port else None

    @property
    def pid(self) -> int | None:  # type: ignore[override]
        return self.proc.pid if self.proc is not None else None

    @property
    def log(self) -> Path:
        return self.dir / "mosquitto.log"

    def server_settings(self, *, account_prefix: str = "") -> dict[str, Any]:
        """Settings of an update server using this broker; ``account_prefix`` keeps several servers' accounts
        on one broker apart (tests share one broker per worker)."""
        values: dict[str, Any] = {"mqtt_url": self.url, "mqtt_ca_file": self.ca_file, "broker_auth": self.auth}
        if self.auth != "none":
            values.update(broker_admin_username=self.admin_username, broker_admin_password=self.admin_password,
                          broker_account_prefix=account_prefix, mqtt_username=f"{account_prefix}edgepack-ingest",
                          mqtt_password=self.ingest_password)
        if self.auth == "files":
            values.update(broker_files_dir=self.files_dir,
                          broker_reload_command=f"kill -HUP $(cat {self.dir / 'mosquitto.pid'})")
        return values

    def start(self) -> MosquittoBroker:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        ports = [p for p in (self.tls_port, self.plain_port) if p]
        while not all(_listening(p) for p in ports):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None and \
                    self.proc.stderr else ""
                self.stop()
                raise RuntimeError(f"mosquitto did not start (config {self.conf}): {err[-1000:]}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def reload(self) -> None:
        """SIGHUP: mosquitto rereads its password and ACL files."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)

    def accounts(self, *, account_prefix: str = "", **settings: Any) -> Any:
        """The server's account manager for this broker (``settings``: more server settings, e.g.
        ``mqtt_topic_prefix``), for tests and tools that enroll devices without a server (an agent against a
        fake server, an ingest-only replica). Started; stop it when done."""
        from update_server.broker import make_accounts
        from update_server.settings import Settings

        accounts = make_accounts(Settings(**{**self.server_settings(account_prefix=account_prefix),
                                             "mqtt_client_id": f"tools-{secrets.token_hex(4)}", **settings}))
        accounts.start()
        return accounts


def start_mosquitto(workdir: Path, **options: Any) -> MosquittoBroker:
    """Start a :class:`MosquittoBroker` (dynamic security + TLS unless ``auth``/``tls`` say otherwise)."""
    return MosquittoBroker(workdir, **options).start()


class AmqttBroker(Broker):
    kind, protocol = "amqtt", "3.1.1"

    def __init__(self, url: str, stop: Any) -> None:
        self.url = url
        self._stop = stop

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None


def _start_amqtt(port: int) -> Broker:
    try:
        from amqtt.broker import Broker as AmqttServer
    except ModuleNotFoundError as exc:
        raise RuntimeError("neither mosquitto nor amqtt is installed: install amqtt, the pure-Python broker, "
                           "with pip install 'edgepack[demo]' (./scripts/demo does), or mosquitto "
                           "(apt-get install mosquitto)") from exc

    loop = asyncio.new_event_loop()
    config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
              "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
    started = threading.Event()
    holder: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        holder["broker"] = AmqttServer(config, loop=loop)
        loop.run_until_complete(holder["broker"].start())
        started.set()
        loop.run_forever()

    threading.Thread(target=run, name="amqtt", daemon=True).start()
    if not started.wait(15):
        raise RuntimeError("the amqtt broker did not start")

    def stop() -> None:
        fut = asyncio.run_coroutine_threadsafe(holder["broker"].shutdown(), loop)
        try:
            fut.result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)

    return AmqttBroker(f"mqtt://127.0.0.1:{port}", stop)


@dataclass
class LocalServer:
    """The update server running in this process (uvicorn in a thread) with an admin API token."""

    url: str
    token: str
    app: Any
    _server: Any
    _thread: threading.Thread
    ca_file: Path | None = None
    """The CA of its HTTPS certificate (None: plain HTTP on loopback)."""

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60,
                            verify=str(self.ca_file) if self.ca_file else True)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(20)


def start_server(*, data_dir: Path, keys_dir: Path, broker: Broker | None, tls_files: Any = None,
                 account_prefix: str = "", **settings: Any) -> LocalServer:
    """Start the update server on SQLite in ``data_dir`` with the online keys of ``keys_dir``, using ``broker``
    (its URL, CA and accounts), serving HTTPS with ``tls_files``' server certificate when given."""
    import uvicorn

    from update_server.app import create_app
    from update_server.security import Role
    from update_server.services.tokens import create_api_token
    from update_server.settings import Settings

    port = free_port()
    values: dict[str, Any] = {"data_dir": data_dir, "keys_dir": keys_dir / "online", "port": port,
                              "host": "127.0.0.1", "mqtt_url": ""}
    if broker is not None:
        values.update(broker.server_settings(account_prefix=account_prefix))
    ssl: dict[str, Any] = {}
    if tls_files is not None:
        values.update(tls_cert=tls_files.cert("server"), tls_key=tls_files.key("server"))
        ssl = {"ssl_certfile": str(tls_files.cert("server")), "ssl_keyfile": str(tls_files.key("server"))}
    app = create_app(Settings(**{**values, **settings}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                           **ssl))
    thread = threading.Thread(target=server.run, name="update-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the update server did not start")
        time.sleep(0.02)
    with app.state.ctx.sessions() as session, session.begin():
        _, token = create_api_token(session, name="demo-admin", role=Role.ADMIN, actor="edgepack demo",
                                    now=datetime.now(timezone.utc))
    ingester = getattr(app.state, "ingester", None)
    if ingester is not None and not ingester.connected.wait(15):
        raise RuntimeError("the update server could not subscribe to the broker")
    scheme = "https" if tls_files is not None else "http"
    return LocalServer(f"{scheme}://127.0.0.1:{port}", token, app, server, thread,
                       tls_files.ca_cert if tls_files is not None else None)


@dataclass
class SimDevice:
    """One simulated device: the real agent, its worker process and its local API, in this process."""

    device_id: str
    state_dir: Path
    agent: Any = None
    api: Any = None
    thread: threading.Thread | None = None
    api_address: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> SimDevice:
        from device_agent.api import LocalApi

        self.agent.boot()
        self.api = LocalApi(self.agent, "127.0.0.1:0").start()
        self.api_address = self.api.address
        self.thread = threading.Thread(target=self.agent.run, name=f"agent-{self.device_id}", daemon=True)
        self.thread.start()
        return self

    def status(self) -> dict[str, Any]:
        return dict(self.agent.status())

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        if self.thread is not None:
            self.thread.join(20)
        if self.api is not None:
            self.api.close()
        if self.agent is not None:
            self.agent.close()


def make_device(*, device_id: str, hardware_id: str, workdir: Path, server: LocalServer, keys_dir: Path,
                token: str, broker: Broker | None, agent_settings: dict[str, Any] | None = None) -> SimDevice:
    """Enroll a device with the real server API (as ``edgepack-agent enroll`` does: credential and broker
    password stored 0600) and build its agent (not started). The agent pins the server's and the broker's CA."""
    from device_agent.config import config_from_dict
    from device_agent.connection import http_transport, save_enrollment
    from device_agent.machine import Agent
    from device_agent.server import ServerClient
    from device_agent.update import installed_runtimes

    state = workdir / device_id
    doc: dict[str, Any] = {
        "device_id": device_id, "hardware_id": hardware_id, "state_dir": str(state),
        "server": {"url": server.url, "poll_interval_s": 2},
        "trust": {"image_root": str(keys_dir / "trust" / "root.json"),
                  "director_root": str(keys_dir / "trust" / "director-root.json")},
        # resent after 5 check-ins (not the production 5 minutes) what a broker acknowledged and lost (amqtt keeps
        # no queue for a reconnecting ingester): the demo's gates wait for that data
        "mqtt": {"resend_s": 10},
    }
    if server.ca_file is not None:
        doc["server"]["ca_file"] = str(server.ca_file)
    if broker is not None and broker.protocol != "5":
        doc["mqtt"]["protocol"] = broker.protocol
    if broker is not None and broker.ca_file is not None:
        doc["mqtt"]["ca_file"] = str(broker.ca_file)
    for section, values in (agent_settings or {}).items():
        doc[section] = {**doc.get(section, {}), **values} if isinstance(values, dict) else values
    config = config_from_dict(doc, source=f"demo:{device_id}")
    client = ServerClient(server.url, http_transport(config), timeout_s=30)
    runtimes = installed_runtimes()
    answer = client.enroll(token, {"device_id": device_id, "hardware_id": hardware_id,
                                   "platform": "linux-x86_64", "agent_version": "0.1.0",
                                   "runtimes": {k: v.split(" ")[-1] for k, v in runtimes.items()},
                                   "tags": {"fleet": "demo"}})
    save_enrollment(config, answer)
    return SimDevice(device_id, state, agent=Agent(config), extra={"config": doc})
