"""Simulated devices and telemetry for server tests: real HTTP to a live server, real MQTT to a broker.

A :class:`SimDevice` enrolls, checks in and verifies its signed assignment with the same library code the
agent uses (``bundles.director.verify_assignment``). :class:`Publisher` sends protocol-conformant
telemetry (docs/protocol.md) through the broker as each device (its own account), QoS 1, waiting for each PUBACK.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlparse

import httpx
from tuf.api.metadata import Metadata, Root

from bundles.director import Assignment, verify_assignment

BOUNDS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class SimDevice:
    def __init__(self, base_url: str, device_id: str, hardware_id: str = "x86-kiosk") -> None:
        self.base_url, self.device_id, self.hardware_id = base_url, device_id, hardware_id
        self.credential = ""
        self.mqtt: dict[str, Any] = {}
        """The broker account from enrollment (``username``, ``password``, ``client_id``, ``url``)."""
        self.http = httpx.Client(base_url=base_url, timeout=30)
        self.active: dict[str, Any] | None = None
        self.last_version = 0

    def enroll(self, token: str, tags: dict[str, str] | None = None) -> dict[str, Any]:
        r = self.http.post("/api/v1/devices/enroll", json={
            "enrollment_token": token, "device_id": self.device_id, "hardware_id": self.hardware_id,
            "platform": "linux-x86_64", "agent_version": "0.1.0", "runtimes": {"onnxruntime": "1.32.0"},
            "tags": tags or {}})
        assert r.status_code == 201, r.text
        body = r.json()
        self.credential = body["credential"]
        self.mqtt = dict(body.get("mqtt") or {})
        return body

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"}

    def checkin(self) -> httpx.Response:
        return self.http.post(f"/api/v1/devices/{self.device_id}/checkin", headers=self.auth, json={
            "agent_version": "0.1.0", "platform": "linux-x86_64", "runtimes": {"onnxruntime": "1.32.0"},
            "state": "idle", "active": self.active, "last_error": None})

    def sync(self, director_root: bytes, *, install: bool = True) -> Assignment | None:
        """Check in, verify the assignment and 'install' its bundle (the active bundle becomes it). With
        ``install=False`` the device refuses the bundle (as after a failed install): it keeps what it runs."""
        r = self.checkin()
        assert r.status_code == 200, r.text
        text = r.json()["assignment"]
        if text is None:
            return None
        root = Metadata[Root].from_bytes(director_root).signed
        assignment = verify_assignment(root, text.encode(), device_id=self.device_id, hardware_id=self.hardware_id,
                                       now=datetime.now(timezone.utc), last_version=self.last_version)
        self.last_version = assignment.version
        if assignment.bundle is not None and install:
            self.active = {"name": assignment.bundle["name"], "version": assignment.bundle["version"],
                           "release_counter": assignment.bundle["release_counter"], "variant": "onnx-fp32"}
        return assignment

    def close(self) -> None:
        self.http.close()


class Publisher:
    """Telemetry as the simulated devices send it: one MQTT connection per device with the broker account it
    got at enrollment (``SimDevice.mqtt``), over TLS pinned to the broker's CA. Each connection subscribes to
    the device's own notify topic; ``notified`` collects the devices that received a check-in-now notice.

    ``broker`` is a ``services.Mosquitto`` (or anything with ``url`` and ``ca_file``)."""

    def __init__(self, broker: Any, prefix: str, devices: Sequence[SimDevice] = ()) -> None:
        self.broker = broker
        self.prefix = prefix
        self.seqs: dict[str, int] = {}
        """Per device, the last seq sent (1, 2, 3, ... as the agent's outbox numbers them)."""
        self.clients: dict[str, Any] = {}
        self.results: dict[tuple[str, int], str] = {}
        self.notified: set[str] = set()
        self.lock = threading.Lock()
        for device in devices:
            self.connect(device)

    def connect(self, device: SimDevice) -> Any:
        """The device's own connection (made once; subscribed to its notify topic before this returns)."""
        if device.device_id in self.clients:
            return self.clients[device.device_id]
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        account = device.mqtt
        parsed = urlparse(self.broker.url)
        client = mqtt.Client(CallbackAPIVersion.VERSION2,
                             client_id=account.get("client_id") or f"edgepack-dev-{device.device_id}",
                             protocol=mqtt.MQTTv5)
        if account.get("username"):
            client.username_pw_set(account["username"], account.get("password"))
        if parsed.scheme == "mqtts":
            client.tls_set(ca_certs=str(self.broker.ca_file))
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        ready = threading.Event()
        client.on_subscribe = lambda *a: ready.set()
        client.on_message = lambda c, u, msg: self._notice(msg)
        client.on_publish = lambda c, u, mid, rc, props: self.results.__setitem__((device.device_id, mid), str(rc))
        client.connect(parsed.hostname, parsed.port)
        client.loop_start()
        client.subscribe(f"{self.prefix}/{device.device_id}/notify", qos=1)
        assert ready.wait(10), f"{device.device_id} could not subscribe to its notify topic"
        self.clients[device.device_id] = client
        return client

    def _notice(self, msg: Any) -> None:
        body = json.loads(msg.payload)
        assert body["schema"] == "edgepack.notify.v1" and body["type"] == "checkin"
        with self.lock:
            self.notified.add(msg.topic.split("/")[-2])

    def envelope(self, device: SimDevice, kind: str, bundle: dict[str, Any] | None) -> dict[str, Any]:
        with self.lock:
            seq = self.seqs[device.device_id] = self.seqs.get(device.device_id, 0) + 1
        return {"schema": "edgepack.telemetry.v1", "kind": kind, "message_id": uuid.uuid4().hex,
                "device_id": device.device_id, "seq": seq, "sent_at": now_iso(), "bundle": bundle,
                "rollout_id": None}

    def publish(self, topic: str, payload: dict[str, Any] | bytes, device: SimDevice | None = None) -> str:
        """Publish as ``device`` (default: the connected device the topic names); returns the broker's PUBACK
        reason ("Success", or "Not authorized" for a topic outside the device's ACL)."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        device_id = device.device_id if device else topic[len(self.prefix) + 1:].split("/", 1)[0]
        client = self.connect(device) if device else self.clients[device_id]
        info = client.publish(topic, data, qos=1)
        info.wait_for_publish(10)
        return self.results.pop((device_id, info.mid), "")

    def window(self, device: SimDevice, *, requests: int = 100, errors: int = 0, crashes: int = 0,
               correct: int = 40, feedback: int = 40, latency: list[int] | None = None,
               bundle: dict[str, Any] | None = None) -> dict[str, Any]:
        msg = self.envelope(device, "window", bundle or device.active)
        counts = latency or [0, 50, 40, 10, 0, 0, 0, 0, 0, 0, 0]
        msg["window"] = {"start": now_iso(), "end": now_iso(), "requests": requests, "errors": errors,
                         "crashes": crashes, "latency_ms": {"bounds": BOUNDS, "counts": counts},
                         "feedback": {"count": feedback, "correct": correct}, "predicted_classes": {"1": requests}}
        self.publish(f"{self.prefix}/{device.device_id}/telemetry/window", msg, device)
        return msg

    def event(self, device: SimDevice, event: str, *, target: dict[str, Any] | None = None,
              detail: dict[str, Any] | None = None) -> dict[str, Any]:
        msg = self.envelope(device, "event", device.active)
        msg["event"], msg["target"], msg["detail"] = event, target, detail or {}
        self.publish(f"{self.prefix}/{device.device_id}/telemetry/event", msg, device)
        return msg

    def close(self) -> None:
        for client in self.clients.values():
            client.disconnect()
            client.loop_stop()
        self.clients.clear()


def expected_phases(rollout_id: str, device_ids: list[str], percents: tuple[float, ...] = (1, 10, 50, 100)
                    ) -> dict[str, int]:
    """Phases of the devices in a rollout at creation: the cohort hash, plus the canary rule (an empty first
    phase takes the member with the lowest bucket)."""
    from update_server.rollout_policy import PhaseSpec, cohort_bucket, phase_of

    phases = [PhaseSpec(p, 0, 0) for p in percents]
    out = {d: phase_of(cohort_bucket(rollout_id, d), phases) for d in device_ids}
    if out and 0 not in out.values():
        out[min(out, key=lambda d: cohort_bucket(rollout_id, d))] = 0
    return out
