"""Model health, read side: the aggregates the dashboard and ``/metrics`` show, computed in SQL.

Everything here is bounded for a fleet of 10,000 devices and 50 versions: sums are grouped in the database,
lists are paginated, and the time series read one row per (bucket, target-or-control) at the minute
resolution for ranges up to six hours and the hour resolution beyond (``services.health``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from update_server.drift import InputDrift, Reference, compare, worst_per_row
from update_server.models import (
    HIST_DTYPE,
    LATENCY_BOUNDS_MS,
    LATENCY_COLUMNS,
    Bundle,
    Device,
    DeviceDrift,
    DriftReference,
    GateSample,
    Rollout,
    VersionHealth,
)
from update_server.rollout_policy import percentile_from_histogram
from update_server.services.health import HOUR, MINUTE, bucket_start

if TYPE_CHECKING:
    from update_server.context import ServerContext

VH = VersionHealth
SCALARS = ("windows", "requests", "errors", "crashes", "feedback_count", "feedback_correct")


def _sum(col: Any) -> Any:
    return func.coalesce(func.sum(col), 0)


_CACHE: dict[tuple[Any, ...], tuple[float, Any]] = {}
_CACHE_LOCK = threading.Lock()


def cached(key: tuple[Any, ...], ttl_s: float, compute: Callable[[], Any]) -> Any:
    """``compute()``, reused for ``ttl_s`` seconds per key in this process (0: always computed). Drift reads many
    JSON histograms and moves slowly, so the gate loop, ``/metrics`` and the pages share one result a while.
    Keys start with the database URL: two servers in one process (tests) never share entries."""
    if ttl_s <= 0:
        return compute()
    now = time.monotonic()
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None and now - hit[0] < ttl_s:
        return hit[1]
    value = compute()
    with _CACHE_LOCK:
        if len(_CACHE) > 2000:
            _CACHE.clear()
        _CACHE[key] = (now, value)
    return value


@dataclass
class Point:
    """Sums over one display step."""

    at: datetime
    windows: int = 0
    requests: int = 0
    errors: int = 0
    crashes: int = 0
    feedback_count: int = 0
    feedback_correct: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * len(LATENCY_COLUMNS))

    def add(self, row: Any) -> None:
        for name in SCALARS:
            setattr(self, name, getattr(self, name) + int(getattr(row, name)))
        self.latency = [a + int(getattr(row, c)) for a, c in zip(self.latency, LATENCY_COLUMNS, strict=True)]

    @property
    def accuracy(self) -> float | None:
        return self.feedback_correct / self.feedback_count if self.feedback_count else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def crash_rate(self) -> float | None:
        """Crashes per 1,000 requests (a crash is rare and a window may have no requests)."""
        return 1000.0 * self.crashes / self.requests if self.requests else None

    def latency_q(self, q: float) -> float | None:
        return percentile_from_histogram(self.latency, q, LATENCY_BOUNDS_MS)


def choose_resolution(span: timedelta) -> int:
    return MINUTE if span <= timedelta(hours=6) else HOUR


def version_series(session: Session, name: str, version: str, since: datetime, now: datetime,
                   points: int = 96) -> tuple[list[Point], list[Point], int]:
    """(target, control, step seconds): the version's sums per step and those of every other version of the
    same model over the same time (the fleet still on other versions is the control group)."""
    res = choose_resolution(now - since)
    step = max(res, int((now - since).total_seconds() / points) // res * res)
    is_target = case((VH.bundle_version == version, 1), else_=0)
    stmt = (select(VH.bucket_start, is_target.label("target"), *[_sum(getattr(VH, c)).label(c)
                                                                for c in (*SCALARS, *LATENCY_COLUMNS)])
            .where(VH.bundle_name == name, VH.resolution == res, VH.bucket_start >= bucket_start(since, res))
            .group_by(VH.bucket_start, is_target).order_by(VH.bucket_start))
    start = bucket_start(since, step)
    n = int((now - start).total_seconds() // step) + 1
    target = [Point(start + timedelta(seconds=i * step)) for i in range(n)]
    control = [Point(p.at) for p in target]
    for row in session.execute(stmt):
        i = int((row.bucket_start - start).total_seconds() // step)
        if 0 <= i < n:
            (target if row.target else control)[i].add(row)
    return target, control, step


def class_histogram(session: Session, name: str, version: str, since: datetime) -> dict[str, int]:
    out: dict[str, int] = {}
    for (classes,) in session.execute(select(VH.classes).where(
            VH.bundle_name == name, VH.bundle_version == version, VH.resolution == HOUR,
            VH.bucket_start >= bucket_start(since, HOUR))):
        for label, count in (classes or {}).items():
            out[label] = out.get(label, 0) + int(count)
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


# ---- drift ---------------------------------------------------------------------------------------------
def version_drift(session: Session, name: str, version: str, since: datetime | None,
                  min_samples: int, *, ttl_s: float = 0.0) -> InputDrift:
    """The version's input drift from hour buckets since ``since`` (None: all time), cached ``ttl_s``."""
    start = bucket_start(since, HOUR) if since is not None else None
    key = ("version_drift", str(session.get_bind().engine.url), name, version, start, min_samples)
    result: InputDrift = cached(key, ttl_s, lambda: _version_drift(session, name, version, start, min_samples))
    return result


