"""An ML engineer's own models, from ``edgepack init`` to a device serving them: a tiny PyTorch network and a
scikit-learn random forest (ai.onnx.ml operators), each configured on top of the template with ``--set``,
built and signed by the real ``edgepack build``, pushed to a real update server, installed by a real agent
process (download, TUF verification, self-test, activation) and answering predictions on its local API."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bundles.keys import KeyStore
from device_agent.client import AgentClient
from tests.agent.conftest import AgentProcess, toml_dumps
from tests.support.services import free_port

RECIPE = '''
import numpy as np


def _split():
    from sklearn.datasets import load_digits
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.images))
    return d.images.astype(np.float32), d.target.astype(np.int64), order


def calibration():
    x, _, order = _split()
    return x[order[:200]], None


def evaluation():
    x, y, order = _split()
    return x[order[1200:]], y[order[1200:]]


def torch_model():
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny network: more threads only contend on a shared machine
    x, y, order = _split()
    xt = torch.tensor(x[order[:1200]].reshape(-1, 64) / 16.0)
    yt = torch.tensor(y[order[:1200]])
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model


def forest():
    from sklearn.ensemble import RandomForestClassifier
    x, y, order = _split()
    return RandomForestClassifier(10, random_state=0).fit(x[order[:1200]].reshape(-1, 64) / 16.0, y[order[:1200]])
'''

# On top of the template: the model, the preprocessing (8x8 grey levels 0..16 -> 64 floats) and the data.
COMMON = ['model.path=""', 'preprocessing.input="image"', 'preprocessing.output="input"',
          'preprocessing.steps=[{op="scale", multiply=0.0625}, {op="reshape", shape=[64]},'
          ' {op="cast", dtype="float32"}]',
          'calibration.path=""', 'calibration.factory="recipe.py:calibration"',
          'evaluation.path=""', 'evaluation.factory="recipe.py:evaluation"', "evaluation.budget=0.02",
          'task.labels=["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]', "output.latency_runs=5"]
MODELS = {
    "digits-torch": ['model.factory="recipe.py:torch_model"', 'model.format="torch"',
                     'variants.build=["onnx-fp32", "onnx-int8"]'],
    "digits-forest": ['model.factory="recipe.py:forest"', 'variants.build=["onnx-fp32"]'],
}


def cli(*args: str) -> str:
    """The `edgepack` command, run in this process (PyTorch, scikit-learn and onnxruntime imported once)."""
    from typer.testing import CliRunner

    from edgepack import cli as edgepack_cli

    edgepack_cli._register_all()
    res = CliRunner().invoke(edgepack_cli.app, list(args))
    assert res.exit_code == 0, f"edgepack {' '.join(args)}:\n{res.output[-3000:]}\n{res.exception!r}"
    return res.stdout


@pytest.mark.slow
def test_torch_and_sklearn_models_from_init_to_a_serving_device(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    from tests.server.conftest import enrollment_token, push, start_server

    cli("keys", "init", "--out", str(tmp_path / "keys"))
    bundles: dict[str, Path] = {}
    for name, settings in MODELS.items():
        cli("init", str(tmp_path / name), "--keys", str(tmp_path / "keys"))
        (tmp_path / name / "recipe.py").write_text(RECIPE)
        sets = [f"bundle.name=\"{name}\"", *COMMON, *settings]
        cli("build", "-c", str(tmp_path / name / "edgepack.toml"), *[a for s in sets for a in ("--set", s)])
        bundles[name] = next((tmp_path / name / "out").glob("*.edgepack"))

    keys = KeyStore.load(tmp_path / "keys")
    live = start_server(keys=keys, data_dir=tmp_path / "server", db_url=f"sqlite:///{tmp_path / 'server.db'}")
    agents: dict[str, AgentProcess] = {}
    try:
        token = enrollment_token(live, uses=len(bundles))
        for name, path in bundles.items():
            assert push(live, path).status_code == 201
            device, api = f"kiosk-{name}", f"127.0.0.1:{free_port()}"
            config = tmp_path / f"{device}.toml"
            config.write_text(toml_dumps({
                "device_id": device, "hardware_id": "x86-kiosk", "state_dir": str(tmp_path / device),
                "server": {"url": live.url, "poll_interval_s": 1},
                "trust": {"image_root": str(keys.root_path), "director_root": str(keys.director_root_path)},
                "api": {"listen": api}, "trial": {"period_s": 1.0, "health_interval_s": 0.3}}))
            enroll = subprocess.run([sys.executable, "-m", "device_agent.cli", "enroll", "--config", str(config),
                                     "--token", token], capture_output=True, text=True, timeout=60)
            assert enroll.returncode == 0, enroll.stderr
            with live.admin as admin:
                r = admin.post("/api/v1/rollouts", json={
                    "bundle": {"name": name, "version": "0.1.0"}, "selector": {"device_ids": [device]},
                    "phases": [100], "start": True, "reason": f"first install of {name}"})
                assert r.status_code == 201, r.text
            agents[name] = AgentProcess(config, api, tmp_path / f"{device}.log").start()

        digits = load_digits()
        images, labels = digits.images[-50:], digits.target[-50:]
        for name, agent in agents.items():
            deadline = time.monotonic() + 90
            while (agent.status().get("serving") or {}).get("name") != name:
                assert time.monotonic() < deadline, f"{name} not serving:\n{agent.log_tail()}"
                time.sleep(0.2)
            with AgentClient(agent.api) as client:
                answer = client.predict(images.tolist())
            assert answer["model"]["name"] == name and answer["model"]["version"] == "0.1.0"
            accuracy = np.mean(np.array(answer["predictions"]) == labels.astype(str))
            assert accuracy > 0.8, (name, answer["predictions"])
        assert agents["digits-forest"].status()["serving"]["variant"] == "onnx-fp32"
        for agent in agents.values():
            assert agent.stop() == 0
    finally:
        for agent in agents.values():
            agent.stop()
        live.stop()
