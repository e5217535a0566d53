"""The server's tables, as SQLAlchemy 2 typed ORM classes. Schema changes go through Alembic only.

Timestamps are timezone-aware UTC in Python; :class:`UTCDateTime` stores them as naive UTC so SQLite and
PostgreSQL behave the same.

The director's state lives on :class:`Device`: ``desired_*`` is what the device should run (changed in
bulk by rollout transitions, with ``desired_seq`` bumped), ``assignment_*`` is the last signed assignment
and ``signed_seq`` the ``desired_seq`` it reflects. A check-in re-signs only when they differ or the
signature is getting old, so the hot path is one UPDATE.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

LATENCY_BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
"""Canonical latency histogram bounds (docs/protocol.md); bucket i counts values <= bound i, the last
bucket the overflow. Histograms with other bounds are re-bucketed at ingest."""
N_LATENCY_BUCKETS = len(LATENCY_BOUNDS_MS) + 1


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class ApiToken(Base):
    """An operator's API token. Only the sha256 of the secret is stored."""

    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(128))
    revoked_at: Mapped[datetime | None]


class EnrollmentToken(Base):
    """A one-time (or n-time) token a device trades for its own credential at enrollment."""

    __tablename__ = "enrollment_tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    uses_left: Mapped[int]
    expires_at: Mapped[datetime]
    group_name: Mapped[str | None] = mapped_column(String(128))
    tags: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(128))


class Bundle(Base):
    """An uploaded, verified bundle. (name, version) is immutable."""

    __tablename__ = "bundles"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_bundles_name_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    release_counter: Mapped[int]
    content_digest: Mapped[str] = mapped_column(String(64))
    archive_size: Mapped[int] = mapped_column(BigInteger)
    hardware_ids: Mapped[list[Any]]
    manifest: Mapped[dict[str, Any]]
    files: Mapped[list[Any]]
    """``[{"path", "length", "sha256"}]``, bundle-relative."""
    targets_version: Mapped[int]
    uploaded_at: Mapped[datetime]
    uploaded_by: Mapped[str] = mapped_column(String(128))


class Device(Base):
    __tablename__ = "devices"
    __table_args__ = (Index("ix_devices_active", "active_name", "active_version"),)
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hardware_id: Mapped[str] = mapped_column(String(64))
    credential_hash: Mapped[str] = mapped_column(String(64), unique=True)
    group_name: Mapped[str | None] = mapped_column(String(128), index=True)
    tags: Mapped[dict[str, Any]]
    platform: Mapped[str | None] = mapped_column(String(64))
    agent_version: Mapped[str | None] = mapped_column(String(32))
    runtimes: Mapped[dict[str, Any]]
    state: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)
    active_name: Mapped[str | None] = mapped_column(String(128))
    active_version: Mapped[str | None] = mapped_column(String(64))
    active_release_counter: Mapped[int | None]
    active_variant: Mapped[str | None] = mapped_column(String(64))
    enrolled_at: Mapped[datetime]
    last_seen_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    """Set by ``edgepack devices revoke``: the credential no longer works, the broker account is gone."""
    mqtt_password_hash: Mapped[str | None] = mapped_column(String(200))
    """The broker password's PBKDF2 hash in mosquitto's ``$7$`` form (update_server/broker/passwords.py),
    so the files backend can regenerate the password file; None without broker accounts."""
    # director state
    desired_bundle_id: Mapped[int | None] = mapped_column(ForeignKey("bundles.id"), index=True)
    desired_reason: Mapped[str] = mapped_column(String(16), default="none")
    desired_rollout_id: Mapped[str | None] = mapped_column(String(32))
    desired_seq: Mapped[int] = mapped_column(default=0)
    signed_seq: Mapped[int] = mapped_column(default=-1)
    assignment_version: Mapped[int] = mapped_column(default=0)
    assignment: Mapped[str | None] = mapped_column(Text)
    assignment_expires_at: Mapped[datetime | None]


