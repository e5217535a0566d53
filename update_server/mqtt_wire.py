"""A minimal MQTT 5 client for the two high-volume jobs: consuming telemetry and (in benchmarks) publishing it.

Why not paho: paho's reader does several small ``recv`` calls and builds a properties object per packet;
on this project's 2-core machine a bare paho subscriber drains about 4,500 QoS 1 messages per second
(measured in bench/bench_server.py), below the 10,000/s goal before any validation or database work. This
client reads the socket in 256 KiB chunks, parses every complete packet in the buffer, and acknowledges in
batches with one ``sendall`` (after the caller committed the batch). It implements only what the server
uses: CONNECT (MQTT 5, clean start off, session expiry, receive maximum; or MQTT 3.1.1, protocol level 4, for
brokers without MQTT 5 such as amqtt), SUBSCRIBE, incoming PUBLISH at
QoS 0/1, PUBACK, outgoing PUBLISH at QoS 1 with a window of unacknowledged messages, PINGREQ and
DISCONNECT. Anything else from the broker (e.g. AUTH) closes the connection with an error; the caller
reconnects. Notices to devices (low volume) still go through paho.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP, DISCONNECT = 2, 3, 4, 9, 13, 14
_PROP_SESSION_EXPIRY, _PROP_RECEIVE_MAX = 0x11, 0x21
_AUTH_REFUSED = {0x04, 0x05, 0x86, 0x87}
"""CONNACK codes for a bad user name or password / not authorized (MQTT 3.1.1 and 5)."""


class MqttError(Exception):
    """The broker refused us, or the connection broke; reconnect."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    data = s.encode()
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


@dataclass
class Message:
    topic: str
    payload: bytes
    packet_id: int
    qos: int
    generation: int
    """Connection it arrived on: a PUBACK is only valid on that connection."""


