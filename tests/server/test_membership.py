"""Where a rollback sends a device: what it runs, or is installing, for good; never what it refused (pure)."""

from __future__ import annotations

from update_server.services.membership import previous_of

BY_NAME = {("digits", "1.0.0"): 1, ("digits", "1.1.0"): 2, ("digits", "1.2.0"): 3}


def test_an_update_committed_or_in_progress_counts_before_any_report() -> None:
    # assigned 1.1.0, committed it a moment ago: neither the check-in (still 1.0.0) nor the event has arrived
    assert previous_of(("digits", "1.0.0"), BY_NAME, ("digits", "1.0.0"), desired=2) == 2
    assert previous_of(("digits", "1.0.0"), BY_NAME, ("digits", "1.1.0"), desired=2, desired_failed=True) == 2


def test_a_refused_assignment_is_never_the_target() -> None:
    # assigned 1.1.0 and reported install_failed for it: back to what it committed
    assert previous_of(("digits", "1.0.0"), BY_NAME, None, desired=2, desired_failed=True) == 1
    assert previous_of(("digits", "1.0.0"), BY_NAME, ("digits", "1.0.0"), desired=2, desired_failed=True) == 1


def test_without_an_assignment_the_newest_commit_then_the_check_in_report_decide() -> None:
    assert previous_of(("digits", "1.0.0"), BY_NAME, ("digits", "1.1.0")) == 2
    assert previous_of(("digits", "1.0.0"), BY_NAME, None) == 1


def test_unknown_bundles_leave_the_device_where_it_is() -> None:
    assert previous_of((None, None), BY_NAME, None) is None
    assert previous_of(("digits", "9.9.9"), BY_NAME, ("digits", "8.8.8")) is None
