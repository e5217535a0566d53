"""Optional Prometheus metrics of one agent, served on its local API as ``GET /metrics``.

Off by default (``[api] metrics = true`` turns it on); answered only to loopback and Unix-socket clients,
so a node exporter or a local Prometheus agent on the device can scrape it while nothing leaves the
device unless the operator ships it. prometheus-client is imported only when it is on, so an agent without
it costs nothing.

=======================================  ==========================================================
``edgepack_agent_info``                  device id, state, serving name/version/variant (labels)
``edgepack_agent_state``                 1 for the state machine's current state (label ``state``)
``edgepack_agent_requests_total``        predictions answered; ``..._errors_total`` the failed ones
``edgepack_agent_latency_seconds``       histogram of prediction latency (the telemetry's buckets)
``edgepack_agent_feedback_total``        labels received; ``..._feedback_correct_total`` correct ones
``edgepack_agent_worker_crashes_total``  serving worker crashes; ``..._worker_restarts_total``
``edgepack_agent_worker_up``             1 while the serving worker is alive
``edgepack_agent_outbox_messages``       telemetry not yet committed by the server; ``..._outbox_dropped_total``
=======================================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from device_agent.states import State
from device_agent.telemetry import LATENCY_BOUNDS_MS, Totals

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = tuple(s.value for s in State)


class Source(Protocol):
    def status(self) -> dict[str, Any]: ...
    def metric_totals(self) -> tuple[Totals, int]: ...


def renderer(source: Source) -> Callable[[], bytes]:
    """A function that renders ``source``'s metrics in Prometheus' text format (imports prometheus-client)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    class _Collector:
        def collect(self) -> Iterator[Any]:
            st = source.status()
            totals, dropped = source.metric_totals()
            serving = st.get("serving") or {}
            info = GaugeMetricFamily("edgepack_agent_info", "The agent and the bundle it serves",
                                     labels=["device_id", "state", "name", "version", "variant"])
            info.add_metric([str(st.get("device_id", "")), str(st.get("state", "")), str(serving.get("name", "")),
                             str(serving.get("version", "")), str(serving.get("variant", ""))], 1)
            yield info
            state = GaugeMetricFamily("edgepack_agent_state", "1 for the current update state", labels=["state"])
            current = str(st.get("state", ""))
            for name in sorted({*STATES, current}):
                state.add_metric([name], 1 if name == current else 0)
            yield state
            yield CounterMetricFamily("edgepack_agent_requests", "Predictions answered", value=totals.requests)
            yield CounterMetricFamily("edgepack_agent_errors", "Predictions that failed", value=totals.errors)
            buckets, running = [], 0
            for bound, count in zip(LATENCY_BOUNDS_MS, totals.counts, strict=False):
                running += count
                buckets.append((repr(bound / 1000), running))
            buckets.append(("+Inf", totals.requests))
            yield HistogramMetricFamily("edgepack_agent_latency_seconds", "Prediction latency", buckets=buckets,
                                        sum_value=totals.latency_sum_ms / 1000)
            yield CounterMetricFamily("edgepack_agent_feedback", "Labels received", value=totals.feedback)
            yield CounterMetricFamily("edgepack_agent_feedback_correct", "Labels that matched the prediction",
                                      value=totals.feedback_correct)
            worker = st.get("worker") or {}
            yield CounterMetricFamily("edgepack_agent_worker_crashes", "Serving worker crashes",
                                      value=int(worker.get("crashes", 0)))
            yield CounterMetricFamily("edgepack_agent_worker_restarts", "Serving worker restarts",
                                      value=int(worker.get("restarts", 0)))
            yield GaugeMetricFamily("edgepack_agent_worker_up", "1 while the serving worker is alive",
                                    value=1 if worker.get("alive") else 0)
            yield GaugeMetricFamily("edgepack_agent_outbox_messages",
                                    "Telemetry messages not yet committed by the server",
                                    value=int(st.get("outbox", 0)))
            yield CounterMetricFamily("edgepack_agent_outbox_dropped", "Telemetry windows dropped by a full outbox",
                                      value=dropped)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())

    def render() -> bytes:
        return generate_latest(registry)

    return render
