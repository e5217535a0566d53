"""A large bundle upload does not stall the server (SQLite, the default): while a throttled client streams a
real 64 MiB bundle and the server verifies and stores it, /healthz and device check-ins keep answering, and
they answer *while the server verifies the bundle* (its large file is still being extracted and hashed in the
staging area when the request is sent and still when the answer has arrived), not after it. Before, a check-in waited on
the event loop for the one SQLite connection the upload held during verification, and every request (even
/healthz) waited with it. Latency figures: bench/bench_faults.py."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bundles.keys import KeyStore
from tests.server.conftest import LiveServer, enrollment_token, push
from tests.server.sim import SimDevice
from tests.support.factories import make_digits_bundle

MiB = 1024 * 1024


def _throttled(data: bytes, sent: threading.Event, chunk: int = 256 * 1024, pause_s: float = 0.005) -> Iterator[bytes]:
    for start in range(0, len(data), chunk):
        yield data[start:start + chunk]
        time.sleep(pause_s)
    sent.set()


@pytest.mark.slow
def test_healthz_and_checkins_answer_during_a_large_upload(session_keys: KeyStore, tmp_path: Path,
                                                           make_server: Callable[..., LiveServer],
                                                           digits_bundles: dict) -> None:
    # digits_bundles first: the session's digits archives are signed before this one joins the session's
    # targets metadata (another model name, so release counters do not interfere either)
    padding = 64 * MiB
    big = make_digits_bundle(session_keys, tmp_path / "big.edgepack", name="digits-big", version="1.0.0",
                             release_counter=1, extra_files={"padding.bin": os.urandom(padding)})
    data = big.path.read_bytes()
    server = make_server(f"sqlite:///{tmp_path / 'server.db'}")
    device = SimDevice(server.url, "busy-1")
    device.enroll(enrollment_token(server, uses=1))
    sent, done = threading.Event(), threading.Event()
    upload: dict[str, object] = {}

    def push() -> None:
        try:
            with server.admin as client:
                upload["response"] = client.post("/api/v1/bundles", content=_throttled(data, sent))
        except Exception as exc:  # reported by the assertion below
            upload["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=push)
    worker.start()
    staging = server.ctx.storage.staging_area()

    def verifying() -> bool:
        """The server is extracting (hashing) the bundle's large file: it is there, not yet whole."""
        for extracted in staging.glob("verify-*/files/padding.bin"):
            try:
                if extracted.stat().st_size < padding:
                    return True
            except FileNotFoundError:
                pass
        return False

    statuses: list[int] = []
    answered_while_verifying: list[str] = []
    try:
        with httpx.Client(base_url=server.url, timeout=60) as plain:
            while not done.is_set():
                if not verifying():
                    statuses.append(plain.get("/healthz").status_code)  # while the body streams in, too
                    time.sleep(0.005)
                    continue
                health, checkin = plain.get("/healthz"), device.checkin()
                statuses += [health.status_code, checkin.status_code]
                if verifying():
                    answered_while_verifying.append(f"{health.status_code}/{checkin.status_code}")
    finally:
        worker.join(120)
    assert "error" not in upload, upload
    response = upload["response"]
    assert isinstance(response, httpx.Response) and response.status_code == 201, response
    assert statuses and set(statuses) == {200}, statuses
    assert answered_while_verifying, "no health check and check-in answered while the server verified the upload"


def test_concurrent_uploads_are_each_verified_against_the_newest_trust(server: LiveServer,
                                                                       digits_bundles: dict) -> None:
    """Verification runs outside the repository lock, so two uploads can verify against the same trusted
    targets; the one that registers second sees that the trust changed and verifies again. Both bundles end
    up registered and the repository serves the newest targets, which list both."""
    results: dict[str, int] = {}

    def upload(version: str) -> None:
        results[version] = push(server, digits_bundles[version]).status_code

    threads = [threading.Thread(target=upload, args=(v,)) for v in ("1.0.0", "1.1.0", "1.2.0")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {"1.0.0": 201, "1.1.0": 201, "1.2.0": 201}
    with server.admin as client:
        assert [b["version"] for b in client.get("/api/v1/bundles").json()] == ["1.0.0", "1.1.0", "1.2.0"]
        targets = client.get("/tuf/image/targets.json").json()["signed"]
        assert {p.split("/")[1] for p in targets["targets"]} == {"1.0.0", "1.1.0", "1.2.0"}
        for version in ("1.0.0", "1.1.0", "1.2.0"):
            files = client.get(f"/api/v1/bundles/digits/{version}").json()["files"]
            for f in files:
                r = client.get(f"/tuf/image/targets/digits/{version}/{f['path']}")
                assert r.status_code == 200 and len(r.content) == f["length"], (version, f["path"])
