"""The TUF image repository the server publishes at ``/tuf/image/`` (python-tuf ``ngclient`` reads it).

Roots and targets are signed offline on the workstation and arrive with bundle uploads (every archive
carries the root chain and the cumulative targets) or alone (``PUT /api/v1/admin/trust/targets``). They
are accepted only through :class:`bundles.trust.TrustStore` (root walk, signatures, version order).
Snapshot and timestamp are signed here with the online keys: a new snapshot whenever targets change, a
new timestamp with it and whenever the current one has less than half its life left (same for the
snapshot). Consistent snapshots are on in the root, so ``{V}.snapshot.json`` and ``{V}.targets.json`` are
served by version, and target files under hash-prefixed names.

Callers hold the ``repo`` lock row (``services.locks``) around :meth:`accept` and :meth:`refresh`, so
replicas never sign two different snapshots with the same version.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

from bundles.keys import OnlineKeys, dump_metadata
from bundles.trust import TrustStore, parse_metadata
from update_server.models import TufMetadata

log = logging.getLogger(__name__)


class ImageRepository:
    def __init__(self, keys: OnlineKeys, *, timestamp_expiry: timedelta, snapshot_expiry: timedelta) -> None:
        self.keys = keys
        self.timestamp_expiry = timestamp_expiry
        self.snapshot_expiry = snapshot_expiry
        self._cache_lock = threading.Lock()
        self._targets_cache: tuple[int, Metadata[Targets]] | None = None

    # ---- reading -------------------------------------------------------------------------------------
    @staticmethod
    def latest_version(session: Session, role: str) -> int:
        return int(session.scalar(select(func.max(TufMetadata.version)).where(TufMetadata.role == role)) or 0)

    @staticmethod
    def get(session: Session, role: str, version: int | None = None) -> bytes | None:
        stmt = select(TufMetadata.data).where(TufMetadata.role == role)
        stmt = stmt.where(TufMetadata.version == version) if version is not None else \
            stmt.order_by(TufMetadata.version.desc()).limit(1)
        data = session.scalar(stmt)
        return bytes(data) if data is not None else None

    def targets(self, session: Session) -> Metadata[Targets] | None:
        """The newest trusted targets metadata, parsed once per version."""
        version = self.latest_version(session, "targets")
        if version == 0:
            return None
        with self._cache_lock:
            if self._targets_cache is not None and self._targets_cache[0] == version:
                return self._targets_cache[1]
        data = self.get(session, "targets", version)
        assert data is not None
        md: Metadata[Targets] = Metadata[Targets].from_bytes(data)
        with self._cache_lock:
            self._targets_cache = (version, md)
        return md

    def trust_store(self, session: Session) -> TrustStore:
        """What the server trusts now: newest root (walked from the pinned one) and newest targets."""
        root = self.get(session, "root")
        store = TrustStore.from_root_bytes(root if root is not None else self.keys.root, source="root.json")
        store.targets = self.targets(session)
        return store

    # ---- writing (caller holds the repo lock) -----------------------------------------------------------
    def bootstrap(self, session: Session, now: datetime) -> None:
        """Pin the root from the online key folder when the database has none yet."""
        if self.latest_version(session, "root") == 0:
            md = parse_metadata(self.keys.root, "root", "online/root.json")
            self._store(session, "root", md.signed.version, self.keys.root, md.signed.expires, now)

    def accept(self, session: Session, trust: TrustStore, chain: list[bytes], now: datetime) -> bool:
        """Persist what ``trust`` learned (newer roots from ``chain``, newer targets); re-sign if needed.

        ``trust`` must have been updated by :class:`TrustStore` (verified). Returns True if targets changed.
        """
        have_root = self.latest_version(session, "root")
        new_root = trust.root.signed.version
        for data in chain:
            md = parse_metadata(data, "root", "root chain")
            if have_root < md.signed.version <= new_root:
                self._store(session, "root", md.signed.version, data, md.signed.expires, now)
        if new_root > have_root and self.latest_version(session, "root") < new_root:
            self._store(session, "root", new_root, dump_metadata(trust.root), trust.root.signed.expires, now)
        changed = False
        if trust.targets is not None and trust.targets.signed.version > self.latest_version(session, "targets"):
            data = dump_metadata(trust.targets)
            self._store(session, "targets", trust.targets.signed.version, data, trust.targets.signed.expires, now)
            changed = True
        if changed or new_root > have_root:
            self._sign_snapshot_and_timestamp(session, now)
        return changed

    def refresh(self, session: Session, now: datetime) -> bool:
        """Re-sign the snapshot and/or timestamp when past half their life. Returns True if it signed."""
        if self.latest_version(session, "targets") == 0:
            return False
        snapshot = self._latest_row(session, "snapshot")
        if snapshot is None or snapshot.expires_at - now < self.snapshot_expiry / 2:
            self._sign_snapshot_and_timestamp(session, now)
            return True
        timestamp = self._latest_row(session, "timestamp")
        if timestamp is None or timestamp.expires_at - now < self.timestamp_expiry / 2:
            self._sign_timestamp(session, snapshot.version, now)
            return True
        return False

    def _latest_row(self, session: Session, role: str) -> TufMetadata | None:
        return session.scalar(select(TufMetadata).where(TufMetadata.role == role)
                              .order_by(TufMetadata.version.desc()).limit(1))

    def _current_root(self, session: Session) -> Root:
        data = self.get(session, "root") or self.keys.root
        return Metadata[Root].from_bytes(data).signed

    def _check_key(self, root: Root, role: str, keyid: str) -> None:
        if keyid not in root.roles[role].keyids:
            log.error("the %s key of this server (%s) is not listed in root v%d; devices will refuse the "
                      "repository until the server gets the current online keys", role, keyid[:12], root.version)

    def _sign_snapshot_and_timestamp(self, session: Session, now: datetime) -> None:
        root = self._current_root(session)
        self._check_key(root, "snapshot", self.keys.snapshot.public_key.keyid)
        targets_version = self.latest_version(session, "targets")
        version = self.latest_version(session, "snapshot") + 1
        snap = Metadata(Snapshot(version=version, expires=now + self.snapshot_expiry,
                                 meta={"targets.json": MetaFile(version=targets_version)}))
        snap.sign(self.keys.snapshot)
        self._store(session, "snapshot", version, dump_metadata(snap), snap.signed.expires, now)
        self._sign_timestamp(session, version, now)

    def _sign_timestamp(self, session: Session, snapshot_version: int, now: datetime) -> None:
        root = self._current_root(session)
        self._check_key(root, "timestamp", self.keys.timestamp.public_key.keyid)
        version = self.latest_version(session, "timestamp") + 1
        ts = Metadata(Timestamp(version=version, expires=now + self.timestamp_expiry,
                                snapshot_meta=MetaFile(version=snapshot_version)))
        ts.sign(self.keys.timestamp)
        self._store(session, "timestamp", version, dump_metadata(ts), ts.signed.expires, now)

    @staticmethod
    def _store(session: Session, role: str, version: int, data: bytes, expires: datetime, now: datetime) -> None:
        session.add(TufMetadata(role=role, version=version, data=data, expires_at=expires, created_at=now))
        session.flush()

