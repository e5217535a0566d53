"""Telemetry ingestion: validate, de-duplicate by message id, aggregate per rollout/phase/version/device.

A batch is written in one transaction: the message ids go into ``telemetry_seen`` with ``ON CONFLICT DO
NOTHING RETURNING`` (so a retry, or the same message reaching two replicas, counts once), then only the
new messages are summed in Python per aggregate key and upserted (``ON CONFLICT DO UPDATE SET x = x +
excluded.x``) in sorted key order, so concurrent replicas take row locks in the same order and cannot
deadlock. Which rollout (and phase) a message belongs to comes from the server's own membership table,
not from the device's claim.

End-to-end acknowledgement (docs/protocol.md "Telemetry delivery"): a message is new only if its
``message_id`` AND its ``(device, seq)`` are new. Each device's row in ``telemetry_progress`` (locked, in
device order) holds the committed high-water mark: every seq up to it is stored or known lost. Seqs above
the mark go into ``telemetry_seqs``; the mark advances over them once contiguous, and the rows it covers
are deleted. The check-in returns the mark; the agent deletes the messages it covers from its outbox and
re-sends the others. :func:`close_gaps` (at check-in) counts the seqs the device can no longer send as lost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, cast

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Table, bindparam, delete, func, insert, select, text, update
from sqlalchemy.orm import Session

from update_server.db import dialect_insert
from update_server.models import (
    LATENCY_BOUNDS_MS,
    LATENCY_COLUMNS,
    Rollout,
    RolloutDevice,
    TelemetryAggregate,
    TelemetryEvent,
    TelemetryProgress,
    TelemetrySeen,
    TelemetrySeq,
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


MAX_COUNT = 10**12
"""The largest count one window may carry in any field (requests, errors, feedback, a latency bucket, ...).

Every count is summed into 64-bit integer columns (SQLite INTEGER, PostgreSQL bigint, at most 2**63 - 1 ~
9.2e18): at this bound a sum row holds 9 million windows before it could overflow, and a value the database
cannot store (``requests: 10**30``) is refused here, at validation, instead of failing a whole batch's write."""
MAX_INT64 = 2**63 - 1
MAX_GAP = 1_000_000
"""The most seqs one check-in may declare gone from a device's outbox (two years of one-minute windows): a
device claiming more is not believed, so one bad device cannot push the fleet's lost count to 2**63."""
MAX_WINDOW = timedelta(days=7)
"""A window longer than this earns no more request allowance than this (see :func:`check_window`)."""
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


def _no_nul(value: str) -> str:
    if "\x00" in value:  # PostgreSQL text cannot hold NUL: the row would fail the whole batch's write
        raise ValueError("contains a NUL character")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]


