"""Many devices' MQTT connections served by one thread (paho's external event loop).

``device_agent.telemetry.MqttPublisher`` runs paho's own network thread (``loop_start``), which wakes every
second; a thousand of them in one process keep the GIL so busy that the agents stall. :class:`SharedLoop`
does the same work for every client in one thread, through paho's documented external-loop API
(``socket``, ``want_write``, ``loop_read``, ``loop_write``, ``loop_misc``), and reconnects lost clients with
capped backoff as paho's thread would. :class:`LoopedMqttPublisher` is the real publisher (its client
settings, callbacks and ``publish``) with ``start``/``stop`` handing the client to the shared loop.
Publishing still happens on the caller's thread: without a network thread, paho writes at once.
"""

from __future__ import annotations

import random
import select
import threading
import time
from typing import Any

from device_agent.telemetry import MqttPublisher

MISC_INTERVAL_S = 1.0


class SharedLoop:
    """One thread polling every registered paho client's socket."""

    def __init__(self) -> None:
        self._clients: dict[int, tuple[Any, list[float]]] = {}
        """id(client) -> (client, [next reconnect attempt, backoff s])."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqtt-shared-loop", daemon=True)
        self._thread.start()

    def add(self, client: Any) -> None:
        with self._lock:
            self._clients[id(client)] = (client, [0.0, 1.0])

    def remove(self, client: Any) -> None:
        with self._lock:
            self._clients.pop(id(client), None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        next_misc = 0.0
        while not self._stop.is_set():
            with self._lock:
                entries = list(self._clients.values())
            now = time.monotonic()
            poller = select.poll()
            by_fd: dict[int, Any] = {}
            pending: list[Any] = []  # TLS: bytes already decrypted in the SSL object, invisible to poll
            for client, retry in entries:
                sock = client.socket()
                if sock is None:
                    if now >= retry[0]:
                        self._reconnect(client, retry, now)
                    continue
                fd = sock.fileno()
                if fd < 0:
                    continue
                by_fd[fd] = client
                poller.register(fd, select.POLLIN | (select.POLLOUT if client.want_write() else 0))
                if getattr(sock, "pending", None) is not None and sock.pending():
                    pending.append(client)
            if not by_fd:
                self._stop.wait(0.1)
                continue
            for client in pending:
                client.loop_read()
            for fd, mask in poller.poll(0 if pending else 100):
                client = by_fd[fd]
                if mask & (select.POLLIN | select.POLLERR | select.POLLHUP):
                    client.loop_read()
                if mask & select.POLLOUT and client.socket() is not None:
                    client.loop_write()
            if time.monotonic() >= next_misc:
                next_misc = time.monotonic() + MISC_INTERVAL_S
                for client in by_fd.values():
                    client.loop_misc()  # keepalive pings; notices a dead connection

    @staticmethod
    def _reconnect(client: Any, retry: list[float], now: float) -> None:
        try:
            client.reconnect()
            retry[1] = 1.0
        except (OSError, ValueError):
            retry[0] = now + retry[1] * random.uniform(0.5, 1.0)
            retry[1] = min(30.0, retry[1] * 2)


class LoopedMqttPublisher(MqttPublisher):
    """The agent's MQTT publisher, its network I/O done by a :class:`SharedLoop`."""

    def __init__(self, url: str, device_id: str, loop: SharedLoop, **kwargs: Any) -> None:
        super().__init__(url, device_id, **kwargs)
        self.loop = loop

    def start(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 86_400
        self.client.connect_async(self.host, self.port, self.keepalive_s, clean_start=False, properties=props)
        self.loop.add(self.client)

    def stop(self) -> None:
        self.loop.remove(self.client)
        self.client.disconnect()
        self._connected.clear()
