"""The acting thread's inbox: what other threads tell it (a check-in notice, a worker crash, stop).

MQTT callbacks, the worker supervisor and the local API only *put* here; the one acting thread takes. It
can also be looked at without taking (:meth:`Inbox.has`), which is how a scheduler (the fleet simulator)
knows that a step would not block.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from device_agent.clock import Clock

Note = tuple[str, Any]
"""``(kind, payload)``: ``("notify", bytes)``, ``("crash", detail)``, ``("stop", None)``."""


class Inbox:
    def __init__(self, clock: Clock, stop_flag: threading.Event) -> None:
        self.clock = clock
        self.stop_flag = stop_flag
        self._notes: deque[Note] = deque()
        self._cond = threading.Condition()

    def put(self, kind: str, payload: Any = None) -> None:
        with self._cond:
            self._notes.append((kind, payload))
            self._cond.notify_all()

    def has(self, kind: str) -> bool:
        """True when a note of ``kind`` waits (nothing is taken)."""
        with self._cond:
            return any(k == kind for k, _ in self._notes)

    def take(self, kind: str) -> Note | None:
        """The oldest note of ``kind``, taken, or None (never waits)."""
        with self._cond:
            for note in self._notes:
                if note[0] == kind:
                    self._notes.remove(note)
                    return note
        return None

    def drain(self, kind: str) -> int:
        """Drop every note of ``kind``; returns how many."""
        with self._cond:
            kept = [n for n in self._notes if n[0] != kind]
            dropped = len(self._notes) - len(kept)
            self._notes = deque(kept)
            return dropped

    def wait(self, seconds: float) -> Note | None:
        """The next note within ``seconds`` (in short slices; the stop flag ends the wait with ``("stop", None)``)."""
        deadline = self.clock.monotonic() + seconds
        while not self.stop_flag.is_set():
            with self._cond:
                if self._notes:
                    return self._notes.popleft()
                left = deadline - self.clock.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))
        return ("stop", None)

    def __len__(self) -> int:
        with self._cond:
            return len(self._notes)

