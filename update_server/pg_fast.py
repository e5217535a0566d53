"""PostgreSQL check-ins without threads: psycopg 3's native async connections, in a small pool.

The check-in UPDATE is the one statement a fleet runs a thousand times a second. Awaiting it on the event
loop avoids a thread hand-off per request (which costs as much as the statement itself, measured in
bench/bench_server.py), and cannot stall the loop while the database is unreachable (connects time out
after ``database_connect_timeout_s``, awaited; waiting for a connection of the pool after
``database_pool_timeout_s``; while the database hangs, ``db_guard`` refuses at once and cuts the sockets of
statements already waiting). Connections are autocommit with ``synchronous_commit=off``: the UPDATE is its own
transaction and does not wait for the WAL flush. SQLAlchemy's asyncio layer would need greenlet, which is
not a dependency, so this uses psycopg directly with the statement SQLAlchemy compiled once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from update_server.db import PgTimeouts, pg_conninfo
from update_server.db_guard import DatabaseGuard
from update_server.errors import Unavailable


class CheckinPool:
    def __init__(self, url: str, statement: Any, *, size: int = 16, timeouts: PgTimeouts | None = None,
                 guard: DatabaseGuard | None = None) -> None:
        from sqlalchemy.dialects.postgresql import psycopg as pg_dialect

        self.timeouts = timeouts or PgTimeouts()
        self.conninfo = pg_conninfo(url, self.timeouts, options="-c synchronous_commit=off")
        self.guard = guard
        compiled = statement.compile(dialect=pg_dialect.dialect())  # type: ignore[no-untyped-call] # untyped ctor
        self.sql = str(compiled)
        self.json_params = {k for k, b in compiled.binds.items() if b.type.__class__.__name__ == "JSON"}
        self.time_params = {k for k, b in compiled.binds.items() if b.type.__class__.__name__ == "UTCDateTime"}
        self.size = size
        self._idle: asyncio.LifoQueue[Any] | None = None
        self._created = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _connect(self) -> Any:
        import psycopg

        conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        if self.guard is not None:
            self.guard.track(conn)
        return conn

    def _convert(self, params: Mapping[str, Any]) -> dict[str, Any]:
        from psycopg.types.json import Json

        out = dict(params)
        for key in self.json_params:
            if out.get(key) is not None:
                out[key] = Json(out[key])
        for key in self.time_params:
            value = out.get(key)
            if isinstance(value, datetime):
                out[key] = value.astimezone(timezone.utc).replace(tzinfo=None)
        return out

    def _epoch(self) -> int:
        return self.guard.epoch if self.guard is not None else 0

    async def _acquire(self, idle: asyncio.LifoQueue[Any]) -> tuple[Any, int]:
        import psycopg

        while True:
            if idle.empty() and self._created < self.size:
                self._created += 1
                try:
                    return await self._connect(), self._epoch()
                except psycopg.OperationalError as exc:
                    self._created -= 1
                    raise Unavailable("the database is unavailable; retry later",
                                      code="database_unavailable") from exc
            try:
                conn, epoch = await asyncio.wait_for(idle.get(), self.timeouts.pool_s)
            except TimeoutError as exc:
                raise Unavailable(f"no database connection free within {self.timeouts.pool_s:g} s; retry later",
                                  code="database_unavailable") from exc
            if epoch == self._epoch():
                return conn, epoch
            self._created -= 1  # made before the database last went down: the guard cut its socket
            await conn.close()

    async def fetchone(self, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """Run the statement; 503 (Unavailable) when the database cannot be reached or does not answer."""
        import psycopg

        if self.guard is not None and self.guard.down:
            raise Unavailable("the database is not answering; retry later", code="database_unavailable")
        loop = asyncio.get_running_loop()
        if self._idle is None or self._loop is not loop:
            self._idle, self._created, self._loop = asyncio.LifoQueue(), 0, loop
        idle = self._idle
        conn, epoch = await self._acquire(idle)
        try:
            cur = await conn.execute(self.sql, self._convert(params), prepare=True)
            row = await cur.fetchone()
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._created -= 1
            await conn.close()
            raise Unavailable("the database is unavailable; retry later", code="database_unavailable") from exc
        except BaseException:
            self._created -= 1
            await conn.close()
            raise
        idle.put_nowait((conn, epoch))
        return tuple(row) if row is not None else None

    async def close(self) -> None:
        if self._idle is not None:
            while not self._idle.empty():
                conn, _ = self._idle.get_nowait()
                await conn.close()
