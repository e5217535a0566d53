"""Fail fast while PostgreSQL hangs: a health probe that opens a breaker.

A database that is *stopped* refuses connections, and requests fail (503) within the connect timeout. A
database that *hangs* (a frozen VM, a SIGSTOPped postmaster, a storage stall) is worse: its kernel still
accepts connections and acknowledges every byte, so connect timeouts, statement timeouts (enforced by the
frozen server itself) and TCP keepalives never fire, and every statement on a pooled connection waits
forever, holding a worker thread and a pool slot. Only the client can notice, by time.

:class:`DatabaseGuard` runs ``SELECT 1`` on a connection of its own every ``database_probe_interval_s``. Two
states, two edges (:func:`next_state`)::

    UP   --probe failed, or unanswered after database_probe_timeout_s-->  DOWN
    DOWN --probe answered--------------------------------------------->  UP

Entering DOWN: new connections are refused at once (the engine's ``do_connect`` hook raises, which maps to
503 + Retry-After), and the sockets of every open connection (the SQLAlchemy pool's and the async check-in
pool's) are shut down, so statements waiting on them fail now instead of when the database resumes, and
the pools drop them (nothing cut is reused after the database is back). In DOWN the probe keeps trying
(each attempt bounded by the connect timeout); the first answer returns to UP and connections are made
again. Worst case from the hang to a 503: ``probe_interval + probe_timeout`` (2.5 s with the defaults).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import threading
import time
import weakref
from typing import Any

from sqlalchemy import Engine, event

log = logging.getLogger(__name__)


class DbState(enum.Enum):
    UP = "up"
    DOWN = "down"


def next_state(state: DbState, probe_ok: bool) -> DbState:
    """The breaker's transition table: the last probe decides."""
    return DbState.UP if probe_ok else DbState.DOWN


def cut(conn: Any) -> None:
    """Shut down a psycopg connection's socket from any thread: whoever waits on it gets an error now."""
    try:
        fd = conn.pgconn.socket
    except Exception:  # closed already
        return
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


class DatabaseGuard:
    """See the module docstring. ``conninfo`` is the probe's libpq connection string."""

    def __init__(self, conninfo: str, *, interval_s: float, timeout_s: float) -> None:
        self.conninfo, self.interval_s, self.timeout_s = conninfo, interval_s, timeout_s
        self.state = DbState.UP
        self.epoch = 0
        """Counts the times the database went DOWN: a connection made in an older epoch had its socket cut."""
        self.last_error = ""
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._probe_conn: Any = None
        self._engines: list[Engine] = []
        self._thread = threading.Thread(target=self._run, name="db-guard", daemon=True)

    @property
    def down(self) -> bool:
        return self.state is DbState.DOWN

    # ---- wiring --------------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        """Track the engine's connections, refuse new ones while DOWN, empty its pool on going DOWN."""
        self._engines.append(engine)

        @event.listens_for(engine, "do_connect")
        def _refuse_while_down(_dialect: Any, _record: Any, _cargs: Any, _cparams: Any) -> None:
            if self.down:
                import psycopg

                raise psycopg.OperationalError(f"the database is not answering ({self.last_error}); "
                                               "not connecting until it does")

        @event.listens_for(engine, "connect")
        def _track(dbapi_conn: Any, _record: Any) -> None:
            self.track(dbapi_conn)

    def track(self, conn: Any) -> None:
        """Cut ``conn`` (a psycopg connection, sync or async) when the database goes DOWN."""
        with self._lock:
            self._connections.add(conn)
        if self.down:
            cut(conn)

    # ---- the loop ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._probe_conn is not None:
            cut(self._probe_conn)
        self._thread.join(10)
        self._close_probe()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                ok, error = self.probe()
            except Exception as exc:  # the guard must never die: a dead guard would never say DOWN
                log.exception("database probe failed unexpectedly")
                self._close_probe()
                ok, error = False, _first_line(exc)
            if self._stop.is_set():
                return
            new = next_state(self.state, ok)
            if new is not self.state:
                self._enter(new, error)
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))

    def _enter(self, state: DbState, error: str) -> None:
        self.last_error = error
        if state is DbState.DOWN:
            self.epoch += 1
        self.state = state
        if state is DbState.DOWN:
            with self._lock:
                victims = list(self._connections)
            log.error("the database is not answering (%s): refusing new connections and cutting %d open ones; "
                      "requests get 503 until it answers again", error, len(victims))
            for conn in victims:
                cut(conn)
            for engine in self._engines:
                engine.dispose()  # idle connections closed; checked-out ones are dropped when returned
        else:
            log.warning("the database answers again; reconnecting")

    def probe(self) -> tuple[bool, str]:
        """``SELECT 1`` within ``timeout_s`` (a new connection is bounded by the connect timeout instead).
        Returns whether it answered, and what went wrong if not."""
        import psycopg

        try:
            if self._probe_conn is None:
                self._probe_conn = psycopg.connect(self.conninfo, autocommit=True)
        except psycopg.Error as exc:
            return False, _first_line(exc)
        conn = self._probe_conn
        timer = threading.Timer(self.timeout_s, cut, (conn,))
        timer.daemon = True
        t0 = time.monotonic()
        timer.start()
        try:
            conn.execute("SELECT 1")
            return True, ""
        except psycopg.Error as exc:
            self._close_probe()
            if time.monotonic() - t0 >= self.timeout_s:
                return False, f"no answer to SELECT 1 within {self.timeout_s:g} s"
            return False, _first_line(exc)
        finally:
            timer.cancel()

    def _close_probe(self) -> None:
        conn, self._probe_conn = self._probe_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
