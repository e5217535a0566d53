"""The tamper matrix: every manipulation is refused with its specific error, nothing written outside tmp.

Each case starts from validly signed bundles (real model, real signatures) and changes one thing.
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest

from bundles._util import utcnow
from bundles.errors import (
    ArchiveError,
    DigestMismatchError,
    ExpiredMetadataError,
    FormatError,
    HardwareMismatchError,
    MissingFileError,
    RollbackError,
    SignatureError,
    UnsignedFileError,
    UnsupportedError,
)
from bundles.keys import KeyStore
from bundles.trust import TrustStore
from bundles.verify import verify_archive
from tests.bundles.conftest import read_members, write_members
from tests.support.factories import make_digits_bundle

PREFIX = "targets/digits/1.0.0/"


def refused(archive: Path, trust: TrustStore, tmp_path: Path, error: type[Exception], **kw) -> Exception:
    """Verify and expect ``error``; check the extraction directory is gone and nothing else was written."""
    before = set(tmp_path.rglob("*"))
    dest = tmp_path / "extract"
    with pytest.raises(error) as info:
        verify_archive(archive, trust, dest, **kw)
    assert not dest.exists(), "a refused bundle must leave no extracted files"
    assert set(tmp_path.rglob("*")) == before, "nothing may be written anywhere else"
    return info.value


def flip(data: bytes, at: int | None = None) -> bytes:
    i = len(data) // 2 if at is None else at
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


@pytest.fixture
def trust(signed) -> TrustStore:
    ks, _, _ = signed
    return TrustStore.from_root_file(ks.root_path)


@pytest.fixture
def members(signed) -> dict[str, bytes]:
    return read_members(signed[1].path)


def test_flipped_byte_in_each_bundle_file(signed, trust, members, tmp_path: Path) -> None:
    files = [n for n in members if n.startswith(PREFIX)]
    assert len(files) == 5
    for name in files:
        bad = dict(members)
        bad[name] = flip(members[name])
        err = refused(write_members(tmp_path / "bad.edgepack", bad), trust, tmp_path, DigestMismatchError)
        assert err.path == name[len(PREFIX):]
        assert "sha256" in str(err.expected) and "sha256" in str(err.found)
        (tmp_path / "bad.edgepack").unlink()


def test_flipped_byte_in_signed_metadata(signed, trust, members, tmp_path: Path) -> None:
    for name in ("metadata/targets.json", "metadata/root.json", "metadata/roots/1.root.json"):
        doc = json.loads(members[name])
        doc["signed"]["version"] += 1  # a one-character change inside the signed part
        bad = {**members, name: json.dumps(doc).encode()}
        refused(write_members(tmp_path / "bad.edgepack", bad), trust, tmp_path, SignatureError)
        (tmp_path / "bad.edgepack").unlink()
    bad = {**members, "metadata/targets.json": flip(members["metadata/targets.json"], 3)}
    refused(write_members(tmp_path / "bad.edgepack", bad), trust, tmp_path, (FormatError, SignatureError))


def test_file_added(trust, members, tmp_path: Path) -> None:
    bad = {**members, PREFIX + "preproc/evil.py": b"import os; os.system('id')"}
    err = refused(write_members(tmp_path / "b.edgepack", bad), trust, tmp_path, UnsignedFileError)
    assert err.path == "preproc/evil.py"


def test_file_removed(trust, members, tmp_path: Path) -> None:
    bad = {k: v for k, v in members.items() if k != PREFIX + "golden.npz"}
    err = refused(write_members(tmp_path / "b.edgepack", bad), trust, tmp_path, MissingFileError)
    assert err.path == "golden.npz"


def test_file_swapped_from_another_signed_bundle(signed, trust, members, tmp_path: Path) -> None:
    other = read_members(signed[2].path)
    bad = {**members, PREFIX + "golden.npz": other["targets/digits/1.1.0/golden.npz"]}
    refused(write_members(tmp_path / "b.edgepack", bad), trust, tmp_path, DigestMismatchError)
    # ...or carried under its own (validly signed) path: two bundles mixed in one archive.
    mixed = {**members, "targets/digits/1.1.0/golden.npz": other["targets/digits/1.1.0/golden.npz"]}
    refused(write_members(tmp_path / "c.edgepack", mixed), trust, tmp_path, UnsignedFileError)


def test_metadata_signed_by_unknown_keys(signed, trust, tmp_path: Path) -> None:
    stranger = KeyStore.init(tmp_path / "stranger")
    foreign = make_digits_bundle(stranger, tmp_path / "foreign.edgepack")
    (tmp_path / "stranger").rename(tmp_path.parent / f"{tmp_path.name}-stranger")
    refused(foreign.path, trust, tmp_path, SignatureError)
    # The stranger's targets.json inside our own bundle: signatures do not verify either.
    ours = read_members(signed[1].path)
    ours["metadata/targets.json"] = read_members(foreign.path)["metadata/targets.json"]
    refused(write_members(tmp_path / "b.edgepack", ours), trust, tmp_path, SignatureError)


def test_signatures_below_threshold(tmp_path: Path) -> None:
    ks = KeyStore.init(tmp_path / "k2", targets_keys=2, targets_threshold=2)
    info = make_digits_bundle(ks, tmp_path / "t.edgepack")
    members = read_members(info.path)
    doc = json.loads(members["metadata/targets.json"])
    assert len(doc["signatures"]) == 2
    doc["signatures"] = doc["signatures"][:1]
    members["metadata/targets.json"] = json.dumps(doc).encode()
    bad = write_members(tmp_path / "bad.edgepack", members)
    err = refused(bad, TrustStore.from_root_file(ks.root_path), tmp_path, SignatureError)
    assert "2 valid signatures" in str(err.expected) and "1 valid" in str(err.found)
    # A duplicated signature of the same key counts once (TUF: each key id once).
    doc["signatures"] = doc["signatures"] * 2
    members["metadata/targets.json"] = json.dumps(doc).encode()
    bad.unlink()
    refused(write_members(bad, members), TrustStore.from_root_file(ks.root_path), tmp_path,
            (SignatureError, FormatError))


def test_expired_metadata(signed, trust, tmp_path: Path) -> None:
    _, v1, _ = signed
    refused(v1.path, trust, tmp_path, ExpiredMetadataError, now=utcnow() + timedelta(days=400))


def test_release_counter_below_the_floor_but_fleet_rollback_above_it(tmp_path: Path) -> None:
    ks = KeyStore.init(tmp_path / "k")
    v1 = make_digits_bundle(ks, tmp_path / "v1.edgepack", version="1.0.0", release_counter=1)
    v2 = make_digits_bundle(ks, tmp_path / "v2.edgepack", version="2.0.0", release_counter=2, n_golden=5)
    v3 = make_digits_bundle(ks, tmp_path / "v3.edgepack", version="3.0.0", release_counter=3, n_golden=4)
    state = tmp_path / "device-state"
    device = TrustStore.open(state, initial_root=ks.root_path)
    verify_archive(v3.path, device, tmp_path / "run3")
    # Operator rolls the fleet back to 2.0.0: allowed, its files are still in the newest signed targets.
    verify_archive(v2.path, device, tmp_path / "run2")
    # The workstation withdraws everything below release 2 for good.
    ks.sign_targets(floors={"digits": 2})
    device.update_targets(ks.targets_path.read_bytes(), utcnow())
    device.save()
    # After a reboot the floor is remembered: the validly signed old 1.0.0 is refused as a rollback.
    rebooted = TrustStore.open(state)
    err = refused(v1.path, rebooted, tmp_path, RollbackError)
    assert err.expected == ">= 2" and err.found == 1
    verify_archive(v2.path, rebooted, tmp_path / "run2-again")  # still allowed: above the floor


def test_other_hardware_and_newer_agent_refused(signed, trust, tmp_path: Path) -> None:
    _, v1, _ = signed
    refused(v1.path, trust, tmp_path, HardwareMismatchError, hardware_id="jetson-nano")
    ks = KeyStore.init(tmp_path.parent / f"{tmp_path.name}-k")
    newer = make_digits_bundle(ks, tmp_path.parent / f"{tmp_path.name}-n.edgepack", min_agent_version="9.0.0")
    refused(newer.path, TrustStore.from_root_file(ks.root_path), tmp_path, UnsupportedError,
            agent_version="0.1.0")


@pytest.mark.parametrize("name", ["../evil", "targets/../../evil", "/etc/evil", "targets//x", "targets\\x",
                                  "targets/./x", "C:/evil"])
def test_unsafe_member_names(members, trust, tmp_path: Path, name: str) -> None:
    refused(write_members(tmp_path / "b.edgepack", {**members, name: b"x"}), trust, tmp_path, ArchiveError)


@pytest.mark.parametrize("mode", [stat.S_IFLNK | 0o777, stat.S_IFCHR | 0o644, stat.S_IFIFO | 0o644,
                                  stat.S_IFBLK | 0o644])
def test_links_and_device_files(members, trust, tmp_path: Path, mode: int) -> None:
    target = PREFIX + "preprocessing.json"

    def tweak(info: zipfile.ZipInfo) -> None:
        if info.filename == target:
            info.external_attr = mode << 16
            info.create_system = 3

    bad = {**members, target: b"/etc/passwd"}
    refused(write_members(tmp_path / "b.edgepack", bad, tweak), trust, tmp_path, ArchiveError)


def test_hardlink_like_shared_entries_and_duplicates(members, trust, tmp_path: Path) -> None:
    """Zip has no hardlink type; its equivalents are two entries sharing data, or a name twice."""
    path = write_members(tmp_path / "b.edgepack", members)
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "a") as zf:
        zf.writestr(PREFIX + "golden.npz", b"second copy")  # duplicate name
    refused(path, trust, tmp_path, ArchiveError)
    # Two central-directory entries pointing at the same local data (overlap).
    raw = bytearray(write_members(tmp_path / "c.edgepack", members).read_bytes())
    with zipfile.ZipFile(tmp_path / "c.edgepack") as zf:
        first_offset = zf.infolist()[0].header_offset
    first_cd = raw.find(b"PK\x01\x02")
    second_cd = raw.find(b"PK\x01\x02", first_cd + 4)
    raw[second_cd + 42: second_cd + 46] = first_offset.to_bytes(4, "little")  # local header offset field
    (tmp_path / "c.edgepack").write_bytes(bytes(raw))
    refused(tmp_path / "c.edgepack", trust, tmp_path, ArchiveError)


def test_member_longer_than_its_signed_length(members, trust, tmp_path: Path) -> None:
    name = PREFIX + "models/digits.fp32.onnx"
    bad = {**members, name: members[name] + os.urandom(4096)}
    err = refused(write_members(tmp_path / "b.edgepack", bad), trust, tmp_path, DigestMismatchError)
    assert "longer than its signed length" in str(err)


def test_compressed_member_expanding_1000_to_1(members, trust, tmp_path: Path) -> None:
    bomb = bytes(10_000_000)  # 10 MB of zeros deflates about 1000:1
    bad = {**members, PREFIX + "models/digits.fp32.onnx": bomb}
    path = write_members(tmp_path / "b.edgepack", bad)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(PREFIX + "models/digits.fp32.onnx")
        assert info.file_size / info.compress_size > 900
    err = refused(path, trust, tmp_path, ArchiveError)
    assert "ratio" in str(err)


def test_not_a_zip_at_all(trust, tmp_path: Path) -> None:
    (tmp_path / "junk.edgepack").write_bytes(os.urandom(2048))
    refused(tmp_path / "junk.edgepack", trust, tmp_path, ArchiveError)
