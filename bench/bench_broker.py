"""Broker benchmarks: what authentication and TLS cost the broker itself.

1. **Delivery rate** to a ``mosquitto_sub`` (the broker's own speed, no edgepack code on the receiving
   side): QoS 1 telemetry windows (~600 bytes) published by P device connections into the ingester's
   shared subscription, until ``mosquitto_sub -C N`` has them all. Measured, interleaved in one run, on

   * ``plain``: no accounts, no TLS (the setup before issue 9, the baseline);
   * ``tls+acl``: the product's broker (``edgepack._local.MosquittoBroker``): TLS listener, dynamic security,
     every publisher a device account limited to its own topics, the subscriber the ingest account.

   The ratio tls+acl / plain is the figure to compare across machines; broker CPU per 1,000 messages is
   read from its process (psutil).
2. **Enrollment cost vs accounts**: dynamic security rewrites its whole JSON file after every change, so
   creating one device account costs time proportional to the accounts that exist. Measured as the time of
   ``add_device`` (what an enrollment adds) with 0 and with N pre-provisioned device accounts.

The broker with N device accounts and TLS is ``MosquittoBroker(workdir, devices=N)`` (credentials in
``broker.device_accounts``): the ``pipeline`` ingest benchmark uses the same launcher.

    python bench/bench_broker.py                         # 200,000 messages, 2 publishers, 2 rounds
    python bench/bench_broker.py --messages 50000 --rounds 1 --accounts 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepack._local import MosquittoBroker  # noqa: E402

PREFIX = "edgepack/v1/devices"
GROUP = "edgepack-server"


def _window(device_id: str, seq: int) -> bytes:
    now = "2026-11-28T18:00:00+00:00"
    return json.dumps({
        "schema": "edgepack.telemetry.v1", "kind": "window", "message_id": uuid.uuid4().hex, "device_id": device_id,
        "seq": seq, "sent_at": now, "rollout_id": None,
        "bundle": {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"},
        "window": {"start": now, "end": now, "requests": 120, "errors": 1, "crashes": 0,
                   "latency_ms": {"bounds": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
                                  "counts": [0, 60, 50, 9, 1, 0, 0, 0, 0, 0, 0], "p50": 1.9, "p95": 4.2, "p99": 8.0},
                   "feedback": {"count": 40, "correct": 38}, "predicted_classes": {"0": 12, "7": 9}}}).encode()


PUBLISHER = """
import json, ssl, sys
from update_server.mqtt_wire import publish_all
spec = json.loads(sys.argv[1])
payloads = [bytes.fromhex(p) for p in spec["payloads"]]
ctx = None
if spec["ca"]:
    ctx = ssl.create_default_context(cafile=spec["ca"])
items = ((spec["topic"], payloads[i % len(payloads)]) for i in range(spec["n"]))
publish_all("127.0.0.1", spec["port"], items, window=2000, client_id=spec["client_id"],
            username=spec["username"], password=spec["password"], ssl_context=ctx)
"""


def _round(broker: MosquittoBroker, messages: int, publishers: int, secure: bool) -> dict[str, float]:
    """One measurement: returns messages per second delivered to mosquitto_sub, and broker CPU per 1,000."""
    import psutil

    sub = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv5", "-q", "1", "-C",
           str(messages), "-t", f"$share/{GROUP}/{PREFIX}/+/telemetry/#", "-i", f"bench-sub-{uuid.uuid4().hex[:6]}"]
    if secure:
        sub += ["--cafile", str(broker.ca_file), "-u", "edgepack-ingest", "-P", broker.ingest_password]
    receiver = subprocess.Popen(sub, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # subscribed
    ids = sorted(broker.device_accounts)[:publishers] if secure else [f"dev-{k:05d}" for k in range(publishers)]
    share = [messages // publishers + (1 if k < messages % publishers else 0) for k in range(publishers)]
    cpu = psutil.Process(broker.pid)
    cpu0 = sum(cpu.cpu_times()[:2])
    t0 = time.perf_counter()
    procs = []
    for device_id, n in zip(ids, share, strict=True):
        account = broker.device_accounts.get(device_id) if secure else None
        spec = {"port": broker.port, "n": n, "topic": f"{PREFIX}/{device_id}/telemetry/window",
                "payloads": [_window(device_id, s).hex() for s in range(1, 51)],
                "client_id": account.client_id if account else f"bench-pub-{device_id}",
                "username": account.username if account else None, "password": account.password if account else None,
                "ca": str(broker.ca_file) if secure else None}
        procs.append(subprocess.Popen([sys.executable, "-c", PUBLISHER, json.dumps(spec)], cwd=ROOT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}))
    for p in procs:
        if p.wait(600) != 0:
            raise RuntimeError("a publisher failed")
    if receiver.wait(600) != 0:
        raise RuntimeError(f"mosquitto_sub failed: {receiver.stderr.read().decode() if receiver.stderr else ''}")
    elapsed = time.perf_counter() - t0
    cpu_s = sum(cpu.cpu_times()[:2]) - cpu0
    return {"per_s": messages / elapsed, "broker_cpu_ms_per_1000": 1000 * cpu_s / messages * 1000}


def bench_delivery(messages: int, publishers: int, rounds: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-broker-"))
    plain = MosquittoBroker(work / "plain", auth="none", tls=False, persistence=False).start()
    secure = MosquittoBroker(work / "secure", persistence=False, devices=publishers, topic_prefix=PREFIX,
                             share_group=GROUP).start()
    try:
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "tls+acl": []}
        for _ in range(rounds):  # interleaved, so both see the same machine load
            runs["plain"].append(_round(plain, messages, publishers, secure=False))
            runs["tls+acl"].append(_round(secure, messages, publishers, secure=True))
            print({k: [round(r["per_s"]) for r in v] for k, v in runs.items()}, flush=True)
        out: dict[str, Any] = {"messages": messages, "publishers": publishers, "rounds": rounds}
        for name, rs in runs.items():
            out[name] = {"per_s": round(statistics.median(r["per_s"] for r in rs)),
                         "broker_cpu_ms_per_1000": round(statistics.median(r["broker_cpu_ms_per_1000"] for r in rs), 1)}
        out["ratio"] = round(out["tls+acl"]["per_s"] / out["plain"]["per_s"], 3)
        return out
    finally:
        plain.close()
        secure.close()
        shutil.rmtree(work, ignore_errors=True)


def bench_enrollment(accounts: int, samples: int) -> dict[str, Any]:
    out: dict[str, Any] = {"samples": samples}
    for existing in (0, accounts):
        work = Path(tempfile.mkdtemp(prefix="bench-dynsec-"))
        broker = MosquittoBroker(work, persistence=False, devices=existing).start()
        mgr = broker.accounts()
        try:
            times = []
            for k in range(samples):
                t0 = time.perf_counter()
                mgr.add_device(f"new-{k:04d}", f"epm_{uuid.uuid4().hex}")
                times.append(time.perf_counter() - t0)
            out[f"ms_with_{existing}_accounts"] = round(1000 * statistics.median(times), 1)
            out[f"dynsec_json_bytes_with_{existing}"] = (work / "dynamic-security.json").stat().st_size
        finally:
            mgr.stop()
            broker.close()
            shutil.rmtree(work, ignore_errors=True)
        print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--publishers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--accounts", type=int, default=10_000, help="pre-provisioned accounts for the enrollment cost")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = {"delivery": bench_delivery(args.messages, args.publishers, args.rounds),
               "enrollment": bench_enrollment(args.accounts, args.samples),
               "host": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}}
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
