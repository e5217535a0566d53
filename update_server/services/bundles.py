"""Bundles: verified upload, listing, inspection, download and guarded deletion.

An upload is verified against the server's trust (the pinned root, walked forward through the archive's
root chain, and the newest targets) with :func:`bundles.verify.verify_archive` before anything is stored,
outside any database transaction (:func:`upload_bundle`).
(name, version) is immutable: a second upload with other signed files is refused (409 ``bundle_exists``), the
same files again are accepted as a no-op; and newer targets metadata (with an upload or alone) that lists other
files for a version the server already publishes is refused (409 ``targets_conflict``), since devices check
every download against the newest list.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session
from tuf.api.metadata import TargetFile, Targets

from bundles.archive import METADATA_PREFIX, BundleArchive
from bundles.errors import BundleError
from bundles.trust import MAX_ROOT_BYTES, MAX_TARGETS_BYTES, TrustStore, parse_metadata
from bundles.verify import VerifiedBundle, verify_archive
from update_server.context import ServerContext
from update_server.errors import Conflict, InvalidContent, NotFound, verification_detail
from update_server.models import Bundle, Device, Rollout, RolloutDevice
from update_server.rollout_policy import ACTIVE_STATES
from update_server.services.common import audit, lock

ACTIVE = [s.value for s in ACTIVE_STATES]


def archive_key(name: str, version: str) -> str:
    return f"archives/{name}/{version}.edgepack"


def target_key(target_path: str) -> str:
    return f"targets/{target_path}"


def _root_chain(archive: Path) -> list[bytes]:
    with BundleArchive(archive) as arc:
        chain = [arc.read_bounded(n, MAX_ROOT_BYTES) for n in arc.names(METADATA_PREFIX + "roots/")]
        if METADATA_PREFIX + "root.json" in arc.members:
            chain.append(arc.read_bounded(METADATA_PREFIX + "root.json", MAX_ROOT_BYTES))
    return chain


MAX_TRUST_RACES = 3
"""Verifications redone when another upload changed the trusted metadata meanwhile, before giving up (409)."""


def upload_bundle(ctx: ServerContext, archive: Path, *, actor: str) -> tuple[Bundle, bool]:
    """Verify ``archive`` (a file in the storage's staging area) and register it; returns the bundle and whether
    it is new.

    Pushing a bundle the server already holds with the very same signed files is idempotent (the bundle, not
    new). Raises InvalidContent (422), or Conflict (409): the same name and version with other content, or
    signed metadata that lists other content for a bundle the server already publishes.

    The slow part (reading, hashing and extracting every file) runs outside any database transaction: it is
    checked against the trust read in a short transaction first, and the registering transaction (which holds
    the repository lock) only re-reads the trusted versions, moves the verified files into place (renames) and
    writes the rows. Had another upload changed the trusted root or targets meanwhile, verification runs again
    against the new trust, so nothing is ever accepted against stale metadata."""
    for _ in range(MAX_TRUST_RACES):
        work = Path(tempfile.mkdtemp(prefix="verify-", dir=ctx.storage.staging_area()))
        try:
            with ctx.sessions() as session, session.begin():
                trust = ctx.repo.trust_store(session)
            seen = _trust_versions(trust)
            now = ctx.clock()
            try:
                verified = verify_archive(archive, trust, work / "files", now=now)
                chain = _root_chain(archive)
            except BundleError as exc:
                raise InvalidContent(f"bundle verification failed: {exc}", code="verification_failed",
                                     detail=verification_detail(exc)) from exc
            result = _register(ctx, verified, archive, trust, seen, chain, now=now, actor=actor)
            if result is not None:
                return result
        finally:
            shutil.rmtree(work, ignore_errors=True)
    raise Conflict(f"the trusted metadata changed {MAX_TRUST_RACES} times while this bundle was verified "
                   "(other uploads at the same time); upload it again", code="trust_changed")


def _trust_versions(trust: TrustStore) -> tuple[int, int]:
    return trust.root.signed.version, trust.targets.signed.version if trust.targets is not None else 0


def _register(ctx: ServerContext, verified: VerifiedBundle, archive: Path, trust: TrustStore,
              seen: tuple[int, int], chain: list[bytes], *, now: datetime,
              actor: str) -> tuple[Bundle, bool] | None:
    """The short, locked part of an upload; None when the trust changed since ``seen`` (verify again)."""
    name, version = verified.name, verified.version
    with ctx.sessions() as session, session.begin():
        lock(session, "repo")
        if _trust_versions(ctx.repo.trust_store(session)) != seen:
            return None
        existing = session.scalar(select(Bundle).where(Bundle.name == name, Bundle.version == version))
        files = _file_rows(verified.files)
        if existing is not None:
            differ = _changed(existing.files, files)
            if differ:
                raise Conflict(f"bundle {name} {version} already exists with other content "
                               f"({', '.join(differ[:6])} differ): a signed version is immutable and devices "
                               "may already hold the files published first; bump the version (and the release "
                               "counter) to publish new content", code="bundle_exists",
                               detail={"name": name, "version": version, "same_content": False, "files": differ})
        assert trust.targets is not None  # verify_archive trusted some targets metadata
        _refuse_resigned(session, trust.targets.signed)
        if existing is not None:  # the same signed files again: nothing to store
            ctx.repo.accept(session, trust, chain, now)
            return existing, False
        manifest = _manifest_dict(verified.path("manifest.json"))
        size = archive.stat().st_size
        prefix = f"{name}/{version}/"
        for rel in verified.files:
            ctx.storage.move_in(target_key(prefix + rel), verified.path(rel))
        ctx.storage.move_in(archive_key(name, version), archive)
        ctx.repo.accept(session, trust, chain, now)
        bundle = Bundle(
            name=name, version=version, release_counter=verified.release_counter,
            content_digest=verified.content_digest, archive_size=size,
            hardware_ids=list(verified.manifest.hardware_ids), manifest=manifest,
            files=files, targets_version=verified.targets_version, uploaded_at=now, uploaded_by=actor)
        session.add(bundle)
        session.flush()
        audit(session, now=now, actor=actor, action="bundle.upload", subject=f"{name}/{version}",
              detail={"content_digest": verified.content_digest, "release_counter": verified.release_counter})
        return bundle, True


def _file_rows(files: Mapping[str, TargetFile]) -> list[dict[str, Any]]:
    return [{"path": rel, "length": t.length, "sha256": t.hashes.get("sha256", "")} for rel, t in sorted(files.items())]


def _changed(stored: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> list[str]:
    """Paths whose length or sha256 differ between two file lists (present in one only: differs too)."""
    a = {str(f["path"]): (int(f["length"]), str(f["sha256"])) for f in stored}
    b = {str(f["path"]): (int(f["length"]), str(f["sha256"])) for f in new}
    return sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))


def _refuse_resigned(session: Session, targets: Targets) -> None:
    """409 when ``targets`` (about to become the newest trusted metadata) lists other files for a bundle the
    server already publishes: devices check downloads against the newest list, so the published copy would
    fail as a corrupt download. A bundle no longer listed (withdrawn by a floor) is fine."""
    by_bundle: dict[tuple[str, str], dict[str, TargetFile]] = {}
    for path, target in targets.targets.items():  # one pass: "name/version/rel" (bundles.verify.target_prefix)
        parts = path.split("/", 2)
        if len(parts) == 3:
            by_bundle.setdefault((parts[0], parts[1]), {})[parts[2]] = target
    for bundle in session.scalars(select(Bundle)):
        listed = by_bundle.get((bundle.name, bundle.version))
        if not listed:
            continue
        differ = _changed(bundle.files, _file_rows(listed))
        if differ:
            raise Conflict(
                f"the signed targets metadata (v{targets.version}) lists other content for {bundle.name} "
                f"{bundle.version} than the server publishes ({', '.join(differ[:6])} differ): that version was "
                "signed again on the workstation, and devices would refuse the published copy as a corrupt "
                "download. Nothing was changed. A signed version is immutable: if no device uses it, delete it here "
                f"(`edgepack bundles delete {bundle.name} {bundle.version}`) and push the archive signed with this "
                "metadata; otherwise withdraw it (`edgepack keys raise-floor`) and publish a new version",
                code="targets_conflict", detail={"name": bundle.name, "version": bundle.version, "files": differ,
                                                 "targets_version": targets.version})


def _manifest_dict(path: Path) -> dict[str, Any]:
    import json

    data: dict[str, Any] = json.loads(path.read_bytes())
    return data


def upload_targets(ctx: ServerContext, data: bytes, *, actor: str) -> int:
    """Accept newer targets metadata alone (e.g. after raising a floor offline). Returns its version."""
    now = ctx.clock()
    with ctx.sessions() as session, session.begin():
        lock(session, "repo")
        trust = ctx.repo.trust_store(session)
        try:
            parse_metadata(data[:MAX_TARGETS_BYTES], "targets", "targets.json")
            md = trust.update_targets(data, now)
        except BundleError as exc:
            raise InvalidContent(f"targets metadata refused: {exc}", code="verification_failed",
                                 detail=verification_detail(exc)) from exc
        _refuse_resigned(session, md.signed)
        ctx.repo.accept(session, trust, [], now)
        audit(session, now=now, actor=actor, action="trust.targets", subject=f"targets v{md.signed.version}")
        return md.signed.version


def list_bundles(session: Session, name: str | None = None) -> list[Bundle]:
    stmt = select(Bundle).order_by(Bundle.name, Bundle.release_counter)
    if name:
        stmt = stmt.where(Bundle.name == name)
    return list(session.scalars(stmt))


def get_bundle(session: Session, name: str, version: str) -> Bundle:
    bundle = session.scalar(select(Bundle).where(Bundle.name == name, Bundle.version == version))
    if bundle is None:
        raise NotFound(f"no bundle {name} {version}", detail={"name": name, "version": version})
    return bundle


def delete_bundle(ctx: ServerContext, name: str, version: str, *, actor: str, reason: str = "") -> None:
    """Delete a bundle nobody uses: refused (409) while a rollout or a device refers to it."""
    now = ctx.clock()
    with ctx.sessions() as session, session.begin():
        lock(session, "rollouts")
        bundle = get_bundle(session, name, version)
        rollout = session.scalar(select(Rollout.id).where(Rollout.state.in_(ACTIVE), or_(
            Rollout.bundle_id == bundle.id,
            exists().where(RolloutDevice.rollout_id == Rollout.id,
                           RolloutDevice.previous_bundle_id == bundle.id))).limit(1))
        if rollout is not None:
            raise Conflict(f"bundle {name} {version} is used by rollout {rollout}; finish or abort it first",
                           code="bundle_in_use", detail={"rollout_id": rollout})
        device = session.scalar(select(Device.id).where(or_(
            Device.desired_bundle_id == bundle.id,
            (Device.active_name == name) & (Device.active_version == version))).limit(1))
        if device is not None:
            raise Conflict(f"bundle {name} {version} is assigned to or running on device {device}",
                           code="bundle_in_use", detail={"device_id": device})
        session.execute(update(RolloutDevice).where(RolloutDevice.previous_bundle_id == bundle.id)
                        .values(previous_bundle_id=None).execution_options(synchronize_session=False))
        session.delete(bundle)
        audit(session, now=now, actor=actor, action="bundle.delete", subject=f"{name}/{version}", reason=reason)
    ctx.storage.delete_prefix(f"targets/{name}/{version}")
    ctx.storage.delete_prefix(archive_key(name, version))


def bundle_view(bundle: Bundle) -> dict[str, Any]:
    return {"name": bundle.name, "version": bundle.version, "release_counter": bundle.release_counter,
            "content_digest": bundle.content_digest, "archive_size": bundle.archive_size,
            "hardware_ids": bundle.hardware_ids, "uploaded_at": bundle.uploaded_at.isoformat(),
            "uploaded_by": bundle.uploaded_by, "targets_version": bundle.targets_version}


def bundle_detail(bundle: Bundle) -> dict[str, Any]:
    return {**bundle_view(bundle), "manifest": bundle.manifest, "files": bundle.files}

