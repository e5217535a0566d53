"""What a verifier trusts, and the TUF checks that let it trust more.

A :class:`TrustStore` starts from a root pinned out of band (``trust/root.json`` from the key directory)
and only ever moves forward: a newer root must be signed by a threshold of the old *and* the new root
(TUF spec 5.3.4), versions never decrease, expired metadata is refused at a reference time, and the
highest release-counter floor seen per model is remembered. With a state directory the store persists
itself atomically, so a device keeps its high-water marks across reboots.

Signature checks are python-tuf's (``Root.verify_delegate``); this module only orders them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets

from bundles._util import atomic_write, pretty_json
from bundles.errors import (
    ExpiredMetadataError,
    FormatError,
    KeyStoreError,
    RollbackError,
    SignatureError,
)
from bundles.keys import EDGEPACK_FIELD, dump_metadata

MAX_ROOT_BYTES = 512_000
MAX_TARGETS_BYTES = 5_000_000


def parse_metadata(data: bytes, role: str, source: str) -> Metadata[Any]:
    """Parse TUF metadata of the expected ``role``; any failure is a :class:`FormatError`."""
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except Exception as exc:  # python-tuf raises several types for malformed input
        raise FormatError(f"malformed {role} metadata: {exc}", path=source) from exc
    if md.signed.type != role:
        raise FormatError("metadata of the wrong role", path=source, expected=role, found=md.signed.type)
    return md


def verify_role(delegator: Root, role: str, md: Metadata[Any], source: str) -> None:
    """Check that ``md`` carries a threshold of ``role``'s keys as listed in ``delegator``."""
    try:
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as exc:
        result = delegator.get_verification_result(role, md.signed_bytes, md.signatures)
        raise SignatureError(
            f"{role} metadata is not signed by a threshold of trusted {role} keys",
            path=source,
            expected=f"{result.threshold} valid signatures from {sorted(k[:12] for k in delegator.roles[role].keyids)}",
            found=f"{len(result.signed)} valid ({sorted(k[:12] for k in md.signatures)} present)",
        ) from exc


def check_expiry(md: Metadata[Any], now: datetime, source: str) -> None:
    if md.signed.is_expired(now):
        raise ExpiredMetadataError(
            f"{md.signed.type} metadata has expired; re-sign it on the workstation",
            path=source, expected=f"expires after {now.isoformat()}",
            found=md.signed.expires.isoformat(),
        )


def floors_of(targets: Targets) -> dict[str, int]:
    """The signed per-model release-counter floors carried in targets metadata."""
    ext = targets.unrecognized_fields.get(EDGEPACK_FIELD, {})
    floors = ext.get("floors", {}) if isinstance(ext, dict) else {}
    return {str(k): int(v) for k, v in floors.items()} if isinstance(floors, dict) else {}


