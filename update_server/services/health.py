"""Model health, write side: per-version time buckets and per-device drift from telemetry, gate history.

:func:`record_windows` is the ingester's hook (called from ``services.telemetry.write_batch`` in the same
transaction, with the batch's de-duplicated messages only). For each window it adds requests, errors,
crashes, feedback, the latency histogram and the predicted classes to the (model, version, minute) and
(model, version, hour) buckets of ``version_health``, and the input histograms (drift counts,
``bundles.drift``) to the hour bucket and to the device's ``device_drift`` row. Rows are read with
``SELECT ... FOR UPDATE`` in sorted key order, summed in Python and written back, so concurrent ingesters
(replicas) serialize per row and cannot deadlock; SQLite transactions are serialized anyway.

A window's bucket is its ``sent_at`` (clamped to the last week and to now): a device that was offline for
an hour reports into the hour it measured, not the one it reconnected in.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import delete, select, tuple_
from sqlalchemy.orm import Session

from update_server.db import dialect_insert, is_postgres
from update_server.models import HIST_DTYPE, LATENCY_COLUMNS, DeviceDrift, DriftReference, GateSample, VersionHealth

if TYPE_CHECKING:
    from update_server.context import ServerContext
    from update_server.rollout_policy import Decision
    from update_server.services.telemetry import Telemetry

log = logging.getLogger(__name__)

MINUTE, HOUR = 60, 3600
RESOLUTIONS = (MINUTE, HOUR)
MINUTE_RETENTION = timedelta(days=2)
MAX_LATENESS = timedelta(days=7)
MAX_CLASSES = 1000
MAX_DRIFT_FEATURES = 4096
MAX_DRIFT_BINS = 64
MAX_COUNT = 10**12
"""As ``services.telemetry.MAX_COUNT``: a larger count in a window's classes or input histogram is ignored (it
could not be summed into 64-bit storage)."""
SUMS = ("windows", "requests", "errors", "crashes", "feedback_count", "feedback_correct", "input_samples",
        *LATENCY_COLUMNS)


def bucket_start(at: datetime, width: int) -> datetime:
    seconds = int(at.timestamp()) // width * width
    return datetime.fromtimestamp(seconds, timezone.utc)


def _blank(name: str, version: str, resolution: int, start: datetime) -> dict[str, Any]:
    return {"bundle_name": name, "bundle_version": version, "resolution": resolution, "bucket_start": start,
            **{c: 0 for c in SUMS}, "classes": {}, "input_profile": None,
            "input_hist": None}


def parse_hist(stats: Any) -> tuple[str, int, np.ndarray] | None:
    """``input_stats.hist`` of a window as (profile digest, samples, flat counts), or None when absent or
    malformed (a device bug there costs the drift statistics of that window, never the window). The counts are
    flattened feature after feature; the profile (same digest) says where each feature starts."""
    if not isinstance(stats, dict):
        return None
    hist = stats.get("hist")
    if not isinstance(hist, dict):
        return None
    profile, samples, counts = hist.get("profile"), hist.get("samples"), hist.get("counts")
    if not isinstance(profile, str) or not 0 < len(profile) <= 32 or not isinstance(samples, int) or \
            not 0 < samples <= MAX_COUNT:
        return None
    if not isinstance(counts, list) or not 0 < len(counts) <= MAX_DRIFT_FEATURES:
        return None
    for row in counts:
        if not isinstance(row, list) or not 0 < len(row) <= MAX_DRIFT_BINS or \
                not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= MAX_COUNT for c in row):
            return None
    return profile, samples, np.fromiter(itertools.chain.from_iterable(counts), dtype=np.int64)


def _add(stored: bytes | None, more: np.ndarray) -> bytes | None:
    """Stored counts plus ``more``; None when the layouts differ (counts against another profile)."""
    if stored is None or not len(stored):
        return more.astype(HIST_DTYPE).tobytes()
    have = np.frombuffer(stored, dtype=HIST_DTYPE)
    return (have + more).astype(HIST_DTYPE).tobytes() if have.size == more.size else None


def _classes(window: Any) -> dict[str, int]:
    raw = window.predicted_classes
    if not isinstance(raw, dict):
        return {}
    return {str(k)[:64]: int(v) for k, v in list(raw.items())[:MAX_CLASSES]
            if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_COUNT}


def record_windows(session: Session, messages: Sequence[Telemetry], now: datetime) -> None:
    """Add a batch of new telemetry messages to the health buckets and device drift rows (see module doc)."""
    from update_server.services.telemetry import rebucket

    buckets: dict[tuple[str, str, int, datetime], dict[str, Any]] = {}
    devices: dict[tuple[str, str, str], dict[str, Any]] = {}
    for msg in messages:
        ref = msg.target if msg.kind == "event" and msg.target is not None else msg.bundle
        if ref is None or (msg.kind == "event" and msg.event != "crash"):
            continue
        at = min(max(msg.sent_at if msg.sent_at.tzinfo else msg.sent_at.replace(tzinfo=timezone.utc),
                     now - MAX_LATENESS), now)
        rows = []
        for res in RESOLUTIONS:
            key = (ref.name, ref.version, res, bucket_start(at, res))
            rows.append(buckets.setdefault(key, _blank(*key)))
        if msg.kind == "event":
            for row in rows:
                row["crashes"] += 1
            continue
        w = msg.window
        assert w is not None
        latency = rebucket(w.latency_ms)
        classes = _classes(w)
        for row in rows:
            row["windows"] += 1
            row["requests"] += w.requests
            row["errors"] += w.errors
            row["crashes"] += w.crashes
            if w.feedback is not None:
                row["feedback_count"] += w.feedback.count
                row["feedback_correct"] += min(w.feedback.correct, w.feedback.count)
            for col, count in zip(LATENCY_COLUMNS, latency, strict=False):
                row[col] += count
            for label, count in classes.items():
                row["classes"][label] = row["classes"].get(label, 0) + count
        hist = parse_hist(w.input_stats)
        if hist is None:
            continue
        profile, samples, counts = hist
        hour = rows[-1]
        if hour["input_profile"] in (None, profile) and \
                (hour["input_hist"] is None or hour["input_hist"].size == counts.size):
            hour["input_profile"] = profile
            hour["input_samples"] += samples
            hour["input_hist"] = counts if hour["input_hist"] is None else hour["input_hist"] + counts
        dev = devices.setdefault((msg.device_id, ref.name, ref.version), {
            "device_id": msg.device_id, "bundle_name": ref.name, "bundle_version": ref.version,
            "input_profile": profile, "input_samples": 0, "input_hist": None, "first_at": now, "last_at": now})
        if dev["input_profile"] == profile and (dev["input_hist"] is None or dev["input_hist"].size == counts.size):
            dev["input_samples"] += samples
            dev["input_hist"] = counts if dev["input_hist"] is None else dev["input_hist"] + counts
    if buckets:
        _merge_buckets(session, buckets)
    if devices:
        _merge_devices(session, devices)


def _merge_buckets(session: Session, buckets: dict[tuple[str, str, int, datetime], dict[str, Any]]) -> None:
    keys = sorted(buckets)
    table = VersionHealth.__table__
    session.execute(dialect_insert(session, table).on_conflict_do_nothing(
        index_elements=["bundle_name", "bundle_version", "resolution", "bucket_start"]),
        [_blank(*k) for k in keys])
    cols = (VersionHealth.bundle_name, VersionHealth.bundle_version, VersionHealth.resolution,
            VersionHealth.bucket_start)
    stmt = select(VersionHealth).where(tuple_(*cols).in_(keys)).order_by(*cols)
    if is_postgres(session):
        stmt = stmt.with_for_update()
    for row in session.scalars(stmt.execution_options(populate_existing=True)):
        add = buckets[(row.bundle_name, row.bundle_version, row.resolution, row.bucket_start)]
        for col in SUMS:
            setattr(row, col, getattr(row, col) + add[col])
        if add["classes"]:
            classes = dict(row.classes)
            for label, count in add["classes"].items():
                classes[label] = int(classes.get(label, 0)) + count
            row.classes = classes
        if add["input_hist"] is not None and row.input_profile in (None, add["input_profile"]):
            merged = _add(row.input_hist, add["input_hist"])
            if merged is not None:
                row.input_profile, row.input_hist = add["input_profile"], merged
            else:
                row.input_samples -= add["input_samples"]  # not added after all
    session.flush()


def _merge_devices(session: Session, devices: dict[tuple[str, str, str], dict[str, Any]]) -> None:
    keys = sorted(devices)
    session.execute(dialect_insert(session, DeviceDrift.__table__).on_conflict_do_nothing(
        index_elements=["device_id", "bundle_name", "bundle_version"]),
        [{**devices[k], "input_samples": 0, "input_hist": b""} for k in keys])
    cols = (DeviceDrift.device_id, DeviceDrift.bundle_name, DeviceDrift.bundle_version)
    stmt = select(DeviceDrift).where(tuple_(*cols).in_(keys)).order_by(*cols)
    if is_postgres(session):
        stmt = stmt.with_for_update()
    for row in session.scalars(stmt.execution_options(populate_existing=True)):
        add = devices[(row.device_id, row.bundle_name, row.bundle_version)]
        if add["input_hist"] is None:
            continue
        merged = _add(row.input_hist, add["input_hist"]) if row.input_profile == add["input_profile"] else None
        if merged is None:  # the device reports against another profile now: start over
            row.input_profile, row.input_samples = add["input_profile"], 0
            merged = _add(None, add["input_hist"])
        row.input_samples += add["input_samples"]
        row.input_hist = merged or b""
        row.last_at = add["last_at"]
    session.flush()


def prune(session: Session, now: datetime) -> None:
    """Drop minute buckets past their retention (hour buckets stay)."""
    session.execute(delete(VersionHealth).where(VersionHealth.resolution == MINUTE,
                                                VersionHealth.bucket_start < now - MINUTE_RETENTION))


# ---- reference profiles ---------------------------------------------------------------------------------
def ensure_reference(ctx: ServerContext, name: str, version: str) -> DriftReference | None:
    """The version's drift reference, copied from the bundle's ``reference_stats.json`` on first use."""
    import json

    from bundles.drift import DriftProfile
    from update_server.models import Bundle
    from update_server.services.bundles import target_key

    with ctx.sessions() as session, session.begin():
        ref = session.get(DriftReference, (name, version))
        if ref is not None:
            return ref
        bundle = session.scalar(select(Bundle).where(Bundle.name == name, Bundle.version == version))
        if bundle is None:
            return None
        rel = bundle.manifest.get("reference_stats")
        profile: dict[str, Any] | None = None
        digest = None
        if isinstance(rel, str):
            try:
                with ctx.storage.open(target_key(f"{name}/{version}/{rel}")) as fh:
                    data = json.loads(fh.read(16 * 1024 * 1024))
                if isinstance(data, dict) and isinstance(data.get("drift"), dict):
                    parsed = DriftProfile.from_dict(data["drift"])
                    profile, digest = parsed.to_dict(), parsed.digest
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("drift profile of %s %s not usable: %s", name, version, exc)
        session.execute(dialect_insert(session, DriftReference.__table__).values(
            bundle_name=name, bundle_version=version, digest=digest, profile=profile,
            loaded_at=ctx.clock()).on_conflict_do_nothing())
        return DriftReference(bundle_name=name, bundle_version=version, digest=digest, profile=profile,
                              loaded_at=ctx.clock())


# ---- gate evaluations -----------------------------------------------------------------------------------
def record_evaluation(ctx: ServerContext, rollout_id: str, decision: Decision | None, seconds: float) -> None:
    """After the gate loop evaluated a rollout: metrics, and a gate-history sample when one is due."""
    from update_server.models import Rollout
    from update_server.services.rollouts import decision_view

    if decision is None:  # another replica holds it, or it is no longer evaluated
        ctx.metrics.gate_evaluated(None, [], seconds)
        return
    view = decision_view(decision)
    breached = [g["name"] for g in view["gates"] if g["status"] == "breached"]
    ctx.metrics.gate_evaluated(view["verdict"], breached, seconds)
    now = ctx.clock()
    with ctx.sessions() as session, session.begin():
        rollout = session.get(Rollout, rollout_id)
        if rollout is None:
            return
        last = session.scalars(select(GateSample).where(GateSample.rollout_id == rollout_id)
                               .order_by(GateSample.at.desc()).limit(1)).first()
        statuses = [(g["name"], g["status"]) for g in view["gates"]]
        changed = last is None or [(g["name"], g["status"]) for g in last.gates] != statuses \
            or last.verdict != view["verdict"]
        due = last is None or (now - last.at).total_seconds() >= ctx.settings.gate_history_interval_s
        if changed or due:
            session.add(GateSample(rollout_id=rollout_id, at=now, phase=rollout.current_phase,
                                   verdict=view["verdict"], gates=view["gates"]))
    if decision.gates and rollout is not None:
        ensure_reference(ctx, rollout.model_name, rollout.target_version)
