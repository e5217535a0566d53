"""Key rotation, thresholds and expiry follow TUF: devices walk root versions, revoked keys stop counting."""

from __future__ import annotations

from pathlib import Path

import pytest

from bundles.errors import KeyStoreError, SignatureError
from bundles.keys import KeyStore
from bundles.trust import TrustStore
from bundles.verify import verify_archive
from tests.support.factories import make_digits_bundle


def test_init_writes_thresholds_and_separates_online_keys(tmp_path: Path) -> None:
    ks = KeyStore.init(tmp_path / "k", root_keys=3, root_threshold=2)
    root = ks.root().signed
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 3
    online = {p.name.split("-")[0] for p in (tmp_path / "k" / "online").glob("*.pem")}
    assert online == {"snapshot", "timestamp", "director"}
    offline = {p.name.split("-")[0] for p in (tmp_path / "k" / "private").glob("*.pem")}
    assert offline == {"root", "targets"}
    assert all(oct(p.stat().st_mode)[-3:] == "600" for p in (tmp_path / "k").rglob("*.pem"))
    with pytest.raises(KeyStoreError, match="not empty"):
        KeyStore.init(tmp_path / "k")
    with pytest.raises(KeyStoreError, match="threshold"):
        KeyStore.init(tmp_path / "k2", root_keys=2, root_threshold=3)


def test_device_offline_across_three_rotations_walks_the_chain(tmp_path: Path) -> None:
    ks = KeyStore.init(tmp_path / "k")
    device = TrustStore.from_root_file(ks.root_path)  # pinned at root v1
    old_targets_key = ks.root().signed.roles["targets"].keyids[0]
    ks.rotate("root", add_keys=1)  # v2
    ks.rotate("targets", add_keys=1, revoke=[old_targets_key[:10]])  # v3: old targets key revoked
    ks.rotate("root", add_keys=1, revoke=[ks.root().signed.roles["root"].keyids[0][:10]])  # v4
    assert ks.root().signed.version == 4
    info = make_digits_bundle(ks, tmp_path / "b.edgepack")
    vb = verify_archive(info.path, device, tmp_path / "x")
    assert device.root.signed.version == 4 and vb.name == "digits"
    assert old_targets_key not in device.root.signed.roles["targets"].keyids


def test_revoked_targets_key_no_longer_verifies(tmp_path: Path) -> None:
    ks = KeyStore.init(tmp_path / "k")
    before = make_digits_bundle(ks, tmp_path / "before.edgepack")  # signed with the old targets key
    old = ks.root().signed.roles["targets"].keyids[0]
    ks.rotate("targets", add_keys=1, revoke=[old[:12]])
    device = TrustStore.from_root_file(ks.root_path)  # a device that knows the new root
    with pytest.raises(SignatureError):
        verify_archive(before.path, device, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_rotation_needs_a_threshold_of_root_keys(tmp_path: Path) -> None:
    KeyStore.init(tmp_path / "k", root_keys=3, root_threshold=2)
    pems = sorted((tmp_path / "k" / "private").glob("root-*.pem"))
    for pem in pems[:2]:
        pem.rename(tmp_path / pem.name)  # only one root key left on this workstation
    with pytest.raises(KeyStoreError, match="not enough root keys"):
        KeyStore.load(tmp_path / "k").rotate("targets")


def test_floor_only_goes_up(tmp_path: Path) -> None:
    ks = KeyStore.init(tmp_path / "k")
    ks.sign_targets(floors={"digits": 3})
    with pytest.raises(KeyStoreError, match="can only be raised"):
        ks.sign_targets(floors={"digits": 2})
