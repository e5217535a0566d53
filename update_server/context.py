"""Everything a request or background loop needs, built once by the app factory and passed down."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from bundles.keys import OnlineKeys
from update_server.broker import BrokerAccounts
from update_server.db_guard import DatabaseGuard
from update_server.metrics import Counters, Metrics
from update_server.settings import Settings
from update_server.storage import BlobStorage
from update_server.tuf_repo import ImageRepository


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


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
    db_guard: DatabaseGuard | None = None
    """PostgreSQL only: the probe that makes requests fail fast (503) while the database hangs."""
    broker: BrokerAccounts | None = None
    """Devices' broker accounts (update_server/broker/); None: no broker configured."""
    metrics: Metrics = field(default_factory=Metrics)
    """Prometheus metrics of this process (summed over workers at /metrics); ``counters`` is their seam."""
    broker_report: Any = None
    """The start-up broker check's result (``broker.check.BrokerReport``), once it has run."""
    notify: Notify = lambda devices: None
    clock: Callable[[], datetime] = utcnow

    @property
    def counters(self) -> Counters:
        """Where every part of the server counts occurrences by name (``update_server.metrics``)."""
        return self.metrics.counters
