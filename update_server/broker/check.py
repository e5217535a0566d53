"""Check that the broker is configured as the product needs it, from a client (``edgepack-server check-broker``,
and in the background at every start).

Two things lose telemetry silently when the broker keeps its defaults, and both can be observed by a client:

* **the session survives a reconnect**: a probe client subscribes at QoS 1 with a session expiry, disconnects,
  reconnects without clean start and must be told "session present";
* **the queue of a disconnected session is deep enough**: while the probe is away, ``messages`` QoS 1
  messages are published to its topic; on reconnect every one must arrive. Mosquitto's default
  ``max_queued_messages 1000`` keeps 1,000 and drops the rest, which is what a server restart with a larger
  backlog would lose.

What a client cannot see (``persistence true``, so sessions and queues survive a *broker* restart;
``persistent_client_expiration``) is listed as a reminder. The probe uses an account of its own: with
dynamic security a temporary client and role (``<account prefix>edgepack-probe-<hex>``, deleted afterwards)
allowed only ``edgepack-probe/<hex>/#``; with ``broker_auth=none`` no account; the ``files`` backend cannot
create one, so there the queue is not probed.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from update_server.broker.endpoint import Endpoint
from update_server.mqtt_wire import Message, MqttError, WireClient, publish_all
from update_server.settings import Settings

DOC = "docs/server.md, section 'Broker settings'"
REMINDERS = ("a client cannot check persistence: set `persistence true` (and `persistence_location`) so sessions "
             "and their queues survive a broker restart",
             "a client cannot check `persistent_client_expiration`: leave it unset, or longer than the longest "
             "server outage you plan for")


@dataclass
class BrokerReport:
    broker: str
    session_resumed: bool | None = None
    """The probe's session was present after a reconnect; None when not checked."""
    sent: int = 0
    queued: int | None = None
    """How many of ``sent`` messages, published while the probe was disconnected, reached it."""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"broker {self.broker}"]
        if self.session_resumed is not None:
            out.append(f"persistent session kept across a reconnect: {'yes' if self.session_resumed else 'NO'}")
        if self.queued is not None:
            out.append(f"queued for a disconnected session: {self.queued} of {self.sent} QoS 1 messages")
        out += [f"PROBLEM: {p}" for p in self.problems]
        out += [f"note: {n}" for n in self.notes]
        return out

    def as_dict(self) -> dict[str, object]:
        return {"broker": self.broker, "ok": self.ok, "session_resumed": self.session_resumed, "sent": self.sent,
                "queued": self.queued, "problems": self.problems, "notes": self.notes}


def check_broker(settings: Settings, *, messages: int = 1500, timeout_s: float = 30.0) -> BrokerReport:
    """Probe the broker ``settings`` name (see the module docstring); never raises for what it finds."""
    ingest = Endpoint.for_server(settings, account="ingest")
    report = BrokerReport(f"{ingest.host}:{ingest.port}")
    try:
        with _probe_account(settings) as endpoint:
            if endpoint is None:
                report.notes.append("broker_auth=files: no probe account can be made, so the session and queue "
                                    f"were not probed; set what {DOC} lists by hand")
            else:
                _probe(endpoint, report, messages, timeout_s, protocol=5 if settings.mqtt_protocol == "5" else 4)
    except (MqttError, OSError) as exc:
        report.problems.append(f"could not probe the broker at {report.broker}: {exc}")
    except Exception as exc:  # BrokerAdminError and the like: the probe account could not be made
        report.problems.append(f"could not make a probe account on the broker: {exc}")
    report.notes.extend(REMINDERS)
    return report


def _probe(endpoint: Endpoint, report: BrokerReport, messages: int, timeout_s: float, *, protocol: int) -> None:
    tag = secrets.token_hex(6)
    topic = f"edgepack-probe/{tag}/queue"
    ctx = endpoint.ssl_context()
    probe = WireClient(endpoint.host, endpoint.port, f"edgepack-probe-{tag}", clean_start=True, session_expiry=600,
                       username=endpoint.username, password=endpoint.password, ssl_context=ctx, protocol=protocol)
    try:
        probe.connect(timeout_s)
        probe.subscribe(topic, qos=1)
        deadline = time.monotonic() + timeout_s
        while not probe.subscribed.is_set():
            if time.monotonic() > deadline:
                raise MqttError(f"the broker did not confirm the probe's subscription to {topic}")
            probe.read(lambda m: None)
        probe.close()
        probe.clean_start = False
        report.session_resumed = probe.connect(timeout_s)
        probe.close()
        if not report.session_resumed:
            report.problems.append(
                "the broker did not keep a persistent session across a reconnect, so telemetry sent while the "
                "server restarts is lost: allow persistent sessions (do not set `persistent_client_expiration` "
                f"to a short time; MQTT 5 session expiry must be honoured); see {DOC}")
            return
        report.sent = publish_all(endpoint.host, endpoint.port, ((topic, b"probe") for _ in range(messages)),
                                  username=endpoint.username, password=endpoint.password, ssl_context=ctx,
                                  protocol=protocol)
        got: list[Message] = []
        probe.connect(timeout_s)
        deadline, quiet = time.monotonic() + timeout_s, time.monotonic()
        while len(got) < report.sent and time.monotonic() < deadline and time.monotonic() - quiet < 2.0:
            before = len(got)
            probe.read(got.append)
            probe.ack(got[before:])
            if len(got) > before:
                quiet = time.monotonic()
        report.queued = len(got)
        if report.queued < report.sent:
            report.problems.append(
                f"the broker kept only {report.queued} of {report.sent} messages for a disconnected session: a "
                f"telemetry backlog larger than that is dropped while the server is down. Mosquitto: in "
                f"mosquitto.conf set `max_queued_messages 1000000` (or 0, no limit) and `max_queued_bytes 0`, then "
                f"restart the broker; another broker: raise its queue limit for offline sessions; see {DOC}")
    finally:
        with contextlib.suppress(MqttError, OSError):
            probe.release_session(timeout_s)


@contextlib.contextmanager
def _probe_account(settings: Settings) -> Iterator[Endpoint | None]:
    """An endpoint whose account may publish and subscribe under ``edgepack-probe/`` (see the module doc)."""
    if settings.broker_auth == "files":
        yield None
        return
    admin = Endpoint.for_server(settings, account="admin")
    if settings.broker_auth == "none":
        yield admin
        return
    from update_server.broker.dynsec import DynsecClient

    name = f"{settings.broker_account_prefix}edgepack-probe-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(18)
    acls = [{"acltype": t, "topic": "edgepack-probe/#", "priority": 0, "allow": True}
            for t in ("publishClientSend", "publishClientReceive", "subscribePattern")]
    client = DynsecClient(admin, f"{name}-admin", timeout_s=settings.broker_admin_timeout_s)
    client.start()
    try:
        errors = [r["error"] for r in client.call([
            {"command": "createRole", "rolename": name, "acls": acls},
            {"command": "createClient", "username": name, "password": password, "roles": [{"rolename": name}]},
        ]) if r.get("error")]
        if errors:
            raise MqttError(f"dynamic security refused the probe account: {'; '.join(errors)}")
        yield Endpoint(admin.host, admin.port, admin.tls, admin.ca_file, name, password)
    finally:
        with contextlib.suppress(Exception):
            client.call([{"command": "deleteClient", "username": name}, {"command": "deleteRole", "rolename": name}])
        client.stop()
