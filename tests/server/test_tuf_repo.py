"""The image repository is a real TUF repository: python-tuf's ngclient refreshes it and downloads targets."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

from tuf.api.metadata import Metadata, Timestamp
from tuf.ngclient import Updater

from bundles.keys import KeyStore
from tests.server.conftest import LiveServer, push


def _updater(server: LiveServer, root: bytes, tmp: Path) -> Updater:
    meta = tmp / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    return Updater(metadata_dir=str(meta), metadata_base_url=f"{server.url}/tuf/image/",
                   target_base_url=f"{server.url}/tuf/image/targets/", target_dir=str(tmp), bootstrap=root)


def test_ngclient_refreshes_and_downloads(server: LiveServer, digits_bundles: dict, session_keys: KeyStore,
                                          tmp_path: Path) -> None:
    assert push(server, digits_bundles["1.0.0"]).status_code == 201
    updater = _updater(server, session_keys.root_path.read_bytes(), tmp_path / "c1")
    updater.refresh()
    info = updater.get_targetinfo("digits/1.0.0/models/digits.fp32.onnx")
    assert info is not None and info.custom["release_counter"] == 1
    path = updater.download_target(info)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == info.hashes["sha256"]

    # a second bundle: new targets, new snapshot and timestamp; a fresh refresh sees both bundles
    assert push(server, digits_bundles["1.1.0"]).status_code == 201
    updater = _updater(server, session_keys.root_path.read_bytes(), tmp_path / "c1")
    updater.refresh()
    assert updater.get_targetinfo("digits/1.1.0/manifest.json") is not None
    assert updater.get_targetinfo("digits/1.0.0/manifest.json") is not None


def test_timestamp_resigned_past_half_life(server: LiveServer, digits_bundles: dict) -> None:
    from update_server.services.common import lock

    assert push(server, digits_bundles["1.0.0"]).status_code == 201
    ctx = server.ctx
    with ctx.sessions() as session, session.begin():
        first = Metadata[Timestamp].from_bytes(ctx.repo.get(session, "timestamp"))
        lock(session, "repo")
        assert not ctx.repo.refresh(session, first.signed.expires - timedelta(hours=13))
        assert ctx.repo.refresh(session, first.signed.expires - timedelta(hours=11))
        second = Metadata[Timestamp].from_bytes(ctx.repo.get(session, "timestamp"))
    assert second.signed.version == first.signed.version + 1
    assert second.signed.snapshot_meta.version == first.signed.snapshot_meta.version
