"""Prometheus metrics: one seam for every counter of the server, HTTP metrics, and ``/metrics``.

Process-local metrics (HTTP, check-ins, ingest, gate evaluations, every ``ctx.counters.add(name)``) are
prometheus-client metrics. With several uvicorn workers they must be summed across processes:
``edgepack-server serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before any worker
starts (prometheus-client's multiprocess mode: each process writes its values to memory-mapped files
there), and ``/metrics`` and ``/api/v1/admin/stats`` read them all through ``MultiProcessCollector``.
Without that variable (one process: tests, tools) each :class:`Metrics` keeps its own registry.

Fleet-wide figures (rollout states, gate values, devices per version, model health per version, drift)
live in the database, not in any process: ``services.health.FleetCollector`` reads them at scrape time.
Each replica exposes them too, so queries over several replicas take ``max by (...)`` (docs/server.md).

The counter seam: ``ctx.counters.add(name, n)`` is how every part of the server counts an occurrence
(``telemetry_ingested``, ``telemetry_dropped_<reason>``, ``notices_sent``, ...). :meth:`Counters.add`
maps the name to a metric once, here: drop reasons become ``edgepack_telemetry_dropped_total{reason}``,
every other name ``edgepack_server_events_total{event}``; names added later appear without a change here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

DROPPED_PREFIX = "telemetry_dropped_"
RECEIVED_NAMES = frozenset({"telemetry_ingested", "telemetry_duplicates"})
"""With every ``telemetry_dropped_*``: the outcomes of a message read from the broker, so they also count
as received."""
CHECKIN_ROUTE = "/api/v1/devices/{device_id}/checkin"
HTTP_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def multiprocess_dir() -> str | None:
    """The directory of prometheus-client's multiprocess mode, when this process runs in it."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Counters:
    """The seam every server counter goes through (``ctx.counters.add``); see the module docstring."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._children: dict[str, Any] = {}

    def add(self, name: str, n: int = 1) -> None:
        if n <= 0:
            return
        child = self._children.get(name)
        if child is None:
            if name.startswith(DROPPED_PREFIX):
                child = self._m.telemetry_dropped.labels(name[len(DROPPED_PREFIX):])
            else:
                child = self._m.events.labels(name)
            self._children[name] = child
        child.inc(n)
        if name in RECEIVED_NAMES or name.startswith(DROPPED_PREFIX):
            self._m.telemetry_received.inc(n)
        elif name == "telemetry_lost":
            self._m.telemetry_lost.inc(n)

    def snapshot(self) -> dict[str, int]:
        """Every counter by its name, summed over all worker processes of this server."""
        out: dict[str, int] = {}
        for family in self._m.collect_process_metrics():
            if family.name == "edgepack_server_events":
                key, prefix = "event", ""
            elif family.name == "edgepack_telemetry_dropped":
                key, prefix = "reason", DROPPED_PREFIX
            else:
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    name = prefix + sample.labels[key]
                    out[name] = out.get(name, 0) + int(sample.value)
        return out


class Metrics:
    """The server's process-local metrics; one per :class:`~update_server.context.ServerContext`."""

    def __init__(self) -> None:
        self.mp_dir = multiprocess_dir()
        self.registry = CollectorRegistry(auto_describe=True)
        self.extra: list[Any] = []
        """Collectors of fleet-wide figures read at scrape time (``services.health.FleetCollector``)."""
        r = self.registry
        self.http_requests = Counter("edgepack_http_requests", "HTTP requests by route template and status",
                                     ["method", "route", "status"], registry=r)
        self.http_duration = Histogram("edgepack_http_request_duration_seconds", "HTTP request time in the server",
                                       ["method", "route"], buckets=HTTP_BUCKETS, registry=r)
        self.checkins = Counter("edgepack_checkins", "Device check-ins by HTTP status", ["status"], registry=r)
        self.events = Counter("edgepack_server_events", "Every named server counter (ctx.counters)", ["event"],
                              registry=r)
        self.telemetry_received = Counter("edgepack_telemetry_received",
                                          "Telemetry messages read from the broker (ingested, duplicate or dropped)",
                                          registry=r)
        self.telemetry_dropped = Counter("edgepack_telemetry_dropped", "Telemetry messages dropped, by reason",
                                         ["reason"], registry=r)
        self.telemetry_lost = Counter("edgepack_telemetry_lost",
                                      "Telemetry messages that left a device's outbox (full, or state reset) "
                                      "before the server stored them, found at check-in", registry=r)
        self.telemetry_lag = Histogram("edgepack_telemetry_lag_seconds",
                                       "From a device sending a telemetry message to its commit in the database",
                                       buckets=LAG_BUCKETS, registry=r)
        self.gate_evaluations = Counter("edgepack_gate_evaluations", "Rollout evaluations by verdict", ["verdict"],
                                        registry=r)
        self.gate_breaches = Counter("edgepack_gate_breaches", "Gates found breached at an evaluation", ["gate"],
                                     registry=r)
        self.gate_duration = Histogram("edgepack_gate_evaluation_seconds", "Time to evaluate one rollout",
                                       buckets=HTTP_BUCKETS, registry=r)
        self.counters = Counters(self)
        self._http_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    # ---- recording -------------------------------------------------------------------------------------
    def http(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._http_children.get(key)
        if children is None:
            children = (self.http_requests.labels(method, route, str(status)), self.http_duration.labels(method, route))
            if len(self._http_children) < 10_000:  # routes are templates, so this stays small; a guard all the same
                self._http_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if route == CHECKIN_ROUTE:
            self.checkins.labels(str(status)).inc()

    def gate_evaluated(self, verdict: str | None, breached: list[str], seconds: float) -> None:
        self.gate_evaluations.labels(verdict or "skipped").inc()
        for name in breached:
            self.gate_breaches.labels(name).inc()
        self.gate_duration.observe(seconds)

    def ingest_committed(self, messages: Iterable[Any], now: datetime) -> None:
        """After a telemetry batch committed: each message's lag from ``sent_at`` (device clock) to now."""
        for msg in messages:
            sent = msg.sent_at if msg.sent_at.tzinfo else msg.sent_at.replace(tzinfo=timezone.utc)
            self.telemetry_lag.observe(max((now - sent).total_seconds(), 0.0))

    # ---- exposition ------------------------------------------------------------------------------------
    def collect_process_metrics(self) -> list[Any]:
        """The process-local metric families, summed over every worker in multiprocess mode."""
        if self.mp_dir:
            registry = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(registry, path=self.mp_dir)  # type: ignore[no-untyped-call]
            return list(registry.collect())
        return list(self.registry.collect())

    def exposition(self) -> bytes:
        """The Prometheus text format: process metrics (all workers) plus the fleet collectors."""
        if self.mp_dir:
            registry = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(registry, path=self.mp_dir)  # type: ignore[no-untyped-call]
        else:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Forward(self.registry))
        for collector in self.extra:
            registry.register(collector)
        return generate_latest(registry)


class _Forward:
    """Re-exposes another registry's metrics (so the fleet collectors can join them per scrape)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Any:
        return self._registry.collect()


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class HttpMetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would cost more than the check-in itself): counts each
    request by method, route template (never the raw path, so ids do not explode the series) and status."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http(scope["method"], route, status, time.perf_counter() - t0)
