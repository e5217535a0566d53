"""The app factory and its lifespan: migrations, repository bootstrap, background loops, MQTT.

Background work runs in threads started by the lifespan and stopped with it:

* gate loop (every ``gate_interval_s``): evaluates each running or paused rollout (``services.rollouts``);
* repository loop (every ``repo_refresh_interval_s``): re-signs timestamp/snapshot past half their life,
  and prunes de-duplication ids older than a week;
* the MQTT ingester and notifier (``ingest``), when ``mqtt_url`` is set.

Every loop survives database outages: it logs, backs off (capped) and carries on when the database is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import delete, text

from bundles.keys import OnlineKeys
from update_server import ui
from update_server.api import admin_api, device_api, docs, errors, metrics_api, tuf_api
from update_server.api.limits import BodyLimitMiddleware, body_limit
from update_server.broker import make_accounts
from update_server.context import ServerContext
from update_server.db import PgTimeouts, is_unavailable, make_engine, make_sessionmaker, migrate, pg_conninfo
from update_server.db_guard import DatabaseGuard
from update_server.metrics import HttpMetricsMiddleware
from update_server.models import TelemetrySeen
from update_server.services import rollouts
from update_server.services.common import ensure_locks, lock
from update_server.services.health import prune as prune_health
from update_server.services.health import record_evaluation
from update_server.services.health_views import FleetCollector
from update_server.settings import Settings
from update_server.storage import make_storage
from update_server.tuf_repo import ImageRepository

log = logging.getLogger(__name__)
SEEN_RETENTION = timedelta(days=7)


class Loop:
    """A named background thread that calls ``step`` every ``interval`` seconds until stopped."""

    def __init__(self, name: str, interval: float, step: Callable[[], None]) -> None:
        self.name, self.interval, self.step = name, interval, step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        delay = self.interval
        while not self._stop.wait(delay):
            try:
                self.step()
                delay = self.interval
            except Exception as exc:  # a loop must never die; report and back off
                if is_unavailable(exc):
                    log.warning("%s: database unavailable, retrying", self.name)
                else:
                    log.exception("%s failed", self.name)
                delay = min(max(delay * 2, 0.5), 10.0)


def build_context(settings: Settings, *, accounts: bool = True) -> ServerContext:
    """Everything the server needs; ``accounts=False`` leaves out broker account management (ingest-only)."""
    if settings.keys_dir is None:
        raise ValueError("EDGEPACK_KEYS_DIR is not set: point it at the online/ folder of your key directory "
                         "(created by `edgepack keys init`)")
    keys = OnlineKeys.load(settings.keys_dir)
    timeouts = PgTimeouts.from_settings(settings)
    engine = make_engine(settings.effective_database_url, timeouts=timeouts)
    repo = ImageRepository(keys, timestamp_expiry=timedelta(seconds=settings.timestamp_expiry_s),
                           snapshot_expiry=timedelta(seconds=settings.snapshot_expiry_s))
    guard, pool = _postgres_extras(engine, settings, timeouts)
    return ServerContext(settings=settings, engine=engine, sessions=make_sessionmaker(engine),
                         storage=make_storage(settings.storage, settings.data_dir), keys=keys, repo=repo,
                         checkin_pool=pool, db_guard=guard, broker=make_accounts(settings) if accounts else None)


def _postgres_extras(engine: Any, settings: Settings, timeouts: PgTimeouts) -> tuple[DatabaseGuard | None, Any]:
    """PostgreSQL only: the hung-database guard and the async check-in pool (None, None for SQLite)."""
    if engine.dialect.name != "postgresql":
        return None, None
    from update_server.pg_fast import CheckinPool
    from update_server.services.devices import CHECKIN

    guard = DatabaseGuard(pg_conninfo(engine.url, timeouts), interval_s=settings.database_probe_interval_s,
                          timeout_s=settings.database_probe_timeout_s)
    guard.attach(engine)
    return guard, CheckinPool(engine.url.render_as_string(hide_password=False), CHECKIN, timeouts=timeouts,
                              guard=guard)


def prepare_database(ctx: ServerContext) -> None:
    if ctx.settings.auto_migrate:
        migrate(ctx.engine)
    with ctx.sessions() as session, session.begin():
        ensure_locks(session)
    with ctx.sessions() as session, session.begin():
        lock(session, "repo")
        ctx.repo.bootstrap(session, ctx.clock())
        ctx.repo.refresh(session, ctx.clock())


def evaluate_all(ctx: ServerContext) -> None:
    for rollout_id in rollouts.active_rollout_ids(ctx):
        t0 = time.perf_counter()
        decision = rollouts.evaluate(ctx, rollout_id)
        record_evaluation(ctx, rollout_id, decision, time.perf_counter() - t0)


def maintain_repository(ctx: ServerContext) -> None:
    now = ctx.clock()
    with ctx.sessions() as session, session.begin():
        lock(session, "repo")
        ctx.repo.refresh(session, now)
    with ctx.sessions() as session, session.begin():
        session.execute(delete(TelemetrySeen).where(TelemetrySeen.received_at < now - SEEN_RETENTION))
        prune_health(session, now)


def _check_broker_in_background(ctx: ServerContext) -> None:
    """Probe the broker's settings (``broker.check``) without delaying the start; log what to change."""
    from update_server.broker.check import check_broker

    def run() -> None:
        try:
            report = check_broker(ctx.settings)
        except Exception:
            log.exception("the broker check failed (edgepack-server check-broker runs it by hand)")
            return
        for line in report.lines():
            (log.warning if report.problems else log.info)("broker check: %s", line)
        ctx.broker_report = report

    threading.Thread(target=run, name="broker-check", daemon=True).start()