def _version_drift(session: Session, name: str, version: str, since: datetime | None,
                   min_samples: int) -> InputDrift:
    ref = session.get(DriftReference, (name, version))
    if ref is None:
        return InputDrift(None, 0, reason="reference profile not loaded yet")
    stmt = select(VH.input_profile, VH.input_samples, VH.input_hist).where(
        VH.bundle_name == name, VH.bundle_version == version, VH.resolution == HOUR, VH.input_hist.is_not(None))
    if since is not None:
        stmt = stmt.where(VH.bucket_start >= since)
    if ref.profile is None:
        return compare(None, None, 0, min_samples)
    arrays = Reference.of(ref.profile)
    total: np.ndarray | None = None
    samples = 0
    for profile, n, hist in session.execute(stmt):
        counts = _counts(arrays, hist) if profile == ref.digest else None
        if counts is not None:
            total = counts if total is None else total + counts
            samples += int(n)
    return compare(ref.profile, total, samples, min_samples, ref=arrays)


def _counts(ref: Reference, stored: bytes | None) -> np.ndarray | None:
    """Stored drift counts as an array, None when empty or not of this profile's layout."""
    if not stored:
        return None
    counts = np.frombuffer(stored, dtype=HIST_DTYPE)
    return counts if counts.size == ref.width else None


def drift_over(session: Session, name: str, version: str, since: datetime, min_samples: int, *,
               ttl_s: float = 0.0) -> tuple[InputDrift, list[tuple[datetime, float | None]]]:
    """The version's drift over the whole range, and the worst-feature PSI of each hour bucket on its own (how
    the drift moves over time), from one read of the hour buckets; cached ``ttl_s``."""
    start = bucket_start(since, HOUR)
    key = ("drift_over", str(session.get_bind().engine.url), name, version, start, min_samples)
    result: tuple[InputDrift, list[tuple[datetime, float | None]]] = cached(
        key, ttl_s, lambda: _drift_over(session, name, version, start, min_samples))
    return result


def _drift_over(session: Session, name: str, version: str, since: datetime,
                min_samples: int) -> tuple[InputDrift, list[tuple[datetime, float | None]]]:
    ref = session.get(DriftReference, (name, version))
    if ref is None or ref.profile is None:
        return compare(None, None, 0, min_samples) if ref is not None else InputDrift(
            None, 0, reason="reference profile not loaded yet"), []
    arrays = Reference.of(ref.profile)
    rows = session.execute(select(VH.bucket_start, VH.input_profile, VH.input_samples, VH.input_hist).where(
        VH.bundle_name == name, VH.bundle_version == version, VH.resolution == HOUR,
        VH.bucket_start >= bucket_start(since, HOUR), VH.input_hist.is_not(None)).order_by(VH.bucket_start))
    times, counts, samples = [], [], []
    for at, profile, n, hist in rows:
        flat = _counts(arrays, hist) if profile == ref.digest else None
        if flat is not None:
            times.append(at)
            counts.append(flat)
            samples.append(int(n))
    if not counts:
        return compare(ref.profile, None, 0, min_samples, ref=arrays), []
    matrix = np.vstack(counts)
    series = list(zip(times, worst_per_row(arrays, matrix, samples, min_samples), strict=True))
    return compare(ref.profile, matrix.sum(axis=0), sum(samples), min_samples, ref=arrays), series


