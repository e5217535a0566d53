"""A fleet split over several processes, so that no single interpreter carries every device's threads.

Each agent keeps a telemetry sender thread and a window thread of its own (``device_agent`` code); a
thousand of them in one CPython process wake so often that the GIL, not the work, sets the pace. A shard
is a child process (spawned, never forked: the parent has threads) running a :class:`~edgepack.fleet.fleet.Fleet`
for its share of the devices; :class:`ShardedFleet` offers the parent the same methods and merges answers.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from edgepack.fleet.scenario import Scenario


def _shard_main(conn: Any, scn: Scenario, server_url: str, keys_dir: str, state_root: str,
                indices: list[int], ca_file: str | None = None) -> None:
    import logging

    from bundles.keys import KeyStore
    from edgepack.fleet.fleet import Fleet

    logging.basicConfig(level=logging.ERROR)
    fleet = Fleet(scn, server_url=server_url, keys=KeyStore.load(Path(keys_dir)), state_root=Path(state_root),
                  indices=indices, ca_file=ca_file)
    try:
        while True:
            name, args = conn.recv()
            try:
                result = getattr(fleet, name)(*args)
                conn.send(("ok", result))
            except Exception as exc:  # report to the parent, keep serving
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
            if name == "stop":
                return
    finally:
        conn.close()


class ShardedFleet:
    """``processes`` child processes, each running a Fleet over every ``processes``-th device."""

    def __init__(self, scn: Scenario, *, server_url: str, keys: Any, state_root: Path, processes: int,
                 ca_file: str | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.n_devices = scn.fleet.devices
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for k in range(processes):
            parent, child = ctx.Pipe()
            indices = list(range(k, scn.fleet.devices, processes))
            proc = ctx.Process(target=_shard_main, args=(child, scn, server_url, str(keys.directory),
                                                          str(state_root), indices, ca_file),
                               name=f"fleet-shard-{k}")
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _all(self, name: str, *args: Any) -> list[Any]:
        for conn in self.conns:
            conn.send((name, args))
        out = []
        for conn in self.conns:
            status, value = conn.recv()
            if status != "ok":
                raise RuntimeError(f"fleet shard failed in {name}: {value}")
            out.append(value)
        return out

    def enroll_and_boot(self, token: str) -> float:
        return float(max(self._all("enroll_and_boot", token)))

    def start(self) -> None:
        self._all("start")

    def arm_faults(self) -> None:
        self._all("arm_faults")

    def versions(self) -> dict[str, int]:
        return _merge(self._all("versions"))

    def settled(self, version: str, rollout_state: str) -> bool:
        return all(self._all("settled", version, rollout_state))

    def published(self) -> int:
        return sum(self._all("published"))

    def report(self) -> dict[str, Any]:
        parts = self._all("report")
        return {"load": _merge([p["load"] for p in parts]), "faults": _merge([p["faults"] for p in parts]),
                "sessions": _merge([p["sessions"] for p in parts]),
                "agent_errors": [e for p in parts for e in p["agent_errors"]]}

    def stop(self) -> None:
        try:
            self._all("stop")
        finally:
            for proc in self.procs:
                proc.join(60)
                if proc.is_alive():
                    proc.kill()


def _merge(parts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out
