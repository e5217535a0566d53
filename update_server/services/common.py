"""Helpers shared by the services: named locks across replicas and the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from update_server.db import dialect_insert, is_postgres
from update_server.models import AuditEntry, Lock

LOCK_NAMES = ("repo", "rollouts")


def ensure_locks(session: Session) -> None:
    stmt = dialect_insert(session, Lock).values([{"name": n} for n in LOCK_NAMES]).on_conflict_do_nothing()
    session.execute(stmt)


def lock(session: Session, name: str) -> None:
    """Serialize a critical section across replicas until the transaction ends.

    PostgreSQL: ``SELECT ... FOR UPDATE`` on the named row. SQLite: every transaction already holds the
    database's write lock (``BEGIN IMMEDIATE``, see ``db.py``).
    """
    if is_postgres(session):
        session.execute(select(Lock.name).where(Lock.name == name).with_for_update())


def audit(session: Session, *, now: datetime, actor: str, action: str, subject: str, reason: str = "",
          rollout_id: str | None = None, detail: dict[str, Any] | None = None) -> None:
    session.add(AuditEntry(at=now, actor=actor, action=action, subject=subject, rollout_id=rollout_id,
                           reason=reason or "", detail=detail or {}))
