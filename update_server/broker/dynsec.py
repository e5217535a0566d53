"""Mosquitto's dynamic-security plugin, administered over its ``$CONTROL`` topics.

The plugin takes a JSON list of commands on ``$CONTROL/dynamic-security/v1`` and publishes the answers on
``.../v1/response`` to every subscribed administrator, so each request carries a ``correlationData`` and
the client waits for the answer that echoes it. Commands of one request run in order.

Per device: one role (its two ACLs, :meth:`BrokerPolicy.device_acls`) and one client (username, password,
bound client id, that role). Mosquitto 2.0's dynamic security has no ``%u``/``%c`` substitution in ACLs,
hence a role per device. ``deleteClient`` disconnects a connected client at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

from update_server.broker import BrokerAdminError, DeviceAccount
from update_server.broker.acl import CONTROL_RESPONSE, CONTROL_TOPIC, Acl, BrokerPolicy, notify_password
from update_server.broker.endpoint import Endpoint
from update_server.settings import Settings

log = logging.getLogger(__name__)


class DynsecClient:
    """Request/response over the control topics with paho (low volume; one request at a time)."""

    def __init__(self, endpoint: Endpoint, client_id: str, *, timeout_s: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._client = endpoint.paho_client(client_id)
        self._client.reconnect_delay_set(0.2, 10)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._ready = threading.Event()
        self._refused = ""
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}

    # paho callbacks: they only record and signal
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            return
        self._refused = ""
        client.subscribe(CONTROL_RESPONSE, qos=1)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if all(not r.is_failure for r in reasons):
            self._ready.set()
        else:
            self._refused = f"subscription to {CONTROL_RESPONSE} refused: {reasons[0]}"

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._ready.clear()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            responses = json.loads(msg.payload)["responses"]
            key = str(responses[0].get("correlationData", "")).split(":", 1)[0]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return
        waiter = self._pending.get(key)
        if waiter is not None:
            waiter[1][:] = responses
            waiter[0].set()

    def start(self) -> None:
        self._client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=30, clean_start=True)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def call(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send the commands, return one response per command (each may hold an ``error``)."""
        if not self._ready.wait(self.timeout_s):
            why = f": {self._refused}" if self._refused else ""
            raise BrokerAdminError(f"not connected to the broker's dynamic-security control topic at "
                                   f"{self.endpoint} as {self.endpoint.username!r}{why}")
        key = uuid.uuid4().hex
        done, out = threading.Event(), list[dict[str, Any]]()
        with self._lock:
            self._pending[key] = (done, out)
            try:
                body = {"commands": [{**c, "correlationData": f"{key}:{i}"} for i, c in enumerate(commands)]}
                # QoS 0: a request lost with its connection times out and is refused; at QoS 1 paho would
                # re-send it after a reconnect and the broker would run it twice.
                info = self._client.publish(CONTROL_TOPIC, json.dumps(body), qos=0)
                deadline = time.monotonic() + self.timeout_s
                while info.rc == 0 and not done.wait(0.05):
                    if not self._ready.is_set():
                        raise BrokerAdminError(f"the connection to {self.endpoint} was lost before the broker "
                                               "answered; the request may or may not have been applied")
                    if time.monotonic() > deadline:
                        break
                if not done.is_set():
                    raise BrokerAdminError(f"the broker at {self.endpoint} did not answer a dynamic-security "
                                           f"request within {self.timeout_s:.0f} s (is the plugin loaded and the "
                                           f"account {self.endpoint.username!r} its administrator?)")
            finally:
                self._pending.pop(key, None)
        if len(out) != len(commands):
            raise BrokerAdminError(f"dynamic security answered {len(out)} of {len(commands)} commands")
        return out


def _errors(responses: list[dict[str, Any]], *, tolerate: tuple[str, ...] = ()) -> list[str]:
    """The error texts of ``responses``, leaving out those containing one of ``tolerate``."""
    return [f"{r.get('command')}: {r['error']}" for r in responses
            if r.get("error") and not any(t in str(r["error"]) for t in tolerate)]


def _roles(response: dict[str, Any]) -> set[str]:
    return {r.get("rolename") for r in response.get("data", {}).get("client", {}).get("roles", [])}


def _acl(a: Acl, priority: int = 0) -> dict[str, Any]:
    return {"acltype": a.acltype, "topic": a.topic, "priority": priority, "allow": True}


