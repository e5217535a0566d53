"""Gather a rollout's :class:`~update_server.rollout_policy.RolloutStats` from the telemetry aggregates.

Target group: the rollout's devices while running the target version. Control group: the same devices
while running another version of the same model (devices in phases not yet reached, and every device
before it updated), which is the fleet "still on the previous version" during this rollout. A device's
pre-update fragment is left out of the control when it is under ``FRAGMENT_SHARE`` of what the device has sent
on the target since (a couple of requests before the update): gates cap each device's weight at the median
device's count, and in a small fleet such fragments, half the control's devices right after the first phase,
dragged that cap down to one or two and held the phase for ever. Only a device's own data decides whether its
own fragment is left out, so no device can remove another's.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from update_server.models import LATENCY_COLUMNS, Rollout, RolloutDevice, TelemetryAggregate
from update_server.rollout_policy import DeviceTable, GroupStats, Progress, RolloutState, RolloutStats
from update_server.services.health_views import version_drift

TA, RD = TelemetryAggregate, RolloutDevice
FRAGMENT_SHARE = 0.1
"""A device's control data under this share of its target data is a pre-update fragment (left out)."""
DRIFT_TTL_S = 5.0
"""The drift gate's value is reused this long (it sums many histograms; drift moves slowly)."""


def _sum(col: Any) -> Any:
    return func.coalesce(func.sum(col), 0)


def _fragments(session: Session, rollout: Rollout) -> set[str]:
    """Devices whose requests on other versions are under FRAGMENT_SHARE of their requests on the target."""
    on_target = TA.bundle_version == rollout.target_version
    rows = session.execute(select(TA.device_id, _sum(case((on_target, TA.requests), else_=0)),
                                  _sum(case((on_target, 0), else_=TA.requests)))
                           .where(TA.rollout_id == rollout.id, TA.bundle_name == rollout.model_name)
                           .group_by(TA.device_id)).all()
    return {d for d, target, other in rows if int(target) > 0 and int(other) < FRAGMENT_SHARE * int(target)}


def _group(session: Session, rollout: Rollout, *, target: bool, exclude: set[str] | None = None) -> GroupStats:
    """The group's sums, and its per-device sums for device weighting (one row per device: a control device
    may have run several other versions)."""
    version_cond = TA.bundle_version == rollout.target_version if target else \
        TA.bundle_version != rollout.target_version
    cols = [func.max(TA.windows), _sum(TA.requests), _sum(TA.errors), _sum(TA.feedback_count),
            _sum(TA.feedback_correct), func.max(TA.crashes), func.max(TA.events),
            func.max(TA.install_failures)] + [_sum(getattr(TA, c)) for c in LATENCY_COLUMNS]
    rows = session.execute(select(TA.device_id, *cols)
                           .where(TA.rollout_id == rollout.id, TA.bundle_name == rollout.model_name, version_cond)
                           .group_by(TA.device_id)).all()
    values = [[int(v or 0) for v in row[1:]] for row in rows if not exclude or row[0] not in exclude]
    per_device = DeviceTable.of([(v[1], v[2], v[3], v[4], tuple(v[8:])) for v in values])
    return GroupStats(devices_reporting=sum(v[0] > 0 for v in values), requests=sum(v[1] for v in values),
                      errors=sum(v[2] for v in values), feedback_count=sum(v[3] for v in values),
                      feedback_correct=sum(v[4] for v in values), crashed_devices=sum(v[5] > 0 for v in values),
                      devices_with_events=sum(v[6] > 0 for v in values),
                      failed_devices=sum(v[7] > 0 for v in values),
                      latency_counts=tuple(sum(v[8 + i] for v in values) for i in range(len(LATENCY_COLUMNS))),
                      per_device=per_device)


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
                        target=_group(session, rollout, target=True),
                        control=_group(session, rollout, target=False, exclude=_fragments(session, rollout)),
                        drift=drift)