def _storable_json(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """``detail`` is stored as JSON (PostgreSQL jsonb): no NaN/Infinity, no NUL character."""
    if value is not None:
        try:
            text = json.dumps(value, allow_nan=False)
        except ValueError:
            raise ValueError("holds NaN or Infinity, which JSON columns cannot store") from None
        if "\\u0000" in text:
            raise ValueError("contains a NUL character")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class BundleRef(_Model):
    name: Text = Field(min_length=1, max_length=128)
    version: Text = Field(min_length=1, max_length=64)
    release_counter: int | None = Field(None, ge=0, le=MAX_INT64)
    variant: Text | None = Field(None, max_length=128)


class Latency(_Model):
    bounds: list[float] = Field(max_length=64)
    counts: list[Count] = Field(max_length=65)


class Feedback(_Model):
    count: Count
    correct: Count


class Window(_Model):
    start: str = Field(max_length=64)  # kept as text; parsed once by check_window for the duration
    end: str = Field(max_length=64)
    requests: Count
    errors: Count
    crashes: Count = 0
    latency_ms: Latency | None = None
    feedback: Feedback | None = None
    predicted_classes: dict[str, Any] | None = None  # checked by services.health (dashboard, drift)
    input_stats: dict[str, Any] | None = None


class Telemetry(_Model):
    """The common envelope plus the event or window part (docs/protocol.md)."""

    schema_: Literal["edgepack.telemetry.v1"] = Field(alias="schema")
    kind: Literal["event", "window"]
    message_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    device_id: Text = Field(min_length=1, max_length=128)
    seq: int = Field(ge=0, le=MAX_INT64)
    sent_at: datetime
    bundle: BundleRef | None = None
    rollout_id: Text | None = Field(None, max_length=64)
    event: str | None = None
    target: BundleRef | None = None
    detail: Annotated[dict[str, Any] | None, AfterValidator(_storable_json)] = None
    window: Window | None = None


class Rejected(Exception):
    """A message that is malformed or inconsistent; counted under ``reason`` and dropped."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


def _instant(text: str) -> datetime:
    at = datetime.fromisoformat(text)
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def check_window(window: Window, max_rate: float) -> None:
    """Refuse a window that claims more than a device can do in its duration (raises :class:`Rejected`).

    A window spans ``start``..``end`` (device clock, ISO 8601); it may count at most ``max_rate`` requests per
    second over that span plus one second (a window sent at once, ``start == end``, still holds up to
    ``max_rate`` requests), the span counted up to :data:`MAX_WINDOW`. The same allowance caps errors,
    feedback and the latency histogram's total: one bad device cannot outweigh a fleet in the gates."""
    try:
        span = (_instant(window.end) - _instant(window.start)).total_seconds()
    except (ValueError, OverflowError):
        raise Rejected("bad_window_time", f"window start/end must be ISO 8601 times, got {window.start!r}, "
                                          f"{window.end!r}") from None
    if span < 0:
        raise Rejected("bad_window_time", f"window ends ({window.end}) before it starts ({window.start})")
    allowed = max_rate * (min(span, MAX_WINDOW.total_seconds()) + 1.0)
    claimed = max(window.requests, window.errors, window.feedback.count if window.feedback else 0,
                  sum(window.latency_ms.counts) if window.latency_ms else 0)
    if claimed > allowed:
        raise Rejected("implausible_rate", f"{claimed} requests in a {span:.0f} s window is more than "
                                           f"max_request_rate={max_rate:g}/s allows ({allowed:.0f})")


def parse(topic: str, payload: bytes, *, prefix: str, max_bytes: int, max_rate: float = 10_000.0) -> Telemetry:
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
        errors = exc.errors()
        bound = any(e["type"] in ("less_than_equal", "greater_than_equal") for e in errors)
        raise Rejected("out_of_range" if bound else "malformed", str(errors[:1])) from None
    if msg.device_id != parts[len(base)]:
        raise Rejected("device_mismatch", f"topic {parts[len(base)]} != payload {msg.device_id}")
    if parts[-1] != msg.kind:
        raise Rejected("kind_mismatch", f"topic {parts[-1]} != payload {msg.kind}")
    if msg.kind == "window" and (msg.window is None or msg.bundle is None):
        raise Rejected("malformed", "a window needs `window` and `bundle`")
    if msg.kind == "window" and msg.window is not None:
        check_window(msg.window, max_rate)
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
    :func:`write_batch` refreshes it in every batch's own transaction, before attributing the batch (two small
    queries): a device's telemetry is sent after the check-in that follows its joining a rollout, so the
    membership row has committed before that telemetry's batch starts and the batch sees it. (A refresh at
    most every 0.5 s attributed telemetry arriving right after a join to no rollout.)
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


_PROGRESS = cast(Table, TelemetryProgress.__table__)
_SEQS = cast(Table, TelemetrySeq.__table__)
_SET_MARK = update(_PROGRESS).where(_PROGRESS.c.device_id == bindparam("d")).values(committed_seq=bindparam("m"))
_FORGET_SEQS = delete(_SEQS).where(_SEQS.c.device_id == bindparam("d"), _SEQS.c.seq <= bindparam("m"))
_UNNEST = "unnest(CAST(:d AS varchar[]), CAST(:m AS bigint[])) AS v(d, m)"
_SEQS_PG = text(f"INSERT INTO telemetry_seqs (device_id, seq) SELECT d, m FROM {_UNNEST} ON CONFLICT DO NOTHING "
                "RETURNING device_id, seq")
_SET_MARK_PG = text(f"UPDATE telemetry_progress SET committed_seq = v.m FROM {_UNNEST} WHERE device_id = v.d")
_FORGET_SEQS_PG = text(f"DELETE FROM telemetry_seqs USING {_UNNEST} WHERE device_id = v.d AND seq <= v.m")
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