@dataclass
class TrustStore:
    """Trusted root, newest trusted targets and highest floors seen. Mutated only by the update methods."""

    root: Metadata[Root]
    targets: Metadata[Targets] | None = None
    floors: dict[str, int] = field(default_factory=dict)
    state_dir: Path | None = None

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_root_bytes(cls, data: bytes, *, source: str = "root.json",
                        state_dir: Path | None = None) -> TrustStore:
        """Pin a root obtained out of band. Its own signatures must meet its root threshold."""
        root = parse_metadata(data, "root", source)
        verify_role(root.signed, "root", root, source)
        store = cls(root=root, state_dir=state_dir)
        return store

    @classmethod
    def from_root_file(cls, path: Path, *, state_dir: Path | None = None) -> TrustStore:
        if path.is_dir():
            for candidate in (path / "trust" / "root.json", path / "root.json"):
                if candidate.is_file():
                    path = candidate
                    break
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyStoreError(f"cannot read the trusted root: {exc.strerror}", path=str(path)) from exc
        return cls.from_root_bytes(data, source=str(path), state_dir=state_dir)

    @classmethod
    def open(cls, state_dir: Path, *, initial_root: Path | None = None) -> TrustStore:
        """Load persisted trust from ``state_dir``, or pin ``initial_root`` there the first time."""
        root_file = state_dir / "root.json"
        if root_file.is_file():
            store = cls.from_root_bytes(root_file.read_bytes(), source=str(root_file), state_dir=state_dir)
            targets_file = state_dir / "targets.json"
            if targets_file.is_file():
                store.targets = parse_metadata(targets_file.read_bytes(), "targets", str(targets_file))
            state_file = state_dir / "trust-state.json"
            if state_file.is_file():
                state = json.loads(state_file.read_text())
                store.floors = {str(k): int(v) for k, v in state.get("floors", {}).items()}
            return store
        if initial_root is None:
            raise KeyStoreError("no trusted root pinned yet; pass the trust root", path=str(state_dir))
        store = cls.from_root_file(initial_root, state_dir=state_dir)
        store.save()
        return store

    def save(self) -> None:
        """Persist root, targets and floors atomically (no-op without a state directory)."""
        if self.state_dir is None:
            return
        atomic_write(self.state_dir / "root.json", dump_metadata(self.root))
        if self.targets is not None:
            atomic_write(self.state_dir / "targets.json", dump_metadata(self.targets))
        atomic_write(self.state_dir / "trust-state.json", pretty_json({"floors": self.floors}))

    # ---- updates -----------------------------------------------------------------------------------------
    def update_root(self, chain: list[bytes], now: datetime) -> None:
        """Walk root rotations: each N+1 must be signed by root N's threshold and by its own.

        ``chain`` may contain versions we already trust; they are skipped. The final root must not be
        expired (TUF 5.3.10).
        """
        by_version: dict[int, Metadata[Root]] = {}
        for i, data in enumerate(chain):
            md = parse_metadata(data, "root", f"root chain[{i}]")
            source = f"{md.signed.version}.root.json"
            if md.signed.version == self.root.signed.version and md.signed_bytes != self.root.signed_bytes:
                raise SignatureError("a root with the trusted version but other content", path=source,
                                     expected="the trusted root", found="different signed content")
            # Every root offered must at least carry its own threshold; nothing unsigned is ever kept.
            verify_role(md.signed, "root", md, source)
            by_version[md.signed.version] = md
        version = self.root.signed.version
        while version + 1 in by_version:
            new = by_version[version + 1]
            source = f"{version + 1}.root.json"
            verify_role(self.root.signed, "root", new, source)
            verify_role(new.signed, "root", new, source)
            self.root = new
            version += 1
            # Keys of timestamp/snapshot may have rotated; a cached targets signed by revoked targets
            # keys must not stay trusted (fast-forward recovery, TUF 5.3.11).
            if self.targets is not None:
                try:
                    verify_role(self.root.signed, "targets", self.targets, "targets.json")
                except SignatureError:
                    self.targets = None
        check_expiry(self.root, now, "root.json")

    def update_targets(self, data: bytes, now: datetime, *, source: str = "targets.json") -> Metadata[Targets]:
        """Verify targets metadata against the trusted root and return the newest trusted targets.

        A newer version replaces the trusted one. An older version is not an error by itself (a bundle
        archive may carry the targets of its own build), but then the *trusted* newer targets are
        returned, so every file is checked against the newest signed list and its floors.
        """
        md = parse_metadata(data, "targets", source)
        verify_role(self.root.signed, "targets", md, source)
        if self.targets is not None and md.signed.version < self.targets.signed.version:
            check_expiry(self.targets, now, "trusted targets.json")
            return self.targets
        if (self.targets is not None and md.signed.version == self.targets.signed.version
                and md.signed_bytes != self.targets.signed_bytes):
            raise RollbackError("two different targets metadata with the same version (mix-and-match?)",
                                path=source, expected="identical content", found="different content")
        check_expiry(md, now, source)
        self.targets = md
        for name, floor in floors_of(md.signed).items():
            self.floors[name] = max(self.floors.get(name, 0), floor)
        return md

    def floor(self, name: str) -> int:
        """Highest release-counter floor trusted for model ``name`` (0 when none)."""
        signed = floors_of(self.targets.signed) if self.targets is not None else {}
        return max(self.floors.get(name, 0), signed.get(name, 0))

    def check_release_counter(self, name: str, release_counter: int, source: str) -> None:
        floor = self.floor(name)
        if release_counter < floor:
            raise RollbackError(
                f"release counter of {name!r} is below the signed floor: this version was withdrawn",
                path=source, expected=f">= {floor}", found=release_counter,
            )
