"""Network faults of one simulated device: dropped connections, a slow link, offline periods.

:class:`Link` is the device's network as the scenario shapes it. :class:`FaultyTransport` wraps the shared
real HTTP transport (``device_agent.transport.Transport``) and :class:`FaultyPublisher` wraps the device's
real MQTT publisher (``device_agent.telemetry.MqttPublisher``); both consult the link, so the agent meets
the faults exactly where a real device would: as ``TransportError`` from its HTTP calls, a broken-off
download (resumed later with a Range request), and a broker connection that drops or is gone.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from device_agent.errors import TransportError
from device_agent.transport import HttpResponse, StreamResponse, Transport


@dataclass
class Link:
    """The device's network. ``offline_until`` is a ``time.monotonic()`` instant."""

    drop: float = 0.0
    latency_s: float = 0.0
    bytes_per_s: float = 0.0
    """0 = unlimited."""
    offline_until: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    counts: dict[str, int] = field(default_factory=lambda: {"http_dropped": 0, "http_offline": 0,
                                                            "mqtt_dropped": 0, "offline_periods": 0})
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def offline(self) -> bool:
        return time.monotonic() < self.offline_until

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def gate(self, method: str, url: str) -> None:
        """Raise the network error this request meets, if any; sleep the link's latency otherwise."""
        if self.offline():
            self.count("http_offline")
            raise TransportError(f"{method} {url} failed: network is unreachable (simulated offline)",
                                 code="network")
        if self.drop and self.rng.random() < self.drop:
            self.count("http_dropped")
            raise TransportError(f"{method} {url} failed: connection reset by peer (simulated)", code="network")
        if self.latency_s:
            time.sleep(self.latency_s)


class FaultyTransport:
    """A :class:`~device_agent.transport.Transport` that passes each request through a :class:`Link`."""

    def __init__(self, inner: Transport, link: Link) -> None:
        self.inner = inner
        self.link = link

    def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                body: bytes | None = None, timeout: float = 15.0) -> HttpResponse:
        self.link.gate(method, url)
        return self.inner.request(method, url, headers=headers, body=body, timeout=timeout)

    @contextmanager
    def stream(self, url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 30.0,
               chunk_bytes: int = 256 * 1024) -> Iterator[StreamResponse]:
        link = self.link
        link.gate("GET", url)
        if link.bytes_per_s:
            chunk_bytes = max(1024, min(chunk_bytes, int(link.bytes_per_s / 4)))
        with self.inner.stream(url, headers=headers, timeout=timeout, chunk_bytes=chunk_bytes) as resp:
            yield StreamResponse(resp.status, resp.headers, self._shaped(url, resp.chunks))

    def _shaped(self, url: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        link = self.link
        for chunk in chunks:
            if link.offline():
                link.count("http_offline")
                raise TransportError(f"GET {url} broke off: network is unreachable (simulated offline)",
                                     code="network")
            if link.drop and link.rng.random() < link.drop:
                link.count("http_dropped")
                raise TransportError(f"GET {url} broke off: connection reset by peer (simulated)", code="network")
            if link.bytes_per_s:
                time.sleep(len(chunk) / link.bytes_per_s)
            yield chunk


def _forward(name: str) -> Any:
    """A property reading and writing ``self.inner.<name>``."""

    def getter(self: FaultyPublisher) -> Callable[..., None]:
        return getattr(self.inner, name)  # type: ignore[no-any-return]

    def setter(self: FaultyPublisher, value: Callable[..., None]) -> None:
        setattr(self.inner, name, value)

    return property(getter, setter)


class FaultyPublisher:
    """A :class:`~device_agent.telemetry.Publisher` over the device's real MQTT publisher.

    While the link is offline the broker connection is closed (``stop``) and nothing is published; the
    telemetry stays in the device's outbox. :meth:`drop_connection` cuts the TCP connection under paho, which
    notices, reports the disconnection and reconnects by itself, as after a network glitch.
    """

    def __init__(self, inner: Any, link: Link) -> None:
        self.inner = inner
        self.link = link
        self._down = False
        self._lock = threading.Lock()

    # Telemetry installs its callbacks on the publisher: forward them to the real one.
    on_ack = _forward("on_ack")
    on_connect = _forward("on_connect")
    on_notify = _forward("on_notify")

    def start(self) -> None:
        self.inner.start()

    def stop(self) -> None:
        with self._lock:
            if not self._down:
                self.inner.stop()
            self._down = True

    def connected(self) -> bool:
        return not self._down and self.inner.connected()

    def publish(self, topic: str, payload: bytes) -> int | None:
        if self._down:
            return None
        return self.inner.publish(topic, payload)  # type: ignore[no-any-return]

    def go_offline(self) -> None:
        with self._lock:
            if not self._down:
                self._down = True
                self.inner.stop()

    def go_online(self) -> None:
        with self._lock:
            if self._down:
                self._down = False
                self.inner.start()

    def drop_connection(self) -> bool:
        """Cut the TCP connection abruptly (no DISCONNECT packet); paho reconnects."""
        import socket

        with self._lock:
            sock = None if self._down else self.inner.client.socket()
            if sock is None:
                return False
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                return False
        self.link.count("mqtt_dropped")
        return True
