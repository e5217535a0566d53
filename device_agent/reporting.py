"""Telemetry that survives a full disk: the agent's one way to emit events and windows.

The outbox writes each message to the state directory before sending it. When that disk refuses the write
(full, over quota, I/O error), an *event* is held here in memory (bounded) and written, in order, before
the next one, so an ``install_failed`` saying "disk full" is not lost because the disk is full. A *window*
that cannot be written is dropped (its counts are aggregates; the log says so). Nothing here raises: a
thread that reports (the worker monitor, the window thread, the acting thread) never dies of a full disk.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from device_agent.errors import StorageError
from device_agent.telemetry import Telemetry

log = logging.getLogger(__name__)

Held = tuple[str, dict[str, Any] | None, dict[str, Any], str | None]


class Reporter:
    def __init__(self, telemetry: Telemetry, *, max_held: int = 1000) -> None:
        self.telemetry = telemetry
        self.max_held = max_held
        self.held: list[Held] = []
        """Events the disk refused, oldest first."""
        self.lost = 0
        """Events dropped because more than ``max_held`` waited for the disk."""
        self._lock = threading.Lock()

    def event(self, name: str, *, target: dict[str, Any] | None = None, detail: dict[str, Any] | None = None,
              rollout_id: str | None = None) -> None:
        with self._lock:
            self.held.append((name, target, dict(detail or {}), rollout_id))
            if len(self.held) > self.max_held:
                self.held.pop(0)
                self.lost += 1
            self._flush()

    def flush(self) -> bool:
        """Write held events now; True when none is left waiting."""
        with self._lock:
            return self._flush()

    def _flush(self) -> bool:
        while self.held:
            name, target, detail, rollout_id = self.held[0]
            try:
                self.telemetry.event(name, target=target, detail=detail, rollout_id=rollout_id)
            except OSError as exc:
                if not StorageError.matches(exc):
                    raise
                log.warning("telemetry event %s kept in memory: the state directory refuses writes (%s); "
                            "%d waiting", name, exc.strerror, len(self.held))
                return False
            self.held.pop(0)
        return True

    def window(self, window: dict[str, Any]) -> dict[str, Any] | None:
        self.flush()
        try:
            return self.telemetry.window(window)
        except OSError as exc:
            if not StorageError.matches(exc):
                raise
            log.warning("telemetry window dropped: the state directory refuses writes (%s)", exc.strerror)
            return None
