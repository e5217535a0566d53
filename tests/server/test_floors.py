"""Floors reach the API: after `edgepack keys raise-floor`, a rollout or rollback that would assign a withdrawn
version is refused with the reason (409), over real HTTP and the CLI, on both databases, and nothing is
half-applied. A running rollout whose version is withdrawn halts by itself.

These tests raise floors, so each has a key directory (and bundles) of its own, not the session's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from sqlalchemy import func, select
from typer.testing import CliRunner

from bundles.assemble import BundleInfo
from bundles.keys import KeyStore
from tests.server.conftest import LiveServer, enrollment_token, push, start_server, wait_for
from tests.server.sim import SimDevice
from tests.support.factories import make_digits_bundle
from update_server import admin_cli
from update_server.models import AuditEntry, Device, Rollout

OLD = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}


@pytest.fixture
def own(db_url: str, tmp_path: Path) -> Iterator[tuple[LiveServer, KeyStore, dict[str, BundleInfo]]]:
    """A server trusting a key directory of this test's own, with digits 1.0.0 (rc 1), 1.1.0 (rc 2), 1.2.0 (rc 3)
    pushed."""
    keys = KeyStore.init(tmp_path / "keys")
    made = {v: make_digits_bundle(keys, tmp_path / f"digits-{v}.edgepack", version=v, release_counter=rc)
            for v, rc in (("1.0.0", 1), ("1.1.0", 2), ("1.2.0", 3))}
    live = start_server(keys=keys, data_dir=tmp_path / "data", db_url=db_url)
    try:
        for b in made.values():
            assert push(live, b).status_code == 201
        yield live, keys, made
    finally:
        live.stop()


def _raise_floor(live: LiveServer, keys: KeyStore, floor: int) -> None:
    """`edgepack keys raise-floor` on the workstation, then the new targets to the server (runbook)."""
    keys.sign_targets(floors={"digits": floor})
    with live.admin as client:
        r = client.put("/api/v1/admin/trust/targets", content=keys.targets_path.read_bytes())
        assert r.status_code == 200, r.text


def _fleet(live: LiveServer, group: str, n: int) -> list[SimDevice]:
    token = enrollment_token(live, uses=n, group=group)
    out = []
    for i in range(n):
        d = SimDevice(live.url, f"{group}-{i}")
        d.enroll(token)
        d.active = dict(OLD)
        assert d.checkin().status_code == 200
        out.append(d)
    return out


def _db(live: LiveServer) -> dict[str, Any]:
    """What a refusal must leave untouched: rollouts and their states, audit entries, device assignments."""
    with live.ctx.sessions() as session, session.begin():
        return {"rollouts": dict(session.execute(select(Rollout.id, Rollout.state)).all()),
                "audit": session.scalar(select(func.count()).select_from(AuditEntry)),
                "devices": {d.id: (d.desired_bundle_id, d.desired_reason, d.desired_rollout_id, d.desired_seq)
                            for d in session.scalars(select(Device))}}


def _post(client: httpx.Client, path: str, **body: Any) -> httpx.Response:
    return client.post(path, json=body)


def test_withdrawn_versions_are_refused_at_the_api(own: tuple[LiveServer, KeyStore, dict]) -> None:
    live, keys, _ = own
    director_root = keys.director_root_path.read_bytes()
    g1, _g2 = _fleet(live, "g1", 2), _fleet(live, "g2", 1)
    client = live.admin
    r1 = _post(client, "/api/v1/rollouts", bundle={"name": "digits", "version": "1.1.0"}, selector={"group": "g1"},
               phases=[100], min_soak_s=3600, start=True)
    assert r1.status_code == 201, r1.text
    r1_id = r1.json()["id"]
    for d in g1:
        assert d.sync(director_root).bundle["version"] == "1.1.0"
    r2 = _post(client, "/api/v1/rollouts", bundle={"name": "digits", "version": "1.1.0"}, selector={"group": "g2"},
               phases=[100], min_soak_s=3600)
    r2_id = r2.json()["id"]
    assert r2.json()["state"] == "created"

    _raise_floor(live, keys, 2)  # 1.0.0 withdrawn
    before = _db(live)
    created = _post(client, "/api/v1/rollouts", bundle={"name": "digits", "version": "1.0.0"},
                    selector={"group": "g2"}, start=True)
    assert created.status_code == 409, created.text
    error = created.json()["error"]
    assert error["code"] == "bundle_withdrawn"
    assert "below the signed floor 2" in error["message"] and "release counter >= 2" in error["message"]
    assert error["detail"] == {"name": "digits", "version": "1.0.0", "release_counter": 1, "floor": 2}
    back = _post(client, f"/api/v1/rollouts/{r1_id}/rollback", reason="complaints")
    assert back.status_code == 409, back.text
    error = back.json()["error"]
    assert error["code"] == "rollback_refused"
    assert "2 device(s) would go back to digits 1.0.0" in error["message"] and "Roll forward" in error["message"]
    assert [(b["version"], b["devices"]) for b in error["detail"]["blocked"]] == [("1.0.0", 2)]
    assert _db(live) == before  # no rollout, no audit entry, no device's assignment changed
    for d in g1:  # and the devices are told nothing new
        version = d.last_version
        d.sync(director_root)
        assert d.last_version == version and d.active["version"] == "1.1.0"
    # a version at or above the floor is still fine
    assert _post(client, f"/api/v1/rollouts/{r1_id}/pause").json()["state"] == "paused"
    assert _post(client, f"/api/v1/rollouts/{r1_id}/resume").json()["state"] == "running"

    _raise_floor(live, keys, 3)  # 1.1.0 withdrawn as well
    started = _post(client, f"/api/v1/rollouts/{r2_id}/start", reason="go")
    assert started.status_code == 409 and started.json()["error"]["code"] == "bundle_withdrawn", started.text
    assert "cannot start rollout" in started.json()["error"]["message"]
    # the gate loop halts the running rollout of the withdrawn version (and rolls nothing back: 1.0.0 is out too)
    wait_for(lambda: client.get(f"/api/v1/rollouts/{r1_id}").json()["state"] == "halted", timeout=30,
             what="the gate loop to halt the rollout of a withdrawn version")
    halt = client.get(f"/api/v1/rollouts/{r1_id}").json()["halt"]
    assert "target withdrawn" in halt["reason"] and "floor 3" in halt["reason"]
    before = _db(live)
    for action in ("resume", "rollback"):
        refused = _post(client, f"/api/v1/rollouts/{r1_id}/{action}")
        assert refused.status_code == 409, refused.text
    assert _post(client, f"/api/v1/rollouts/{r1_id}/resume").json()["error"]["code"] == "bundle_withdrawn"
    assert _post(client, f"/api/v1/rollouts/{r2_id}/pause").json()["error"]["code"] == "illegal_transition"
    assert _db(live) == before
    # the way out: stop it (devices keep what they run) and roll forward to a version above the floor
    assert _post(client, f"/api/v1/rollouts/{r1_id}/abort", reason="withdrawn").json()["state"] == "aborted"
    forward = _post(client, "/api/v1/rollouts", bundle={"name": "digits", "version": "1.2.0"},
                    selector={"group": "g1"}, phases=[100], min_soak_s=3600, start=True)
    assert forward.status_code == 201 and forward.json()["state"] == "running", forward.text
    assert all(d.sync(director_root).bundle["version"] == "1.2.0" for d in g1)
    client.close()


def test_cli_prints_why_a_withdrawn_version_is_refused(own: tuple[LiveServer, KeyStore, dict]) -> None:
    from edgepack.cli import _register_all
    from edgepack.cli import app as edgepack_app

    live, keys, _ = own
    _register_all()
    runner = CliRunner()
    admin = typer.Typer()
    admin_cli.register(admin)
    env = {"EDGEPACK_SERVER": live.url, "EDGEPACK_TOKEN": live.token}
    director_root = keys.director_root_path.read_bytes()
    (device,) = _fleet(live, "lab", 1)
    out = runner.invoke(admin, ["rollout", "create", "digits", "1.1.0", "--phases", "100", "--soak", "3600",
                                "--start"], env=env)
    assert out.exit_code == 0, out.output
    rid = out.output.split()[1]
    assert device.sync(director_root).bundle["version"] == "1.1.0"
    floor = runner.invoke(edgepack_app, ["keys", "raise-floor", "--keys", str(keys.directory), "--name", "digits",
                                         "--release-counter", "2"])
    assert floor.exit_code == 0, floor.output
    pushed = runner.invoke(admin, ["bundles", "push-targets", str(keys.targets_path)], env=env)
    assert pushed.exit_code == 0 and "the server publishes targets v" in pushed.output, pushed.output
    before = _db(live)
    back = runner.invoke(admin, ["rollout", "rollback", rid, "--reason", "complaints"], env=env)
    assert back.exit_code == 1 and "409 rollback_refused" in back.output, back.output
    assert "would go back to digits 1.0.0" in back.output and "below the signed floor 2" in back.output
    create = runner.invoke(admin, ["rollout", "create", "digits", "1.0.0", "--start"], env=env)
    assert create.exit_code == 1 and "409 bundle_withdrawn" in create.output, create.output
    assert "release counter >= 2" in create.output
    assert _db(live) == before
    status = runner.invoke(admin, ["rollout", "status", rid], env=env)
    assert status.exit_code == 0 and "state=running" in status.output


def test_why_not_installable_decides_from_the_signed_metadata(keys: KeyStore, tmp_path: Path) -> None:
    from bundles.verify import bundle_targets
    from update_server.services.installable import why_not_installable

    make_digits_bundle(keys, tmp_path / "d.edgepack", version="1.0.0", release_counter=1)
    targets = keys.targets().signed
    files = [{"path": rel, "length": t.length, "sha256": t.hashes["sha256"]}
             for rel, t in bundle_targets(targets, "digits", "1.0.0").items()]

    def why(md: Any, **kw: Any) -> str | None:
        return why_not_installable(md, **{"name": "digits", "version": "1.0.0", "release_counter": 1,
                                          "files": files, **kw})

    assert why(targets) is None
    assert why(None) == "the server has no signed targets metadata yet"
    assert "is no longer listed" in (why(targets, version="9.9.9") or "")
    changed = [dict(files[0], sha256="0" * 64), *files[1:]]
    assert files[0]["path"] in (why(targets, files=changed) or "") and "corrupt" in (why(targets, files=changed) or "")
    raised = keys.sign_targets(floors={"digits": 2}).signed
    assert "below the signed floor 2" in (why(raised) or "")
    assert why(raised, release_counter=2) is not None  # not listed any more either: dropped by the floor


def test_an_automatic_rollback_to_a_withdrawn_version_is_not_applied(db_url: str, session_broker: Any,
                                                                      tmp_path: Path) -> None:
    """A crash halts a rollout of 1.1.0 whose devices came from 1.0.0, withdrawn meanwhile: the policy's rollback
    would send them to a version they refuse, so the rollout stays halted with the reason and no device is
    reassigned."""
    import uuid

    from tests.server.sim import Publisher

    keys = KeyStore.init(tmp_path / "keys")
    made = [make_digits_bundle(keys, tmp_path / f"digits-{v}.edgepack", version=v, release_counter=rc)
            for v, rc in (("1.0.0", 1), ("1.1.0", 2))]
    live = start_server(keys=keys, data_dir=tmp_path / "data", db_url=db_url, broker=session_broker,
                        prefix=f"edgepack-test-{uuid.uuid4().hex[:8]}/v1/devices")
    pub = None
    try:
        for b in made:
            assert push(live, b).status_code == 201
        devices = _fleet(live, "g", 2)
        pub = Publisher(live.broker, live.prefix, devices)
        director_root = keys.director_root_path.read_bytes()
        client = live.admin
        r = _post(client, "/api/v1/rollouts", bundle={"name": "digits", "version": "1.1.0"}, phases=[100],
                  min_soak_s=3600, gates={"max_crash_rate": 0.05, "false_halt_rate": 0.2}, start=True)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        for d in devices:
            assert d.sync(director_root).bundle["version"] == "1.1.0"
        _raise_floor(live, keys, 2)

        def reporting() -> bool:
            for d in devices:
                pub.window(d)
            return bool(client.get(f"/api/v1/rollouts/{rid}").json()["target"]["devices_reporting"] == 2)

        wait_for(reporting, timeout=60, interval=0.3, what="both devices reporting on 1.1.0")
        before = _db(live)["devices"]
        for d in devices:  # both crash: with false_halt_rate 0.2 two devices of two can halt the crash gate
            pub.event(d, "crash", detail={"signal": 11, "phase": "serving"})
        wait_for(lambda: client.get(f"/api/v1/rollouts/{rid}").json()["state"] == "halted", timeout=60,
                 what="the crash to halt the rollout")
        status = client.get(f"/api/v1/rollouts/{rid}").json()
        assert status["halt"]["breached"][0]["name"] == "crash_rate"
        assert "2 device(s) would go back to digits 1.0.0" in status["halt"]["rollback_refused"]
        assert [(b["version"], b["devices"]) for b in status["halt"]["blocked"]] == [("1.0.0", 2)]
        assert _db(live)["devices"] == before  # nobody was sent to the withdrawn version
        admin = typer.Typer()
        admin_cli.register(admin)
        shown = CliRunner().invoke(admin, ["rollout", "status", rid],
                                   env={"EDGEPACK_SERVER": live.url, "EDGEPACK_TOKEN": live.token})
        assert shown.exit_code == 0 and "not rolled back: rollback of" in shown.output, shown.output
        actions = [e["action"] for e in client.get(f"/api/v1/rollouts/{rid}/audit").json()]
        assert actions[0] == "rollout.halt" and "rollout.rollback" not in actions
        client.close()
    finally:
        if pub is not None:
            pub.close()
        live.stop()