def create_app(settings: Settings | None = None, *, background: bool = True) -> FastAPI:
    """The FastAPI app. ``background=False`` leaves out loops and MQTT (for tools and some tests)."""
    settings = settings or Settings.load()
    for warning in settings.transport_warnings():  # raises ValueError for plain transport off loopback
        log.warning("%s", warning)
    ctx = build_context(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        prepare_database(ctx)
        started: list[Any] = []
        if ctx.db_guard is not None:
            ctx.db_guard.start()
            started.append(ctx.db_guard)
        if ctx.broker is not None and settings.mqtt_url:  # enrollment needs it, with or without background
            ctx.broker.start()
            started.append(ctx.broker)
        served = False
        try:
            if background:
                if settings.mqtt_url:
                    from update_server.ingest import Ingester, Notifier

                    notifier = Notifier(ctx)
                    notifier.start()
                    ctx.notify = notifier
                    started.append(notifier)
                    ingester = Ingester(ctx)
                    ingester.start()
                    app.state.ingester = ingester
                    started.append(ingester)
                    if settings.broker_check:
                        _check_broker_in_background(ctx)
                started.append(Loop("gate-loop", settings.gate_interval_s, lambda: evaluate_all(ctx)))
                started.append(Loop("repo-loop", settings.repo_refresh_interval_s, lambda: maintain_repository(ctx)))
                for loop in started[-2:]:
                    loop.start()
            served = True
            yield
        finally:
            live_ingester: Any = getattr(app.state, "ingester", None)
            for item in reversed(started):
                if live_ingester is not None and item is live_ingester:
                    # A start that failed must not leave a session in the shared subscription taking telemetry.
                    live_ingester.stop(release=not served)
                else:
                    item.stop()
            ctx.engine.dispose()
            if ctx.checkin_pool is not None:
                await ctx.checkin_pool.close()

    app = FastAPI(title="edgepack update server", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    errors.install(app)
    docs.install(app)  # /docs from local files (no CDN)
    app.include_router(device_api.router)
    app.include_router(admin_api.router)
    app.include_router(tuf_api.router)
    ui.install(app)
    app.add_middleware(BodyLimitMiddleware, limit_for=lambda method, path: body_limit(method, path, settings))
    if settings.metrics_enabled:  # added last: outermost, so it also counts the 413s of the body limits
        app.add_middleware(HttpMetricsMiddleware, metrics=ctx.metrics)
        app.include_router(metrics_api.router)
        ctx.metrics.extra.append(FleetCollector(ctx, ttl_s=settings.metrics_cache_s))

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(scope: Literal["all", "http"] = "all") -> JSONResponse:
        """Ready: the database answers and, when this server ingests telemetry, the ingester is connected,
        its threads alive and its writer not stuck (``Ingester.health``). 503 names the reason.
        ``scope=http``: the database only (a load balancer that should keep routing check-ins while the
        broker is down). 503 + Retry-After at once while the database guard has the database down, else
        within the guard's detection time (the SELECT 1 below is cut with every other statement)."""
        ingester = getattr(app.state, "ingester", None) if scope == "all" else None
        body: dict[str, Any] = {"status": "ready"}
        if ingester is not None:
            health = ingester.health()
            body["ingester"] = health.as_dict()
            if health.problem:
                body["status"] = health.problem
        if ctx.broker_report is not None:
            body["broker_check"] = ctx.broker_report.problems or "ok"
        unavailable = JSONResponse({**body, "status": "database unavailable"}, status_code=503,
                                   headers={"Retry-After": "2"})
        if ctx.db_guard is not None and ctx.db_guard.down:
            return unavailable
        try:
            with ctx.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            if is_unavailable(exc):
                return unavailable
            raise
        if body["status"] != "ready":
            return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})
        return JSONResponse(body)

    return app
