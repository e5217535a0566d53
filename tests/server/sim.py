"""Simulated devices and telemetry for server tests: real HTTP to a live server, real MQTT to a broker.

A :class:`SimDevice` enrolls, checks in and verifies its signed assignment with the same library code the
agent uses (``bundles.director.verify_assignment``). :class:`Publisher` sends protocol-conformant
telemetry (docs/protocol.md) through the broker, QoS 1, waiting for each PUBACK.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

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
        return body

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"}

    def checkin(self) -> httpx.Response:
        return self.http.post(f"/api/v1/devices/{self.device_id}/checkin", headers=self.auth, json={
            "agent_version": "0.1.0", "platform": "linux-x86_64", "runtimes": {"onnxruntime": "1.32.0"},
            "state": "idle", "active": self.active, "last_error": None})

    def sync(self, director_root: bytes) -> Assignment | None:
        """Check in, verify the assignment and 'install' its bundle (the active bundle becomes it)."""
        r = self.checkin()
        assert r.status_code == 200, r.text
        text = r.json()["assignment"]
        if text is None:
            return None
        root = Metadata[Root].from_bytes(director_root).signed
        assignment = verify_assignment(root, text.encode(), device_id=self.device_id, hardware_id=self.hardware_id,
                                       now=datetime.now(timezone.utc), last_version=self.last_version)
        self.last_version = assignment.version
        if assignment.bundle is not None:
            self.active = {"name": assignment.bundle["name"], "version": assignment.bundle["version"],
                           "release_counter": assignment.bundle["release_counter"], "variant": "onnx-fp32"}
        return assignment

    def close(self) -> None:
        self.http.close()


class Publisher:
    """One MQTT client publishing telemetry for many simulated devices."""

    def __init__(self, broker_url: str, prefix: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        host, port = broker_url.split("://", 1)[-1].rsplit(":", 1)
        self.prefix = prefix
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.seq = 0

    def envelope(self, device: SimDevice, kind: str, bundle: dict[str, Any] | None) -> dict[str, Any]:
        self.seq += 1
        return {"schema": "edgepack.telemetry.v1", "kind": kind, "message_id": uuid.uuid4().hex,
                "device_id": device.device_id, "seq": self.seq, "sent_at": now_iso(), "bundle": bundle,
                "rollout_id": None}

    def publish(self, topic: str, payload: dict[str, Any] | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(topic, data, qos=1).wait_for_publish(10)

    def window(self, device: SimDevice, *, requests: int = 100, errors: int = 0, crashes: int = 0,
               correct: int = 40, feedback: int = 40, latency: list[int] | None = None,
               bundle: dict[str, Any] | None = None) -> dict[str, Any]:
        msg = self.envelope(device, "window", bundle or device.active)
        counts = latency or [0, 50, 40, 10, 0, 0, 0, 0, 0, 0, 0]
        msg["window"] = {"start": now_iso(), "end": now_iso(), "requests": requests, "errors": errors,
                         "crashes": crashes, "latency_ms": {"bounds": BOUNDS, "counts": counts},
                         "feedback": {"count": feedback, "correct": correct}, "predicted_classes": {"1": requests}}
        self.publish(f"{self.prefix}/{device.device_id}/telemetry/window", msg)
        return msg

    def event(self, device: SimDevice, event: str, *, target: dict[str, Any] | None = None,
              detail: dict[str, Any] | None = None) -> dict[str, Any]:
        msg = self.envelope(device, "event", device.active)
        msg["event"], msg["target"], msg["detail"] = event, target, detail or {}
        self.publish(f"{self.prefix}/{device.device_id}/telemetry/event", msg)
        return msg

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


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