class DynsecAccounts:
    """The ``dynsec`` backend of :class:`~update_server.broker.BrokerAccounts`."""

    kind = "dynsec"

    def __init__(self, settings: Settings, policy: BrokerPolicy) -> None:
        self.settings = settings
        self.policy = policy
        self.client = DynsecClient(Endpoint.for_server(settings, account="admin"),
                                   f"{settings.effective_mqtt_client_id}-dynsec-{uuid.uuid4().hex[:6]}",
                                   timeout_s=settings.broker_admin_timeout_s)
        self.ensured = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._ensure_loop, name="dynsec-ensure", daemon=True)
        self._ensure_lock = threading.Lock()

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect; the first set-up gets a few seconds here (so the ingester finds its account), then goes on
        retrying in the background while the broker is unreachable."""
        self.client.start()
        self._thread.start()
        self.ensured.wait(5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.stop()

    def _ensure_loop(self) -> None:
        delay = 0.5
        while not self._stop.is_set() and not self.ensured.is_set():
            try:
                self.ensure()
            except BrokerAdminError as exc:
                log.warning("broker accounts not set up yet: %s; retrying in %.0f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)

    def ensure(self) -> None:
        """Create or update the ingest and notify roles and accounts (idempotent; several replicas may)."""
        with self._ensure_lock:
            if self.ensured.is_set():
                return
            p = self.policy
            self._ensure_role(p.ingest_role, p.ingest_acls())
            self._ensure_role(p.notify_role, p.notify_acls())
            self._ensure_client(p.ingest_username, self.settings.mqtt_password, p.ingest_role,
                                "edgepack telemetry ingester")
            self._ensure_client(p.notify_username, notify_password(self.settings.broker_admin_password),
                                p.notify_role, "edgepack check-in notices")
            self.ensured.set()
            log.info("broker accounts ready (dynamic security at %s)", self.client.endpoint)

    def _ensure_role(self, rolename: str, acls: tuple[Acl, ...]) -> None:
        out = self.client.call([{"command": "createRole", "rolename": rolename},
                                {"command": "getRole", "rolename": rolename}])
        problems = _errors(out, tolerate=("already exists",))
        if problems:
            raise BrokerAdminError(f"creating role {rolename!r} failed: " + "; ".join(problems))
        have = {(a["acltype"], a["topic"]) for a in out[1].get("data", {}).get("role", {}).get("acls", [])}
        want = {(a.acltype, a.topic) for a in acls}
        commands = [{"command": "removeRoleACL", "rolename": rolename, "acltype": t, "topic": topic}
                    for t, topic in sorted(have - want)]
        commands += [{"command": "addRoleACL", "rolename": rolename, **_acl(Acl(t, topic))}
                     for t, topic in sorted(want - have)]
        if commands:
            problems = _errors(self.client.call(commands))
            if problems:
                raise BrokerAdminError(f"updating role {rolename!r} failed: " + "; ".join(problems))

    def _ensure_client(self, username: str, password: str, role: str, textname: str) -> None:
        """Create the account with its role, or set its password (which disconnects its sessions, so a changed
        password takes effect) and make sure it has the role. The admin itself is never changed here:
        dynamic security disconnects a client whose roles change."""
        if username == self.policy.admin_username:
            raise BrokerAdminError(f"{username!r} is the administrator account; choose another name")
        (found,) = self.client.call([{"command": "getClient", "username": username}])
        if found.get("error"):
            commands: list[dict[str, Any]] = [{"command": "createClient", "username": username, "password": password,
                                               "textname": textname, "roles": [{"rolename": role}]}]
        else:
            commands = [{"command": "setClientPassword", "username": username, "password": password}]
            if role not in _roles(found):
                commands.append({"command": "addClientRole", "username": username, "rolename": role})
        # Mosquitto 2.0.11 answers addClientRole with "Internal error" even when it added the role, so the
        # result is checked by reading the client back.
        problems = [e for e in _errors(self.client.call(commands)) if not e.startswith("addClientRole:")]
        (found,) = self.client.call([{"command": "getClient", "username": username}])
        if role not in _roles(found):
            problems.append(f"{username!r} lacks role {role!r}")
        if problems:
            raise BrokerAdminError(f"setting up broker account {username!r} failed: " + "; ".join(problems))

    def _require_ensured(self) -> None:
        if not self.ensured.is_set():
            self.ensure()

    # ---- devices ---------------------------------------------------------------------------------------
    def add_device(self, device_id: str, password: str) -> DeviceAccount:
        """Replace whatever account the device had (a leftover of a failed enrollment) with a new one."""
        self._require_ensured()
        p = self.policy
        username, role = p.device_username(device_id), p.device_role(device_id)
        client_id = p.device_client_id(device_id)
        out = self.client.call([
            {"command": "deleteClient", "username": username},
            {"command": "deleteRole", "rolename": role},
            {"command": "createRole", "rolename": role, "acls": [_acl(a) for a in p.device_acls(device_id)]},
            {"command": "createClient", "username": username, "password": password, "clientid": client_id,
             "textname": f"edgepack device {device_id}", "roles": [{"rolename": role}]}])
        problems = _errors(out[2:])
        if problems:
            self._delete(username, role)  # leave nothing half-made
            raise BrokerAdminError(f"creating the broker account of {device_id!r} failed: " + "; ".join(problems))
        return DeviceAccount(username, password, client_id)

    def remove_device(self, device_id: str) -> None:
        self._require_ensured()
        p = self.policy
        self._delete(p.device_username(device_id), p.device_role(device_id))

    def _delete(self, username: str, role: str) -> None:
        out = self.client.call([{"command": "deleteClient", "username": username},
                                {"command": "deleteRole", "rolename": role}])
        problems = _errors(out, tolerate=("not found",))
        if problems:
            raise BrokerAdminError(f"removing broker account {username!r} failed: " + "; ".join(problems))
