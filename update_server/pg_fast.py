"""PostgreSQL check-ins without threads: psycopg 3's native async connections, in a small pool.

The check-in UPDATE is the one statement a fleet runs a thousand times a second. Awaiting it on the event
loop avoids a thread hand-off per request (which costs as much as the statement itself, measured in
bench/bench_server.py), and cannot stall the loop while the database is unreachable (connects time out
after 3 s, awaited). Connections are autocommit with ``synchronous_commit=off``: the UPDATE is its own
transaction and does not wait for the WAL flush. SQLAlchemy's asyncio layer would need greenlet, which is
not a dependency, so this uses psycopg directly with the statement SQLAlchemy compiled once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from update_server.errors import Unavailable


class CheckinPool:
    def __init__(self, url: str, statement: Any, *, size: int = 16) -> None:
        from sqlalchemy import make_url
        from sqlalchemy.dialects.postgresql import psycopg as pg_dialect

        u = make_url(url)
        from psycopg.conninfo import make_conninfo

        parts: dict[str, Any] = {"host": u.host or "127.0.0.1", "port": u.port or 5432, "user": u.username,
                                 "password": u.password, "dbname": u.database}
        self.conninfo = make_conninfo(**{k: v for k, v in parts.items() if v is not None})
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

        return await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, connect_timeout=3,
                                                     options="-c synchronous_commit=off")

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

    async def fetchone(self, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """Run the statement; 503 (Unavailable) when the database cannot be reached."""
        import psycopg

        loop = asyncio.get_running_loop()
        if self._idle is None or self._loop is not loop:
            self._idle, self._created, self._loop = asyncio.LifoQueue(), 0, loop
        idle = self._idle
        if idle.empty() and self._created < self.size:
            self._created += 1
            try:
                conn = await self._connect()
            except psycopg.OperationalError as exc:
                self._created -= 1
                raise Unavailable("the database is unavailable; retry later", code="database_unavailable") from exc
        else:
            conn = await idle.get()
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
        idle.put_nowait(conn)
        return tuple(row) if row is not None else None

    async def close(self) -> None:
        if self._idle is not None:
            while not self._idle.empty():
                await self._idle.get_nowait().close()
