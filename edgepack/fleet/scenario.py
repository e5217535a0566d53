"""Scenario files: one TOML file describes a simulated run (fleet, server, faults, bundles, rollouts).

Read once into a frozen :class:`Scenario`; unknown keys and wrong types are refused with the key's name,
what was found and what is allowed, so a typo never silently becomes a default. See
``examples/fleet/smoke.toml`` for a commented example of every table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib


class ScenarioError(ValueError):
    """The scenario file is wrong; the message names the key and what to write instead."""


@dataclass(frozen=True)
class FleetSpec:
    devices: int = 50
    id_prefix: str = "sim"
    hardware_ids: tuple[str, ...] = ("x86-kiosk",)
    """Assigned round robin; each must be one the bundles are signed for."""
    processes: int = 1
    """Processes the devices are spread over (each runs its share with its own threads)."""
    step_threads: int = 16
    """Threads (per process) stepping the agents' state machines (the devices share them)."""
    load_threads: int = 1
    """Threads sending predictions and feedback to the devices."""
    enroll_threads: int = 8
    poll_interval_s: int = 5
    """The server's poll interval (handed to devices at enrollment and check-in)."""
    window_s: float = 3.0
    """Telemetry window of every device."""
    trial_s: float = 2.0
    trial_max_crashes: int = 0
    requests_per_s: float = 0.2
    """Prediction calls per device per second (each carries ``batch`` images)."""
    batch: int = 8
    feedback: float = 1.0
    """Fraction of predictions that get their true label back (label sparsity)."""
    labelled_devices: float = 1.0
    """Fraction of devices whose users send labels at all (the others never do: sparse labels per device)."""
    state_dir: str = ""
    """Where the devices' state directories go; empty = a fresh directory on /dev/shm (tmpfs) if present."""


@dataclass(frozen=True)
class ServerSpec:
    database: str = "sqlite"
    """``sqlite`` (a fresh file), ``postgresql`` (a fresh database on 127.0.0.1:5432) or a SQLAlchemy URL."""
    broker: str = "private"
    """``private`` (a mosquitto of the run's own) or ``mqtt://host:port``."""
    gate_interval_s: float = 0.5
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Extra update-server settings (``EDGEPACK_<NAME>``), e.g. ``ingest_flush_s``."""


@dataclass(frozen=True)
class FaultSpec:
    crash_per_device_hour: float = 0.0
    """Background worker crashes of every device, whatever it serves."""
    http_drop: float = 0.0
    """Probability that one HTTP request's connection is dropped (the agent sees a network error)."""
    mqtt_drops_per_device_hour: float = 0.0
    """Broker connections cut abruptly (paho reconnects by itself)."""
    slow_fraction: float = 0.0
    """Fraction of devices on a slow link."""
    slow_latency_ms: float = 200.0
    slow_kbps: float = 256.0
    offline_fraction: float = 0.0
    """Fraction of devices that go offline (no HTTP, no MQTT) once during the run."""
    offline_s: float = 20.0
    offline_start_s: tuple[float, float] = (5.0, 60.0)
    """Offline periods start at a uniformly random time in this range (seconds after the first rollout)."""


@dataclass(frozen=True)
class BundleSpec:
    version: str
    release_counter: int
    quality: str = "good"
    """``good`` or ``bad`` (a real model trained on shuffled labels: near-chance accuracy)."""
    file: str = ""
    """A signed ``.edgepack`` to use instead of building one (signed with the scenario's ``keys``)."""
    crash_per_device_minute: float = 0.0
    """Extra worker crashes of a device while it serves this bundle (a crashing build)."""
    crash_per_inference: float = 0.0
    """Probability that one prediction call on this bundle kills the device's worker."""
    accuracy_drop: float = 0.0
    """Graded regression: this share of the labels sent back for this bundle's predictions is replaced by a
    wrong one, so its measured accuracy is about this much lower (0.05: about 5 points; exactly
    ``accuracy_drop * (accuracy - (1 - accuracy) / 9)``)."""


@dataclass(frozen=True)
class RolloutPlan:
    bundle: str
    phases: tuple[float, ...] = (1.0, 10.0, 50.0, 100.0)
    min_soak_s: float = 5.0
    phase_soak_s: tuple[float, ...] = ()
    """Soak time of each phase, overriding ``min_soak_s`` (the first phase usually needs longer: few devices
    must gather enough labelled predictions for the accuracy gates to have data before it advances)."""
    min_reporting: float = 0.9
    """Fraction of each phase's (cumulative) devices that must report on the target before advancing."""
    gates: Mapping[str, Any] = field(default_factory=dict)
    """Gate thresholds (server names, e.g. ``min_accuracy``); the string ``"off"`` turns a gate off."""
    allow_unproven: tuple[str, ...] = ()
    """The no-data policy: gates that may lack data (or an undecided interval) when a phase advances.
    Empty (the default): every configured gate must have its data, a phase waits otherwise."""
    canary_devices: int = 1
    """The first phase holds at least this many devices."""
    on_breach: str = "rollback"
    timeout_s: float = 300.0
    settle_s: float = 30.0
    """After the rollout ends, wait up to this long for devices to finish updating or rolling back."""
    expect: str = ""
    """Expected final state (``completed``, ``rolled_back``, ``halted``); empty = no expectation."""
    expect_gate: str = ""
    """The gate that must have halted it (``accuracy``, ``crash_rate``, ...)."""
    expect_halt_phase: int | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    fleet: FleetSpec
    server: ServerSpec
    faults: FaultSpec
    bundles: Mapping[str, BundleSpec]
    rollouts: tuple[RolloutPlan, ...]
    model: str = "digits"
    seed: int = 0
    keys: str = ""
    """Key directory (``edgepack keys init``); empty = a fresh one for the run (needed for built bundles)."""
    source: str = "<dict>"


