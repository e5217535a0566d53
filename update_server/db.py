"""Database plumbing: engines for SQLite and PostgreSQL, sessions, migrations, locking, outage detection.

SQLite (the default) is one file with no setup. Every SQLite transaction starts with ``BEGIN IMMEDIATE``:
in WAL mode a deferred transaction that reads and then writes fails at once with "database is locked"
when another writer committed in between, whatever the busy timeout; taking the write lock up front
makes concurrent writers queue instead. PostgreSQL gets row locks (``SELECT ... FOR UPDATE``) where two
replicas could race, pool invalidation on disconnect errors so a restarted server is reconnected to without
a restart of ours, and :class:`PgTimeouts` on every connection: a short connect timeout so requests fail
fast (503) while it is down, server-side statement and lock timeouts, TCP keepalives and a TCP user timeout
so a vanished host is noticed, a bounded wait for a pooled connection. A database that *hangs* (accepts
and acknowledges but never answers) is caught by ``db_guard.DatabaseGuard``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_LOCK_ID = 0x6564676570616B  # "edgepak": pg advisory lock taken while migrating


@dataclass(frozen=True)
class PgTimeouts:
    """How long PostgreSQL connections wait; the defaults are the settings' (``database_*_s``)."""

    connect_s: float = 2.0
    statement_s: float = 30.0
    lock_s: float = 10.0
    pool_s: float = 3.0
    keepalive_idle_s: int = 10  # then a probe every 5 s, 3 unanswered: a vanished host is noticed in ~25 s
    user_timeout_s: int = 10  # data sent and not acknowledged this long: the connection is broken

    @classmethod
    def from_settings(cls, settings: Any) -> PgTimeouts:
        return cls(connect_s=settings.database_connect_timeout_s, statement_s=settings.database_statement_timeout_s,
                   lock_s=settings.database_lock_timeout_s, pool_s=settings.database_pool_timeout_s)

    def connect_args(self) -> dict[str, Any]:
        """libpq connection parameters (psycopg ``connect`` keywords)."""
        args: dict[str, Any] = {"connect_timeout": max(2, round(self.connect_s)), "keepalives": 1,
                                "keepalives_idle": self.keepalive_idle_s, "keepalives_interval": 5,
                                "keepalives_count": 3, "tcp_user_timeout": self.user_timeout_s * 1000}
        # Sent as startup options; both 0 sends none (PgBouncer refuses `options` unless it ignores them).
        options = [f"-c {name}={int(value * 1000)}" for name, value in
                   (("statement_timeout", self.statement_s), ("lock_timeout", self.lock_s)) if value > 0]
        if options:
            args["options"] = " ".join(options)
        return args


def pg_conninfo(url: Any, timeouts: PgTimeouts, **extra: Any) -> str:
    """A libpq connection string for a SQLAlchemy URL, with ``timeouts`` (for connections made outside the pool)."""
    from psycopg.conninfo import make_conninfo
    from sqlalchemy import make_url

    u = make_url(url) if isinstance(url, str) else url
    parts: dict[str, Any] = {"host": u.host or "127.0.0.1", "port": u.port or 5432, "user": u.username,
                             "password": u.password, "dbname": u.database}
    args = timeouts.connect_args()
    if "options" in extra:
        args["options"] = f"{args.get('options', '')} {extra.pop('options')}".strip()
    return make_conninfo(**{k: v for k, v in {**parts, **args, **extra}.items() if v is not None})


def make_engine(url: str, *, pool_size: int = 10, timeouts: PgTimeouts | None = None) -> Engine:
    """An engine tuned for the server: WAL SQLite or pooled PostgreSQL (psycopg 3) with ``timeouts``."""
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # One connection: SQLite has one writer anyway, and threads queueing on the pool wake up as soon as
        # it is free, where SQLite's busy handler would make them sleep and retry (seconds of p99 latency).
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=1, max_overflow=0, pool_timeout=60)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    # No pool_pre_ping (a round trip per request): a connection broken by a restart fails once, SQLAlchemy
    # then invalidates the whole pool, that request gets 503 and the next ones reconnect.
    timeouts = timeouts or PgTimeouts()
    return create_engine(url, pool_size=pool_size, max_overflow=20, pool_timeout=timeouts.pool_s,
                         connect_args=timeouts.connect_args())


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def is_postgres(session_or_engine: Session | Engine) -> bool:
    bind = session_or_engine.get_bind() if isinstance(session_or_engine, Session) else session_or_engine
    return bind.dialect.name == "postgresql"


def dialect_insert(session: Session, table: Any) -> Any:
    """``INSERT`` with ``on_conflict_do_*`` for the session's dialect."""
    if is_postgres(session):
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def is_unavailable(error: BaseException) -> bool:
    """True when ``error`` means the database cannot be reached (as opposed to a bad query)."""
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, (exc.OperationalError, exc.InterfaceError)):
        return True
    return isinstance(error, exc.TimeoutError)  # pool exhausted while connections hang


_migrate_lock = threading.Lock()


def migrate(engine: Engine, revision: str = "head") -> None:
    """Run Alembic migrations up to ``revision``; safe when several replicas start at once."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with _migrate_lock, engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # Migrations may rewrite big tables, and wait for the lock of another replica's migration.
            conn.execute(text("SET statement_timeout = 0"))
            conn.execute(text("SET lock_timeout = 0"))
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_ID})
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
        finally:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK_ID})
                conn.execute(text("RESET statement_timeout"))  # back to the connection's own (PgTimeouts)
                conn.execute(text("RESET lock_timeout"))
                conn.commit()


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on any error."""
    with factory() as session, session.begin():
        yield session
