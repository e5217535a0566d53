"""Bundles: verified upload, listing, inspection, download and guarded deletion.

An upload is verified against the server's trust (the pinned root, walked forward through the archive's
root chain, and the newest targets) with :func:`bundles.verify.verify_archive` before anything is stored,
outside any database transaction (:func:`upload_bundle`).
(name, version) is immutable: a second upload is refused with 409 even with the same bytes.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session

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


def upload_bundle(ctx: ServerContext, archive: Path, *, actor: str) -> Bundle:
    """Verify ``archive`` (a file in the storage's staging area) and register it. Raises InvalidContent (422)
    or Conflict (409).

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
            bundle = _register(ctx, verified, archive, trust, seen, chain, now=now, actor=actor)
            if bundle is not None:
                return bundle
        finally:
            shutil.rmtree(work, ignore_errors=True)
    raise Conflict(f"the trusted metadata changed {MAX_TRUST_RACES} times while this bundle was verified "
                   "(other uploads at the same time); upload it again", code="trust_changed")


def _trust_versions(trust: TrustStore) -> tuple[int, int]:
    return trust.root.signed.version, trust.targets.signed.version if trust.targets is not None else 0


def _register(ctx: ServerContext, verified: VerifiedBundle, archive: Path, trust: TrustStore,
              seen: tuple[int, int], chain: list[bytes], *, now: datetime, actor: str) -> Bundle | None:
    """The short, locked part of an upload; None when the trust changed since ``seen`` (verify again)."""
    name, version = verified.name, verified.version
    with ctx.sessions() as session, session.begin():
        lock(session, "repo")
        if _trust_versions(ctx.repo.trust_store(session)) != seen:
            return None
        existing = session.scalar(select(Bundle).where(Bundle.name == name, Bundle.version == version))
        if existing is not None:
            same = existing.content_digest == verified.content_digest
            raise Conflict(f"bundle {name} {version} already exists and is immutable"
                           + (" (same content)" if same else "; bump the version to publish new content"),
                           code="bundle_exists", detail={"name": name, "version": version, "same_content": same})
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
            files=[{"path": rel, "length": t.length, "sha256": t.hashes.get("sha256", "")}
                   for rel, t in sorted(verified.files.items())],
            targets_version=verified.targets_version, uploaded_at=now, uploaded_by=actor)
        session.add(bundle)
        session.flush()
        audit(session, now=now, actor=actor, action="bundle.upload", subject=f"{name}/{version}",
              detail={"content_digest": verified.content_digest, "release_counter": verified.release_counter})
        return bundle


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

