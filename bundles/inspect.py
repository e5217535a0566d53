"""Read what a bundle archive holds, without trusting it (for humans and tooling)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata

from bundles.archive import METADATA_PREFIX, TARGETS_PREFIX, BundleArchive
from bundles.errors import FormatError
from bundles.trust import MAX_TARGETS_BYTES, parse_metadata
from bundles.verify import MANIFEST, bundle_targets, content_digest

MAX_MANIFEST_BYTES = 1_000_000


def inspect_bundle(path: Path) -> dict[str, Any]:
    """Manifest, signed file list and signature summary of a bundle. Nothing here is verified."""
    with BundleArchive(path) as arc:
        manifests = [m for m in arc.names(TARGETS_PREFIX) if m.endswith("/" + MANIFEST) and m.count("/") == 3]
        if len(manifests) != 1:
            raise FormatError("a bundle archive holds exactly one manifest", expected=1, found=len(manifests))
        _, name, version, _ = manifests[0].split("/")
        try:
            manifest = json.loads(arc.read_bounded(manifests[0], MAX_MANIFEST_BYTES))
        except json.JSONDecodeError as exc:
            raise FormatError(f"manifest.json is not JSON: {exc}", path=manifests[0]) from exc
        targets: Metadata[Any] = parse_metadata(
            arc.read_bounded(METADATA_PREFIX + "targets.json", MAX_TARGETS_BYTES), "targets", "targets.json")
        files = bundle_targets(targets.signed, name, version)
        return {
            "manifest": manifest,
            "content_digest": content_digest(files) if files else None,
            "targets": {"version": targets.signed.version, "expires": targets.signed.expires.isoformat(),
                        "signers": sorted(k[:12] for k in targets.signatures)},
            "files": [{"path": rel, "length": t.length, "sha256": t.hashes.get("sha256", "")}
                      for rel, t in sorted(files.items())],
            "archive_members": arc.names(),
        }
