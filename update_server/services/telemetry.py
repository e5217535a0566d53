"""Telemetry ingestion: validate, de-duplicate by message id, aggregate per rollout/phase/version/device.

A batch is written in one transaction: the message ids go into ``telemetry_seen`` with ``ON CONFLICT DO
NOTHING RETURNING`` (so a retry, or the same message reaching two replicas, counts once), then only the
new messages are summed in Python per aggregate key and upserted (``ON CONFLICT DO UPDATE SET x = x +
excluded.x``) in sorted key order, so concurrent replicas take row locks in the same order and cannot
deadlock. Which rollout (and phase) a message belongs to comes from the server's own membership table,
not from the device's claim.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Table, bindparam, insert, select, text
from sqlalchemy.orm import Session

from update_server.db import dialect_insert
from update_server.models import (
    LATENCY_BOUNDS_MS,
    LATENCY_COLUMNS,
    Rollout,
    RolloutDevice,
    TelemetryAggregate,
    TelemetryEvent,
    TelemetrySeen,
    UTCDateTime,
)
from update_server.services.health import record_windows
from update_server.services.membership import ACTIVE

log = logging.getLogger(__name__)

INSTALL_FAILURES = frozenset({"verification_failed", "selftest_failed", "install_failed", "rolled_back"})
EVENTS = frozenset({"downloading", "downloaded", "verified", "verification_failed", "selftest_passed",
                    "selftest_failed", "activated", "committed", "rolled_back", "crash", "install_failed",
                    "update_refused"})
SUM_COLUMNS = ("windows", "requests", "errors", "crashes", "feedback_count", "feedback_correct", "events",
               "install_failures", *LATENCY_COLUMNS)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class BundleRef(_Model):
    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    release_counter: int | None = None
    variant: str | None = None


class Latency(_Model):
    bounds: list[float] = Field(max_length=64)
    counts: list[int] = Field(max_length=65)


class Feedback(_Model):
    count: int = Field(ge=0)
    correct: int = Field(ge=0)


class Window(_Model):
    start: str = Field(max_length=64)  # kept as text: only sums are used, and parsing costs ~5 us a message
    end: str = Field(max_length=64)
    requests: int = Field(ge=0)
    errors: int = Field(ge=0)
    crashes: int = Field(0, ge=0)
    latency_ms: Latency | None = None
    feedback: Feedback | None = None
    predicted_classes: dict[str, Any] | None = None  # checked by services.health (dashboard, drift)
    input_stats: dict[str, Any] | None = None


class Telemetry(_Model):
    """The common envelope plus the event or window part (docs/protocol.md)."""

    schema_: Literal["edgepack.telemetry.v1"] = Field(alias="schema")
    kind: Literal["event", "window"]
    message_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    device_id: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=0)
    sent_at: datetime
    bundle: BundleRef | None = None
    rollout_id: str | None = None
    event: str | None = None
    target: BundleRef | None = None
    detail: dict[str, Any] | None = None
    window: Window | None = None


class Rejected(Exception):
    """A message that is malformed or inconsistent; counted under ``reason`` and dropped."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


def parse(topic: str, payload: bytes, *, prefix: str, max_bytes: int) -> Telemetry:
    """Validate one MQTT message; raises :class:`Rejected`."""
    if len(payload) > max_bytes:
        raise Rejected("oversized", f"{len(payload)} bytes > {max_bytes}")
    parts = topic.split("/")
    base = prefix.split("/")
    if len(parts) != len(base) + 3 or parts[:len(base)] != base or parts[-2] != "telemetry":
        raise Rejected("bad_topic", topic)
    try:
        msg = Telemetry.model_validate_json(payload)
    except ValidationError as exc:
        raise Rejected("malformed", str(exc.errors()[:1])) from None
    if msg.device_id != parts[len(base)]:
        raise Rejected("device_mismatch", f"topic {parts[len(base)]} != payload {msg.device_id}")
    if parts[-1] != msg.kind:
        raise Rejected("kind_mismatch", f"topic {parts[-1]} != payload {msg.kind}")
    if msg.kind == "window" and (msg.window is None or msg.bundle is None):
        raise Rejected("malformed", "a window needs `window` and `bundle`")
    if msg.kind == "event" and msg.event not in EVENTS:
        raise Rejected("malformed", f"unknown event {msg.event!r}")
    return msg


