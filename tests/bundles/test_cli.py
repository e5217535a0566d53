"""The workstation CLI as a user runs it: keys init, assemble, inspect, verify and its exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.bundles.conftest import read_members, write_members


def edgepack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgepack.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_keys_assemble_inspect_verify(signed, tmp_path: Path) -> None:
    res = edgepack("keys", "init", "--out", str(tmp_path / "k"), "--root-keys", "3", "--root-threshold", "2")
    assert res.returncode == 0, res.stderr
    assert "trust/root.json" in res.stdout
    # Assemble from a directory of files (the verified content of an existing bundle, re-signed here).
    _, v1, _ = signed
    src = tmp_path / "src"
    for name, data in read_members(v1.path).items():
        if name.startswith("targets/digits/1.0.0/"):
            dest = src / name[len("targets/digits/1.0.0/"):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
    out = tmp_path / "digits.edgepack"
    res = edgepack("assemble", str(src), "--keys", str(tmp_path / "k"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert v1.content_digest in res.stdout.replace("\n", "")

    res = edgepack("inspect", str(out), "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["manifest"]["version"] == "1.0.0" and report["content_digest"] == v1.content_digest

    root = tmp_path / "k" / "trust" / "root.json"
    res = edgepack("verify", str(out), "--trust", str(root), "--selftest", "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["verified"] and result["selftest"]["onnx-fp32"] == "golden vectors pass"

    # Exit codes: 1 refused (tampered), 3 malformed archive, 4 unusable trust root.
    members = read_members(out)
    members["targets/digits/1.0.0/golden.npz"] += b"\0"
    bad = write_members(tmp_path / "bad.edgepack", members)
    res = edgepack("verify", str(bad), "--trust", str(root))
    assert res.returncode == 1 and "DigestMismatchError" in res.stderr and "golden.npz" in res.stderr
    (tmp_path / "junk.edgepack").write_bytes(b"not a zip")
    assert edgepack("verify", str(tmp_path / "junk.edgepack"), "--trust", str(root)).returncode == 3
    assert edgepack("verify", str(out), "--trust", str(tmp_path / "nope.json")).returncode == 4
    res = edgepack("verify", str(out), "--trust", str(root), "--hardware-id", "jetson")
    assert res.returncode == 1 and "HardwareMismatchError" in res.stderr


def test_rotate_and_raise_floor(tmp_path: Path) -> None:
    assert edgepack("keys", "init", "--out", str(tmp_path / "k")).returncode == 0
    res = edgepack("keys", "rotate", "--keys", str(tmp_path / "k"), "--role", "targets", "--add", "1")
    assert res.returncode == 0 and "version 2" in res.stdout, res.stderr
    res = edgepack("keys", "raise-floor", "--keys", str(tmp_path / "k"), "--name", "digits",
                   "--release-counter", "4")
    assert res.returncode == 0 and "floor" in res.stdout
    res = edgepack("keys", "raise-floor", "--keys", str(tmp_path / "k"), "--name", "digits",
                   "--release-counter", "2")
    assert res.returncode == 4 and "only be raised" in res.stderr
    shutil.rmtree(tmp_path / "k")


def test_assemble_refuses_to_sign_a_version_again_with_other_content(signed, tmp_path: Path) -> None:
    """Identical content may be signed again; a changed file, even the host-dependent measurements.json, is
    refused (exit 4) with the metadata file it is recorded in and the fix, and nothing is written."""
    assert edgepack("keys", "init", "--out", str(tmp_path / "k")).returncode == 0
    _, v1, _ = signed
    src = tmp_path / "src"
    for name, data in read_members(v1.path).items():
        if name.startswith("targets/digits/1.0.0/"):
            dest = src / name[len("targets/digits/1.0.0/"):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
    (src / "measurements.json").write_text('{"timings_s": {"convert": 1.5}}')
    args = ("assemble", str(src), "--keys", str(tmp_path / "k"), "--out")
    assert edgepack(*args, str(tmp_path / "a.edgepack")).returncode == 0
    res = edgepack(*args, str(tmp_path / "same.edgepack"))
    assert res.returncode == 0, res.stderr  # identical content: signing it again is harmless
    targets = (tmp_path / "k" / "repo" / "targets.json").read_bytes()
    (src / "measurements.json").write_text('{"timings_s": {"convert": 1.7}}')  # a rebuild on a busier host
    res = edgepack(*args, str(tmp_path / "b.edgepack"))
    assert res.returncode == 4, res.stdout + res.stderr
    message = " ".join(res.stderr.split())
    assert "digits 1.0.0 is already signed in" in message and "repo/targets.json" in message
    assert "measurements.json differ" in message and "bump the version" in message
    assert (tmp_path / "k" / "repo" / "targets.json").read_bytes() == targets
    assert not (tmp_path / "b.edgepack").exists()
    # the archive published first still verifies against the newest signed metadata
    res = edgepack("verify", str(tmp_path / "a.edgepack"), "--trust", str(tmp_path / "k" / "trust" / "root.json"))
    assert res.returncode == 0, res.stderr