class TufMetadata(Base):
    """Every version of the image repository's metadata: roots and targets as uploaded (signed offline),
    snapshot and timestamp as signed here with the online keys."""

    __tablename__ = "tuf_metadata"
    role: Mapped[str] = mapped_column(String(16), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    expires_at: Mapped[datetime]
    created_at: Mapped[datetime]


class Lock(Base):
    """Named rows locked with ``SELECT ... FOR UPDATE`` to serialize work across replicas."""

    __tablename__ = "locks"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)


class Rollout(Base):
    __tablename__ = "rollouts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(128), index=True)
    target_version: Mapped[str] = mapped_column(String(64))
    selector: Mapped[dict[str, Any]]
    spec: Mapped[dict[str, Any]]
    """Phases, gates and breach policy (``rollout_policy.RolloutSpec.to_dict``)."""
    state: Mapped[str] = mapped_column(String(16), index=True)
    current_phase: Mapped[int] = mapped_column(default=0)
    phase_started_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    halt: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """Why the rollout was halted: breached gates with values and thresholds."""
    last_decision: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class RolloutDevice(Base):
    """A device's membership of a rollout: its cohort bucket and phase, fixed when it joined."""

    __tablename__ = "rollout_devices"
    __table_args__ = (UniqueConstraint("rollout_id", "device_id", name="uq_rollout_devices"),
                      Index("ix_rollout_devices_device", "device_id"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    bucket: Mapped[float] = mapped_column(Float)
    phase_index: Mapped[int]
    previous_bundle_id: Mapped[int | None] = mapped_column(ForeignKey("bundles.id"))
    joined_at: Mapped[datetime]


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(256))
    rollout_id: Mapped[str | None] = mapped_column(String(32), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[dict[str, Any]]


class TelemetrySeen(Base):
    """Message ids already ingested (de-duplication across retries and replicas)."""

    __tablename__ = "telemetry_seen"
    message_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(index=True)


class TelemetryProgress(Base):
    """Per device: the committed high-water mark of its telemetry ``seq`` (every seq up to it is stored or
    known lost), returned at check-in so the agent deletes those messages from its outbox, and the seqs
    counted lost (dropped by a full outbox, or gone with a device state reset, before the server stored them)."""

    __tablename__ = "telemetry_progress"
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    committed_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    lost: Mapped[int] = mapped_column(BigInteger, default=0)
    resets: Mapped[int] = mapped_column(BigInteger, default=0)
    """Times the device's seq counter started again (its state directory was reset)."""


class TelemetrySeq(Base):
    """Seqs stored above a device's committed mark (arrived out of order, or past a gap): de-duplication by
    (device, seq), and what the mark advances over once the gap fills. Rows at or below the mark are deleted."""

    __tablename__ = "telemetry_seqs"
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)


class TelemetryEvent(Base):
    __tablename__ = "telemetry_events"
    __table_args__ = (Index("ix_telemetry_events_device", "device_id", "id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(32))
    device_id: Mapped[str] = mapped_column(String(128))
    rollout_id: Mapped[str | None] = mapped_column(String(32), index=True)
    event: Mapped[str] = mapped_column(String(32))
    bundle_version: Mapped[str | None] = mapped_column(String(64))
    target_name: Mapped[str | None] = mapped_column(String(128))
    target_version: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]]
    sent_at: Mapped[datetime | None]
    received_at: Mapped[datetime]


class TelemetryAggregate(Base):
    """Sums per (rollout, device, bundle): what the gates read. ``rollout_id`` is '' outside rollouts."""

    __tablename__ = "telemetry_aggregates"
    __table_args__ = (UniqueConstraint("rollout_id", "device_id", "bundle_name", "bundle_version",
                                       name="uq_telemetry_aggregates"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(String(32))
    device_id: Mapped[str] = mapped_column(String(128))
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[str] = mapped_column(String(64))
    phase_index: Mapped[int]
    windows: Mapped[int] = mapped_column(BigInteger)
    requests: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    crashes: Mapped[int] = mapped_column(BigInteger)
    feedback_count: Mapped[int] = mapped_column(BigInteger)
    feedback_correct: Mapped[int] = mapped_column(BigInteger)
    events: Mapped[int] = mapped_column(BigInteger)
    install_failures: Mapped[int] = mapped_column(BigInteger)
    # latency histogram over LATENCY_BOUNDS_MS (+ overflow): columns, so upserts add them in SQL
    lat_0: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_1: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_2: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_3: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_4: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_5: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_6: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_7: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_8: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_9: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_10: Mapped[int] = mapped_column(BigInteger, default=0)
    first_at: Mapped[datetime]
    last_at: Mapped[datetime]


LATENCY_COLUMNS = tuple(f"lat_{i}" for i in range(N_LATENCY_BUCKETS))
HIST_DTYPE = "<i8"
"""How drift counts are stored (``input_hist``): flat little-endian int64."""


class VersionHealth(Base):
    """Model health per (bundle name, version, time bucket): what the dashboard charts and the drift checks read.

    Two resolutions: ``resolution`` 60 (minute buckets, for the last hours; pruned after two days) and 3600
    (hour buckets, kept). Input histograms (drift) are kept at the hour resolution only. Written by
    ``services.health.record_windows`` in the ingester's transaction, from de-duplicated messages only.
    """

    __tablename__ = "version_health"
    __table_args__ = (UniqueConstraint("bundle_name", "bundle_version", "resolution", "bucket_start",
                                       name="uq_version_health"),
                      Index("ix_version_health_model", "bundle_name", "resolution", "bucket_start"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[str] = mapped_column(String(64))
    resolution: Mapped[int]
    bucket_start: Mapped[datetime]
    windows: Mapped[int] = mapped_column(BigInteger, default=0)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    crashes: Mapped[int] = mapped_column(BigInteger, default=0)
    feedback_count: Mapped[int] = mapped_column(BigInteger, default=0)
    feedback_correct: Mapped[int] = mapped_column(BigInteger, default=0)
    # latency histogram over LATENCY_BOUNDS_MS (+ overflow), as columns so charts sum them in SQL
    lat_0: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_1: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_2: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_3: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_4: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_5: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_6: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_7: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_8: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_9: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_10: Mapped[int] = mapped_column(BigInteger, default=0)
    classes: Mapped[dict[str, Any]]
    """Predicted class -> count."""
    input_samples: Mapped[int] = mapped_column(BigInteger, default=0)
    input_profile: Mapped[str | None] = mapped_column(String(32))
    input_hist: Mapped[bytes | None] = mapped_column(LargeBinary)
    """Counts per reference bin of every drift feature one after the other (bundles/drift.py), as little-endian
    int64 (``HIST_DTYPE``): a week of hour buckets is read and summed without parsing; hour buckets only."""


class DeviceDrift(Base):
    """A device's input histograms per bundle version since it started reporting them (drift per device)."""

    __tablename__ = "device_drift"
    __table_args__ = (UniqueConstraint("device_id", "bundle_name", "bundle_version", name="uq_device_drift"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128))
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[str] = mapped_column(String(64))
    input_profile: Mapped[str] = mapped_column(String(32))
    input_samples: Mapped[int] = mapped_column(BigInteger, default=0)
    input_hist: Mapped[bytes] = mapped_column(LargeBinary)
    """Like ``VersionHealth.input_hist``."""
    first_at: Mapped[datetime]
    last_at: Mapped[datetime]


class GateSample(Base):
    """A rollout's gate values at one evaluation, kept every ``gate_history_interval_s`` and at each change of a
    gate's status: the history the dashboard charts (the gate loop itself keeps only the last decision)."""

    __tablename__ = "gate_history"
    __table_args__ = (Index("ix_gate_history_rollout", "rollout_id", "at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime]
    phase: Mapped[int]
    verdict: Mapped[str] = mapped_column(String(16))
    gates: Mapped[list[Any]]
    """``decision_view(...)["gates"]`` as it was."""


class DriftReference(Base):
    """A bundle version's drift profile (from its ``reference_stats.json``), copied from storage once so the gate
    loop and the dashboard read it with the rest of the data. ``profile`` is None when the bundle has none."""

    __tablename__ = "drift_references"
    bundle_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    bundle_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[str | None] = mapped_column(String(32))
    profile: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    loaded_at: Mapped[datetime]
