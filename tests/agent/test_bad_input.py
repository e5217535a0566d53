"""Bad input of every kind is refused with a clear error, reported, and the last good model keeps serving."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from bundles.keys import KeyStore
from device_agent.machine import Agent
from device_agent.states import State
from tests.agent.conftest import DEVICE, HARDWARE, drive, outbox_events, rebuild_bundle
from tests.agent.fakeserver import FakeUpdateServer
from tests.support.factories import digits_data


@pytest.fixture
def serving(fake_server: FakeUpdateServer, bundle: Callable, make_agent: Callable) -> Agent:
    """An agent serving digits 1.0.0, with 1.1.0 (release counter 2) published but not assigned."""
    bundle("1.0.0", 1)
    agent = make_agent()
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    drive(agent)
    bundle("1.1.0", 2)
    return agent


def _last_event(agent: Agent) -> dict:
    return outbox_events(agent)[-1]


def _still_serving(agent: Agent, version: str = "1.0.0") -> None:
    images, _ = digits_data()
    status, body = agent.predict(json.dumps({"inputs": images[:1].tolist()}).encode())
    assert status == 200 and json.loads(body)["model"]["version"] == version
    assert agent.record.state is State.IDLE and agent.record.active.version == version
    assert not any(agent.store.staging.iterdir())


def test_corrupt_download_is_refused(serving: Agent, fake_server: FakeUpdateServer) -> None:
    fake_server.tamper["digits/1.1.0/models/digits.fp32.onnx"] = lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:]
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0")
    drive(serving)
    ev = _last_event(serving)
    assert ev["event"] == "verification_failed" and ev["target"]["version"] == "1.1.0"
    assert ev["detail"]["error"] == "DigestMismatchError" and "models/digits.fp32.onnx" in ev["detail"]["message"]
    _still_serving(serving)
    # the same assignment is not retried on every check-in
    drive(serving)
    assert [e["event"] for e in outbox_events(serving)].count("verification_failed") == 1


def test_more_than_the_signed_length_is_refused(serving: Agent, fake_server: FakeUpdateServer) -> None:
    fake_server.tamper["digits/1.1.0/golden.npz"] = lambda b: b + b"x" * 5000
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0")
    drive(serving)
    ev = _last_event(serving)
    assert ev["event"] == "verification_failed" and "more than the signed length" in ev["detail"]["message"]
    _still_serving(serving)


def test_assignment_signed_by_an_unknown_key_is_refused(serving: Agent, fake_server: FakeUpdateServer,
                                                         tmp_path: Path) -> None:
    from bundles.keys import OnlineKeys

    other = KeyStore.init(tmp_path / "attacker")
    fake_server.online = OnlineKeys.load(other.directory).__class__(
        fake_server.online.root, fake_server.online.director_root, fake_server.online.snapshot,
        fake_server.online.timestamp, OnlineKeys.load(other.directory).director)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0")
    drive(serving)
    ev = _last_event(serving)
    assert ev["event"] == "update_refused" and ev["detail"]["error"] == "SignatureError"
    assert "director" in ev["detail"]["message"] or "threshold" in ev["detail"]["message"]
    _still_serving(serving)


def test_image_metadata_signed_by_an_unknown_key_is_refused(serving: Agent, fake_server: FakeUpdateServer,
                                                             tmp_path: Path) -> None:
    other = KeyStore.init(tmp_path / "attacker")
    forged = other.targets()
    forged.signed.version = 99
    forged.signed.targets = fake_server.keys.targets().signed.targets
    forged.sign(other.signers["targets"][0])
    from bundles.keys import dump_metadata

    fake_server.keys.targets_path.write_bytes(dump_metadata(forged))  # the repository now serves forged targets
    fake_server.resign()
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0")
    drive(serving)
    ev = _last_event(serving)
    assert ev["event"] == "verification_failed" and ev["detail"]["error"] == "UnsignedMetadataError"
    _still_serving(serving)


def test_another_devices_assignment_is_refused(serving: Agent, fake_server: FakeUpdateServer) -> None:
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", for_device="kiosk-9999")
    drive(serving)
    ev = _last_event(serving)
    assert ev["event"] == "update_refused" and ev["detail"]["error"] == "AssignmentError"
    assert "another device" in ev["detail"]["message"] and "kiosk-9999" in ev["detail"]["message"]
    _still_serving(serving)


def test_bundle_for_other_hardware_is_refused(serving: Agent, fake_server: FakeUpdateServer,
                                               bundle: Callable) -> None:
    bundle("1.2.0", 3, hardware_ids=("rpi4",))
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.2.0")
    drive(serving)
    ev = _last_event(serving)
    assert ev["event"] == "update_refused" and ev["detail"]["error"] == "HardwareMismatchError"
    assert "x86-kiosk" in ev["detail"]["message"] and "rpi4" in ev["detail"]["message"]
    _still_serving(serving)


def test_director_and_image_disagree(serving: Agent, fake_server: FakeUpdateServer, bundle: Callable) -> None:
    """A stolen director key cannot name files the offline keys did not sign for that bundle."""
    bundle("1.2.0", 3)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", files_from=("digits", "1.2.0"))
    drive(serving)
    ev = _last_event(serving)
    assert ev["event"] in ("update_refused", "verification_failed")
    assert ev["detail"]["error"] == "AssignmentError"
    _still_serving(serving)


def test_expired_metadata_is_refused(serving: Agent, fake_server: FakeUpdateServer) -> None:
    fake_server.resign(timestamp_expires=timedelta(hours=-1))
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0")
    drive(serving)
    ev = _last_event(serving)
    assert ev["event"] == "verification_failed" and ev["detail"]["error"] == "ExpiredMetadataError"
    _still_serving(serving)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", expires=timedelta(seconds=-5))
    drive(serving)
    ev = _last_event(serving)
    assert ev["event"] == "update_refused" and ev["detail"]["error"] == "ExpiredMetadataError"


def test_replayed_old_version_below_the_floor_is_refused_operator_rollback_is_not(
        serving: Agent, fake_server: FakeUpdateServer, bundle: Callable, keys: KeyStore,
        make_agent: Callable, agent_config: Callable) -> None:
    captured = fake_server.assignments[DEVICE]  # the validly signed assignment to 1.0.0, for a replay later
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0")
    drive(serving)
    bundle("1.2.0", 3)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.2.0")
    drive(serving)
    assert serving.record.active.version == "1.2.0"
    # operator rollback to 1.1.0 (release counter 2): allowed, nothing withdrew it
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", reason="rollback")
    drive(serving)
    assert serving.record.active.version == "1.1.0"
    # the workstation raises the floor to 2 (1.0.0 withdrawn); the device learns it at its next refresh
    keys.sign_targets(floors={"digits": 2})
    fake_server.resign()
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.2.0")
    drive(serving)
    assert serving.record.active.version == "1.2.0"
    serving.close()
    # a restarted agent remembers the floor even if a replayed (old, validly signed) assignment arrives
    agent = make_agent(agent_config())
    assert json.loads((agent.store.trust / "trust-state.json").read_text())["floors"] == {"digits": 2}
    assert not any(p.startswith("digits/1.0.0/") for p in keys.targets().signed.targets)  # withdrawn
    fake_server.assignments[DEVICE] = captured  # an attacker replays the old, validly signed assignment
    drive(agent)
    ev = _last_event(agent)
    assert ev["event"] == "update_refused" and ev["detail"]["error"] == "RollbackError"
    assert "replay" in ev["detail"]["message"]
    assert agent.record.active.version == "1.2.0"


def test_release_counter_below_persisted_floor(serving: Agent, fake_server: FakeUpdateServer) -> None:
    """Even if the image repository still listed an old bundle, a counter below the floor is refused."""
    serving.image.trust.floors["digits"] = 2  # the highest floor this device has seen (persisted)
    serving.image.trust.save()
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0", reason="rollback")
    serving.record = serving.record.evolve(active=None)  # so 1.0.0 is a change, not "already running"
    drive(serving)
    ev = _last_event(serving)
    assert ev["event"] == "verification_failed" and ev["detail"]["error"] == "RollbackError"
    assert "below the signed floor" in ev["detail"]["message"]


def test_drip_feed_hits_the_deadline_then_resumes(serving: Agent, fake_server: FakeUpdateServer,
                                                  make_agent: Callable, agent_config: Callable) -> None:
    serving.close()
    agent = make_agent(agent_config(limits={"download_deadline_s": 1.0}))
    fake_server.drip_s = 0.01
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0")
    agent.check_in_now()
    assert agent.step() is State.DOWNLOADING
    assert agent.step() is State.IDLE  # deadline: back off, keep the partial files
    assert agent.record.last_error["error"] == "slow_retrieval"
    parts = list(agent.store.staging.rglob("*.part"))
    assert parts and parts[0].stat().st_size > 0
    fake_server.drip_s = None
    fake_server.requests.clear()
    drive(agent)
    assert agent.record.active.version == "1.1.0"
    ranged = [p for m, p in fake_server.requests if "targets/" in p]
    assert ranged  # resumed, and committed


def test_server_errors_are_retried_with_backoff(serving: Agent, fake_server: FakeUpdateServer) -> None:
    fake_server.fail_targets = 2
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0")
    serving.check_in_now()
    assert serving.step() is State.DOWNLOADING
    assert serving.step() is State.IDLE and serving.record.last_error["error"] == "http_503"
    drive(serving)  # waits for the (short) backoff, checks in, resumes
    if serving.record.active.version != "1.1.0":
        drive(serving)
    assert serving.record.active.version == "1.1.0"


def test_unknown_preprocessing_op_fails_the_selftest(serving: Agent, fake_server: FakeUpdateServer,
                                                      keys: KeyStore, tmp_path: Path) -> None:
    from tests.support.factories import make_digits_bundle

    base = make_digits_bundle(keys, tmp_path / "base.edgepack", version="1.5.0", release_counter=5)
    spec = {"opset": 1, "input": {"kind": "image"}, "output": "input",
            "steps": [{"op": "frobnicate", "version": 1, "params": {}}]}
    bad = rebuild_bundle(keys, base, tmp_path / "bad.edgepack", version="1.6.0", release_counter=6,
                         replace_files={"preprocessing.json": json.dumps(spec).encode()})
    fake_server.publish(bad)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.6.0")
    drive(serving)
    ev = _last_event(serving)
    assert ev["event"] == "selftest_failed" and ev["target"]["version"] == "1.6.0"
    assert "frobnicate" in ev["detail"]["message"]
    _still_serving(serving)
    assert [p.name for p in serving.store.bundles.iterdir()] == [serving.record.active.slot]


@pytest.mark.parametrize("body, fragment", [
    (b"not json", "not JSON"),
    (b'{"inputs": [[1, 2, 3]]}', "(N, H, W)"),
    (b'{"inputs": [[["a", "b"]]]}', "must be numbers"),
    (b'{"inputs": [[[1, 2], [3]]]}', "not a rectangular array"),
    (b'{"images": []}', "lacks `inputs`"),
    (json.dumps({"inputs": [[[0.0] * 9] * 7]}).encode(), "element count does not match"),
])
def test_prediction_of_the_wrong_shape_or_type(serving: Agent, body: bytes, fragment: str) -> None:
    status, answer = serving.predict(body)
    assert status == 400, answer
    message = json.loads(answer)["error"]["message"]
    assert fragment in message, message
    _still_serving(serving)
    window = serving.window.take(serving.clock.now())
    assert window["errors"] >= 1
