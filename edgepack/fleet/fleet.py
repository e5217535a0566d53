"""The simulated fleet: real agents, enrolled for real, stepped by a few threads, used by simulated users.

Each :class:`SimDevice` is one ``device_agent.machine.Agent`` with its own state directory, credential,
MQTT connection (through :class:`~edgepack.fleet.faults.FaultyPublisher`), HTTP access (through
:class:`~edgepack.fleet.faults.FaultyTransport` over one shared connection pool) and an
:class:`~edgepack.fleet.supervisor.InProcessSupervisor`.

Stepping. ``Agent.run()`` would hold one thread per device, mostly asleep in its IDLE wait or its trial.
Instead a scheduler thread looks at each agent every ``TICK_S`` and hands the ready ones to a small pool,
which calls ``Agent.step()``. An agent is ready when its step would not block: in IDLE when its next
check-in is due or a check-in notice is queued; in TRIAL when the trial period is over or a crash is
queued; in every other state always. Reading "when is the next check-in" uses the agent's private
``_next_checkin`` (the agent has no public "due" query; see the report in docs/benchmarks.md).

Users. Load threads send each serving device ``requests_per_s`` prediction calls of ``batch`` real digit
images (scikit-learn's bundled test split) through ``Agent.predict`` and return the true labels through
``Agent.feedback``, as a kiosk's users would: that is where the accuracy telemetry comes from.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.fleet.faults import FaultyPublisher, FaultyTransport, Link
from edgepack.fleet.mqtt import LoopedMqttPublisher, SharedLoop
from edgepack.fleet.scenario import Scenario
from edgepack.fleet.supervisor import InProcessSupervisor, SessionCache

log = logging.getLogger(__name__)
TICK_S = 0.05
FAULT_TICK_S = 0.5


@dataclass
class SimDevice:
    device_id: str
    hardware_id: str
    state_dir: Path
    link: Link
    agent: Any = None
    publisher: FaultyPublisher | None = None
    supervisor: InProcessSupervisor | None = None
    busy: bool = False
    offline_at: float | None = None
    steps: int = 0


@dataclass
class LoadStats:
    calls: int = 0
    ok: int = 0
    errors: int = 0
    feedback: int = 0
    correct: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _requests(batch: int, seed: int, n: int = 64) -> list[tuple[bytes, list[str]]]:
    """Prediction bodies of ``batch`` real digit images each, with their true labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images[1200:], digits.target[1200:]  # the split the digits models never saw
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        idx = [rng.randrange(len(images)) for _ in range(batch)]
        body = json.dumps({"inputs": [images[i].tolist() for i in idx]}).encode()
        out.append((body, [str(int(labels[i])) for i in idx]))
    return out