def _lock_progress(session: Session, devices: list[str]) -> dict[str, int]:
    """Create the devices' progress rows if missing, lock them (in device order), return their marks."""
    conn = session.connection()
    query = (select(TelemetryProgress.device_id, TelemetryProgress.committed_seq)
             .where(TelemetryProgress.device_id.in_(devices)).order_by(TelemetryProgress.device_id))
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    marks = {d: int(m) for d, m in conn.execute(query)}
    if missing := [d for d in devices if d not in marks]:  # a device's first telemetry (once per device)
        conn.execute(dialect_insert(session, _PROGRESS).on_conflict_do_nothing(),
                     [{"device_id": d, "committed_seq": 0, "lost": 0, "resets": 0} for d in missing])
        marks.update({d: int(m) for d, m in conn.execute(query.where(TelemetryProgress.device_id.in_(missing)))})
    return marks


def _advance(session: Session, marks: dict[str, int]) -> dict[str, int]:
    """Move each device's mark over the contiguous seqs stored above it; delete the rows it covers.
    Returns the new marks of the devices whose mark moved."""
    conn = session.connection()
    seqs = _SEQS.c
    rows = conn.execute(select(seqs.device_id, seqs.seq).where(seqs.device_id.in_(sorted(marks)))
                        .order_by(seqs.device_id, seqs.seq))
    moved: dict[str, int] = {}
    for device_id, seq in rows:
        mark = moved.get(device_id, marks[device_id])
        if seq == mark + 1:
            moved[device_id] = seq
    if moved and conn.dialect.name == "postgresql":  # one statement each, one array per column
        arrays = {"d": sorted(moved), "m": [moved[d] for d in sorted(moved)]}
        conn.execute(_SET_MARK_PG, arrays)
        conn.execute(_FORGET_SEQS_PG, arrays)
    elif moved:  # one executemany each, in device order
        params = [{"d": d, "m": moved[d]} for d in sorted(moved)]
        conn.execute(_SET_MARK, params)
        conn.execute(_FORGET_SEQS, params)
    return moved


@dataclass(frozen=True)
class Unstorable:
    """A message the server will never store (rejected by validation, or a row the database refuses) whose
    device (from the topic, which the broker's ACL ties to the sender) and seq are known. Its seq counts as
    done, so the device's mark moves past it and the device stops sending it again (a poison loop)."""

    device_id: str
    seq: int


