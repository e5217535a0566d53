"""Uptane-style assignments: bound to one device and hardware, short-lived, and checked against the
offline-signed image metadata, so a stolen director key cannot install anything the workstation did not sign."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import TargetFile

from bundles._util import utcnow
from bundles.director import AssignmentError, match_image, sign_assignment, verify_assignment
from bundles.errors import ExpiredMetadataError, HardwareMismatchError, RollbackError, SignatureError
from bundles.keys import OnlineKeys
from bundles.verify import bundle_targets, target_prefix


@pytest.fixture
def setup(signed):
    ks = signed[0]
    online = OnlineKeys.load(ks.directory)
    director_root = ks.director_root().signed
    files = {target_prefix("digits", "1.0.0") + rel: t
             for rel, t in bundle_targets(ks.targets().signed, "digits", "1.0.0").items()}
    return ks, online, director_root, files


def assign(online: OnlineKeys, files, *, device="kiosk-1", hw="x86-kiosk", version=1, now=None, signer=None,
           bundle=None) -> bytes:
    return sign_assignment(signer or online.director, device_id=device, hardware_id=hw, version=version,
                           files=files, bundle=bundle or {"name": "digits", "version": "1.0.0", "release_counter": 1},
                           now=now or utcnow(), extra={"rollout_id": "r-1", "reason": "rollout"})


def test_valid_assignment_matches_the_image_repository(setup) -> None:
    ks, online, director_root, files = setup
    a = verify_assignment(director_root, assign(online, files), device_id="kiosk-1", hardware_id="x86-kiosk",
                          now=utcnow())
    assert a.bundle == {"name": "digits", "version": "1.0.0", "release_counter": 1}
    assert a.info["rollout_id"] == "r-1"
    match_image(a, ks.targets().signed)


def test_another_devices_assignment_is_refused(setup) -> None:
    _, online, director_root, files = setup
    with pytest.raises(AssignmentError, match="another device"):
        verify_assignment(director_root, assign(online, files, device="kiosk-2"), device_id="kiosk-1",
                          hardware_id="x86-kiosk", now=utcnow())


def test_other_hardware_is_refused(setup) -> None:
    _, online, director_root, files = setup
    with pytest.raises(HardwareMismatchError):
        verify_assignment(director_root, assign(online, files, hw="rpi4"), device_id="kiosk-1",
                          hardware_id="x86-kiosk", now=utcnow())
    with pytest.raises(HardwareMismatchError, match="signed for other hardware"):
        verify_assignment(director_root, assign(online, files, hw="jetson"), device_id="kiosk-1",
                          hardware_id="jetson", now=utcnow())


def test_replayed_older_assignment_and_expired_one_are_refused(setup) -> None:
    _, online, director_root, files = setup
    old = assign(online, files, version=3)
    with pytest.raises(RollbackError):
        verify_assignment(director_root, old, device_id="kiosk-1", hardware_id="x86-kiosk", now=utcnow(),
                          last_version=4)
    stale = assign(online, files, now=utcnow() - timedelta(days=2))
    with pytest.raises(ExpiredMetadataError):
        verify_assignment(director_root, stale, device_id="kiosk-1", hardware_id="x86-kiosk", now=utcnow())


def test_assignment_signed_by_another_key_is_refused(setup) -> None:
    _, online, director_root, files = setup
    with pytest.raises(SignatureError):
        verify_assignment(director_root, assign(online, files, signer=CryptoSigner.generate_ed25519()),
                          device_id="kiosk-1", hardware_id="x86-kiosk", now=utcnow())


def test_compromised_director_cannot_install_what_the_workstation_did_not_sign(setup, tmp_path: Path) -> None:
    """An attacker with the director key signs a file the image repository does not list, or lists with
    another hash: the device refuses both (Uptane full verification)."""
    ks, online, director_root, files = setup
    evil = {"digits/1.0.0/models/digits.fp32.onnx": TargetFile.from_data(
        "digits/1.0.0/models/digits.fp32.onnx", b"evil model", ["sha256"])}
    evil["digits/1.0.0/models/digits.fp32.onnx"].unrecognized_fields["custom"] = dict(
        files["digits/1.0.0/models/digits.fp32.onnx"].custom)
    a = verify_assignment(director_root, assign(online, evil), device_id="kiosk-1", hardware_id="x86-kiosk",
                          now=utcnow())
    with pytest.raises(AssignmentError, match="disagree on a file"):
        match_image(a, ks.targets().signed)
    unlisted = {"digits/9.9.9/manifest.json": TargetFile.from_data("digits/9.9.9/manifest.json", b"{}", ["sha256"])}
    unlisted["digits/9.9.9/manifest.json"].unrecognized_fields["custom"] = {"name": "digits", "version": "9.9.9"}
    a = verify_assignment(director_root, assign(online, unlisted,
                                                bundle={"name": "digits", "version": "9.9.9", "release_counter": 9}),
                          device_id="kiosk-1", hardware_id="x86-kiosk", now=utcnow())
    with pytest.raises(AssignmentError, match="not signed by the image repository"):
        match_image(a, ks.targets().signed)
    # Changing a match field (release counter) in the director's copy is caught too.
    forged = {p: TargetFile.from_dict(t.to_dict(), p) for p, t in files.items()}
    for t in forged.values():
        t.unrecognized_fields["custom"] = {**t.custom, "release_counter": 99}
    a = verify_assignment(director_root, assign(online, forged), device_id="kiosk-1", hardware_id="x86-kiosk",
                          now=utcnow())
    with pytest.raises(AssignmentError, match="release_counter"):
        match_image(a, ks.targets().signed)
