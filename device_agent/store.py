"""The persisted state of one agent: which bundle is active, which is kept for rollback, what is in flight.

One JSON file, ``state.json``, written atomically (temp file + fsync + ``os.replace`` + directory fsync)
before every step that changes the device, so a power loss leaves either the old or the new record,
never a mix. Activation *is* one such write: the record that names the new active bundle.

Layout of the state directory::

    state.json          this record
    credential          the device credential (0600), written at enrollment
    enrollment.json     what the server returned at enrollment (broker URL, image repository URL)
    tuf/image/          python-tuf's metadata cache for the image repository (root.json, timestamp.json...)
    trust/              bundles.trust.TrustStore: trusted targets and the highest release-counter floors
    staging/<slot>/     files being downloaded (``*.part`` until complete and hash-checked)
    bundles/<slot>/     verified bundles: the active one and, during a trial, the previous one
    outbox/             telemetry until the server has committed it

Compatibility: fields added since the first release (``Pending.boots``, ``StateRecord.attempts``,
``StateRecord.clock_floor``) are optional on load, so an agent upgraded in place resumes from the file an
older one wrote; ``trial_boots`` is still written, so a downgraded agent keeps counting trial restarts.
A disk that refuses a write (full, over quota, I/O error) raises
:class:`~device_agent.errors.StorageError`, never a bare ``OSError``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bundles._util import atomic_write
from device_agent.errors import StateError, StorageError
from device_agent.states import State

SCHEMA = 1


@dataclass(frozen=True)
class FileInfo:
    """Signed length and sha256 of one bundle file (copied from verified metadata)."""

    length: int
    sha256: str


def slot_name(name: str, version: str, files: Mapping[str, FileInfo]) -> str:
    """Directory name of a bundle: name, version and a digest of its signed file list."""
    lines = "".join(f"{files[rel].sha256}  {rel}\n" for rel in sorted(files))
    return f"{name}-{version}-{hashlib.sha256(lines.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class BundleRef:
    """A verified bundle in ``bundles/<slot>``, and the variant chosen for this device."""

    name: str
    version: str
    release_counter: int
    variant: str
    runtime: str
    slot: str
    files: dict[str, FileInfo]

    def ident(self) -> dict[str, Any]:
        """As telemetry and check-in name it."""
        return {"name": self.name, "version": self.version, "release_counter": self.release_counter,
                "variant": self.variant}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BundleRef:
        files = {str(k): FileInfo(int(v["length"]), str(v["sha256"])) for k, v in d["files"].items()}
        return cls(str(d["name"]), str(d["version"]), int(d["release_counter"]), str(d["variant"]),
                   str(d["runtime"]), str(d["slot"]), files)


@dataclass(frozen=True)
class Pending:
    """The update in flight: the assignment's bundle, its signed files and progress across restarts."""

    name: str
    version: str
    release_counter: int
    assignment_version: int
    assignment_digest: str
    rollout_id: str | None
    slot: str
    files: dict[str, FileInfo]
    variant: str | None = None
    runtime: str | None = None
    trial_started_at: str | None = None
    boots: dict[str, int] = field(default_factory=dict)
    """Boots of the agent in each state of this update (``{"verifying": 2}``): the loop guard's count."""

    @property
    def trial_boots(self) -> int:
        return self.boots.get(State.TRIAL.value, 0)

    def booted(self, state: State) -> Pending:
        """This update with one more boot counted in ``state``."""
        return replace(self, boots={**self.boots, state.value: self.boots.get(state.value, 0) + 1})

    def target(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "release_counter": self.release_counter}

    def to_ref(self) -> BundleRef:
        if self.variant is None or self.runtime is None:
            raise StateError("pending bundle has no chosen variant yet", detail={"slot": self.slot})
        return BundleRef(self.name, self.version, self.release_counter, self.variant, self.runtime, self.slot,
                         self.files)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trial_boots": self.trial_boots}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Pending:
        files = {str(k): FileInfo(int(v["length"]), str(v["sha256"])) for k, v in d["files"].items()}
        boots = {str(k): int(v) for k, v in (d.get("boots") or {}).items()}
        if int(d.get("trial_boots", 0)) > boots.get(State.TRIAL.value, 0):  # written by an older agent
            boots[State.TRIAL.value] = int(d["trial_boots"])
        return cls(str(d["name"]), str(d["version"]), int(d["release_counter"]), int(d["assignment_version"]),
                   str(d["assignment_digest"]), d.get("rollout_id"), str(d["slot"]), files, d.get("variant"),
                   d.get("runtime"), d.get("trial_started_at"), boots)


@dataclass(frozen=True)
class Attempts:
    """Failed download attempts of one bundle, across restarts and re-signed assignments: what paces retries."""

    bundle: str
    """``name/version`` of the bundle (a re-signed assignment of the same bundle continues the count)."""
    count: int = 0
    reported: tuple[str, ...] = ()
    """Failure reasons already reported for this bundle (``disk_full``, ``download_stalled``): once each."""

    def failed(self) -> Attempts:
        return replace(self, count=self.count + 1)

    def report(self, reason: str) -> Attempts:
        return replace(self, reported=(*self.reported, reason))

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "count": self.count, "reported": list(self.reported)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Attempts:
        return cls(str(d["bundle"]), int(d.get("count", 0)), tuple(str(r) for r in d.get("reported", ())))


