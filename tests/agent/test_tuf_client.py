"""``edgepack-agent tuf``: the tuf-conformance client protocol over the agent's fetcher and downloader."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from bundles.assemble import BundleInfo
from device_agent import tuf_client
from tests.agent.fakeserver import FakeUpdateServer


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "device_agent.cli", "tuf", *args], capture_output=True,
                          text=True, timeout=120)


def test_init_refresh_download_and_cache(fake_server: FakeUpdateServer, bundle: Callable[..., BundleInfo],
                                         keys, tmp_path: Path) -> None:
    bundle("1.0.0", 1)
    md, td = tmp_path / "metadata", tmp_path / "targets"
    md.mkdir()
    url = fake_server.url + "/tuf/image"
    assert _cli("--metadata-dir", str(md), "init", str(keys.root_path)).returncode == 0
    assert fake_server.requests == []  # init makes no request
    r = _cli("--metadata-dir", str(md), "--metadata-url", url, "refresh")
    assert r.returncode == 0, r.stderr
    assert {"root.json", "timestamp.json", "snapshot.json", "targets.json"} <= {p.name for p in md.iterdir()}
    names = ["digits/1.0.0/manifest.json", "digits/1.0.0/models/digits.fp32.onnx"]
    args = ["--metadata-dir", str(md), "--metadata-url", url, "--target-base-url", url + "/targets",
            "--target-dir", str(td)]
    for n in names:
        args += ["--target-name", n]
    r = _cli(*args, "download")
    assert r.returncode == 0, r.stderr
    assert (td / "digits%2F1.0.0%2Fmanifest.json").read_bytes() == fake_server.files[names[0]]
    assert (td / "digits%2F1.0.0%2Fmodels%2Fdigits.fp32.onnx").read_bytes() == fake_server.files[names[1]]
    fake_server.requests.clear()
    assert tuf_client.main([*args, "download"]) == 0
    assert not [p for _, p in fake_server.requests if "/targets/" in p]  # already there with matching hashes


def test_failures_exit_1(fake_server: FakeUpdateServer, bundle: Callable[..., BundleInfo], keys,
                         tmp_path: Path) -> None:
    bundle("1.0.0", 1)
    md, td = tmp_path / "metadata", tmp_path / "targets"
    url = fake_server.url + "/tuf/image"
    assert tuf_client.main(["--metadata-dir", str(md), "--metadata-url", url, "refresh"]) == 1  # no init
    assert tuf_client.main(["--metadata-dir", str(md), "init", str(keys.root_path)]) == 0
    base = ["--metadata-dir", str(md), "--metadata-url", url, "--target-base-url", url + "/targets",
            "--target-dir", str(td)]
    assert tuf_client.main([*base, "--target-name", "digits/9.9.9/manifest.json", "download"]) == 1
    name = "digits/1.0.0/golden.npz"
    fake_server.tamper[name] = lambda b: b[:-1] + bytes([b[-1] ^ 0xFF])
    r = _cli(*base, "--target-name", name, "download")
    assert r.returncode == 1 and "length and hashes" in r.stderr
    assert not list(td.iterdir())  # nothing unverified is left behind
    fake_server.tamper.clear()
    fake_server.resign(timestamp_expires=timedelta(hours=-1))
    r = _cli("--metadata-dir", str(md), "--metadata-url", url, "refresh")
    assert r.returncode == 1 and "ExpiredMetadataError" in r.stderr


def _python_tuf_repository(directory: Path, files: dict[str, bytes], *, consistent: bool) -> None:
    """A TUF repository laid out as python-tuf writes one: with consistent snapshots, versioned metadata
    (``N.snapshot.json``, ``N.targets.json``) and each target stored only as ``<dir>/<hash>.<name>`` under
    every hash the metadata lists; without, plain names."""
    from datetime import datetime, timedelta, timezone

    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

    expires = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=1)
    signer = CryptoSigner.generate_ecdsa()
    root = Root(expires=expires, consistent_snapshot=consistent)
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(signer.public_key, role)
    targets = Targets(expires=expires)
    for name, data in files.items():
        targets.targets[name] = TargetFile.from_data(name, data, ["sha256", "sha512"])
    snapshot = Snapshot(expires=expires, meta={"targets.json": MetaFile(version=targets.version)})
    timestamp = Timestamp(expires=expires, snapshot_meta=MetaFile(version=snapshot.version))
    (directory / "metadata").mkdir(parents=True)
    for signed in (root, targets, snapshot, timestamp):
        md = Metadata(signed)
        md.sign(signer)
        prefix = f"{signed.version}." if consistent and signed.type in ("snapshot", "targets") else ""
        md.to_file(str(directory / "metadata" / f"{prefix}{signed.type}.json"))
        if signed.type == "root":
            md.to_file(str(directory / "metadata" / f"{signed.version}.root.json"))
    for name, data in files.items():
        dirname, _, base = name.rpartition("/")
        names = [f"{h}.{base}" for h in targets.targets[name].hashes.values()] if consistent else [base]
        for stored in names:
            path = directory / "targets" / dirname / stored
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


@pytest.mark.parametrize("consistent", [True, False])
def test_follows_consistent_snapshot_like_python_tuf(tmp_path: Path, consistent: bool) -> None:
    """Against a python-tuf style repository served by a real HTTP server (which knows only the file names
    on disk): hash-prefixed target names when the root says so, plain names when it does not."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    repo = tmp_path / "repo"
    files = {"models/digits/model.onnx": b"\x08\x01" * 5000, "readme.txt": b"hello"}
    _python_tuf_repository(repo, files, consistent=consistent)
    served: list[tuple[str, int]] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_request(self, code: object = "-", size: object = "-") -> None:
            served.append((self.path, int(str(code)) if str(code).isdigit() else 0))

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(repo)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        md, td = tmp_path / "client-metadata", tmp_path / "client-targets"
        assert tuf_client.main(["--metadata-dir", str(md), "init", str(repo / "metadata" / "root.json")]) == 0
        args = ["--metadata-dir", str(md), "--metadata-url", url + "/metadata", "--target-base-url",
                url + "/targets", "--target-dir", str(td)]
        for name in files:
            args += ["--target-name", name]
        r = _cli(*args, "download")
        assert r.returncode == 0, r.stderr
        for name, data in files.items():
            assert (td / name.replace("/", "%2F")).read_bytes() == data
        fetched = [p for p, code in served if p.startswith("/targets/") and code == 200]
        assert len(fetched) == 2 and not [p for p, code in served if code == 404 and p.startswith("/targets/")]
        if consistent:  # the first listed hash (sha256), as python-tuf's Updater.download_target picks it
            sha256 = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
            assert sorted(fetched) == sorted([f"/targets/models/digits/{sha256['models/digits/model.onnx']}.model.onnx",
                                              f"/targets/{sha256['readme.txt']}.readme.txt"])
            assert ("/metadata/1.snapshot.json", 200) in served and ("/metadata/1.targets.json", 200) in served
        else:
            assert sorted(fetched) == ["/targets/models/digits/model.onnx", "/targets/readme.txt"]
    finally:
        httpd.shutdown()
        httpd.server_close()