class Fleet:
    def __init__(self, scn: Scenario, *, server_url: str, keys: Any, state_root: Path,
                 indices: Sequence[int] | None = None, ca_file: str | None = None) -> None:
        import urllib3

        from device_agent import AGENT_VERSION
        from device_agent.transport import Urllib3Transport
        from device_agent.update import installed_runtimes

        self.scn = scn
        self.server_url = server_url
        self.ca_file = ca_file
        """The local CA the agents pin for HTTPS and MQTT (None: plain, loopback only)."""
        self.keys = keys
        self.state_root = state_root
        self.indices = list(indices) if indices is not None else list(range(scn.fleet.devices))
        self.rng = random.Random(scn.seed * 7919 + (self.indices[0] if self.indices else 0))
        self.cache = SessionCache()
        self.mqtt_loop = SharedLoop()
        self.runtimes = installed_runtimes()
        f = scn.fleet
        self.http = Urllib3Transport(f"edgepack-agent/{AGENT_VERSION} (fleet-sim)")
        tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED", "ca_certs": ca_file} if ca_file else {}
        self.http.pool = urllib3.PoolManager(retries=False, maxsize=f.step_threads + f.enroll_threads + 4,
                                             headers={"User-Agent": f"edgepack-agent/{AGENT_VERSION} (fleet-sim)"},
                                             **tls)
        self.devices = [self._device(i) for i in self.indices]
        self.load = LoadStats()
        self.crash_rates: dict[str, float] = {v: b.crash_per_device_minute / 60.0 for v, b in scn.bundles.items()
                                              if b.crash_per_device_minute}
        self.inference_crash: dict[str, float] = {v: b.crash_per_inference for v, b in scn.bundles.items()
                                                  if b.crash_per_inference}
        self.label_flip: dict[str, float] = {v: b.accuracy_drop for v, b in scn.bundles.items() if b.accuracy_drop}
        self.injected = {"crashes": 0, "inference_crashes": 0, "labels_flipped": 0}
        self.agent_errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pool: ThreadPoolExecutor | None = None
        self._faults_armed_at: float | None = None

    def _device(self, i: int) -> SimDevice:
        f, fa = self.scn.fleet, self.scn.faults
        link = Link(drop=fa.http_drop, rng=random.Random(self.rng.random()))
        if self.rng.random() < fa.slow_fraction:
            link.latency_s, link.bytes_per_s = fa.slow_latency_ms / 1e3, fa.slow_kbps * 1000 / 8
        hw = f.hardware_ids[i % len(f.hardware_ids)]
        dev_id = f"{f.id_prefix}-{i:05d}"
        return SimDevice(dev_id, hw, self.state_root / dev_id, link)

    # ---- enrollment and boot --------------------------------------------------------------------------
    def _config(self, dev: SimDevice) -> Any:
        from device_agent.config import config_from_dict

        f = self.scn.fleet
        return config_from_dict({
            "device_id": dev.device_id, "hardware_id": dev.hardware_id, "state_dir": str(dev.state_dir),
            "server": {"url": self.server_url, "poll_interval_s": float(f.poll_interval_s),
                       **({"ca_file": self.ca_file} if self.ca_file else {})},
            "trust": {"image_root": str(self.keys.root_path), "director_root": str(self.keys.director_root_path)},
            "trial": {"period_s": f.trial_s, "max_crashes": f.trial_max_crashes,
                      "health_interval_s": max(1.0, f.trial_s)},
            "limits": {"backoff_initial_s": 1.0, "backoff_max_s": 10.0, "download_deadline_s": 120.0},
            "telemetry": {"window_s": f.window_s},
            # what the broker acknowledged but the server never committed (an injected drop) is sent again after
            # three check-ins, not after the production default of 5 minutes: the gates wait for that data
            "mqtt": {"keepalive_s": 60, "publish_timeout_s": 15.0, "resend_s": max(10.0, 3 * float(f.poll_interval_s))},
        }, source=f"fleet-sim:{dev.device_id}")

    def _enroll(self, dev: SimDevice, token: str) -> None:
        """What ``edgepack-agent enroll`` does: the real enrollment call, credential and broker password 0600."""
        from device_agent import AGENT_VERSION
        from device_agent.connection import save_enrollment
        from device_agent.server import ServerClient
        from device_agent.steps import platform_name

        client = ServerClient(self.server_url, self.http, timeout_s=60)
        answer = client.enroll(token, {"device_id": dev.device_id, "hardware_id": dev.hardware_id,
                                       "platform": platform_name(), "agent_version": AGENT_VERSION,
                                       "runtimes": {k: v.split(" ")[-1] for k, v in self.runtimes.items()},
                                       "tags": {"fleet": self.scn.name}})
        save_enrollment(self._config(dev), answer)

    def _boot(self, dev: SimDevice) -> None:
        from device_agent.connection import mqtt_settings
        from device_agent.machine import Agent

        config = self._config(dev)
        enrollment = json.loads((dev.state_dir / "enrollment.json").read_bytes())
        m = mqtt_settings(config, enrollment)  # the device's broker account, TLS pinned to the CA
        assert m is not None, "the server gave no broker"
        publisher = LoopedMqttPublisher(m.url, dev.device_id, self.mqtt_loop, keepalive_s=60, username=m.username,
                                        password=m.password, client_id=m.client_id, ca_file=m.ca_file)
        dev.publisher = FaultyPublisher(publisher, dev.link)
        dev.supervisor = InProcessSupervisor(dev.state_dir / "bundles", self.cache,
                                             max_input_dims=config.telemetry.max_input_dims,
                                             restart_backoff_max_s=5.0)
        dev.agent = Agent(config, transport=FaultyTransport(self.http, dev.link), publisher=dev.publisher,
                          supervisor=dev.supervisor, runtimes=self.runtimes)
        dev.agent.boot()

    def enroll_and_boot(self, token: str) -> float:
        """Enroll every device (in parallel), then boot its agent; returns the seconds it took."""
        t0 = time.monotonic()
        with ThreadPoolExecutor(self.scn.fleet.enroll_threads, thread_name_prefix="enroll") as pool:
            list(pool.map(lambda d: self._enroll(d, token), self.devices))
            list(pool.map(self._boot, self.devices))
        return time.monotonic() - t0

    # ---- running ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.scn.fleet.step_threads, thread_name_prefix="step")
        self._threads = [threading.Thread(target=self._schedule, name="scheduler", daemon=True),
                         threading.Thread(target=self._faults, name="faults", daemon=True)]
        bodies = _requests(self.scn.fleet.batch, self.scn.seed)
        for i in range(self.scn.fleet.load_threads):
            self._threads.append(threading.Thread(target=self._users, args=(i, bodies), name=f"users-{i}",
                                                  daemon=True))
        for t in self._threads:
            t.start()

    def arm_faults(self) -> None:
        """Offline periods are placed from now on (the first rollout's start)."""
        fa = self.scn.faults
        now = time.monotonic()
        self._faults_armed_at = now
        for dev in self.devices:
            if self.rng.random() < fa.offline_fraction:
                dev.offline_at = now + self.rng.uniform(*fa.offline_start_s)

    @staticmethod
    def _ready(dev: SimDevice) -> bool:
        return bool(dev.agent.ready())

    def _schedule(self) -> None:
        assert self._pool is not None
        while not self._stop.wait(TICK_S):
            for dev in self.devices:
                if not dev.busy and self._ready(dev):
                    dev.busy = True
                    self._pool.submit(self._step, dev)

    def _step(self, dev: SimDevice) -> None:
        try:
            for _ in range(20):  # an update's steps back to back, while they do not block
                if self._stop.is_set() or not self._ready(dev):
                    break
                dev.agent.step()
                dev.steps += 1
        except Exception:
            if len(self.agent_errors) < 20:
                self.agent_errors.append(f"{dev.device_id}: {traceback.format_exc(limit=6)}")
            log.exception("agent %s step failed", dev.device_id)
            time.sleep(1.0)
        finally:
            dev.busy = False

    def _faults(self) -> None:
        fa = self.scn.faults
        base = fa.crash_per_device_hour / 3600.0
        drops = fa.mqtt_drops_per_device_hour / 3600.0
        while not self._stop.wait(FAULT_TICK_S):
            if self._faults_armed_at is None:
                continue
            now = time.monotonic()
            for dev in self.devices:
                sup = dev.supervisor
                serving = sup.serving if sup is not None else None
                rate = base + (self.crash_rates.get(serving.ref.version, 0.0)
                               if serving is not None and serving.ref is not None else 0.0)
                if rate and self.rng.random() < rate * FAULT_TICK_S and sup is not None and sup.crash():
                    self.injected["crashes"] += 1
                if drops and dev.publisher is not None and self.rng.random() < drops * FAULT_TICK_S:
                    dev.publisher.drop_connection()
                if dev.offline_at is not None and now >= dev.offline_at:
                    dev.offline_at = None
                    dev.link.offline_until = now + fa.offline_s
                    dev.link.count("offline_periods")
                    if dev.publisher is not None:
                        dev.publisher.go_offline()
                elif dev.publisher is not None and dev.publisher._down and not dev.link.offline() \
                        and dev.link.offline_until:
                    dev.publisher.go_online()

    def _users(self, index: int, bodies: list[tuple[bytes, list[str]]]) -> None:
        f = self.scn.fleet
        rng = random.Random(self.scn.seed * 1000 + index)
        mine = self.devices[index::f.load_threads]
        rate = f.requests_per_s * len(mine)  # calls per second for this thread
        if rate <= 0 or not mine:
            return
        i, next_at = 0, time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now < next_at:
                self._stop.wait(min(0.1, next_at - now))
                continue
            next_at = max(next_at + 1.0 / rate, now - 1.0)  # never more than a second of backlog
            dev = mine[i % len(mine)]
            i += 1
            if dev.supervisor is None or dev.supervisor.serving is None:
                continue
            self._use(dev, *bodies[rng.randrange(len(bodies))], rng)

    def _serving_version(self, dev: SimDevice) -> str | None:
        sup = dev.supervisor
        serving = sup.serving if sup is not None else None
        return serving.ref.version if serving is not None and serving.ref is not None else None

    def _labelled(self, dev: SimDevice) -> bool:
        """Whether this device's users send labels at all (stable per device: label sparsity)."""
        share = self.scn.fleet.labelled_devices
        return share >= 1 or random.Random(f"{self.scn.seed}:{dev.device_id}").random() < share

    def _use(self, dev: SimDevice, body: bytes, labels: list[str], rng: random.Random) -> None:
        version = self._serving_version(dev)
        crash_p = self.inference_crash.get(version or "", 0.0)
        if crash_p and rng.random() < crash_p and dev.supervisor is not None and dev.supervisor.crash():
            with self.load.lock:
                self.injected["inference_crashes"] += 1
            return  # the call that killed the worker gets no answer
        status, answer = dev.agent.predict(body)
        load = self.load
        if status != 200:
            with load.lock:
                load.calls += 1
                load.errors += 1
            return
        with load.lock:
            load.calls += 1
            load.ok += 1
        if rng.random() >= self.scn.fleet.feedback or not self._labelled(dev):
            return
        pid = json.loads(answer)["prediction_id"]
        flip = self.label_flip.get(version or "", 0.0)
        if flip:  # a graded regression: this share of labels is replaced by a wrong one
            flipped = [str((int(t) + 1) % 10) if rng.random() < flip else t for t in labels]
            with self.load.lock:
                self.injected["labels_flipped"] += sum(a != b for a, b in zip(flipped, labels, strict=True))
            labels = flipped
        status, ans = dev.agent.feedback(json.dumps({"prediction_id": pid, "label": labels}).encode())
        if status == 200:
            correct = sum(json.loads(ans)["correct"])
            with load.lock:
                load.feedback += len(labels)
                load.correct += correct

    # ---- observing and stopping --------------------------------------------------------------------------
    def versions(self) -> dict[str, int]:
        """Devices per serving version (``none`` before the first bundle)."""
        out: dict[str, int] = {}
        for dev in self.devices:
            ref = dev.agent.record.serving() if dev.agent is not None else None
            key = ref.version if ref is not None else "none"
            out[key] = out.get(key, 0) + 1
        return out

    def settled(self, version: str, rollout_state: str) -> bool:
        """Every device idle, and every reachable one where the rollout's end sends it: on ``version`` after a
        completed rollout, off it after a rollback."""
        for dev in self.devices:
            if dev.agent is None:
                continue
            if dev.agent.record.state.value != "idle":
                return False
            ref = dev.agent.record.serving()
            on_target = ref is not None and ref.version == version
            if rollout_state == "rolled_back" and on_target:
                return False
            if rollout_state == "completed" and not on_target and not dev.link.offline():
                return False
        return True

    def states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for dev in self.devices:
            if dev.agent is not None:
                s = dev.agent.record.state.value
                out[s] = out.get(s, 0) + 1
        return out

    def fault_counts(self) -> dict[str, int]:
        total: dict[str, int] = {"crashes_injected": self.injected["crashes"],
                                 "inference_crashes_injected": self.injected["inference_crashes"],
                                 "labels_flipped": self.injected["labels_flipped"]}
        for dev in self.devices:
            for k, v in dev.link.counts.items():
                total[k] = total.get(k, 0) + v
        total["slow_devices"] = sum(1 for d in self.devices if d.link.bytes_per_s)
        return total

    def published(self) -> int:
        """Telemetry messages the devices' brokers acknowledged so far (all devices)."""
        return sum(d.agent.telemetry.published for d in self.devices if d.agent is not None)

    def report(self) -> dict[str, Any]:
        """Everything the summary needs from this (part of the) fleet, as plain data."""
        load = self.load
        return {"load": {"calls": load.calls, "ok": load.ok, "errors": load.errors, "feedback": load.feedback,
                         "correct": load.correct},
                "faults": self.fault_counts(),
                "sessions": {"loaded": self.cache.sessions, "device_loads": self.cache.hits},
                "agent_errors": list(self.agent_errors)}

    def telemetry_backlog(self) -> int:
        return sum(len(d.agent.telemetry.outbox) for d in self.devices if d.agent is not None)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for dev in self.devices:
            if dev.agent is not None:
                dev.agent.stop()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda d: d.agent.close() if d.agent is not None else None, self.devices))
        self.mqtt_loop.close()