def device_drift(session: Session, device_id: str, min_samples: int) -> list[tuple[str, str, InputDrift]]:
    out = []
    for row in session.scalars(select(DeviceDrift).where(DeviceDrift.device_id == device_id)
                               .order_by(DeviceDrift.last_at.desc())):
        ref = session.get(DriftReference, (row.bundle_name, row.bundle_version))
        counts = _counts(Reference.of(ref.profile), row.input_hist) if ref is not None and ref.profile else None
        drift = (compare(ref.profile, counts, row.input_samples, min_samples)
                 if ref is not None and ref.digest == row.input_profile and counts is not None
                 else InputDrift(None, row.input_samples, reason="reference profile not loaded or different"))
        out.append((row.bundle_name, row.bundle_version, drift))
    return out


def full_versions(session: Session) -> list[tuple[str, str]]:
    """Versions at 100 %: the target of a completed rollout that is still the newest completed one of its model."""
    newest: dict[str, tuple[datetime, str]] = {}
    for model, version, finished in session.execute(select(Rollout.model_name, Rollout.target_version,
                                                           Rollout.finished_at).where(Rollout.state == "completed")):
        if finished is not None and (model not in newest or finished > newest[model][0]):
            newest[model] = (finished, version)
    return sorted((m, v) for m, (_, v) in newest.items())


def drift_alerts(ctx: ServerContext, now: datetime) -> list[dict[str, Any]]:
    """The fleet alert: versions at 100 % whose inputs drifted past ``drift_threshold`` in the recent window
    (cached ``metrics_cache_s``: the overview, the models page and ``/metrics`` share it)."""
    key = ("drift_alerts", str(ctx.engine.url), bucket_start(now, MINUTE))
    result: list[dict[str, Any]] = cached(key, ctx.settings.metrics_cache_s, lambda: _drift_alerts(ctx, now))
    return result


def _drift_alerts(ctx: ServerContext, now: datetime) -> list[dict[str, Any]]:
    from update_server.services.health import ensure_reference

    settings = ctx.settings
    with ctx.sessions() as session, session.begin():
        full = full_versions(session)
        known = {(a, b) for a, b in session.execute(select(DriftReference.bundle_name, DriftReference.bundle_version))}
    for name, version in full:
        if (name, version) not in known:
            ensure_reference(ctx, name, version)
    out = []
    with ctx.sessions() as session, session.begin():
        for name, version in full:
            drift = version_drift(session, name, version, now - timedelta(seconds=settings.drift_window_s),
                                  settings.drift_min_samples)
            out.append({"model": name, "version": version, "drift": drift,
                        "alert": drift.value is not None and drift.value > settings.drift_threshold})
    return out


# ---- fleet ---------------------------------------------------------------------------------------------
def fleet_by_version(session: Session) -> list[tuple[str | None, str | None, str | None, int]]:
    stmt = (select(Device.active_name, Device.active_version, Device.state, func.count())
            .group_by(Device.active_name, Device.active_version, Device.state)
            .order_by(Device.active_name, Device.active_version, Device.state))
    return [(a, b, c, int(n)) for a, b, c, n in session.execute(stmt)]


def version_table(session: Session, since: datetime) -> list[dict[str, Any]]:
    """Every uploaded version with its devices and the sums of its telemetry since ``since``."""
    running = {(a, b): int(n) for a, b, n in session.execute(
        select(Device.active_name, Device.active_version, func.count())
        .group_by(Device.active_name, Device.active_version))}
    sums = {(r.bundle_name, r.bundle_version): r for r in session.execute(
        select(VH.bundle_name, VH.bundle_version, *[_sum(getattr(VH, c)).label(c) for c in SCALARS])
        .where(VH.resolution == HOUR, VH.bucket_start >= bucket_start(since, HOUR))
        .group_by(VH.bundle_name, VH.bundle_version))}
    out = []
    for b in session.execute(select(Bundle.name, Bundle.version, Bundle.release_counter, Bundle.uploaded_at)
                             .order_by(Bundle.name, Bundle.release_counter.desc())):
        s = sums.get((b.name, b.version))
        p = Point(since)
        if s is not None:
            for c in SCALARS:
                setattr(p, c, int(getattr(s, c)))
        out.append({"name": b.name, "version": b.version, "release_counter": b.release_counter,
                    "uploaded_at": b.uploaded_at, "devices": running.get((b.name, b.version), 0), "sums": p})
    return out


def gate_history(session: Session, rollout_id: str, since: datetime, points: int = 120) -> list[GateSample]:
    """The rollout's gate samples since ``since``, thinned to about ``points`` evenly spaced ones (always the
    newest): a week of samples every 30 s is 20,000 rows, and a chart needs a hundred."""
    ids = [i for (i,) in session.execute(select(GateSample.id).where(
        GateSample.rollout_id == rollout_id, GateSample.at >= since).order_by(GateSample.at))]
    if len(ids) > points:
        step = len(ids) / points
        ids = sorted({ids[int(k * step)] for k in range(points)} | {ids[-1]})
    if not ids:
        return []
    return list(session.scalars(select(GateSample).where(GateSample.id.in_(ids)).order_by(GateSample.at)))


