"""Dashboard pages (read-only; a viewer sees them all). Each reads through the services, so it shows what the
API shows: rollout status and gate values come from ``services.rollouts.rollout_status``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import func, or_, select

from update_server.models import AuditEntry, Device, Rollout, RolloutDevice, TelemetryAggregate, TelemetryEvent
from update_server.rollout_policy import TRANSITIONS, Action, RolloutState
from update_server.services import rollouts
from update_server.services.health import ensure_reference
from update_server.services.health_views import (
    class_histogram,
    device_drift,
    drift_alerts,
    drift_over,
    fleet_by_version,
    gate_history,
    version_drift,
    version_series,
    version_table,
)
from update_server.ui import Page, view
from update_server.ui.charts import PALETTE, Series, bar_chart, line_chart, stacked_bar, state_colour

router = APIRouter(prefix="/ui", include_in_schema=False)
PAGE_SIZE = 50
RANGES = {"1h": timedelta(hours=1), "6h": timedelta(hours=6), "24h": timedelta(hours=24), "7d": timedelta(days=7)}
MANUAL = (Action.PAUSE, Action.RESUME, Action.ADVANCE, Action.ABORT, Action.ROLLBACK, Action.START)
ACTIVE = ("created", "running", "paused", "halted")


def allowed_actions(state: str) -> list[str]:
    s = RolloutState(state)
    return [a.value for a in MANUAL if (s, a) in TRANSITIONS]


@router.get("/")
def overview(request: Request) -> Response:
    def body(p: Page) -> Response:
        ctx = p.ctx
        with ctx.sessions() as session, session.begin():
            fleet = fleet_by_version(session)
            active = list(session.scalars(select(Rollout).where(Rollout.state.in_(ACTIVE))
                                          .order_by(Rollout.created_at.desc()).limit(100)))
            recent = list(session.scalars(select(Rollout).where(Rollout.state.not_in(ACTIVE))
                                          .order_by(Rollout.created_at.desc()).limit(10)))
            lately = Device.last_seen_at >= p.now - timedelta(minutes=10)
            total, seen, errors = (int(v or 0) for v in session.execute(select(
                func.count(), func.count(Device.last_seen_at).filter(lately), func.count(Device.last_error))).one())
        alerts = [a for a in drift_alerts(ctx, p.now) if a["alert"]]
        versions: dict[tuple[str, str], list[tuple[str, int, str]]] = {}
        for name, version, state, n in fleet:
            versions.setdefault((name or "(none)", version or "–"), []).append((state or "unknown", n,
                                                                                state_colour(state)))
        fleet_rows = [{"model": m, "version": v, "devices": sum(n for _, n, _ in parts), "parts": parts,
                       "bar": stacked_bar(parts)} for (m, v), parts in sorted(versions.items())]
        return p.render("overview.html", fleet=fleet_rows, active=active, recent=recent, total=total, seen=seen,
                        errors=errors, alerts=alerts, halted=[r for r in active if r.state == "halted"])
    return view(request, body)


@router.get("/rollouts")
def rollout_list(request: Request, state: str = "", page: int = 1) -> Response:
    def body(p: Page) -> Response:
        page_no = max(page, 1)
        with p.ctx.sessions() as session, session.begin():
            stmt = select(Rollout)
            if state:
                stmt = stmt.where(Rollout.state == state)
            total = int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
            rows = list(session.scalars(stmt.order_by(Rollout.created_at.desc())
                                        .limit(PAGE_SIZE).offset((page_no - 1) * PAGE_SIZE)))
        return p.render("rollouts.html", rollouts=rows, state=state, page=page_no, total=total,
                        pages=max(1, -(-total // PAGE_SIZE)), states=[s.value for s in RolloutState])
    return view(request, body)


def _gate_charts(history: list[Any]) -> list[Any]:
    """One chart per gate: its value over time against its threshold (and its interval, when it has one)."""
    by_gate: dict[str, dict[str, Any]] = {}
    for sample in history:
        for g in sample.gates:
            entry = by_gate.setdefault(g["name"], {"points": [], "threshold": None, "band": [], "unit": ""})
            entry["points"].append((sample.at, g.get("value")))
            if g.get("threshold") is not None:
                entry["threshold"] = float(g["threshold"])
            interval = g.get("interval") or (
                [g["lower"], g["upper"]] if g.get("lower") is not None and g.get("upper") is not None else None)
            if isinstance(interval, (list, tuple)) and len(interval) == 2 and None not in interval:
                entry["band"].append((sample.at, float(interval[0]), float(interval[1])))
    charts = []
    for name, e in by_gate.items():
        if all(v is None for _, v in e["points"]) and e["threshold"] is None:
            continue
        charts.append(line_chart([Series(name, e["points"])], title=name, threshold=e["threshold"],
                                 band=e["band"], y_min=None if name == "accuracy_drop" else 0.0,
                                 width=420, height=150))
    return charts


@router.get("/rollouts/{rollout_id}")
def rollout_page(request: Request, rollout_id: str, members: int = 1) -> Response:
    def body(p: Page) -> Response:
        status = rollouts.rollout_status(p.ctx, rollout_id)
        page_no = max(members, 1)
        with p.ctx.sessions() as session, session.begin():
            audit = rollouts.audit_entries(session, rollout_id, 200)
            row = session.get(Rollout, rollout_id)
            end = (row.finished_at if row is not None else None) or p.now
            started = (row.started_at if row is not None else None) or end
            history = gate_history(session, rollout_id, max(started, end - timedelta(hours=24)))
            member_total = int(session.scalar(select(func.count()).select_from(RolloutDevice)
                                              .where(RolloutDevice.rollout_id == rollout_id)) or 0)
            member_rows = session.execute(
                select(RolloutDevice.device_id, RolloutDevice.phase_index, RolloutDevice.bucket, Device.state,
                       Device.active_version, Device.last_seen_at)
                .join(Device, Device.id == RolloutDevice.device_id)
                .where(RolloutDevice.rollout_id == rollout_id)
                .order_by(RolloutDevice.phase_index, RolloutDevice.device_id)
                .limit(PAGE_SIZE).offset((page_no - 1) * PAGE_SIZE)).all()
            drift = version_drift(session, status["bundle"]["name"], status["bundle"]["version"], started,
                                  p.ctx.settings.drift_min_samples, ttl_s=p.ctx.settings.metrics_cache_s)
        return p.render("rollout.html", r=status, audit=audit, gate_charts=_gate_charts(history),
                        actions=allowed_actions(status["state"]), members=member_rows, member_total=member_total,
                        member_page=page_no, member_pages=max(1, -(-member_total // PAGE_SIZE)), drift=drift)
    return view(request, body)


@router.get("/models")
def models(request: Request) -> Response:
    def body(p: Page) -> Response:
        with p.ctx.sessions() as session, session.begin():
            table = version_table(session, p.now - timedelta(hours=24))
        drift = {(a["model"], a["version"]): a for a in drift_alerts(p.ctx, p.now)}
        return p.render("models.html", versions=table, drift=drift)
    return view(request, body)


@router.get("/models/{name}/{version}")
def version_page(request: Request, name: str, version: str, range: str = "24h") -> Response:
    def body(p: Page) -> Response:
        span = RANGES.get(range, RANGES["24h"])
        since = p.now - span
        ensure_reference(p.ctx, name, version)
        s = p.ctx.settings
        with p.ctx.sessions() as session, session.begin():
            target, control, step = version_series(session, name, version, since, p.now)
            classes = class_histogram(session, name, version, since)
            drift, drift_points = drift_over(session, name, version, since, s.drift_min_samples,
                                             ttl_s=s.metrics_cache_s)
            running = int(session.scalar(select(func.count()).select_from(Device).where(
                Device.active_name == name, Device.active_version == version)) or 0)
        tgt, ctl = f"{version}", "other versions (control)"

        def pair(metric: str, scale: float = 1.0) -> list[Series]:
            def pts(points: list[Any]) -> list[Any]:
                return [(q.at, None if getattr(q, metric) is None else getattr(q, metric) * scale) for q in points]
            return [Series(tgt, pts(target)), Series(ctl, pts(control), PALETTE[1], dashed=True)]

        latency = [Series(f"p{int(q * 100)}", [(pt.at, pt.latency_q(q)) for pt in target], PALETTE[i])
                   for i, q in ((0, 0.5), (4, 0.95), (2, 0.99))]
        latency.append(Series("control p95", [(pt.at, pt.latency_q(0.95)) for pt in control], PALETTE[1], True))
        total = sum(classes.values()) or 1
        charts = {
            "requests": line_chart([Series(tgt, [(q.at, float(q.requests)) for q in target]),
                                    Series(ctl, [(q.at, float(q.requests)) for q in control], PALETTE[1], True)],
                                   title=f"requests per {step // 60} min"),
            "accuracy": line_chart(pair("accuracy", 100), title="accuracy from feedback", unit=" %", y_min=None),
            "errors": line_chart(pair("error_rate", 100), title="error rate", unit=" %"),
            "crashes": line_chart(pair("crash_rate"), title="crashes per 1,000 requests"),
            "latency": line_chart(latency, title="latency (ms)", unit=""),
            "classes": bar_chart([(k, v / total) for k, v in classes.items()], title="predicted classes (share)"),
            "drift": line_chart([Series("worst-feature PSI", drift_points)], title="input drift (PSI per hour)",
                                threshold=s.drift_threshold),
        }
        totals = {"requests": sum(q.requests for q in target), "errors": sum(q.errors for q in target),
                  "crashes": sum(q.crashes for q in target), "feedback": sum(q.feedback_count for q in target),
                  "correct": sum(q.feedback_correct for q in target)}
        return p.render("version.html", name=name, version=version, charts=charts, drift=drift, running=running,
                        ranges=list(RANGES), range=range if range in RANGES else "24h", totals=totals,
                        top_features=sorted(drift.features, key=lambda f: -f.psi)[:10])
    return view(request, body)


@router.get("/devices")
def device_list(request: Request, q: str = "", version: str = "", state: str = "", page: int = 1) -> Response:
    def body(p: Page) -> Response:
        page_no = max(page, 1)
        stmt = select(Device)
        if q:
            like = f"%{q.replace('%', '').replace('_', '')}%"
            stmt = stmt.where(or_(Device.id.like(like), Device.group_name.like(like)))
        if version:
            model, _, ver = version.partition("/")
            stmt = stmt.where(Device.active_name == model, Device.active_version == ver)
        if state:
            stmt = stmt.where(Device.state == state)
        with p.ctx.sessions() as session, session.begin():
            total = int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
            rows = list(session.scalars(stmt.order_by(Device.id).limit(PAGE_SIZE).offset((page_no - 1) * PAGE_SIZE)))
            versions = sorted({f"{a}/{b}" for a, b, _, _ in fleet_by_version(session) if a})
        return p.render("devices.html", devices=rows, total=total, page=page_no,
                        pages=max(1, -(-total // PAGE_SIZE)), q=q, version=version, state=state, versions=versions)
    return view(request, body)


@router.get("/devices/{device_id}")
def device_page(request: Request, device_id: str, before: int | None = None) -> Response:
    def body(p: Page) -> Response:
        from update_server.errors import NotFound

        with p.ctx.sessions() as session, session.begin():
            device = session.get(Device, device_id)
            if device is None:
                raise NotFound(f"no device {device_id!r}")
            stmt = select(TelemetryEvent).where(TelemetryEvent.device_id == device_id)
            if before:
                stmt = stmt.where(TelemetryEvent.id < before)
            events = list(session.scalars(stmt.order_by(TelemetryEvent.id.desc()).limit(PAGE_SIZE)))
            errors = list(session.scalars(select(TelemetryEvent).where(
                TelemetryEvent.device_id == device_id, TelemetryEvent.event.in_(
                    ("crash", "selftest_failed", "verification_failed", "install_failed", "rolled_back",
                     "update_refused"))).order_by(TelemetryEvent.id.desc()).limit(10)))
            aggregates = list(session.scalars(select(TelemetryAggregate).where(
                TelemetryAggregate.device_id == device_id).order_by(TelemetryAggregate.last_at.desc()).limit(50)))
            memberships = session.execute(select(RolloutDevice.rollout_id, RolloutDevice.phase_index, Rollout.state,
                                                 Rollout.model_name, Rollout.target_version)
                                          .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
                                          .where(RolloutDevice.device_id == device_id)
                                          .order_by(Rollout.created_at.desc()).limit(50)).all()
            versions = {(a.bundle_name, a.bundle_version) for a in aggregates}
            session.expunge_all()
        for name, version in versions:
            ensure_reference(p.ctx, name, version)
        with p.ctx.sessions() as session, session.begin():
            drift = device_drift(session, device_id, p.ctx.settings.drift_min_samples)
        return p.render("device.html", d=device, events=events, errors=errors, aggregates=aggregates,
                        memberships=memberships, drift=drift,
                        older=events[-1].id if len(events) == PAGE_SIZE else None)
    return view(request, body)


@router.get("/audit")
def audit_page(request: Request, before: int | None = None) -> Response:
    def body(p: Page) -> Response:
        with p.ctx.sessions() as session, session.begin():
            stmt = select(AuditEntry)
            if before:
                stmt = stmt.where(AuditEntry.id < before)
            rows = list(session.scalars(stmt.order_by(AuditEntry.id.desc()).limit(100)))
            session.expunge_all()
        return p.render("audit.html", entries=rows, older=rows[-1].id if len(rows) == 100 else None)
    return view(request, body)