@dataclass(frozen=True)
class StateRecord:
    state: State = State.IDLE
    active: BundleRef | None = None
    previous: BundleRef | None = None
    """Kept on disk (and named here) from activation until commit or rollback."""
    pending: Pending | None = None
    assignment_version: int = 0
    """Highest director assignment version accepted: a lower one is a replay."""
    refused: dict[str, Any] | None = None
    """The last assignment refused or rolled back: ``{"digest", "bundle": [name, version] | None,
    "assignment_version"}``. The same bytes, or the same bundle at an assignment version not above this one,
    are not tried again; the server issues a newer assignment to retry."""
    last_error: dict[str, Any] | None = None
    rollout_id: str | None = None
    """Rollout of the update that produced the active bundle (copied into telemetry)."""
    attempts: Attempts | None = None
    """Failed download attempts of the assignment being retried (None once it installed or was refused)."""
    clock_floor: str | None = None
    """The newest signed time this agent accepted (ISO 8601): a device clock far below it was rewound."""
    extra: dict[str, Any] = field(default_factory=dict)

    def evolve(self, **changes: Any) -> StateRecord:
        return replace(self, **changes)

    def serving(self) -> BundleRef | None:
        """The bundle that must serve after a restart in this state (never a half-installed one)."""
        if self.state is State.ROLLING_BACK:
            return self.previous
        return self.active

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "state": self.state.value,
            "active": self.active.to_dict() if self.active else None,
            "previous": self.previous.to_dict() if self.previous else None,
            "pending": self.pending.to_dict() if self.pending else None,
            "assignment_version": self.assignment_version, "refused": self.refused,
            "last_error": self.last_error, "rollout_id": self.rollout_id,
            "attempts": self.attempts.to_dict() if self.attempts else None, "clock_floor": self.clock_floor,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StateRecord:
        if d.get("schema") != SCHEMA:
            raise StateError("state file has an unknown schema", detail={"expected": SCHEMA,
                                                                         "found": d.get("schema")})
        return cls(
            state=State(d["state"]),
            active=BundleRef.from_dict(d["active"]) if d.get("active") else None,
            previous=BundleRef.from_dict(d["previous"]) if d.get("previous") else None,
            pending=Pending.from_dict(d["pending"]) if d.get("pending") else None,
            assignment_version=int(d.get("assignment_version", 0)),
            refused=d.get("refused"),
            last_error=d.get("last_error"), rollout_id=d.get("rollout_id"),
            attempts=Attempts.from_dict(d["attempts"]) if d.get("attempts") else None,
            clock_floor=d.get("clock_floor"), extra=dict(d.get("extra", {})),
        )


class _Keep(enum.Enum):
    KEEP = "keep"


KEEP = _Keep.KEEP
"""A :class:`Change` field left at ``KEEP`` leaves that field of the record as it is."""


@dataclass(frozen=True)
class Change:
    """What one step changes in the persisted record (typed; every field defaults to ``KEEP``)."""

    active: BundleRef | _Keep | None = KEEP
    previous: BundleRef | _Keep | None = KEEP
    pending: Pending | _Keep | None = KEEP
    assignment_version: int | _Keep = KEEP
    refused: dict[str, Any] | _Keep | None = KEEP
    last_error: dict[str, Any] | _Keep | None = KEEP
    rollout_id: str | _Keep | None = KEEP
    attempts: Attempts | _Keep | None = KEEP
    clock_floor: str | _Keep | None = KEEP

    def apply(self, record: StateRecord, state: State) -> StateRecord:
        """``record`` in ``state`` with these changes."""
        changed = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not KEEP}
        return replace(record, state=state, **changed)

    def get(self, name: str, record: StateRecord) -> Any:
        """The value this change gives ``name``: its own, or the record's when it keeps it."""
        value = getattr(self, name)
        return getattr(record, name) if value is KEEP else value


class Store:
    """Paths of the state directory and the atomic load/save of :class:`StateRecord`."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.file = state_dir / "state.json"
        self.bundles = state_dir / "bundles"
        self.staging = state_dir / "staging"
        self.tuf = state_dir / "tuf" / "image"
        self.trust = state_dir / "trust"
        self.outbox = state_dir / "outbox"
        for d in (self.dir, self.bundles, self.staging, self.tuf, self.trust, self.outbox):
            d.mkdir(parents=True, exist_ok=True)

    def load(self) -> StateRecord:
        if not self.file.exists():
            return StateRecord()
        try:
            return StateRecord.from_dict(json.loads(self.file.read_bytes()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(f"state file {self.file} is unreadable ({exc}); it is written atomically, so "
                             "this means outside interference: move it away to start from scratch") from exc

    def save(self, record: StateRecord) -> None:
        """Write ``record`` atomically. Raises StorageError when the disk refuses (the old file stays)."""
        data = json.dumps(record.to_dict(), sort_keys=True, indent=1).encode() + b"\n"
        try:
            atomic_write(self.file, data, mode=0o600)
        except OSError as exc:
            raise StorageError.from_os(exc, f"saving {self.file}") from exc

    def disk(self) -> tuple[int, int]:
        """``(free, total)`` bytes of the file system holding the state directory (free: for this user)."""
        usage = shutil.disk_usage(self.dir)
        return usage.free, usage.total

    def bytes_in(self, directory: Path) -> int:
        """Bytes in the regular files under ``directory`` (0 when it does not exist)."""
        try:
            return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        except OSError:
            return 0

    def slot_dir(self, slot: str) -> Path:
        return self.bundles / slot

    def staging_dir(self, slot: str) -> Path:
        return self.staging / slot

    def prune(self, keep: set[str]) -> list[str]:
        """Delete bundle slots and staging directories not named in ``keep``; returns what was deleted."""
        removed = []
        for parent in (self.bundles, self.staging):
            for child in parent.iterdir():
                if child.name not in keep:
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
                    removed.append(f"{parent.name}/{child.name}")
        return removed
