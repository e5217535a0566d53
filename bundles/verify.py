"""Verify a bundle before anything reads it; nothing is ever partially trusted.

Two entry points share one checker:

* :func:`verify_archive` for a bundle file (upload to the server, sideloading): the archive's root chain
  and targets metadata update the :class:`~bundles.trust.TrustStore`, then every member is streamed into a
  fresh directory with its length capped at the signed length and its hash checked. Any failure deletes
  the directory; nothing is written anywhere else.
* :func:`verify_directory` for files a device downloaded one by one as TUF targets.

Both return a :class:`VerifiedBundle` whose ``directory`` holds exactly the signed files, and whose manifest
was parsed only after every file was verified.

**Per variant.** A device runs one variant, so it needs every file of the bundle except the model files of
the other variants (:func:`variant_files`). ``verify_directory(..., variant=ID)`` verifies such a directory
with the same guarantees: the manifest is read only after its own signed hash matched; then the directory
must hold exactly the files of that variant (none missing, no other variant's model, nothing unsigned),
each matching its signed length and hash under this bundle's name and version.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import Metadata, TargetFile, Targets

from bundles._util import parse_semver, utcnow
from bundles.archive import METADATA_PREFIX, TARGETS_PREFIX, BundleArchive
from bundles.errors import (
    ArchiveError,
    DigestMismatchError,
    FormatError,
    HardwareMismatchError,
    MissingFileError,
    UnsignedFileError,
    UnsupportedError,
    VerificationError,
)
from bundles.manifest import Manifest
from bundles.trust import MAX_ROOT_BYTES, MAX_TARGETS_BYTES, TrustStore

MANIFEST = "manifest.json"
MEASUREMENTS = "measurements.json"
"""Host-dependent build figures; signed, but left out of the content digest so builds are reproducible."""


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose every file matched its signed length and hashes."""

    directory: Path
    manifest: Manifest
    files: Mapping[str, TargetFile]
    """Bundle-relative path -> its signed target info."""
    content_digest: str
    targets_version: int
    variant: str | None = None
    """The one variant whose files the directory holds (per-variant download), or None: all of them."""

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def release_counter(self) -> int:
        return self.manifest.release_counter

    def path(self, rel: str) -> Path:
        return self.directory / rel


def target_prefix(name: str, version: str) -> str:
    return f"{name}/{version}/"


def content_digest(files: Mapping[str, TargetFile]) -> str:
    """sha256 over ``"<sha256>  <path>\\n"`` lines of every signed file but measurements.json, sorted."""
    lines = "".join(f"{files[rel].hashes['sha256']}  {rel}\n" for rel in sorted(files) if rel != MEASUREMENTS)
    return hashlib.sha256(lines.encode()).hexdigest()


def bundle_targets(targets: Targets, name: str, version: str) -> dict[str, TargetFile]:
    """The signed files of one bundle, keyed by bundle-relative path."""
    prefix = target_prefix(name, version)
    return {p[len(prefix):]: t for p, t in targets.targets.items() if p.startswith(prefix)}


def _check_manifest_target(files: Mapping[str, TargetFile], name: str, version: str,
                           trust: TrustStore | None, hardware_id: str | None,
                           agent_version: str | None) -> int:
    if MANIFEST not in files:
        raise MissingFileError("the signed metadata lists no manifest for this bundle",
                               path=f"{name}/{version}/{MANIFEST}")
    custom = files[MANIFEST].custom
    rc = int(custom.get("release_counter", -1))
    if trust is not None:
        trust.check_release_counter(name, rc, f"{name}/{version}")
    if hardware_id is not None:
        hw = list(custom.get("hardware_ids", []))
        if hw and hardware_id not in hw:
            raise HardwareMismatchError("the bundle is signed for other hardware", path=f"{name}/{version}",
                                        expected=hardware_id, found=hw)
    if agent_version is not None:
        need = str(custom.get("min_agent_version", "0.0.0"))
        if parse_semver(agent_version) < parse_semver(need):
            raise UnsupportedError("the bundle needs a newer agent; upgrade edgepack on the device",
                                   path=f"{name}/{version}", expected=f">= {need}", found=agent_version)
    return rc


def variant_files(manifest: Manifest, signed: Iterable[str], variant_id: str) -> set[str]:
    """The bundle files a device running ``variant_id`` needs: all signed files but other variants' models.

    Raises:
        ManifestError: the manifest has no variant ``variant_id``.
    """
    manifest.variant(variant_id)
    others = {v.file for v in manifest.variants if v.id != variant_id} - {manifest.variant(variant_id).file}
    return set(signed) - others


