"""Bundle registry over real HTTP on both databases: verified upload, immutability, Range, guarded delete."""

from __future__ import annotations

import hashlib
from pathlib import Path

from bundles.keys import KeyStore
from tests.server.conftest import LiveServer, enrollment_token, push
from tests.server.sim import SimDevice
from tests.support.factories import make_digits_bundle


def test_upload_list_inspect_download(server: LiveServer, digits_bundles: dict) -> None:
    b = digits_bundles["1.0.0"]
    r = push(server, b)
    assert r.status_code == 201, r.text
    assert r.json()["content_digest"] == b.content_digest
    with server.admin as client:
        listed = client.get("/api/v1/bundles").json()
        assert [(x["name"], x["version"]) for x in listed] == [("digits", "1.0.0")]
        detail = client.get("/api/v1/bundles/digits/1.0.0").json()
        assert detail["manifest"]["name"] == "digits"
        assert {f["path"] for f in detail["files"]} >= {"manifest.json", "models/digits.fp32.onnx"}
        data = b.path.read_bytes()
        whole = client.get("/api/v1/bundles/digits/1.0.0/archive")
        assert whole.status_code == 200 and whole.content == data
        part = client.get("/api/v1/bundles/digits/1.0.0/archive", headers={"Range": "bytes=100-"})
        assert part.status_code == 206 and part.content == data[100:]
        assert part.headers["content-range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
        bad = client.get("/api/v1/bundles/digits/1.0.0/archive", headers={"Range": f"bytes={len(data) + 10}-"})
        assert bad.status_code == 416
        assert client.get("/api/v1/bundles/digits/9.9.9").status_code == 404


def test_bundles_are_immutable(server: LiveServer, digits_bundles: dict) -> None:
    first = push(server, digits_bundles["1.0.0"])
    assert first.status_code == 201 and first.json()["created"] is True
    again = push(server, digits_bundles["1.0.0"])  # the same signed files again: idempotent
    assert again.status_code == 200 and again.json()["created"] is False, again.text
    assert again.json()["uploaded_at"] == first.json()["uploaded_at"]
    with server.admin as client:
        assert len(client.get("/api/v1/bundles").json()) == 1


def test_a_version_signed_again_with_other_content_is_refused(db_url: str, tmp_path: Path) -> None:
    """Two signings of digits 1.0.0 (a second copy of the key directory, or an old workstation that re-signed
    a rebuilt version): the server keeps the first. The other archive (409 bundle_exists) and every newer
    targets metadata listing the other content (with a bundle: 409 targets_conflict; alone: the same) are
    refused, so devices never see metadata that makes the published copy a corrupt download."""
    import shutil

    import httpx

    from tests.server.conftest import start_server

    keys = KeyStore.init(tmp_path / "keys")
    shutil.copytree(keys.directory, tmp_path / "keys2")
    keys2 = KeyStore.load(tmp_path / "keys2")
    first = make_digits_bundle(keys, tmp_path / "a.edgepack", version="1.0.0", release_counter=1)
    keys2.sign_targets(floors={"unrelated": 1})  # this copy has signed other things since
    other = make_digits_bundle(keys2, tmp_path / "b.edgepack", version="1.0.0", release_counter=1, n_golden=3)
    newer = make_digits_bundle(keys2, tmp_path / "c.edgepack", version="1.1.0", release_counter=2)
    live = start_server(keys=keys, data_dir=tmp_path / "data", db_url=db_url)
    try:
        assert push(live, first).status_code == 201
        tuf = httpx.get(f"{live.url}/tuf/image/targets.json").content

        r = push(live, other)
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "bundle_exists" and error["detail"]["files"] == ["golden.npz"]
        assert "already exists with other content (golden.npz differ)" in error["message"]
        assert "bump the version" in error["message"]
        for attempt in (push(live, newer), httpx.put(f"{live.url}/api/v1/admin/trust/targets",
                                                     content=keys2.targets_path.read_bytes(),
                                                     headers={"Authorization": f"Bearer {live.token}"})):
            assert attempt.status_code == 409, attempt.text
            error = attempt.json()["error"]
            assert error["code"] == "targets_conflict" and error["detail"]["files"] == ["golden.npz"]
            assert "other content for digits 1.0.0" in error["message"] and "corrupt download" in error["message"]
            assert "edgepack bundles delete digits 1.0.0" in error["message"]
        assert httpx.get(f"{live.url}/tuf/image/targets.json").content == tuf  # nothing published
        with live.admin as client:
            assert [b["version"] for b in client.get("/api/v1/bundles").json()] == ["1.0.0"]
            # the documented way out when no device uses it: delete it here, push what the new metadata signs
            assert client.delete("/api/v1/bundles/digits/1.0.0").status_code == 204
        assert push(live, newer).status_code == 201
        assert push(live, other).status_code == 201
    finally:
        live.stop()


def test_bundle_signed_by_unknown_key_is_refused(server: LiveServer, tmp_path: Path) -> None:
    stranger = KeyStore.init(tmp_path / "other-keys")
    foreign = make_digits_bundle(stranger, tmp_path / "foreign.edgepack", version="1.0.0")
    r = push(server, foreign)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "verification_failed"
    assert error["detail"]["error"] == "SignatureError"
    assert error["detail"]["file"] in ("1.root.json", "targets.json")
    assert "expected" in error["detail"] and "found" in error["detail"]
    with server.admin as client:
        assert client.get("/api/v1/bundles").json() == []


def test_tampered_bundle_gets_422_with_the_file(server: LiveServer, digits_bundles: dict, tmp_path: Path) -> None:
    import zipfile

    src = digits_bundles["1.0.0"].path
    tampered = tmp_path / "tampered.edgepack"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("preprocessing.json"):
                data = data.replace(b"float32", b"float64")
            zout.writestr(info, data)
    r = push(server, tampered)
    assert r.status_code == 422
    assert r.json()["error"]["detail"]["error"] == "DigestMismatchError"
    assert r.json()["error"]["detail"]["file"] == "preprocessing.json"
    with server.admin as client:
        assert client.post("/api/v1/bundles", content=b"").status_code == 400
        assert client.post("/api/v1/bundles", content=b"not a zip").status_code == 422


def test_delete_refused_while_used(server: LiveServer, digits_bundles: dict) -> None:
    assert push(server, digits_bundles["1.0.0"]).status_code == 201
    assert push(server, digits_bundles["1.1.0"]).status_code == 201
    device = SimDevice(server.url, "kiosk-del")
    device.enroll(enrollment_token(server))
    with server.admin as client:
        r = client.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "1.1.0"},
                                                  "start": True})
        assert r.status_code == 201, r.text
        refused = client.delete("/api/v1/bundles/digits/1.1.0")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "bundle_in_use"
        assert client.delete("/api/v1/bundles/digits/1.0.0").status_code == 204
        assert client.get("/api/v1/bundles/digits/1.0.0").status_code == 404
        assert client.get("/api/v1/bundles/digits/1.0.0/archive").status_code == 404
        assert client.delete("/api/v1/bundles/digits/1.0.0").status_code == 404


def test_tuf_targets_served_with_hash_prefix(server: LiveServer, digits_bundles: dict) -> None:
    b = digits_bundles["1.0.0"]
    assert push(server, b).status_code == 201
    with server.admin as client:
        files = client.get("/api/v1/bundles/digits/1.0.0").json()["files"]
    model = next(f for f in files if f["path"].endswith(".onnx"))
    import httpx

    plain = httpx.get(f"{server.url}/tuf/image/targets/digits/1.0.0/{model['path']}")
    assert plain.status_code == 200 and hashlib.sha256(plain.content).hexdigest() == model["sha256"]
    head, _, name = model["path"].rpartition("/")
    hashed = httpx.get(f"{server.url}/tuf/image/targets/digits/1.0.0/{head}/{model['sha256']}.{name}")
    assert hashed.status_code == 200 and hashed.content == plain.content
    wrong = httpx.get(f"{server.url}/tuf/image/targets/digits/1.0.0/{head}/{'0' * 64}.{name}")
    assert wrong.status_code == 404
    ranged = httpx.get(f"{server.url}/tuf/image/targets/digits/1.0.0/{model['path']}", headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.content == plain.content[:10]
