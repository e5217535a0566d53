"""End-to-end acknowledgement under issue 10's faults: lost / duplicated, device vs server counts.

Three scenarios, each with devices made of the agent's real telemetry parts (tests/support/ackfleet.py:
``Outbox`` + ``Telemetry`` + ``MqttPublisher``, checking in every second), a real update server, a real
Mosquitto:

* ``broker``: the broker stopped for ``--broker-stop`` seconds (issue: 60) and started again WITHOUT
  persistence while the devices keep producing (issue 10 measured 12 of 41 and 13 of 38 lost this way when
  the broker's PUBACK deleted messages from the outbox);
* ``kill9``: the server (a subprocess, PostgreSQL) killed with SIGKILL during a burst and started again;
* ``ingester``: the server (and its ingester) away for ``--ingester-away`` seconds (issue: 300) while the
  broker runs mosquitto's DEFAULT ``max_queued_messages`` (1000) and the devices produce more than that.

For each: produced (device side), stored (server side: windows in ``telemetry_aggregates``), lost
(produced - stored when positive, plus the server's own ``lost`` count), duplicated (stored - produced when
positive), re-sent (messages the devices sent again because the server had not committed them
``resend_s`` after sending: what a broker PUBACK would have lost), and the time from the end of the fault to
every outbox being empty.

    python bench/bench_e2e_ack.py                        # the issue's durations (about 8 minutes)
    python bench/bench_e2e_ack.py --broker-stop 20 --ingester-away 60 --json
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundles.keys import KeyStore  # noqa: E402
from tests.server.conftest import enrollment_token, start_server  # noqa: E402
from tests.support import services  # noqa: E402
from tests.support.ackfleet import (  # noqa: E402
    AckDevice,
    AckFleet,
    Producer,
    end_process,
    enroll_token_cli,
    serve_process,
    server_counts,
    server_env,
    wait_until,
)


def _figures(db_url: str, devices: list[AckDevice], fault_end: float, fleet: AckFleet) -> dict[str, Any]:
    try:
        wait_until(fleet.drained, 600, "every outbox to drain", interval=0.1)
        drained_s: float | None = round(time.monotonic() - fault_end, 1)
    except AssertionError:
        drained_s = None
    counts = server_counts(db_url, [d.device_id for d in devices])
    produced = sum(d.produced for d in devices)
    stored = sum(c["windows"] for c in counts.values())
    per_device = [(d.produced, counts[d.device_id]["windows"]) for d in devices]
    return {"devices": len(devices), "produced": produced, "stored": stored,
            "lost": sum(max(p - s, 0) for p, s in per_device) + sum(c["lost"] for c in counts.values()),
            "duplicated": sum(max(s - p, 0) for p, s in per_device),
            "resent": sum(d.telemetry.resent for d in devices), "drained_after_fault_s": drained_s}


def broker_outage(work: Path, keys: KeyStore, n: int, rate: float, stop_s: float) -> dict[str, Any]:
    broker = services.Mosquitto(persistence=False).start()
    db_url = f"sqlite:///{work / 'broker.db'}"
    live = start_server(keys=keys, data_dir=work / "broker-data", db_url=db_url, broker=broker)
    fleet = None
    try:
        token = enrollment_token(live, uses=n)
        devices = [AckDevice(live.url, f"bs-{i}", token, broker, work / "broker-devices", resend_s=10)
                   for i in range(n)]
        fleet = AckFleet(devices, interval_s=1.0)
        producer = Producer(fleet, rate)
        time.sleep(5)
        broker.stop()
        time.sleep(stop_s)
        broker.start()
        time.sleep(5)
        producer.stop()
        return {"fault": f"broker stopped {stop_s:g} s, restarted without persistence", "rate_per_device": rate,
                **_figures(db_url, devices, time.monotonic(), fleet)}
    finally:
        if fleet is not None:
            fleet.close()
        live.stop()
        broker.close()


def kill9(work: Path, keys: KeyStore, n: int, burst: int) -> dict[str, Any]:
    from sqlalchemy import create_engine, func, select

    from update_server.models import TelemetrySeen

    broker = services.Mosquitto().start()
    fleet = None
    with services.postgres_database() as db_url:
        env, url = server_env(work / "kill9-data", keys.directory / "online", db_url, broker)
        log = work / "kill9-server.log"
        token = enroll_token_cli(env, n)
        proc = serve_process(env, url, log)
        engine = create_engine(db_url)
        try:
            devices = [AckDevice(url, f"k9-{i}", token, broker, work / "kill9-devices", resend_s=10)
                       for i in range(n)]
            fleet = AckFleet(devices, interval_s=1.0)
            fleet.produce(burst)

            def stored() -> int:
                with engine.connect() as conn:
                    return int(conn.execute(select(func.count()).select_from(TelemetrySeen)).scalar_one())

            wait_until(lambda: stored() > n * burst // 4, 120, "a quarter of the burst stored")
            at_kill = stored()
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            fleet.produce(burst // 10)
            proc = serve_process(env, url, log)
            return {"fault": f"server SIGKILL during a burst of {n} x {burst} ({at_kill} stored at the kill)",
                    **_figures(db_url, devices, time.monotonic(), fleet)}
        finally:
            if fleet is not None:
                fleet.close()
            end_process(proc)
            engine.dispose()
            broker.close()


def ingester_away(work: Path, keys: KeyStore, n: int, rate: float, away_s: float) -> dict[str, Any]:
    broker = services.Mosquitto(max_queued_messages=1000).start()
    fleet = None
    with services.postgres_database() as db_url:
        same: dict[str, Any] = {"keys": keys, "data_dir": work / "away-data", "db_url": db_url, "broker": broker,
                                "account_prefix": f"a{uuid.uuid4().hex[:6]}-",
                                "mqtt_share_group": f"g-{uuid.uuid4().hex[:8]}",
                                "mqtt_client_id": f"srv-{uuid.uuid4().hex[:8]}"}
        live = start_server(**same)
        try:
            token = enrollment_token(live, uses=n)
            devices = [AckDevice(live.url, f"ia-{i}", token, broker, work / "away-devices", resend_s=30)
                       for i in range(n)]
            fleet = AckFleet(devices, interval_s=1.0)
            producer = Producer(fleet, rate)
            time.sleep(3)
            live.stop()
            time.sleep(away_s)
            live = start_server(**same)
            for d in devices:
                d.retarget(live.url)
            producer.stop()
            backlog = int(rate * away_s * n)
            return {"fault": f"ingester away {away_s:g} s, broker max_queued_messages 1000, backlog ~{backlog}",
                    "rate_per_device": rate, **_figures(db_url, devices, time.monotonic(), fleet)}
        finally:
            if fleet is not None:
                fleet.close()
            live.stop()
            broker.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=5)
    ap.add_argument("--broker-stop", type=float, default=60.0)
    ap.add_argument("--ingester-away", type=float, default=300.0)
    ap.add_argument("--rate", type=float, default=1.0, help="windows per second per device (broker scenario)")
    ap.add_argument("--away-rate", type=float, default=2.0, help="windows per second per device while the "
                                                                   "ingester is away")
    ap.add_argument("--burst", type=int, default=400, help="messages per device in the kill -9 burst")
    ap.add_argument("--only", choices=["broker", "kill9", "ingester"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-ack-"))
    keys = KeyStore.init(work / "keys")
    results: dict[str, Any] = {}
    try:
        if args.only in (None, "broker"):
            results["broker"] = broker_outage(work, keys, args.devices, args.rate, args.broker_stop)
        if args.only in (None, "kill9"):
            results["kill9"] = kill9(work, keys, args.devices, args.burst)
        if args.only in (None, "ingester"):
            results["ingester"] = ingester_away(work, keys, args.devices, args.away_rate, args.ingester_away)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'scenario':10} {'produced':>9} {'stored':>7} {'lost':>5} {'dup':>4} {'resent':>7} {'drained':>8}  fault")
    for name, r in results.items():
        print(f"{name:10} {r['produced']:>9} {r['stored']:>7} {r['lost']:>5} {r['duplicated']:>4} {r['resent']:>7} "
              f"{r['drained_after_fault_s']!s:>8}  {r['fault']}")


if __name__ == "__main__":
    main()