def _finish(directory: Path, files: Mapping[str, TargetFile], targets_version: int,
            variant: str | None = None) -> VerifiedBundle:
    """Parse the (now verified) manifest and cross-check it with the signed file list."""
    manifest = Manifest.from_bytes((directory / MANIFEST).read_bytes())
    custom = files[MANIFEST].custom
    if (manifest.name, manifest.version, manifest.release_counter) != (
            custom.get("name"), custom.get("version"), custom.get("release_counter")):
        raise VerificationError("manifest disagrees with its signed custom fields", path=MANIFEST,
                                expected=(custom.get("name"), custom.get("version"), custom.get("release_counter")),
                                found=(manifest.name, manifest.version, manifest.release_counter))
    missing = manifest.referenced_files() - set(files)
    if missing:
        raise MissingFileError("the manifest references files that are not signed", path=sorted(missing)[0])
    return VerifiedBundle(directory, manifest, dict(files), content_digest(files), targets_version, variant)


def _write_verified(dest: Path, rel: str, target: TargetFile, chunks_source: BundleArchive, member: str) -> None:
    path = dest / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o644)
    digest = hashlib.sha256()
    length = 0
    with os.fdopen(fd, "wb") as fh:
        try:
            for chunk in chunks_source.iter_bounded(member, target.length):
                digest.update(chunk)
                length += len(chunk)
                fh.write(chunk)
        except ArchiveError as exc:
            if exc.found != f"> {target.length}":
                raise
            raise DigestMismatchError("file is longer than its signed length; reading stopped there",
                                      path=rel, expected=f"{target.length} bytes",
                                      found=f"more than {target.length} bytes") from exc
    expected = target.hashes.get("sha256")
    if length != target.length or digest.hexdigest() != expected:
        raise DigestMismatchError("file does not match its signed length and hash", path=rel,
                                  expected=f"{target.length} bytes sha256={expected}",
                                  found=f"{length} bytes sha256={digest.hexdigest()}")


def _refuse_unlisted(arc: BundleArchive, trust: TrustStore, name: str, version: str) -> None:
    """The newest trusted targets do not list this bundle: say whether it was withdrawn by a floor."""
    from bundles.trust import parse_metadata

    own = parse_metadata(arc.read_bounded(METADATA_PREFIX + "targets.json", MAX_TARGETS_BYTES), "targets",
                         "targets.json")
    listed = bundle_targets(own.signed, name, version)
    if MANIFEST in listed:
        trust.check_release_counter(name, int(listed[MANIFEST].custom.get("release_counter", -1)),
                                    f"{name}/{version}")
    raise UnsignedFileError("the newest signed targets metadata does not list this bundle (withdrawn?)",
                            path=f"{name}/{version}")


def verify_archive(
    archive: Path,
    trust: TrustStore,
    dest: Path,
    *,
    now: datetime | None = None,
    hardware_id: str | None = None,
    agent_version: str | None = None,
) -> VerifiedBundle:
    """Verify ``archive`` against ``trust`` and extract its files into the fresh directory ``dest``.

    ``dest`` must not exist; it is created and, on any failure, removed again. The trust store is updated
    (newer root, newer targets, higher floors) only when the whole bundle verified; call ``trust.save()``
    to persist that.
    """
    now = now or utcnow()
    if dest.exists():
        raise FormatError("extraction directory must not exist yet", path=str(dest))
    staged = TrustStore(root=trust.root, targets=trust.targets, floors=dict(trust.floors))
    dest.mkdir(parents=True, mode=0o755)
    try:
        with BundleArchive(archive) as arc:
            chain = [arc.read_bounded(n, MAX_ROOT_BYTES) for n in arc.names(METADATA_PREFIX + "roots/")]
            if METADATA_PREFIX + "root.json" in arc.members:
                chain.append(arc.read_bounded(METADATA_PREFIX + "root.json", MAX_ROOT_BYTES))
            staged.update_root(chain, now)
            if METADATA_PREFIX + "targets.json" not in arc.members:
                raise MissingFileError("bundle archive carries no targets metadata",
                                       path=METADATA_PREFIX + "targets.json")
            extra_meta = set(arc.names(METADATA_PREFIX)) - {METADATA_PREFIX + "root.json",
                                                           METADATA_PREFIX + "targets.json"}
            extra_meta = {n for n in extra_meta if not n.startswith(METADATA_PREFIX + "roots/")}
            if extra_meta:
                raise UnsignedFileError("unexpected file among the metadata", path=sorted(extra_meta)[0])
            targets = staged.update_targets(arc.read_bounded(METADATA_PREFIX + "targets.json",
                                                             MAX_TARGETS_BYTES), now)

            members = arc.names(TARGETS_PREFIX)
            manifests = [m for m in members if m.endswith("/" + MANIFEST) and m.count("/") == 3]
            if len(manifests) != 1:
                raise FormatError("a bundle archive holds exactly one bundle (one manifest)",
                                  expected=1, found=len(manifests))
            _, name, version, _ = manifests[0].split("/")
            prefix = TARGETS_PREFIX + target_prefix(name, version)
            foreign = [m for m in members if not m.startswith(prefix)]
            if foreign:
                raise UnsignedFileError("archive mixes files from another bundle (mix-and-match)",
                                        path=foreign[0], expected=f"only {prefix}*")
            signed = bundle_targets(targets.signed, name, version)
            if not signed:
                _refuse_unlisted(arc, staged, name, version)
            present = {m[len(prefix):] for m in members}
            for rel in sorted(present - set(signed)):
                raise UnsignedFileError("file is not listed in the signed metadata", path=rel)
            for rel in sorted(set(signed) - present):
                raise MissingFileError("signed file is missing from the bundle", path=rel)
            _check_manifest_target(signed, name, version, staged, hardware_id, agent_version)
            for rel in sorted(signed):
                _write_verified(dest, rel, signed[rel], arc, prefix + rel)
            verified = _finish(dest, signed, targets.signed.version)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    trust.root, trust.targets, trust.floors = staged.root, staged.targets, staged.floors
    return verified


