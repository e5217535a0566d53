"""Local services for the demo and the fleet simulator: a broker, the update server, simulated devices.

Everything here runs the real code: mosquitto (or amqtt, a pure-Python broker, when mosquitto is not
installed), the real FastAPI update server under uvicorn, and real agents (`device_agent.machine.Agent`)
each with its own state directory, credential, worker process and local prediction API.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
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


@dataclass
class Broker:
    """An MQTT broker of our own. ``protocol`` is "5" (mosquitto) or "3.1.1" (amqtt)."""

    url: str
    kind: str
    protocol: str
    _stop: Any = None
    pid: int | None = None
    """The broker's process (mosquitto), for CPU measurements; None when it runs in this process."""

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None


def _mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


def start_broker(workdir: Path, kind: str = "auto") -> Broker:
    """mosquitto on a free port when installed (or ``kind="mosquitto"``), otherwise amqtt in-process (MQTT 3.1.1)."""
    binary = _mosquitto_binary()
    if kind == "mosquitto" and not binary:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto), or use --broker amqtt")
    if binary and kind != "amqtt":
        return start_mosquitto(workdir)
    return _start_amqtt(free_port())


def start_mosquitto(workdir: Path, extra_config: tuple[str, ...] = ("max_queued_messages 100000",)) -> Broker:
    """A private mosquitto (MQTT 5) on a free port, with ``extra_config`` lines in its configuration."""
    binary = _mosquitto_binary()
    if binary is None:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join([f"listener {port} 127.0.0.1", "allow_anonymous true", *extra_config]) + "\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("mosquitto did not start")
        time.sleep(0.05)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()

    return Broker(f"mqtt://127.0.0.1:{port}", "mosquitto", "5", stop, proc.pid)


def _start_amqtt(port: int) -> Broker:
    try:
        from amqtt.broker import Broker as AmqttBroker
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
        holder["broker"] = AmqttBroker(config, loop=loop)
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

    return Broker(f"mqtt://127.0.0.1:{port}", "amqtt", "3.1.1", stop)


@dataclass
class LocalServer:
    """The update server running in this process (uvicorn in a thread) with an admin API token."""

    url: str
    token: str
    app: Any
    _server: Any
    _thread: threading.Thread

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(20)


def start_server(*, data_dir: Path, keys_dir: Path, broker: Broker | None, **settings: Any) -> LocalServer:
    """Start the update server on SQLite in ``data_dir`` with the online keys of ``keys_dir``."""
    import uvicorn

    from update_server.app import create_app
    from update_server.security import Role
    from update_server.services.tokens import create_api_token
    from update_server.settings import Settings

    port = free_port()
    values: dict[str, Any] = {"data_dir": data_dir, "keys_dir": keys_dir / "online", "port": port,
                              "mqtt_url": broker.url if broker else ""}
    if broker is not None and broker.protocol != "5":
        values["mqtt_protocol"] = broker.protocol
    app = create_app(Settings(**{**values, **settings}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
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
    return LocalServer(f"http://127.0.0.1:{port}", token, app, server, thread)


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
    """Enroll a device with the real server API and build its agent (not started)."""
    from bundles._util import atomic_write
    from device_agent.config import config_from_dict
    from device_agent.machine import Agent
    from device_agent.server import ServerClient
    from device_agent.transport import Urllib3Transport
    from device_agent.update import installed_runtimes

    state = workdir / device_id
    doc: dict[str, Any] = {
        "device_id": device_id, "hardware_id": hardware_id, "state_dir": str(state),
        "server": {"url": server.url, "poll_interval_s": 2},
        "trust": {"image_root": str(keys_dir / "trust" / "root.json"),
                  "director_root": str(keys_dir / "trust" / "director-root.json")},
    }
    if broker is not None and broker.protocol != "5":
        doc["mqtt"] = {"protocol": broker.protocol}
    for section, values in (agent_settings or {}).items():
        doc[section] = {**doc.get(section, {}), **values} if isinstance(values, dict) else values
    config = config_from_dict(doc, source=f"demo:{device_id}")
    client = ServerClient(server.url, Urllib3Transport(), timeout_s=30)
    runtimes = installed_runtimes()
    answer = client.enroll(token, {"device_id": device_id, "hardware_id": hardware_id,
                                   "platform": "linux-x86_64", "agent_version": "0.1.0",
                                   "runtimes": {k: v.split(" ")[-1] for k, v in runtimes.items()},
                                   "tags": {"fleet": "demo"}})
    state.mkdir(parents=True, exist_ok=True)
    atomic_write(config.path(config.server.credential_file), answer["credential"].encode() + b"\n", mode=0o600)
    import json

    info = {k: v for k, v in answer.items() if k != "credential"}
    atomic_write(state / "enrollment.json", json.dumps(info).encode(), mode=0o600)
    return SimDevice(device_id, state, agent=Agent(config), extra={"config": doc})