def rebucket(latency: Latency | None) -> list[int]:
    """A latency histogram on the canonical bounds (values are put at their bucket's upper bound)."""
    out = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    if latency is None:
        return out
    if tuple(latency.bounds) == LATENCY_BOUNDS_MS and len(latency.counts) == len(out):
        return [max(0, int(c)) for c in latency.counts]
    for i, count in enumerate(latency.counts):
        upper = latency.bounds[i] if i < len(latency.bounds) else float("inf")
        j = next((k for k, b in enumerate(LATENCY_BOUNDS_MS) if upper <= b), len(LATENCY_BOUNDS_MS))
        out[j] += max(0, int(count))
    return out


@dataclass
class MembershipCache:
    """Device -> {model: (rollout id, phase)} for active rollouts, refreshed incrementally.

    New memberships are read by id (rows are inserted under the ``rollouts`` lock, so ids commit in
    order); the set of active rollouts is re-read each refresh, so a finished rollout stops collecting.
    """

    by_device: dict[str, dict[str, tuple[str, int]]] = field(default_factory=dict)
    active: dict[str, str] = field(default_factory=dict)
    max_id: int = 0

    def refresh(self, session: Session) -> None:
        self.active = {r: m for r, m in session.execute(select(Rollout.id, Rollout.model_name)
                                                        .where(Rollout.state.in_(ACTIVE)))}
        rows = session.execute(select(RolloutDevice.id, RolloutDevice.rollout_id, RolloutDevice.device_id,
                                      RolloutDevice.phase_index, Rollout.model_name).join(Rollout)
                               .where(RolloutDevice.id > self.max_id).order_by(RolloutDevice.id))
        for row_id, rollout_id, device_id, phase, model in rows:
            self.by_device.setdefault(device_id, {})[model] = (rollout_id, phase)
            self.max_id = max(self.max_id, row_id)

    def lookup(self, device_id: str, model: str) -> tuple[str, int]:
        entry = self.by_device.get(device_id, {}).get(model)
        if entry is None or entry[0] not in self.active:
            return "", -1
        return entry


def _key_of(msg: Telemetry) -> tuple[str, str] | None:
    ref = msg.target if msg.kind == "event" and msg.target is not None else msg.bundle
    return None if ref is None else (ref.name, ref.version)


_SEEN_PG = text("INSERT INTO telemetry_seen (message_id, received_at) SELECT unnest(CAST(:ids AS varchar[])), :now "
                "ON CONFLICT DO NOTHING RETURNING message_id").bindparams(bindparam("now", type_=UTCDateTime()))


_AGG_TEXT = ("rollout_id", "device_id", "bundle_name", "bundle_version")


def _upsert_pg() -> Any:
    """One statement with one array per column (unnest): no per-row parameters to build or send."""
    arrays = [f"CAST(:{c} AS varchar[])" for c in _AGG_TEXT] + ["CAST(:phase_index AS integer[])"] + \
        [f"CAST(:{c} AS bigint[])" for c in SUM_COLUMNS] + ["CAST(:first_at AS timestamp[])",
                                                          "CAST(:last_at AS timestamp[])"]
    columns = [*_AGG_TEXT, "phase_index", *SUM_COLUMNS, "first_at", "last_at"]
    updates = ", ".join(f"{c} = telemetry_aggregates.{c} + excluded.{c}" for c in SUM_COLUMNS)
    return text(f"INSERT INTO telemetry_aggregates ({', '.join(columns)}) SELECT * FROM unnest({', '.join(arrays)}) "
                f"ON CONFLICT (rollout_id, device_id, bundle_name, bundle_version) DO UPDATE SET {updates}, "
                "last_at = excluded.last_at")


_UPSERT_PG = _upsert_pg()


