"""Bundles of every released format version keep verifying and loading in every later edgepack."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from bundles.selftest import run_golden
from bundles.trust import TrustStore
from bundles.verify import verify_archive

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("version_dir", sorted(p for p in GOLDEN.iterdir() if p.name.startswith("format-v")),
                         ids=lambda p: p.name)
def test_golden_bundle_still_verifies_and_runs(version_dir: Path, tmp_path: Path) -> None:
    info = json.loads((version_dir / "info.json").read_text())
    # Verify at the time it was made (+1 day): its metadata expires, its format must not.
    when = datetime.fromisoformat(info["made_at"]) + timedelta(days=1)
    trust = TrustStore.from_root_file(version_dir / "root.json")
    vb = verify_archive(version_dir / "digits-1.0.0.edgepack", trust, tmp_path / "x", now=when)
    assert vb.content_digest == info["content_digest"]
    for variant in vb.manifest.variants:
        run_golden(vb, variant.id)