def unstorable(topic: str, payload: bytes, *, prefix: str) -> Unstorable | None:
    """The device and seq of a rejected message, when both can be read; None otherwise."""
    parts, base = topic.split("/"), prefix.split("/")
    if len(parts) != len(base) + 3 or parts[:len(base)] != base:
        return None
    try:
        seq = json.loads(payload).get("seq")
    except (ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 < seq <= MAX_INT64:
        return None
    return Unstorable(parts[len(base)], seq)


def _new_by_seq(session: Session, messages: Sequence[Telemetry],
                skipped: Sequence[Unstorable] = ()) -> tuple[list[Telemetry], dict[str, int]]:
    """Messages whose (device, seq) is new: above the device's mark and not stored above it yet. Records them,
    and the ``skipped`` seqs, in ``telemetry_seqs``. Returns them and the devices' marks (locked until the
    transaction ends). A seq of 0 means unnumbered (a sender without an outbox): de-duplicated by message id
    only."""
    numbered: dict[tuple[str, int], Telemetry] = {}
    unnumbered = []
    for m in messages:
        if m.seq <= 0:
            unnumbered.append(m)
        else:
            numbered.setdefault((m.device_id, m.seq), m)
    done = {(u.device_id, u.seq) for u in skipped} - set(numbered)
    if not numbered and not done:
        return unnumbered, {}
    marks = _lock_progress(session, sorted({d for d, _ in [*numbered, *done]}))
    if done := {k for k in done if k[1] > marks[k[0]]}:
        session.connection().execute(dialect_insert(session, _SEQS).on_conflict_do_nothing(),
                                     [{"device_id": d, "seq": q} for d, q in sorted(done)])
    candidates = sorted(k for k in numbered if k[1] > marks[k[0]])
    fresh: set[tuple[str, int]] = set()
    if candidates:
        conn = session.connection()
        if conn.dialect.name == "postgresql":
            rows = conn.execute(_SEQS_PG, {"d": [d for d, _ in candidates], "m": [q for _, q in candidates]})
        else:
            stmt = dialect_insert(session, _SEQS).on_conflict_do_nothing().returning(_SEQS.c.device_id, _SEQS.c.seq)
            rows = conn.execute(stmt, [{"device_id": d, "seq": q} for d, q in candidates])
        fresh = {(d, int(q)) for d, q in rows}
    return unnumbered + [numbered[k] for k in candidates if k in fresh], marks


def write_batch(session: Session, messages: Sequence[Telemetry], membership: MembershipCache,
                now: datetime, skipped: Sequence[Unstorable] = ()) -> int:
    """Store a batch; returns how many messages were new (the rest were duplicates by message id or by
    (device, seq)), and advances the devices' committed marks.

    ``membership`` is refreshed first, in this transaction, so attribution never depends on the cache's age.
    ``skipped``: seqs of messages that will never be stored (:class:`Unstorable`); the marks move past them."""
    if not messages and not skipped:
        return 0
    membership.refresh(session)
    fresh, marks = _new_by_seq(session, messages, skipped)
    unique = {m.message_id: m for m in fresh}
    new_ids = _insert_seen(session, sorted(unique), now) if unique else set()
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
    if marks:
        _advance(session, marks)
    return len(new_ids)


def close_gaps(session: Session, device_id: str, oldest_seq: int | None, last_seq: int | None) -> tuple[int, int]:
    """What a check-in's ``outbox_oldest_seq``/``outbox_seq`` tell the server; returns (mark, newly lost).

    * ``last_seq`` below the mark: the device's counter started again (its state directory was reset).
      The mark and the stored seqs start again from 0 (``resets`` counts it), so its new messages are
      not taken for duplicates.
    * Every seq below ``oldest_seq`` has left the device's outbox: committed, or dropped by a full outbox.
      Those not stored are lost for good: counted in ``lost``, and the mark moves past them (then over
      the stored seqs contiguous above)."""
    marks = _lock_progress(session, [device_id])
    mark = marks[device_id]
    conn = session.connection()
    progress = _PROGRESS.c
    seqs = _SEQS.c
    if last_seq is not None and last_seq < mark:
        log.warning("device %s reports telemetry seq %d below the committed mark %d: its state was reset; "
                    "the mark starts again", device_id, last_seq, mark)
        conn.execute(delete(_SEQS).where(seqs.device_id == device_id))
        conn.execute(update(_PROGRESS).where(progress.device_id == device_id)
                     .values(committed_seq=0, resets=progress.resets + 1))
        mark = 0
    if oldest_seq is None or oldest_seq <= mark + 1:
        return mark, 0
    if oldest_seq - 1 - mark > MAX_GAP:
        log.warning("device %s reports its oldest telemetry seq %d, %d above the committed mark %d (more than %d): "
                    "not believed, nothing counted lost", device_id, oldest_seq, oldest_seq - 1 - mark, mark, MAX_GAP)
        return mark, 0
    stored = conn.execute(select(func.count()).select_from(_SEQS).where(
        seqs.device_id == device_id, seqs.seq > mark, seqs.seq < oldest_seq)).scalar_one()
    lost = (oldest_seq - 1 - mark) - int(stored)
    conn.execute(update(_PROGRESS).where(progress.device_id == device_id)
                 .values(committed_seq=oldest_seq - 1, lost=progress.lost + lost))
    conn.execute(delete(_SEQS).where(seqs.device_id == device_id, seqs.seq < oldest_seq))
    moved = _advance(session, {device_id: oldest_seq - 1})
    if lost:
        log.warning("device %s: %d telemetry messages left its outbox before the server stored them (lost)",
                    device_id, lost)
    return moved.get(device_id, oldest_seq - 1), lost


def parse_one(topic: str, payload: bytes, *, prefix: str, max_bytes: int, counters: Any,
              max_rate: float = 10_000.0) -> Telemetry | Unstorable | None:
    """:func:`parse`, counting a rejected message (by reason) instead of raising; a rejected message whose
    device and seq are known comes back as :class:`Unstorable` (its seq is done: the device stops re-sending it)."""
    try:
        return parse(topic, payload, prefix=prefix, max_bytes=max_bytes, max_rate=max_rate)
    except Rejected as exc:
        counters.add(f"telemetry_dropped_{exc.reason}")
        log.debug("dropped telemetry on %s: %s", topic, exc)
        return unstorable(topic, payload, prefix=prefix)

