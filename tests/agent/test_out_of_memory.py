"""A model that cannot allocate its memory kills its worker (as the OOM killer would), not the agent:
the crash is reported, the self-test fails, and the device keeps serving its last good model."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

from bundles.keys import KeyStore
from bundles.trust import TrustStore
from bundles.verify import verify_archive
from device_agent.states import State
from edgepack.demo_bundles import add_memory_bomb, derive_bundle
from tests.agent.conftest import DEVICE, HARDWARE, drive, outbox_events
from tests.agent.fakeserver import FakeUpdateServer
from tests.support.factories import digits_data


def test_out_of_memory_in_selftest_is_a_crash_and_keeps_the_old_model(
        keys: KeyStore, tmp_path: Path, fake_server: FakeUpdateServer, bundle: Callable, make_agent: Callable,
        agent_config: Callable) -> None:
    good = bundle("1.0.0", 1)
    agent = make_agent(agent_config(worker={"memory_limit_mb": 2048}))
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    drive(agent)
    base = verify_archive(good.path, TrustStore.from_root_file(keys.root_path), tmp_path / "base")
    bomb = derive_bundle(base, keys, tmp_path / "digits-1.1.0.edgepack", version="1.1.0", release_counter=2,
                         transform=add_memory_bomb, golden_from_base=True)
    fake_server.publish(bomb)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0")
    agent.check_in_now()
    drive(agent)
    events = outbox_events(agent)
    crash = next(e for e in events if e["event"] == "crash")
    assert crash["detail"]["signal"] == signal.SIGKILL and crash["detail"]["phase"] == "selftest"
    failed = next(e for e in events if e["event"] == "selftest_failed")
    assert failed["target"]["version"] == "1.1.0"
    assert agent.record.state is State.IDLE and agent.record.active.version == "1.0.0"
    images, _ = digits_data()
    status, body = agent.predict(json.dumps({"inputs": images[:1].tolist()}).encode())
    assert status == 200 and json.loads(body)["model"]["version"] == "1.0.0"