_STATES = ("completed", "rolled_back", "halted", "aborted")
_GATES = ("max_install_failure_rate", "max_crash_rate", "max_error_rate", "min_accuracy", "max_accuracy_drop",
          "max_p95_latency_regression", "min_requests", "min_feedback", "false_halt_rate", "margin_error_rate",
          "margin_accuracy", "margin_accuracy_drop", "margin_p95_latency_regression")
_GATE_NAMES = ("install_failure_rate", "crash_rate", "error_rate", "accuracy", "accuracy_drop",
               "p95_latency_regression", "input_drift")


def _table(cls: type, raw: Any, where: str, **fixed: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"[{where}] must be a table, found {type(raw).__name__}")
    known = {f.name: f for f in fields(cls) if f.name not in fixed}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ScenarioError(f"[{where}] has unknown key(s) {unknown}; known: {sorted(known)}")
    values: dict[str, Any] = dict(fixed)
    for name, value in raw.items():
        f = known[name]
        default = f.default if f.default is not MISSING else None
        values[name] = _coerce(value, default, f"[{where}] {name}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ScenarioError(f"[{where}] is incomplete: {exc}") from exc


def _coerce(value: Any, default: Any, what: str) -> Any:
    if isinstance(default, bool) or default is None or isinstance(default, Mapping) or isinstance(value, Mapping):
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ScenarioError(f"{what} must be a number, found {value!r}")
        if value < 0:
            raise ScenarioError(f"{what} must not be negative, found {value!r}")
        if isinstance(default, int) and not isinstance(default, bool):
            if int(value) != value:
                raise ScenarioError(f"{what} must be a whole number, found {value!r}")
            return int(value)
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ScenarioError(f"{what} must be a string, found {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise ScenarioError(f"{what} must be a list, found {value!r}")
        sample = default[0] if default else None
        return tuple(_coerce(v, sample, what) if sample is not None else v for v in value)
    return value


def _check(scn: Scenario) -> None:
    try:
        from update_server.settings import Settings
    except ImportError:  # without the server extra the simulator cannot run anyway
        Settings = None  # type: ignore[assignment,misc]
    unknown = sorted(set(scn.server.settings) - set(Settings.model_fields)) if Settings is not None else []
    if unknown:
        raise ScenarioError(f"[server] settings has unknown key(s) {unknown}; known: {sorted(Settings.model_fields)}")
    f = scn.fleet
    if min(f.devices, f.processes, f.step_threads, f.load_threads, f.batch) < 1:
        raise ScenarioError("[fleet] devices, processes, step_threads, load_threads and batch must be at least 1")
    if not f.hardware_ids:
        raise ScenarioError("[fleet] hardware_ids must name at least one hardware id")
    if f.poll_interval_s < 1:
        raise ScenarioError("[fleet] poll_interval_s must be at least 1 (the server counts whole seconds)")
    for name in ("feedback", "labelled_devices"):
        if not 0 <= getattr(f, name) <= 1:
            raise ScenarioError(f"[fleet] {name} is a fraction between 0 and 1, found {getattr(f, name)}")
    fa = scn.faults
    for name in ("http_drop", "slow_fraction", "offline_fraction"):
        if not 0 <= getattr(fa, name) <= 1:
            raise ScenarioError(f"[faults] {name} is a fraction between 0 and 1, found {getattr(fa, name)}")
    if len(fa.offline_start_s) != 2 or fa.offline_start_s[0] > fa.offline_start_s[1]:
        raise ScenarioError(f"[faults] offline_start_s must be [earliest, latest], found {list(fa.offline_start_s)}")
    if not scn.bundles:
        raise ScenarioError("[bundles] must name at least one bundle version")
    counters = [b.release_counter for b in scn.bundles.values()]
    if len(set(counters)) != len(counters):
        raise ScenarioError(f"[bundles] release counters must differ, found {counters}")
    for b in scn.bundles.values():
        if b.quality not in ("good", "bad"):
            raise ScenarioError(f"[bundles.\"{b.version}\"] quality must be good or bad, found {b.quality!r}")
        for name in ("crash_per_inference", "accuracy_drop"):
            if not 0 <= getattr(b, name) <= 1:
                raise ScenarioError(f"[bundles.\"{b.version}\"] {name} is a fraction between 0 and 1, "
                                    f"found {getattr(b, name)}")
        if b.file and not scn.keys:
            raise ScenarioError(f"[bundles.\"{b.version}\"] file needs the top-level `keys` that signed it")
    if not scn.rollouts:
        raise ScenarioError("the scenario has no [[rollout]]; add at least one")
    for i, r in enumerate(scn.rollouts):
        where = f"[[rollout]] #{i + 1} ({r.bundle})"
        if r.bundle not in scn.bundles:
            raise ScenarioError(f"{where}: bundle {r.bundle!r} is not in [bundles] ({sorted(scn.bundles)})")
        if not r.phases or r.phases[-1] != 100 or any(b <= a for a, b in zip(r.phases, r.phases[1:], strict=False)) \
                or r.phases[0] <= 0:
            raise ScenarioError(f"{where}: phases must grow strictly from above 0 to 100, found {list(r.phases)}")
        if r.phase_soak_s and (len(r.phase_soak_s) != len(r.phases)
                               or any(not isinstance(x, (int, float)) or x < 0 for x in r.phase_soak_s)):
            raise ScenarioError(f"{where}: phase_soak_s needs one number >= 0 per phase ({len(r.phases)}), "
                                f"found {list(r.phase_soak_s)}")
        if not 0 <= r.min_reporting <= 1:
            raise ScenarioError(f"{where}: min_reporting is a fraction, found {r.min_reporting}")
        if r.expect and r.expect not in _STATES:
            raise ScenarioError(f"{where}: expect must be one of {_STATES}, found {r.expect!r}")
        if r.on_breach not in ("rollback", "halt"):
            raise ScenarioError(f"{where}: on_breach must be rollback or halt, found {r.on_breach!r}")
        bad = sorted(set(r.gates) - set(_GATES))
        if bad:
            raise ScenarioError(f"{where}: unknown gate(s) {bad}; known: {list(_GATES)}")
        bad = sorted({str(g) for g in r.allow_unproven} - set(_GATE_NAMES))
        if bad:
            raise ScenarioError(f"{where}: allow_unproven names unknown gate(s) {bad}; known: {list(_GATE_NAMES)}")
        if r.canary_devices < 1:
            raise ScenarioError(f"{where}: canary_devices must be at least 1, found {r.canary_devices}")


def scenario_from_dict(doc: Mapping[str, Any], *, source: str = "<dict>", base: Path | None = None) -> Scenario:
    top = {"name", "seed", "model", "keys", "fleet", "server", "faults", "bundles", "rollout"}
    unknown = sorted(set(doc) - top)
    if unknown:
        raise ScenarioError(f"{source}: unknown top-level key(s) {unknown}; known: {sorted(top)}")
    raw_bundles = doc.get("bundles") or {}
    if not isinstance(raw_bundles, Mapping):
        raise ScenarioError("[bundles] must be a table of version = {release_counter = N, ...}")
    bundles = {str(v): _table(BundleSpec, spec, f'bundles."{v}"', version=str(v)) for v, spec in raw_bundles.items()}
    if base is not None:
        bundles = {v: b if not b.file or Path(b.file).is_absolute() else
                   BundleSpec(**{**b.__dict__, "file": str(base / b.file)}) for v, b in bundles.items()}
    raw_rollouts = doc.get("rollout") or []
    if not isinstance(raw_rollouts, list):
        raise ScenarioError("rollouts are written as [[rollout]] tables")
    rollouts = tuple(_table(RolloutPlan, r, f"rollout #{i + 1}") for i, r in enumerate(raw_rollouts))
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ScenarioError(f"{source}: seed must be a whole number, found {seed!r}")
    keys = str(doc.get("keys", ""))
    if keys and base is not None and not Path(keys).is_absolute():
        keys = str(base / keys)
    scn = Scenario(name=str(doc.get("name", "fleet")), fleet=_table(FleetSpec, doc.get("fleet"), "fleet"),
                   server=_table(ServerSpec, doc.get("server"), "server"),
                   faults=_table(FaultSpec, doc.get("faults"), "faults"), bundles=bundles, rollouts=rollouts,
                   model=str(doc.get("model", "digits")), seed=seed, keys=keys, source=source)
    _check(scn)
    return scn


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; relative paths in it are relative to the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ScenarioError(f"cannot read the scenario file {path}: {exc.strerror}") from exc
    try:
        doc = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{path} is not valid TOML: {exc}") from exc
    return scenario_from_dict(doc, source=str(path), base=path.parent)


def gate_values(plan: RolloutPlan) -> dict[str, Any]:
    """The rollout's gates as the server's API takes them (``"off"`` -> null), with the no-data policy."""
    gates: dict[str, Any] = {k: (None if v == "off" else v) for k, v in plan.gates.items()}
    if plan.allow_unproven:
        gates["allow_unproven"] = list(plan.allow_unproven)
    return gates