def verify_directory(
    directory: Path,
    targets: Metadata[Targets] | Targets,
    name: str,
    version: str,
    *,
    trust: TrustStore | None = None,
    hardware_id: str | None = None,
    agent_version: str | None = None,
    variant: str | None = None,
) -> VerifiedBundle:
    """Verify files already on disk (downloaded as individual targets) against verified targets metadata.

    ``targets`` must come from a verified source (a :class:`TrustStore` or python-tuf's updater). Extra files
    in ``directory`` are refused as well as missing or altered ones. With ``variant``, the directory must hold
    exactly :func:`variant_files` of that variant (the manifest is verified and read first to know them).
    """
    signed_targets = targets.signed if isinstance(targets, Metadata) else targets
    signed = bundle_targets(signed_targets, name, version)
    if not signed:
        raise MissingFileError("no signed files for this bundle", path=f"{name}/{version}")
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() or p.is_symlink()}
    _check_manifest_target(signed, name, version, trust, hardware_id, agent_version)
    expected = set(signed)
    if variant is not None:
        _verify_one(directory, MANIFEST, signed)
        expected = variant_files(Manifest.from_bytes((directory / MANIFEST).read_bytes()), signed, variant)
        for rel in sorted((present & set(signed)) - expected):
            raise UnsignedFileError(f"file belongs to another variant than {variant!r}", path=rel,
                                    expected=sorted(expected))
    for rel in sorted(present - set(signed)):
        raise UnsignedFileError("file is not listed in the signed metadata", path=rel)
    for rel in sorted(expected - present):
        raise MissingFileError("signed file is missing", path=rel)
    for rel in sorted(expected):
        _verify_one(directory, rel, signed)
    return _finish(directory, signed, signed_targets.version, variant)


def verified_manifest(directory: Path, targets: Metadata[Targets] | Targets, name: str, version: str) -> Manifest:
    """Parse ``directory/manifest.json`` only after it matched its signed length and hash.

    For a device that must read the manifest to know which variant, and so which files, it needs.
    """
    signed_targets = targets.signed if isinstance(targets, Metadata) else targets
    signed = bundle_targets(signed_targets, name, version)
    if MANIFEST not in signed:
        raise MissingFileError("the signed metadata lists no manifest for this bundle",
                               path=f"{name}/{version}/{MANIFEST}")
    _verify_one(directory, MANIFEST, signed)
    return Manifest.from_bytes((directory / MANIFEST).read_bytes())


def _verify_one(directory: Path, rel: str, signed: Mapping[str, TargetFile]) -> None:
    path = directory / rel
    if path.is_symlink():
        raise UnsignedFileError("symlinks are never trusted", path=rel)
    if not path.is_file():
        raise MissingFileError("signed file is missing", path=rel)
    with open(path, "rb") as fh:
        try:
            signed[rel].verify_length_and_hashes(fh)
        except LengthOrHashMismatchError as exc:
            raise DigestMismatchError(f"file does not match its signed length and hash: {exc}", path=rel) from exc
