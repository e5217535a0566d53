"""Gather a rollout's :class:`~update_server.rollout_policy.RolloutStats` from the telemetry aggregates.

Target group: the rollout's devices while running the target version. Control group: the same devices
while running another version of the same model (devices in phases not yet reached, and every device
before it updated), which is the fleet "still on the previous version" during this rollout.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from update_server.models import LATENCY_COLUMNS, Rollout, RolloutDevice, TelemetryAggregate
from update_server.rollout_policy import GroupStats, Progress, RolloutState, RolloutStats
from update_server.services.health_views import version_drift

TA, RD = TelemetryAggregate, RolloutDevice
DRIFT_TTL_S = 5.0
"""The drift gate's value is reused this long (it sums many histograms; drift moves slowly)."""


def _count_if(cond: Any) -> Any:
    return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)


def _sum(col: Any) -> Any:
    return func.coalesce(func.sum(col), 0)


def _group(session: Session, rollout: Rollout, *, target: bool) -> GroupStats:
    version_cond = TA.bundle_version == rollout.target_version if target else \
        TA.bundle_version != rollout.target_version
    cols = [_count_if(TA.windows > 0), _sum(TA.requests), _sum(TA.errors), _sum(TA.feedback_count),
            _sum(TA.feedback_correct), _count_if(TA.crashes > 0), _count_if(TA.events > 0),
            _count_if(TA.install_failures > 0)] + [_sum(getattr(TA, c)) for c in LATENCY_COLUMNS]
    row = session.execute(select(*cols).where(TA.rollout_id == rollout.id, TA.bundle_name == rollout.model_name,
                                              version_cond)).one()
    values = [int(v) for v in row]
    return GroupStats(devices_reporting=values[0], requests=values[1], errors=values[2], feedback_count=values[3],
                      feedback_correct=values[4], crashed_devices=values[5], devices_with_events=values[6],
                      failed_devices=values[7], latency_counts=tuple(values[8:]))


def gather_stats(session: Session, rollout: Rollout) -> RolloutStats:
    members = {int(p): int(n) for p, n in session.execute(
        select(RD.phase_index, func.count()).where(RD.rollout_id == rollout.id).group_by(RD.phase_index))}
    reporting = {int(p): int(n) for p, n in session.execute(
        select(RD.phase_index, func.count(func.distinct(TA.device_id)))
        .join(TA, (TA.device_id == RD.device_id) & (TA.rollout_id == RD.rollout_id))
        .where(RD.rollout_id == rollout.id, TA.bundle_name == rollout.model_name,
               TA.bundle_version == rollout.target_version, TA.windows > 0)
        .group_by(RD.phase_index))}
    progress = Progress(RolloutState(rollout.state), rollout.current_phase, rollout.phase_started_at)
    gates = rollout.spec.get("gates") or {}
    drift = None
    if gates.get("max_input_drift") is not None:  # the input_drift gate is on: the target's drift since the start
        drift = version_drift(session, rollout.model_name, rollout.target_version, rollout.started_at,
                              int(gates.get("min_drift_samples") or 1), ttl_s=DRIFT_TTL_S)
    return RolloutStats(progress=progress, members_by_phase=members, reporting_by_phase=reporting,
                        target=_group(session, rollout, target=True), control=_group(session, rollout, target=False),
                        drift=drift)
