"""What TLS and the broker account cost the agent's supervisor: idle RSS and CPU of ``edgepack-agent run``.

Two agents, same run, same machine, each enrolled for real with ``edgepack-agent enroll``:

* ``baseline``: plain HTTP on loopback, no broker (as the supervisor figure of bench_agent.py);
* ``tls``: HTTPS pinned to the local CA, MQTT over TLS with its own broker account (dynamic security),
  connected and subscribed to its notify topic.

Both idle with a 60 s poll interval (no bundle assigned, so no worker); RSS after ``--idle`` seconds, CPU
over that time.

    python bench/bench_agent_tls.py [--idle 15]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundles.keys import KeyStore  # noqa: E402
from tests.agent.conftest import AgentProcess, toml_dumps  # noqa: E402
from tests.server.conftest import enrollment_token, start_server  # noqa: E402
from tests.support import services  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(work: Path, keys: KeyStore, live: Any, name: str, idle_s: float) -> dict[str, float]:
    api = f"127.0.0.1:{services.free_port()}"
    server: dict[str, Any] = {"url": live.url, "poll_interval_s": 60}
    if live.ca_file:
        server["ca_file"] = str(live.ca_file)
    config = work / f"{name}.toml"
    config.write_text(toml_dumps({"device_id": f"bench-{name}", "hardware_id": "x86-kiosk",
                                  "state_dir": str(work / name), "server": server, "api": {"listen": api},
                                  "trust": {"image_root": str(keys.root_path),
                                            "director_root": str(keys.director_root_path)}}))
    enrolled = subprocess.run([sys.executable, "-m", "device_agent.cli", "enroll", "--config", str(config),
                               "--token", enrollment_token(live)], capture_output=True, text=True, cwd=ROOT)
    if enrolled.returncode != 0:
        raise RuntimeError(enrolled.stderr)
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")  # as in device_agent/edgepack-agent.service
    agent = AgentProcess(config, api, work / f"{name}.log").start()
    try:
        time.sleep(3)
        pid = agent.proc.pid
        c0, t0 = cpu_s(pid), time.monotonic()
        time.sleep(idle_s)
        return {"rss_mb": round(rss_mb(pid), 1), "cpu_pct": round(100 * (cpu_s(pid) - c0) / (time.monotonic() - t0), 2)}
    finally:
        agent.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", type=float, default=15.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-agent-tls-"))
    keys = KeyStore.init(work / "keys")
    broker = services.Mosquitto(persistence=False).start()
    plain = start_server(keys=keys, data_dir=work / "plain", db_url=f"sqlite:///{work / 'plain.db'}")
    secure = start_server(keys=keys, data_dir=work / "secure", db_url=f"sqlite:///{work / 'secure.db'}",
                          broker=broker, tls_files=broker.tls_files)
    try:
        results = {"baseline": measure(work, keys, plain, "baseline", args.idle),
                   "tls": measure(work, keys, secure, "tls", args.idle)}
        results["delta_mb"] = round(results["tls"]["rss_mb"] - results["baseline"]["rss_mb"], 1)
        results["load_avg_1m"] = round(os.getloadavg()[0], 2)
        print(json.dumps(results, indent=1))
    finally:
        plain.stop()
        secure.stop()
        broker.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
