"""``edgepack-agent tuf``: the tuf-conformance client protocol over the agent's fetcher and downloader."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

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
