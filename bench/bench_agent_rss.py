"""Supervisor idle memory of ``edgepack-agent run`` from this tree against another tree (a baseline commit),
measured in the same run, alternating, on the same bundle and server.

The absolute figure of bench/bench_agent.py moves with the machine and the installed packages; this one
answers "did a change make the agent heavier?" as a ratio. Each round starts the agent from each tree,
lets it install the digits bundle from a protocol-conformant server (tests/agent/fakeserver.py), waits
until it is idle, then reads its RSS and USS.

    git worktree add /tmp/baseline main
    python bench/bench_agent_rss.py --baseline /tmp/baseline [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundles.keys import KeyStore  # noqa: E402
from device_agent.client import AgentClient  # noqa: E402
from tests.agent.conftest import DEVICE, HARDWARE, agent_config_dict, toml_dumps  # noqa: E402
from tests.agent.fakeserver import FakeUpdateServer  # noqa: E402
from tests.support.factories import make_digits_bundle  # noqa: E402
from tests.support.services import free_port  # noqa: E402


def measure(tree: Path, work: Path, server: FakeUpdateServer, keys: KeyStore, settle_s: float) -> tuple[float, float]:
    import psutil

    api = f"127.0.0.1:{free_port()}"
    (work / "state").mkdir(parents=True)
    cfg = agent_config_dict(work / "state", server.url, keys, api={"listen": api}, server={"poll_interval_s": 60})
    (work / "agent.toml").write_text(toml_dumps(cfg))
    with open(work / "agent.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--config", str(work / "agent.toml")],
                                env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with AgentClient(api, timeout=2) as client:
                    status = client.status()
                if status["state"] == "idle" and status["serving"]:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError(f"the agent from {tree} did not install the bundle; see {work / 'agent.log'}")
        time.sleep(settle_s)
        info = psutil.Process(proc.pid).memory_full_info()
        return info.rss / 1e6, info.uss / 1e6
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, required=True, help="another checkout of the repository")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settle", type=float, default=5.0, help="seconds idle before reading the memory")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-agent-rss-"))
    keys = KeyStore.init(work / "keys")
    server = FakeUpdateServer(keys)
    try:
        server.publish(make_digits_bundle(keys, work / "digits.edgepack"))
        server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
        server.poll_interval_s = 60
        trees = {"baseline": args.baseline.resolve(), "this tree": ROOT}
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in trees}
        for rnd in range(args.rounds):
            for name, tree in trees.items():
                res[name].append(measure(tree, work / f"{name.replace(' ', '-')}-{rnd}", server, keys, args.settle))
    finally:
        server.close()
    med = {k: (statistics.median(r for r, _ in v), statistics.median(u for _, u in v)) for k, v in res.items()}
    print("| tree | RSS MB (median) | USS MB (median) | rounds |")
    print("|---|---|---|---|")
    for name, (rss, uss) in med.items():
        print(f"| {name} | {rss:.2f} | {uss:.2f} | {args.rounds} |")
    b, t = med["baseline"], med["this tree"]
    print(f"\nratio this tree / baseline: RSS {t[0] / b[0]:.3f}x, USS {t[1] / b[1]:.3f}x")


if __name__ == "__main__":
    main()
