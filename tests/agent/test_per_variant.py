"""Per-variant download: a device fetches the manifest, chooses its variant, downloads only that model plus
the shared files, verifies them per variant and serves; the other variants' models never reach it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from bundles.keys import KeyStore
from device_agent.states import State
from tests.agent.conftest import DEVICE, HARDWARE, drive, outbox_events, rebuild_bundle
from tests.agent.fakeserver import FakeUpdateServer
from tests.support.factories import digits_onnx


def _two_variants(keys: KeyStore, bundle: Callable, fake_server: FakeUpdateServer, out: Path):  # type: ignore[no-untyped-def]
    """The digits bundle plus a second model only the Pi profiles run (a real, different ONNX file)."""
    base = bundle("1.0.0", 1, publish=False)
    pi_model = digits_onnx("bad")
    manifest_variants = [
        {"id": "onnx-fp32", "file": "models/digits.fp32.onnx", "format": "onnx", "runtime": "onnxruntime",
         "precision": "fp32"},
        {"id": "onnx-fp32-pi", "file": "models/digits.pi.onnx", "format": "onnx", "runtime": "onnxruntime",
         "precision": "fp32"},
    ]
    info = rebuild_bundle(keys, base, out / "digits-1.1.0.edgepack", version="1.1.0", release_counter=2,
                          replace_files={"models/digits.pi.onnx": pi_model}, variants=manifest_variants,
                          profiles={"x86-kiosk": ["onnx-fp32"], "rpi4": ["onnx-fp32-pi", "onnx-fp32"]})
    fake_server.publish(info)
    return info, len(pi_model)


def test_device_downloads_only_its_variant_and_serves_it(
        keys: KeyStore, fake_server: FakeUpdateServer, bundle: Callable, make_agent: Callable,
        tmp_path: Path) -> None:
    _, pi_bytes = _two_variants(keys, bundle, fake_server, tmp_path)
    agent = make_agent()
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", rollout_id="r-1")
    states = drive(agent)
    assert states[-1] is State.IDLE and agent.record.active is not None
    assert agent.record.active.variant == "onnx-fp32"
    fetched = [path for method, path in fake_server.requests if method == "GET" and "/tuf/image/targets/" in path]
    assert fetched and not any("digits.pi.onnx" in p for p in fetched)      # never asked for the other model
    assert fetched[0].endswith("manifest.json")                            # the manifest comes first
    slot = agent.store.slot_dir(agent.record.active.slot)
    held = sorted(str(p.relative_to(slot)) for p in slot.rglob("*") if p.is_file())
    assert "models/digits.pi.onnx" not in held and "models/digits.fp32.onnx" in held
    assert set(agent.record.active.files) == set(held)   # what the worker re-hashes after a restart
    downloaded = next(e for e in outbox_events(agent) if e["event"] == "downloaded")
    total = sum(fake_server_sizes(fake_server, "digits/1.1.0/").values())
    assert downloaded["detail"]["bytes"] == total - pi_bytes
    # the same bundle on a Pi profile would fetch the other model
    manifest = json.loads((slot / "manifest.json").read_text())
    assert manifest["profiles"]["rpi4"][0] == "onnx-fp32-pi"


def test_restart_after_per_variant_install_rehashes_only_the_held_files(
        keys: KeyStore, fake_server: FakeUpdateServer, bundle: Callable, make_agent: Callable,
        agent_config: Callable, tmp_path: Path) -> None:
    _two_variants(keys, bundle, fake_server, tmp_path)
    config = agent_config()
    agent = make_agent(config)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", rollout_id="r-1")
    drive(agent)
    agent.stop()
    again = make_agent(config)   # a reboot: the worker re-hashes the active bundle's files before serving
    drive(again)
    assert again.record.active is not None and again.status()["serving"]["version"] == "1.1.0"


def fake_server_sizes(server: FakeUpdateServer, prefix: str) -> dict[str, int]:
    return {p: len(d) for p, d in server.files.items() if p.startswith(prefix)}
