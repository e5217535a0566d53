"""Uptane-style director assignments: which bundle one device must run, signed by the server's online key.

An assignment is TUF ``targets`` metadata signed by the director role (keys listed in
``director-root.json``; the root keys that sign that file stay offline). It lists every file of the
assigned bundle with length and hashes copied from the image repository, and carries, in the signed
``x-edgepack-assignment`` field, the device id, hardware id and bundle identity, with a short expiry.

Full verification on the device (Uptane 5.4.4.2): the assignment must verify against the director root,
be for this device and hardware, not be older than the last one accepted, and every file it lists must
appear with identical length, hashes and match fields in the image repository's targets, signed offline.
So a stolen director key can only pick among bundles the workstation signed, above the floor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from bundles.errors import FormatError, HardwareMismatchError, RollbackError, VerificationError
from bundles.keys import dump_metadata
from bundles.trust import check_expiry, parse_metadata, verify_role

ASSIGNMENT_FIELD = "x-edgepack-assignment"
DEFAULT_ASSIGNMENT_EXPIRY = timedelta(hours=24)
MATCH_FIELDS = ("name", "version", "release_counter", "hardware_ids")
"""Custom fields that must be identical in director and image metadata ("SHALL match")."""


class AssignmentError(VerificationError):
    """The assignment is not for this device, or disagrees with the image repository."""


@dataclass(frozen=True)
class Assignment:
    """A verified assignment. ``bundle`` is None when the device is told to keep what it runs."""

    version: int
    device_id: str
    hardware_id: str
    bundle: dict[str, Any] | None
    """``{"name", "version", "release_counter"}`` of the bundle to run."""
    files: dict[str, TargetFile]
    """Image-repository target path -> target info (length, hashes, custom)."""
    expires: datetime
    info: dict[str, Any]
    """The whole signed assignment field (rollout id, reason, issued_at, ...)."""
    raw: bytes


def sign_assignment(
    signer: Signer,
    *,
    device_id: str,
    hardware_id: str,
    version: int,
    files: Mapping[str, TargetFile],
    bundle: Mapping[str, Any] | None,
    now: datetime,
    expires: timedelta = DEFAULT_ASSIGNMENT_EXPIRY,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """Sign an assignment for one device (server side). ``files`` come from the image targets."""
    targets = Targets(version=version, expires=now + expires, targets=dict(files))
    targets.unrecognized_fields[ASSIGNMENT_FIELD] = {
        **(extra or {}),
        "device_id": device_id,
        "hardware_id": hardware_id,
        "bundle": dict(bundle) if bundle is not None else None,
        "issued_at": now.isoformat(),
    }
    md = Metadata(targets)
    md.sign(signer)
    return dump_metadata(md)


def verify_assignment(
    director_root: Root,
    data: bytes,
    *,
    device_id: str,
    hardware_id: str,
    now: datetime,
    last_version: int = 0,
) -> Assignment:
    """Verify an assignment for this device (device side). Raises a VerificationError subclass."""
    md: Metadata[Any] = parse_metadata(data, "targets", "assignment")
    verify_role(director_root, "targets", md, "assignment")
    check_expiry(md, now, "assignment")
    info = md.signed.unrecognized_fields.get(ASSIGNMENT_FIELD)
    if not isinstance(info, dict):
        raise FormatError("assignment lacks its signed device binding", path="assignment", expected=ASSIGNMENT_FIELD)
    if info.get("device_id") != device_id:
        raise AssignmentError("assignment is for another device", path="assignment",
                              expected=device_id, found=info.get("device_id"))
    if info.get("hardware_id") != hardware_id:
        raise HardwareMismatchError("assignment is for other hardware", path="assignment",
                                    expected=hardware_id, found=info.get("hardware_id"))
    if md.signed.version < last_version:
        raise RollbackError("assignment older than one already accepted (replay?)", path="assignment",
                            expected=f">= {last_version}", found=md.signed.version)
    bundle = info.get("bundle")
    files = dict(md.signed.targets)
    for path, target in files.items():
        hw = target.custom.get("hardware_ids") or []
        if hw and hardware_id not in hw:
            raise HardwareMismatchError("assigned bundle is signed for other hardware", path=path,
                                        expected=hardware_id, found=hw)
        if bundle is not None and (target.custom.get("name"), target.custom.get("version")) != (
                bundle.get("name"), bundle.get("version")):
            raise AssignmentError("assignment lists files of another bundle", path=path,
                                  expected=(bundle.get("name"), bundle.get("version")),
                                  found=(target.custom.get("name"), target.custom.get("version")))
    return Assignment(md.signed.version, device_id, hardware_id, bundle, files, md.signed.expires, dict(info), data)


def match_image(assignment: Assignment, image_targets: Targets) -> None:
    """Uptane full verification: each assigned file must be signed offline with identical values."""
    if assignment.bundle is not None and not assignment.files:
        raise AssignmentError("assignment names a bundle but lists no files", path="assignment")
    for path, director_target in assignment.files.items():
        image_target = image_targets.targets.get(path)
        if image_target is None:
            raise AssignmentError("assigned file is not signed by the image repository (offline keys)",
                                  path=path)
        if (director_target.length, director_target.hashes) != (image_target.length, image_target.hashes):
            raise AssignmentError("director and image repository disagree on a file", path=path,
                                  expected=f"{image_target.length} {image_target.hashes}",
                                  found=f"{director_target.length} {director_target.hashes}")
        for key in MATCH_FIELDS:
            if director_target.custom.get(key) != image_target.custom.get(key):
                raise AssignmentError(f"director and image repository disagree on {key}", path=path,
                                      expected=image_target.custom.get(key), found=director_target.custom.get(key))
