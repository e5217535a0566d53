"""The ingester's MQTT reader against paho 2.x, side by side in one run (ADR 0006).

Both read the same thing the way the ingester must: a persistent MQTT 5 session on a QoS 1 subscription, a
backlog of telemetry windows (~600 bytes, the product's JSON) queued by the broker while the reader was
away, each payload decoded (``json.loads``), and PUBACKs sent only after a "commit" of up to ``--batch``
messages (paho: ``manual_ack=True`` and ``client.ack(mid, qos)``; ours: ``WireClient.ack`` in one write).
The backlog is published before the reader connects, by separate processes, so the figure is the reader's
alone: messages per second until the whole backlog is acknowledged, and the reader process's CPU time per
message (``time.process_time``: the bench process runs nothing else meanwhile). Rounds alternate the two
readers on one private Mosquitto (the product's configuration: deep queues, no inflight cap).

    python bench/bench_mqtt_reader.py                     # 50,000 messages, 3 rounds
    python bench/bench_mqtt_reader.py --messages 20000 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_server import _payloads, _publish  # noqa: E402
from edgepack._local import MosquittoBroker  # noqa: E402

PREFIX = "edgepack-bench/v1/devices"
TOPIC = f"{PREFIX}/+/telemetry/#"


def _subscribe_session(port: int, client_id: str) -> None:
    """Create the persistent session (subscribed at QoS 1) and leave: the backlog queues for it."""
    from update_server.mqtt_wire import WireClient

    c = WireClient("127.0.0.1", port, client_id, clean_start=True, session_expiry=3600)
    c.connect()
    c.subscribe(TOPIC)
    deadline = time.monotonic() + 10
    while not c.subscribed.is_set() and time.monotonic() < deadline:
        c.read(lambda m: None)
    c.close()


def drain_wire(port: int, client_id: str, expect: int, batch: int) -> tuple[float, float]:
    from update_server.mqtt_wire import WireClient

    c = WireClient("127.0.0.1", port, client_id, clean_start=False, session_expiry=3600)
    pending: list[Any] = []
    n = 0

    def on_message(msg: Any) -> None:
        json.loads(msg.payload)
        pending.append(msg)

    t0, cpu0 = time.perf_counter(), time.process_time()
    c.connect()
    deadline = time.monotonic() + 600
    while n < expect and time.monotonic() < deadline:
        c.read(on_message)
        while pending:  # "commit" then acknowledge, batch by batch
            chunk, pending[:] = pending[:batch], pending[batch:]
            c.ack(chunk)
            n += len(chunk)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    c.close()
    if n < expect:
        raise RuntimeError(f"our reader got {n} of {expect}")
    return elapsed, cpu


def drain_paho(port: int, client_id: str, expect: int, batch: int) -> tuple[float, float]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    lock = threading.Lock()
    pending: list[tuple[int, int]] = []
    arrived = threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:  # paho's network thread: decode and hand over
        json.loads(msg.payload)
        with lock:
            pending.append((msg.mid, msg.qos))
        arrived.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True)
    c.on_message = on_message
    c.max_inflight_messages_set(65535)
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    t0, cpu0 = time.perf_counter(), time.process_time()
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    n = 0
    deadline = time.monotonic() + 600
    while n < expect and time.monotonic() < deadline:
        arrived.wait(0.05)
        arrived.clear()
        with lock:
            chunk, pending[:] = pending[:batch], pending[batch:]
        for mid, qos in chunk:  # the writer thread acknowledges after its commit
            c.ack(mid, qos)
        n += len(chunk)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    c.disconnect()
    c.loop_stop()
    if n < expect:
        raise RuntimeError(f"paho got {n} of {expect}")
    return elapsed, cpu


READERS: dict[str, Callable[[int, str, int, int], tuple[float, float]]] = {"ours": drain_wire, "paho": drain_paho}


def run(messages: int, rounds: int, batch: int, publishers: int) -> dict[str, Any]:
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in READERS}
    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp:
        broker = MosquittoBroker(Path(tmp) / "mq", auth="none", tls=False, persistence=False).start()
        try:
            for _ in range(rounds):
                for name, drain in READERS.items():
                    client_id = f"bench-{name}-{uuid.uuid4().hex[:6]}"
                    _subscribe_session(broker.port, client_id)
                    _publish(broker.port, _payloads(PREFIX, 1000, messages), publishers)
                    results[name].append(drain(broker.port, client_id, messages, batch))
        finally:
            broker.close()
    out: dict[str, Any] = {"messages": messages, "rounds": rounds, "batch": batch}
    for name, samples in results.items():
        out[name] = {"msgs_per_s": round(statistics.median(messages / e for e, _ in samples)),
                     "cpu_us_per_msg": round(statistics.median(c / messages * 1e6 for _, c in samples), 1)}
    out["ratio_msgs_per_s"] = round(out["ours"]["msgs_per_s"] / out["paho"]["msgs_per_s"], 2)
    out["ratio_cpu"] = round(out["paho"]["cpu_us_per_msg"] / out["ours"]["cpu_us_per_msg"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2000, help="messages acknowledged per commit (ingest_batch)")
    ap.add_argument("--publishers", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps(run(args.messages, args.rounds, args.batch, args.publishers), indent=2))


if __name__ == "__main__":
    main()