class WireClient:
    def __init__(self, host: str, port: int, client_id: str, *, clean_start: bool = False,
                 session_expiry: int = 24 * 3600, receive_maximum: int = 65535, keepalive: int = 30,
                 protocol: int = 5, username: str | None = None, password: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if protocol not in (4, 5):
            raise ValueError("protocol level must be 5 (MQTT 5) or 4 (MQTT 3.1.1)")
        self.host, self.port, self.client_id = host, port, client_id
        self.username, self.password, self.ssl_context = username, password, ssl_context
        self.v5 = protocol == 5
        self.clean_start, self.session_expiry = clean_start, session_expiry
        self.receive_maximum, self.keepalive = receive_maximum, keepalive
        self.sock: socket.socket | None = None
        self.generation = 0
        self._buf = bytearray()
        self._send_lock = threading.Lock()
        # TLS: one OpenSSL connection must not be read and written by two threads at once, so writes from
        # other threads (the ingest writer's acknowledgements) are queued and sent by the reading thread,
        # woken through a socket pair.
        self._io_thread: int | None = None
        self._outq: list[tuple[int, bytes]] = []
        if ssl_context is not None:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
        self._last_send = 0.0
        self._next_id = 0
        self.inflight: set[int] = set()
        self.subscribed = threading.Event()

    # ---- connection ----------------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> bool:
        """Connect and return whether the broker resumed an existing session."""
        self.close()
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        if self.ssl_context is not None:
            try:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise MqttError(f"TLS with the broker at {self.host}:{self.port} failed: {exc}") from exc
        flags = 0x02 if self.clean_start else 0x00
        credentials = b""
        if self.username:
            flags |= 0x80
            credentials += _str(self.username)
            if self.password is not None:
                flags |= 0x40
                credentials += _str(self.password)
        if self.v5:
            props = bytes([_PROP_SESSION_EXPIRY]) + struct.pack("!I", self.session_expiry) + \
                bytes([_PROP_RECEIVE_MAX]) + struct.pack("!H", self.receive_maximum)
            body = _str("MQTT") + bytes([5, flags]) + struct.pack("!H", self.keepalive) + _varint(len(props)) \
                + props + _str(self.client_id) + credentials
        else:  # 3.1.1: clean session flag, no properties
            body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", self.keepalive) + _str(self.client_id) \
                + credentials
        self.sock, self._buf = sock, bytearray()
        self._send(_packet(0x10, body))
        ptype, _flags, payload = self._read_packet(timeout)
        if ptype != CONNACK or len(payload) < 2:
            raise MqttError(f"expected CONNACK, got packet type {ptype}")
        if payload[1] != 0:
            hint = (f"; check the account ({self.username!r}) and its password" if payload[1] in _AUTH_REFUSED
                    else "")
            raise MqttError(f"broker refused the connection (reason code 0x{payload[1]:02x}){hint}")
        sock.settimeout(1.0)
        self._io_thread = threading.get_ident()
        self.generation += 1
        self.inflight.clear()
        return bool(payload[0] & 1)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.sendall(_packet(0xE0, b""))
            self.sock.close()
            self.sock = None
        self._io_thread = None

    def release_session(self, timeout: float = 10.0) -> None:
        """End this client id's session on the broker: connect with clean start (the broker discards the old
        session and its queue) and a session expiry of 0, then disconnect (the new one ends with it)."""
        keep = self.clean_start, self.session_expiry
        self.clean_start, self.session_expiry = True, 0
        try:
            self.connect(timeout)
        finally:
            self.clean_start, self.session_expiry = keep
            self.close()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Send SUBSCRIBE; the SUBACK is handled by :meth:`read` (``subscribed`` is set, or MqttError).

        Messages of a resumed session may arrive before the SUBACK; they go to the reader like any other."""
        self.subscribed.clear()
        props = _varint(0) if self.v5 else b""
        body = struct.pack("!H", self._packet_id()) + props + _str(topic) + bytes([qos])
        self._send(_packet(0x82, body))

    # ---- reading -------------------------------------------------------------------------------------
    def read(self, on_message: Callable[[Message], None], on_puback: Callable[[int], None] | None = None) -> int:
        """Read what the socket has (waits up to 1 s), dispatch every complete packet; returns how many."""
        assert self.sock is not None
        self._ping_if_due()
        if self.ssl_context is not None and not self._tls_readable():
            return 0
        try:
            chunk = self.sock.recv(1 << 18)
        except TimeoutError:
            return 0
        except OSError as exc:
            raise MqttError(f"connection lost: {exc}") from exc
        if not chunk:
            raise MqttError("the broker closed the connection")
        self._buf += chunk
        return self._dispatch(on_message, on_puback)

    def _dispatch(self, on_message: Callable[[Message], None], on_puback: Callable[[int], None] | None) -> int:
        """Handle every complete packet in the buffer. A malformed packet raises :class:`MqttError` (only
        that: the caller reconnects); the fields of each packet are checked against its own length."""
        buf, pos, n, end = self._buf, 0, 0, len(self._buf)
        while pos + 2 <= end:
            first = buf[pos]
            length, mult, i = 0, 1, pos + 1
            while True:
                if i >= end:
                    self._buf = buf[pos:]
                    return n
                if i - pos > 4:
                    raise MqttError("malformed packet from the broker: remaining length longer than 4 bytes")
                byte = buf[i]
                length += (byte & 0x7F) * mult
                mult *= 128
                i += 1
                if not byte & 0x80:
                    break
            if i + length > end:
                break
            packet_end = i + length
            ptype = first >> 4
            if ptype == PUBLISH:
                on_message(self._publish(buf, first, i, packet_end))
                n += 1
            elif ptype == PUBACK:
                if length < 2:
                    raise MqttError(f"malformed PUBACK from the broker ({length} bytes)")
                pid = (buf[i] << 8) | buf[i + 1]
                self.inflight.discard(pid)
                if on_puback is not None:
                    on_puback(pid)
            elif ptype == SUBACK:
                code = self._suback_code(buf, i, packet_end)
                if code > 2:
                    raise MqttError(f"subscription refused by the broker (reason code 0x{code:02x})")
                self.subscribed.set()
            elif ptype == DISCONNECT:
                raise MqttError("the broker sent DISCONNECT")
            elif ptype != PINGRESP:
                raise MqttError(f"unsupported packet type {ptype} from the broker")
            pos = packet_end
        self._buf = buf[pos:]
        return n

    def _publish(self, buf: bytearray, first: int, i: int, end: int) -> Message:
        """The PUBLISH whose variable header starts at ``buf[i]`` and which ends before ``buf[end]``."""
        qos = (first >> 1) & 3
        if qos == 3:
            raise MqttError("malformed PUBLISH from the broker: QoS 3")
        if i + 2 > end:
            raise MqttError("malformed PUBLISH from the broker: no topic length")
        j = i + 2 + ((buf[i] << 8) | buf[i + 1])
        if j > end:
            raise MqttError("malformed PUBLISH from the broker: topic longer than the packet")
        topic = bytes(buf[i + 2:j]).decode("utf-8", "replace")
        pid = 0
        if qos:
            if j + 2 > end:
                raise MqttError("malformed PUBLISH from the broker: no packet id")
            pid = (buf[j] << 8) | buf[j + 1]
            j += 2
        if self.v5:  # skip the properties
            plen, pmult, start = 0, 1, j
            while True:
                if j >= end or j - start >= 4:
                    raise MqttError("malformed PUBLISH from the broker: bad properties length")
                byte = buf[j]
                j += 1
                plen += (byte & 0x7F) * pmult
                pmult *= 128
                if not byte & 0x80:
                    break
            j += plen
            if j > end:
                raise MqttError("malformed PUBLISH from the broker: properties longer than the packet")
        return Message(topic, bytes(buf[j:end]), pid, qos, self.generation)

    def _suback_code(self, buf: bytearray, i: int, end: int) -> int:
        """The first reason code of a SUBACK (0x80, failure, when it has none)."""
        if i + 2 > end:
            raise MqttError("malformed SUBACK from the broker: no packet id")
        k = i + 2
        if self.v5:
            if k >= end:
                raise MqttError("malformed SUBACK from the broker: no properties length")
            k += 1 + buf[k]  # properties (a SUBACK's are short: one length byte)
        return buf[k] if k < end else 0x80

    def _read_packet(self, timeout: float) -> tuple[int, int, bytes]:
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buf) >= 2:
                length, mult, i = 0, 1, 1
                while i < len(self._buf):
                    if i > 4:
                        raise MqttError("malformed packet from the broker: remaining length longer than 4 bytes")
                    byte = self._buf[i]
                    length += (byte & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not byte & 0x80:
                        break
                else:
                    i = -1
                if i > 0 and len(self._buf) >= i + length:
                    first = self._buf[0]
                    payload = bytes(self._buf[i:i + length])
                    self._buf = self._buf[i + length:]
                    return first >> 4, first & 0x0F, payload
            if time.monotonic() > deadline:
                raise MqttError("timed out waiting for the broker")
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError as exc:
                raise MqttError(f"connection lost: {exc}") from exc
            if not chunk:
                raise MqttError("the broker closed the connection")
            self._buf += chunk

    # ---- writing -------------------------------------------------------------------------------------
    def ack(self, messages: Iterable[Message]) -> None:
        """PUBACK every QoS 1 message of the current connection, in one write."""
        generation = self.generation
        data = b"".join(b"\x40\x02" + struct.pack("!H", m.packet_id) for m in messages
                        if m.qos == 1 and m.generation == generation)
        if data:
            self._send(data, generation)

    def publish(self, topic: str, payload: bytes) -> int:
        """Queue a QoS 1 PUBLISH (no properties); returns its packet id (see ``inflight``)."""
        pid = self._packet_id()
        body = _str(topic) + struct.pack("!H", pid) + (b"\x00" if self.v5 else b"") + payload
        self.inflight.add(pid)
        self._send(_packet(0x32, body))
        return pid

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def _tls_readable(self) -> bool:
        """TLS: send what other threads queued, then wait up to 1 s for data or a wake-up."""
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        self._flush_queued()
        if sock.pending():
            return True
        readable, _, _ = select.select([sock, self._wake_r], [], [], 1.0)
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                while self._wake_r.recv(4096):
                    pass
            self._flush_queued()
        return sock in readable

    def _flush_queued(self) -> None:
        with self._send_lock:
            queued, self._outq = self._outq, []
        data = b"".join(d for gen, d in queued if gen == self.generation)
        if data:
            self._send(data)

    def _send(self, data: bytes, generation: int | None = None) -> None:
        if self.sock is None:
            raise MqttError("not connected")
        if self.ssl_context is not None and self._io_thread not in (None, threading.get_ident()):
            with self._send_lock:
                self._outq.append((self.generation if generation is None else generation, data))
            with contextlib.suppress(BlockingIOError):
                self._wake_w.send(b"\0")
            return
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise MqttError(f"send failed: {exc}") from exc
            self._last_send = time.monotonic()

    def _ping_if_due(self) -> None:
        if time.monotonic() - self._last_send > self.keepalive / 2:
            self._send(b"\xc0\x00")


def publish_all(host: str, port: int, items: Iterable[tuple[str, bytes]], *, window: int = 1000,
                client_id: str = "", username: str | None = None, password: str | None = None,
                ssl_context: ssl.SSLContext | None = None, protocol: int = 5) -> int:
    """Publish at QoS 1 keeping at most ``window`` unacknowledged; returns when every PUBACK arrived."""
    import uuid

    client = WireClient(host, port, client_id or f"pub-{uuid.uuid4().hex[:8]}", clean_start=True,
                        session_expiry=0, username=username, password=password, ssl_context=ssl_context,
                        protocol=protocol)
    client.connect()
    sent = 0
    try:
        for topic, payload in items:
            while len(client.inflight) >= window:
                client.read(lambda m: None)
            client.publish(topic, payload)
            sent += 1
        deadline = time.monotonic() + 300
        while client.inflight and time.monotonic() < deadline:
            client.read(lambda m: None)
        if client.inflight:
            raise MqttError(f"{len(client.inflight)} messages were never acknowledged")
    finally:
        client.close()
    return sent
