"""A Mosquitto configuration for edgepack: dynamic security (or password/ACL files), TLS, the settings the
product relies on. ``edgepack-server broker init`` writes it for production; ``edgepack._local`` (demo,
fleet simulator, tests, benchmarks) launches a private broker from the same text.

What the product needs from the broker, and why:

* ``allow_anonymous false`` plus dynamic security (or ``password_file`` + ``acl_file``): every client has
  an account, every account only its topics (:mod:`update_server.broker.acl`).
* a TLS listener (``cafile``/``certfile``/``keyfile``, TLS 1.2 or newer); a plain listener only on loopback.
* ``persistence true``: the ingester's persistent session (QoS 1 telemetry waiting while the server is down)
  and the dynamic-security state survive a broker restart.
* ``max_queued_messages 1000000``: one ingester session may hold a backlog of a large fleet for minutes.
* ``max_inflight_messages 0``: the ingester acknowledges in batches of thousands (receive maximum 65535).
* ``max_packet_size``: telemetry is at most 64 KiB; bigger packets are refused by the broker itself.
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundles._util import atomic_write
from update_server.broker.acl import ADMIN_ACLS, ADMIN_ROLE, Acl, BrokerPolicy, notify_password
from update_server.broker.passwords import PasswordHash

DYNSEC_PLUGIN_PATHS = ("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
                       "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
                       "/usr/lib/mosquitto_dynamic_security.so",
                       "/usr/local/lib/mosquitto_dynamic_security.so")
MAX_PACKET_BYTES = 256 * 1024


def find_dynsec_plugin() -> Path | None:
    for path in DYNSEC_PLUGIN_PATHS:
        if os.path.exists(path):
            return Path(path)
    return None


def _role(name: str, acls: Iterable[Acl]) -> dict[str, object]:
    return {"rolename": name, "acls": [{"acltype": a.acltype, "topic": a.topic, "priority": 0, "allow": True}
                                       for a in acls]}


def _client(username: str, password: str, roles: Iterable[str], *, textname: str,
            clientid: str | None = None) -> dict[str, object]:
    out: dict[str, object] = {"username": username, "textname": textname, **PasswordHash.of(password).dynsec_fields(),
                              "roles": [{"rolename": r} for r in roles]}
    if clientid:
        out["clientid"] = clientid
    return out


def dynsec_document(admin_username: str, admin_password: str, *, policy: BrokerPolicy | None = None,
                    ingest_password: str = "", devices: Mapping[str, str] | None = None) -> dict[str, object]:
    """A dynamic-security.json holding the administrator (what ``mosquitto_ctrl dynsec init`` does, with a
    narrower role: the control topics, nothing else); everything is denied by default.

    With ``policy``, also what the server would create at start-up and enrollment: the ingest and notify
    accounts and one account per device in ``devices`` (id -> password). Written before the broker starts,
    this provisions thousands of devices at once (benchmarks; dynamic security rewrites its whole file after
    every change, so creating N accounts one by one costs O(N^2))."""
    clients = [_client(admin_username, admin_password, [ADMIN_ROLE], textname="edgepack update server")]
    roles = [_role(ADMIN_ROLE, ADMIN_ACLS)]
    if policy is not None:
        roles += [_role(policy.ingest_role, policy.ingest_acls()), _role(policy.notify_role, policy.notify_acls())]
        clients += [_client(policy.ingest_username, ingest_password, [policy.ingest_role],
                            textname="edgepack telemetry ingester"),
                    _client(policy.notify_username, notify_password(admin_password), [policy.notify_role],
                            textname="edgepack check-in notices")]
        for device_id, password in (devices or {}).items():
            roles.append(_role(policy.device_role(device_id), policy.device_acls(device_id)))
            clients.append(_client(policy.device_username(device_id), password, [policy.device_role(device_id)],
                                   textname=f"edgepack device {device_id}",
                                   clientid=policy.device_client_id(device_id)))
    return {"clients": clients, "groups": [], "roles": roles,
            "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True, "subscribe": False,
                                 "unsubscribe": True}}


def write_private(path: Path, text: str) -> None:
    """Write a secret-bearing file atomically with mode 0600 (never world-readable in between)."""
    atomic_write(path, text.encode(), mode=0o600)


def write_dynsec(path: Path, admin_username: str, admin_password: str, **provision: Any) -> None:
    """Write :func:`dynsec_document` (``provision``: its ``policy``, ``ingest_password``, ``devices``)."""
    write_private(path, json.dumps(dynsec_document(admin_username, admin_password, **provision), indent=1) + "\n")


@dataclass(frozen=True)
class TlsFiles:
    cafile: Path
    certfile: Path
    keyfile: Path


@dataclass
class MosquittoConfig:
    """The text of a mosquitto.conf (Mosquitto 2.0)."""

    tls_port: int | None = 8883
    tls_bind: str = "0.0.0.0"
    tls: TlsFiles | None = None
    plain_port: int | None = None
    """A plain listener, bound to ``plain_bind`` (loopback by default): development and local tools only."""
    plain_bind: str = "127.0.0.1"
    dynsec_file: Path | None = None
    dynsec_plugin: Path | None = None
    password_file: Path | None = None
    acl_file: Path | None = None
    anonymous: bool = False
    persistence_dir: Path | None = None
    pid_file: Path | None = None
    log_file: Path | None = None
    run_as: str | None = None
    """``user``: when started as root mosquitto switches to this user (default ``mosquitto``)."""
    max_queued_messages: int = 1_000_000
    extra: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = ["# written by edgepack (update_server/broker/setup.py); see docs/server.md",
                 "per_listener_settings false", f"allow_anonymous {'true' if self.anonymous else 'false'}"]
        if self.run_as:
            lines.append(f"user {self.run_as}")
        if self.dynsec_file is not None:
            plugin = self.dynsec_plugin or find_dynsec_plugin()
            if plugin is None:
                raise FileNotFoundError("mosquitto_dynamic_security.so not found; install mosquitto 2.x, or use "
                                        "broker_auth = \"files\" (docs/server.md)")
            lines += [f"plugin {plugin}", f"plugin_opt_config_file {self.dynsec_file}"]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.persistence_dir is not None:
            lines += ["persistence true", f"persistence_location {self.persistence_dir}/", "autosave_interval 60"]
        else:
            lines.append("persistence false")
        if self.pid_file is not None:
            lines.append(f"pid_file {self.pid_file}")
        if self.log_file is not None:
            lines += [f"log_dest file {self.log_file}", "log_type error", "log_type warning", "log_type notice",
                      "log_type information", "connection_messages true"]
        lines += [f"max_queued_messages {self.max_queued_messages}", "max_inflight_messages 0",
                  f"max_packet_size {MAX_PACKET_BYTES}", "set_tcp_nodelay true"]
        if self.tls_port is not None:
            if self.tls is None:
                raise ValueError("a TLS listener needs cafile, certfile and keyfile (edgepack tls init)")
            lines += ["", f"listener {self.tls_port} {self.tls_bind}", f"cafile {self.tls.cafile}",
                      f"certfile {self.tls.certfile}", f"keyfile {self.tls.keyfile}", "tls_version tlsv1.2"]
        if self.plain_port is not None:
            lines += ["", f"listener {self.plain_port} {self.plain_bind}"]
        lines += self.extra
        return "\n".join(lines) + "\n"


def current_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def env_lines(values: Iterable[tuple[str, object]]) -> str:
    return "".join(f"{k}={v}\n" for k, v in values if v is not None and v != "")


@dataclass(frozen=True)
class BrokerInit:
    conf: Path
    server_env: Path
    ingest_env: Path
    dynsec_file: Path | None
    password_file: Path | None
    acl_file: Path | None


def init_broker(out: Path, *, tls_dir: Path, broker_host: str, port: int = 8883, bind: str = "0.0.0.0",
                auth: str = "dynsec", plain_port: int | None = None, data_dir: Path | None = None,
                topic_prefix: str = "edgepack/v1/devices", share_group: str = "edgepack-server",
                admin_username: str = "edgepack-server", ingest_username: str = "edgepack-ingest",
                run_as: str | None = None, force: bool = False) -> BrokerInit:
    """Write a production broker configuration into ``out`` (``edgepack-server broker init``).

    ``mosquitto.conf`` (a TLS listener on ``bind:port`` with ``tls_dir``'s CA and broker certificate; an
    optional plain listener on loopback), the account store (``dynamic-security.json`` with the administrator,
    or ``passwd`` + ``acl`` for the files backend) and two env files (0600) with fresh random passwords:
    ``server.env`` for ``edgepack-server serve`` and ``ingest.env`` for ingest-only replicas."""
    import secrets

    out.mkdir(parents=True, exist_ok=True)
    store = out / ("dynamic-security.json" if auth == "dynsec" else "passwd")
    if store.exists() and not force:
        raise FileExistsError(f"{store} exists and holds live accounts; use another directory (or --force to "
                              "start over: every device would have to enroll again)")
    tls = TlsFiles(tls_dir / "ca.pem", tls_dir / "broker.pem", tls_dir / "broker.key")
    for path in (tls.cafile, tls.certfile, tls.keyfile):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `edgepack tls init --out {tls_dir} --host "
                                    f"{broker_host}` first")
    admin_password, ingest_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    conf = MosquittoConfig(tls_port=port, tls_bind=bind, tls=tls, plain_port=plain_port,
                           persistence_dir=data_dir or out / "data", pid_file=out / "mosquitto.pid", run_as=run_as)
    (data_dir or out / "data").mkdir(parents=True, exist_ok=True)
    env: list[tuple[str, object]] = [("EDGEPACK_MQTT_URL", f"mqtts://{broker_host}:{port}"),
                                     ("EDGEPACK_MQTT_CA_FILE", tls.cafile.resolve()),
                                     ("EDGEPACK_BROKER_AUTH", auth),
                                     ("EDGEPACK_MQTT_TOPIC_PREFIX", topic_prefix),
                                     ("EDGEPACK_MQTT_SHARE_GROUP", share_group),
                                     ("EDGEPACK_MQTT_USERNAME", ingest_username),
                                     ("EDGEPACK_MQTT_PASSWORD", ingest_password)]
    ingest_env = list(env)
    env += [("EDGEPACK_BROKER_ADMIN_USERNAME", admin_username), ("EDGEPACK_BROKER_ADMIN_PASSWORD", admin_password)]
    dynsec_file = password_file = acl_file = None
    if auth == "dynsec":
        dynsec_file = conf.dynsec_file = store
        write_dynsec(store, admin_username, admin_password)
    elif auth == "files":
        from update_server.broker.files import write_server_accounts

        policy = BrokerPolicy(topic_prefix=topic_prefix, ingest_subscription=f"$share/{share_group}/{topic_prefix}"
                              "/+/telemetry/#", admin_username=admin_username, ingest_username=ingest_username)
        password_file, acl_file = write_server_accounts(out, policy, admin_password=admin_password,
                                                        ingest_password=ingest_password)
        conf.password_file, conf.acl_file = password_file, acl_file
        env += [("EDGEPACK_BROKER_FILES_DIR", out.resolve()),
                ("EDGEPACK_BROKER_RELOAD_COMMAND", f"kill -HUP $(cat {(out / 'mosquitto.pid').resolve()})")]
    else:
        raise ValueError(f"auth must be dynsec or files, found {auth!r}")
    (out / "mosquitto.conf").write_text(conf.render())
    write_private(out / "server.env", env_lines(env))
    write_private(out / "ingest.env", env_lines(ingest_env))
    return BrokerInit(out / "mosquitto.conf", out / "server.env", out / "ingest.env", dynsec_file, password_file,
                      acl_file)
