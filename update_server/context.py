"""Everything a request or background loop needs, built once by the app factory and passed down."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from bundles.keys import OnlineKeys
from update_server.broker import BrokerAccounts
from update_server.settings import Settings
from update_server.storage import BlobStorage
from update_server.tuf_repo import ImageRepository


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Counters:
    """Thread-safe counters (ingest drops, duplicates, ...) exposed at /api/v1/admin/stats."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


Notify = Callable[[Iterable[str]], None]
"""Sends a check-in-now notice to each device id (MQTT); a no-op without a broker."""


@dataclass
class ServerContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: BlobStorage
    keys: OnlineKeys
    repo: ImageRepository
    checkin_pool: Any = None
    """PostgreSQL only: ``pg_fast.CheckinPool``, async connections for the check-in UPDATE."""
    broker: BrokerAccounts | None = None
    """Devices' broker accounts (update_server/broker/); None: no broker configured."""
    counters: Counters = field(default_factory=Counters)
    notify: Notify = lambda devices: None
    clock: Callable[[], datetime] = utcnow