def _insert_seen(session: Session, ids: list[str], now: datetime) -> set[str]:
    """Insert message ids, returning those not seen before (one array parameter on PostgreSQL)."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        return set(conn.execute(_SEEN_PG, {"ids": ids, "now": now}).scalars())
    table = TelemetrySeen.__table__
    stmt = dialect_insert(session, table).on_conflict_do_nothing().returning(table.c.message_id)
    return set(conn.execute(stmt, [{"message_id": i, "received_at": now} for i in ids]).scalars())


def write_batch(session: Session, messages: Sequence[Telemetry], membership: MembershipCache,
                now: datetime) -> int:
    """Store a batch; returns how many messages were new (the rest were duplicates)."""
    if not messages:
        return 0
    unique = {m.message_id: m for m in messages}
    new_ids = _insert_seen(session, sorted(unique), now)
    aggs: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    events: list[dict[str, Any]] = []
    for message_id in sorted(new_ids):
        msg = unique[message_id]
        key = _key_of(msg)
        rollout_id, phase = membership.lookup(msg.device_id, key[0]) if key else ("", -1)
        if msg.kind == "event":
            events.append({"message_id": message_id, "device_id": msg.device_id, "rollout_id": rollout_id or None,
                           "event": msg.event, "bundle_version": msg.bundle.version if msg.bundle else None,
                           "target_name": msg.target.name if msg.target else None,
                           "target_version": msg.target.version if msg.target else None,
                           "detail": msg.detail or {}, "sent_at": msg.sent_at, "received_at": now})
        if key is None:
            continue
        agg = aggs.get((rollout_id, msg.device_id, *key))
        if agg is None:
            agg = {"rollout_id": rollout_id, "device_id": msg.device_id, "bundle_name": key[0],
                   "bundle_version": key[1], "phase_index": phase, "first_at": now, "last_at": now,
                   **{c: 0 for c in SUM_COLUMNS}}
            aggs[(rollout_id, msg.device_id, *key)] = agg
        if msg.kind == "window" and msg.window is not None:
            w = msg.window
            agg["windows"] += 1
            agg["requests"] += w.requests
            agg["errors"] += w.errors
            agg["crashes"] += w.crashes
            if w.feedback is not None:
                agg["feedback_count"] += w.feedback.count
                agg["feedback_correct"] += min(w.feedback.correct, w.feedback.count)
            for col, count in zip(LATENCY_COLUMNS, rebucket(w.latency_ms), strict=False):
                agg[col] += count
        else:
            agg["events"] += 1
            if msg.event in INSTALL_FAILURES and msg.target is not None:
                agg["install_failures"] += 1
            if msg.event == "crash":
                agg["crashes"] += 1
    if aggs and session.connection().dialect.name == "postgresql":
        rows = [aggs[k] for k in sorted(aggs)]
        params = {c: [r[c] for r in rows] for c in (*_AGG_TEXT, "phase_index", *SUM_COLUMNS)}
        params.update(first_at=[r["first_at"].replace(tzinfo=None) for r in rows],
                      last_at=[r["last_at"].replace(tzinfo=None) for r in rows])
        session.connection().execute(_UPSERT_PG, params)
    elif aggs:
        table = TelemetryAggregate.__table__
        stmt = dialect_insert(session, table)
        stmt = stmt.on_conflict_do_update(
            index_elements=["rollout_id", "device_id", "bundle_name", "bundle_version"],
            set_={**{c: table.c[c] + stmt.excluded[c] for c in SUM_COLUMNS}, "last_at": stmt.excluded.last_at})
        session.connection().execute(stmt, [aggs[k] for k in sorted(aggs)])
    if events:
        session.connection().execute(insert(cast(Table, TelemetryEvent.__table__)), events)
    record_windows(session, [unique[i] for i in sorted(new_ids)], now)  # dashboard and drift buckets
    return len(new_ids)


def parse_one(topic: str, payload: bytes, *, prefix: str, max_bytes: int, counters: Any) -> Telemetry | None:
    """:func:`parse`, counting a rejected message (by reason) instead of raising."""
    try:
        return parse(topic, payload, prefix=prefix, max_bytes=max_bytes)
    except Rejected as exc:
        counters.add(f"telemetry_dropped_{exc.reason}")
        log.debug("dropped telemetry on %s: %s", topic, exc)
        return None

