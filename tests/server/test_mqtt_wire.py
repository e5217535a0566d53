"""The hand-written MQTT reader (update_server/mqtt_wire.py) on malformed input: every malformed packet
raises MqttError (the ingester then reconnects), never IndexError or anything else; valid packets, however
they are split across reads, parse to the same messages. Bytes go through a real socket pair."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from update_server.mqtt_wire import Message, MqttError, WireClient, _packet, _str, _varint


def _publish(topic: str, payload: bytes, pid: int = 7, *, qos: int = 1, v5: bool = True) -> bytes:
    body = _str(topic) + (struct.pack("!H", pid) if qos else b"") + (b"\x00" if v5 else b"") + payload
    return _packet(0x30 | (qos << 1), body)


def _feed(data: bytes, *, v5: bool = True, chunks: list[int] | None = None) -> list[Message]:
    """Send ``data`` (in ``chunks``) into a client reading from a socket pair; returns what it parsed."""
    client = WireClient("127.0.0.1", 1, "t", protocol=5 if v5 else 4, keepalive=3600)
    ours, theirs = socket.socketpair()
    ours.settimeout(1.0)
    client.sock = ours
    got: list[Message] = []
    try:
        pieces, pos = [], 0
        for size in chunks or [len(data)]:
            pieces.append(data[pos:pos + size])
            pos += size
        if pos < len(data):
            pieces.append(data[pos:])
        for piece in pieces:
            if piece:
                theirs.sendall(piece)
                client.read(got.append)
        return got
    finally:
        ours.close()
        theirs.close()


def test_valid_packets_parse_however_they_are_split() -> None:
    data = b"".join(_publish(f"a/{i}/telemetry/window", b"x" * i, pid=i + 1) for i in range(50)) + b"\xd0\x00"
    whole = _feed(data)
    assert [(m.topic, m.payload, m.packet_id) for m in whole] == \
        [(f"a/{i}/telemetry/window", b"x" * i, i + 1) for i in range(50)]
    split = _feed(data, chunks=[1] * 40 + [3, 7, 11] * 30)
    assert [(m.topic, m.payload) for m in split] == [(m.topic, m.payload) for m in whole]
    v4 = _feed(_publish("t/x", b"{}", qos=0, v5=False), v5=False)
    assert v4[0].payload == b"{}" and v4[0].qos == 0


@pytest.mark.parametrize("data, what", [
    (b"\x32\x01\x00", "topic length cut off"),
    (b"\x32\x03\x00\x05a", "topic longer than the packet"),
    (b"\x32\x04\x00\x01a\x00", "QoS 1 without a whole packet id"),
    (b"\x32\x05\x00\x01a\x00\x01", "no properties length"),
    (b"\x32\x06\x00\x01a\x00\x01\x09", "properties longer than the packet"),
    (b"\x32\x0a\x00\x01a\x00\x01\xff\xff\xff\xff\x01", "properties length over 4 bytes"),
    (b"\x36\x05\x00\x01a\x00\x01", "QoS 3"),
    (b"\x40\x01\x00", "PUBACK too short"),
    (b"\x90\x01\x00", "SUBACK too short"),
    (b"\x30\xff\xff\xff\xff\x01", "remaining length over 4 bytes"),
    (b"\x20\x02\x00\x00", "CONNACK after connecting"),
    (b"\xe0\x00", "DISCONNECT"),
])
def test_malformed_packets_raise_mqtt_error(data: bytes, what: str) -> None:
    with pytest.raises(MqttError):
        _feed(data)


def _check(data: bytes, v5: bool) -> None:
    try:
        messages = _feed(data, v5=v5)
    except MqttError:
        return
    for m in messages:
        assert isinstance(m.topic, str) and isinstance(m.payload, bytes) and 0 <= m.packet_id <= 0xFFFF


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=300), v5=st.booleans())
def test_random_bytes_raise_only_mqtt_error(data: bytes, v5: bool) -> None:
    _check(data, v5)


VALID = b"".join([_publish("edgepack/v1/devices/d/telemetry/window", b'{"a": 1}'),
                  b"\x40\x02\x00\x07", b"\x90\x04\x00\x01\x00\x01", b"\xd0\x00",
                  _publish("t", b"x" * 130, pid=9)])


@FUZZ
@given(cut=st.integers(0, len(VALID)), flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1),
                                                                 st.integers(0, 255)), max_size=6), v5=st.booleans())
def test_truncated_and_mutated_valid_packets_raise_only_mqtt_error(cut: int, flips: list[tuple[int, int]],
                                                                   v5: bool) -> None:
    data = bytearray(VALID)
    for index, value in flips:
        data[index] = value
    _check(bytes(data[:cut]), v5)


def test_varint_round_trip() -> None:
    for n in (0, 127, 128, 16383, 16384, 2_097_151, 268_435_455):
        assert len(_varint(n)) <= 4
