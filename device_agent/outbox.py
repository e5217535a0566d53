"""The telemetry outbox: messages persisted on disk until the SERVER has committed them.

Every message is one file, written atomically (``<seq>-<kind>-<message_id>.json``), so broker outages
and reboots lose nothing. The ``message_id`` is assigned once, when the message is produced, and kept
across retries and restarts; ``seq`` (persisted in ``meta.json``) grows by one per message and device.
The server de-duplicates by both and reports, at every check-in, its committed high-water mark: the
highest ``seq`` such that every message up to it is stored (or known lost). :meth:`Outbox.commit` then
deletes what it covers. A broker's acknowledgement deletes nothing (a broker restarted without
persistence, or one that hit ``max_queued_messages``, acknowledged messages nobody ever received).

The outbox is bounded (messages and bytes). When full, the oldest *window* is dropped first (an
aggregate; the next one still carries the counters), then the oldest event. Drops are counted in
``meta.json`` and reported in the next window (``outbox_dropped``): never silent.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundles._util import atomic_write

KINDS = ("event", "window")


@dataclass(frozen=True)
class Entry:
    seq: int
    kind: str
    message_id: str
    path: Path
    size: int

    def read(self) -> bytes:
        return self.path.read_bytes()


class Outbox:
    """Thread-safe, persisted FIFO of telemetry messages."""

    def __init__(self, directory: Path, *, max_messages: int = 10_000, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_messages = max(1, max_messages)
        self.max_bytes = max(1, max_bytes)
        self._lock = threading.Lock()
        self._meta_file = directory / "meta.json"
        meta: dict[str, Any] = {}
        if self._meta_file.exists():
            try:
                meta = json.loads(self._meta_file.read_bytes())
            except ValueError:
                meta = {}
        self._entries: list[Entry] = []
        for p in directory.iterdir():
            if p.name == "meta.json":
                continue
            parts = p.stem.split("-")
            if p.name.startswith(".") or len(parts) != 3 or parts[1] not in KINDS or not parts[0].isdigit():
                p.unlink(missing_ok=True)  # a temp file left by a power loss: never a whole message
                continue
            self._entries.append(Entry(int(parts[0]), parts[1], parts[2], p, p.stat().st_size))
        self._entries.sort(key=lambda e: e.seq)
        top = self._entries[-1].seq if self._entries else 0
        self.seq = max(int(meta.get("seq", 0)), top)
        self.dropped = int(meta.get("dropped", 0))
        self.dropped_reported = int(meta.get("dropped_reported", 0))
        self._bytes = sum(e.size for e in self._entries)

    def _save_meta(self) -> None:
        atomic_write(self._meta_file, json.dumps({"seq": self.seq, "dropped": self.dropped,
                                                  "dropped_reported": self.dropped_reported}).encode())

    def put(self, kind: str, envelope: dict[str, Any]) -> dict[str, Any]:
        """Assign ``message_id`` and ``seq``, persist, return the complete message."""
        if kind not in KINDS:
            raise ValueError(f"unknown telemetry kind {kind!r}")
        with self._lock:
            self.seq += 1
            message = {**envelope, "message_id": uuid.uuid4().hex, "seq": self.seq}
            data = json.dumps(message, separators=(",", ":")).encode()
            self._make_room(kind, len(data))
            self._save_meta()
            path = self.dir / f"{self.seq:012d}-{kind}-{message['message_id']}.json"
            atomic_write(path, data)
            self._entries.append(Entry(self.seq, kind, message["message_id"], path, len(data)))
            self._bytes += len(data)
            return message

    def _make_room(self, kind: str, size: int) -> None:
        while self._entries and (len(self._entries) + 1 > self.max_messages
                                 or self._bytes + size > self.max_bytes):
            victim = next((e for e in self._entries if e.kind == "window"), self._entries[0])
            self._remove(victim)
            self.dropped += 1

    def _remove(self, entry: Entry) -> None:
        self._entries.remove(entry)
        self._bytes -= entry.size
        entry.path.unlink(missing_ok=True)

    def pending(self, limit: int | None = None) -> list[Entry]:
        with self._lock:
            return list(self._entries[:limit] if limit else self._entries)

    def pending_after(self, seq: int, limit: int) -> list[Entry]:
        """Up to ``limit`` entries with a seq above ``seq``, oldest first."""
        import bisect

        with self._lock:
            i = bisect.bisect_right([e.seq for e in self._entries], seq) if self._entries else 0
            return self._entries[i:i + limit]

    def oldest_seq(self) -> int:
        """The seq of the oldest message still here (``seq + 1`` when empty): every seq below it has been
        committed by the server or dropped by a full outbox, and will never be sent again."""
        with self._lock:
            return self._entries[0].seq if self._entries else self.seq + 1

    def commit(self, committed_seq: int) -> list[Entry]:
        """The server has committed every seq up to ``committed_seq``: delete those messages; returns them.

        A mark above this outbox's own ``seq`` is ignored: the state directory was reset and the counter
        started again, so the server's mark belongs to the earlier numbering (the next check-in reports
        ``outbox_seq`` and the server starts the device's mark again)."""
        with self._lock:
            if committed_seq > self.seq:
                return []
            n = 0
            while n < len(self._entries) and self._entries[n].seq <= committed_seq:
                n += 1
            done, self._entries = self._entries[:n], self._entries[n:]
            for e in done:
                self._bytes -= e.size
                e.path.unlink(missing_ok=True)
            return done

    def ack(self, message_id: str) -> None:
        """Forget one message by id (tests; the agent deletes by :meth:`commit`)."""
        with self._lock:
            for e in self._entries:
                if e.message_id == message_id:
                    self._remove(e)
                    return

    def take_dropped(self) -> int:
        """Drops not reported yet; marked reported (persisted) when taken."""
        with self._lock:
            n = self.dropped - self.dropped_reported
            if n:
                self.dropped_reported = self.dropped
                self._save_meta()
            return n

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
