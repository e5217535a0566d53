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

from tuf.api.metadata import Metadata, TargetFile, Targets

from bundles.archive import METADATA_PREFIX, TARGETS_PREFIX, check_member_name, write_archive
from bundles.errors import FormatError, KeyStoreError
from bundles.keys import KeyStore, dump_metadata
from bundles.manifest import Manifest
from bundles.verify import MANIFEST, bundle_targets, content_digest, target_prefix


@dataclass(frozen=True)
class BundleInfo:
    """What was written: where, which bundle, its reproducible content digest and the targets version."""

    path: Path
    name: str
    version: str
    release_counter: int
    content_digest: str
    targets_version: int


def changed_files(signed: Mapping[str, TargetFile], new: Mapping[str, TargetFile]) -> list[str]:
    """Bundle-relative paths whose signed length or hashes differ between two signings of one version (a file
    present in only one of them counts). Every signed file counts, ``measurements.json`` too: devices check
    each file they download against the newest signed list, so re-signing one of them with other bytes turns
    the copy already published into a corrupt download."""
    return sorted(p for p in set(signed) | set(new)
                  if p not in signed or p not in new
                  or (signed[p].length, signed[p].hashes) != (new[p].length, new[p].hashes))


def already_signed_message(keystore: KeyStore, targets: Targets, name: str, version: str,
                           differ: list[str] | None = None) -> str:
    """Why a version cannot be signed again, naming the metadata file it is recorded in, and what to do."""
    rcs = [int(t.custom.get("release_counter", 0)) for t in targets.targets.values() if t.custom.get("name") == name]
    what = f" with different content ({', '.join(differ[:6])} differ)" if differ else ""
    return (f"{name} {version} is already signed in {keystore.targets_path} (targets v{targets.version}){what}; a "
            f"signed version is immutable (devices and servers hold the files it lists): bump the version and the "
            f"release counter (above {max(rcs, default=0)}) for new content")


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
        KeyStoreError: this name and version were already signed with other content (any file, the
            host-dependent ``measurements.json`` too: identical content may be signed again), the release
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
    differ = changed_files(existing, new_targets) if existing else []
    if differ:
        raise KeyStoreError(already_signed_message(keystore, current, name, version, differ), path=prefix)
    for path, target in ([] if existing else current.targets.items()):  # re-signing a version: no check
        other = target.custom
        if (other.get("name") == name and other.get("version") != version
                and int(other.get("release_counter", -1)) >= rc):
            raise KeyStoreError(
                "the release counter must grow with every new version of a model",
                path=path, expected=f"> {other.get('release_counter')}", found=rc)

    # Signed now, recorded in the key store only once the archive is written: a failed write leaves the version
    # unsigned (so it can be built again), never signed without an archive.
    targets_md = keystore.sign_targets(new_targets.values(), expires=timedelta(days=expires_days), now=now,
                                       persist=False)
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
        keystore.save_targets(targets_md)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return BundleInfo(out_path, name, version, rc, content_digest(new_targets), targets_md.signed.version)
