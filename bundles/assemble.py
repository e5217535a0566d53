"""Assemble and sign a bundle from files, on the workstation. The converter builds on this.

``assemble_bundle`` validates the manifest, checks that every file it references is present, signs every
file as a TUF target (length, sha256 and the custom fields devices match on: name, version, release
counter, hardware ids, minimum agent version) into the key store's cumulative targets metadata, and writes
the archive atomically: a failed build leaves no half-written bundle behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from tuf.api.metadata import Metadata, TargetFile

from bundles.archive import METADATA_PREFIX, TARGETS_PREFIX, check_member_name, write_archive
from bundles.errors import FormatError, KeyStoreError
from bundles.keys import KeyStore, dump_metadata
from bundles.manifest import Manifest
from bundles.verify import MANIFEST, MEASUREMENTS, bundle_targets, content_digest, target_prefix


@dataclass(frozen=True)
class BundleInfo:
    """What was written: where, which bundle, its reproducible content digest and the targets version."""

    path: Path
    name: str
    version: str
    release_counter: int
    content_digest: str
    targets_version: int


def _read(content: bytes | Path) -> bytes:
    return content if isinstance(content, bytes) else Path(content).read_bytes()


def assemble_bundle(
    out_path: Path,
    *,
    keystore: KeyStore,
    manifest: Mapping[str, object] | Manifest,
    files: Mapping[str, bytes | Path],
    expires_days: int = 365,
    now: datetime | None = None,
) -> BundleInfo:
    """Sign ``files`` plus ``manifest`` as one bundle and write the archive to ``out_path``.

    Raises:
        ManifestError: the manifest is invalid.
        FormatError: a referenced file is missing, or a path is unsafe.
        KeyStoreError: this name and version were already signed with other content, the release
            counter does not grow, or the key store lacks a threshold of targets keys.
    """
    parsed = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)
    contents = {rel: _read(c) for rel, c in files.items()}
    if MANIFEST in contents:
        raise FormatError("pass the manifest as `manifest`, not among the files", path=MANIFEST)
    for rel in contents:
        check_member_name(rel)
    missing = parsed.referenced_files() - set(contents)
    if missing:
        raise FormatError("the manifest references files that were not given", path=sorted(missing)[0])
    contents[MANIFEST] = parsed.to_bytes()

    name, version, rc = parsed.name, parsed.version, parsed.release_counter
    custom = {
        "name": name,
        "version": version,
        "release_counter": rc,
        "hardware_ids": list(parsed.hardware_ids),
        "min_agent_version": parsed.min_agent_version,
    }
    prefix = target_prefix(name, version)
    new_targets = {}
    for rel, data in sorted(contents.items()):
        target = TargetFile.from_data(prefix + rel, data, ["sha256"])
        target.unrecognized_fields["custom"] = {**custom, "bundle_file": rel, "unpacked_size": len(data)}
        new_targets[rel] = target

    current = keystore.targets().signed
    existing = bundle_targets(current, name, version)
    if existing:
        # measurements.json holds host timings that differ on every build: not part of the identity.
        same = ({r: t.hashes for r, t in existing.items() if r != MEASUREMENTS}
                == {r: t.hashes for r, t in new_targets.items() if r != MEASUREMENTS})
        if not same:
            raise KeyStoreError(
                f"{name} {version} is already signed with different content; versions are immutable, "
                "bump the version (and the release counter)", path=prefix)
    for path, target in ([] if existing else current.targets.items()):  # re-signing a version: no check
        other = target.custom
        if (other.get("name") == name and other.get("version") != version
                and int(other.get("release_counter", -1)) >= rc):
            raise KeyStoreError(
                "the release counter must grow with every new version of a model",
                path=path, expected=f"> {other.get('release_counter')}", found=rc)

    targets_md = keystore.sign_targets(new_targets.values(), expires=timedelta(days=expires_days), now=now)
    entries: dict[str, bytes] = {METADATA_PREFIX + "root.json": keystore.root_path.read_bytes(),
                                 METADATA_PREFIX + "targets.json": dump_metadata(targets_md)}
    for data in keystore.root_chain():
        entries[f"{METADATA_PREFIX}roots/{Metadata.from_bytes(data).signed.version}.root.json"] = data
    for rel, data in contents.items():
        entries[TARGETS_PREFIX + prefix + rel] = data

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".part", dir=out_path.parent)
    os.close(fd)
    try:
        write_archive(Path(tmp), entries)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return BundleInfo(out_path, name, version, rc, content_digest(new_targets), targets_md.signed.version)