# ---- Prometheus: fleet-wide figures from the database ------------------------------------------------------
class FleetCollector:
    """A prometheus-client collector of what lives in the database; cached ``ttl_s`` per process so frequent
    scrapes (or several Prometheus servers) cost one set of queries per interval."""

    def __init__(self, ctx: ServerContext, ttl_s: float = 10.0) -> None:
        self.ctx, self.ttl_s = ctx, ttl_s
        self._cache: tuple[float, list[Any]] | None = None

    def collect(self) -> Iterator[Any]:
        now = time.monotonic()
        if self._cache is None or now - self._cache[0] > self.ttl_s:
            self._cache = (now, self._families())
        yield from self._cache[1]

    def _families(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        ctx = self.ctx
        rollouts = GaugeMetricFamily("edgepack_rollouts", "Rollouts by state", labels=["state"])
        phase = GaugeMetricFamily("edgepack_rollout_phase", "Current phase of each active rollout",
                                  labels=["rollout", "model", "version", "state"])
        gate = GaugeMetricFamily("edgepack_rollout_gate_value", "Each gate's value at the last evaluation",
                                 labels=["rollout", "model", "version", "gate", "status"])
        threshold = GaugeMetricFamily("edgepack_rollout_gate_threshold", "Each gate's threshold",
                                      labels=["rollout", "model", "version", "gate"])
        devices = GaugeMetricFamily("edgepack_devices", "Devices by the model version they run and their state",
                                    labels=["model", "version", "state"])
        metric = {c: CounterMetricFamily(f"edgepack_model_{c}", f"Telemetry sum of {c} per model version",
                                         labels=["model", "version"]) for c in SCALARS}
        latency = HistogramMetricFamily("edgepack_model_latency_ms", "On-device latency per model version (ms)",
                                        labels=["model", "version"])
        drift = GaugeMetricFamily("edgepack_model_input_drift", "Worst-feature PSI of the inputs against the "
                                  "bundle's reference, over drift_window_s", labels=["model", "version"])
        alert = GaugeMetricFamily("edgepack_model_input_drift_alert", "1 when a version at 100 % drifted past "
                                  "drift_threshold", labels=["model", "version"])
        now = ctx.clock()
        with ctx.sessions() as session, session.begin():
            for state, n in session.execute(select(Rollout.state, func.count()).group_by(Rollout.state)):
                rollouts.add_metric([state], n)
            for r in session.scalars(select(Rollout).where(Rollout.state.in_(("running", "paused", "halted")))):
                phase.add_metric([r.id, r.model_name, r.target_version, r.state], r.current_phase)
                for g in (r.last_decision or {}).get("gates", []):
                    labels = [r.id, r.model_name, r.target_version, g["name"]]
                    if g.get("value") is not None:
                        gate.add_metric([*labels, g["status"]], float(g["value"]))
                    if g.get("threshold") is not None:
                        threshold.add_metric(labels, float(g["threshold"]))
            for model, ver, dev_state, n in fleet_by_version(session):
                devices.add_metric([model or "", ver or "", dev_state or ""], n)
            rows = session.execute(select(VH.bundle_name, VH.bundle_version,
                                          *[_sum(getattr(VH, c)).label(c) for c in (*SCALARS, *LATENCY_COLUMNS)])
                                   .where(VH.resolution == HOUR).group_by(VH.bundle_name, VH.bundle_version))
            for row in rows:
                labels = [row.bundle_name, row.bundle_version]
                for c in SCALARS:
                    metric[c].add_metric(labels, int(getattr(row, c)))
                cum, buckets = 0, []
                for bound, col in zip([*LATENCY_BOUNDS_MS, float("inf")], LATENCY_COLUMNS, strict=True):
                    cum += int(getattr(row, col))
                    buckets.append(("+Inf" if bound == float("inf") else str(float(bound)), cum))
                latency.add_metric(labels, buckets, sum_value=0.0)
        for a in drift_alerts(ctx, now):
            if a["drift"].value is not None:
                drift.add_metric([a["model"], a["version"]], a["drift"].value)
            alert.add_metric([a["model"], a["version"]], 1.0 if a["alert"] else 0.0)
        return [rollouts, phase, gate, threshold, devices, *metric.values(), latency, drift, alert]
