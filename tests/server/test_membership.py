"""Where a rollback sends a device: the bundle it last committed (pure decision)."""

from __future__ import annotations

from update_server.services.membership import previous_of

BY_NAME = {("digits", "1.0.0"): 1, ("digits", "1.1.0"): 2, ("digits", "1.2.0"): 3}


def test_a_commit_the_device_has_not_checked_in_about_yet_counts() -> None:
    # committed 1.1.0 a moment ago (its committed event arrived); its last check-in still reported 1.0.0
    assert previous_of(("digits", "1.0.0"), BY_NAME, ("digits", "1.1.0")) == 2


def test_without_a_committed_event_the_check_in_report_decides() -> None:
    assert previous_of(("digits", "1.0.0"), BY_NAME, None) == 1


def test_a_refused_assignment_is_never_the_target() -> None:
    # assigned 1.2.0 and refused it: no committed event for 1.2.0; the newest commit is still 1.1.0
    assert previous_of(("digits", "1.1.0"), BY_NAME, ("digits", "1.1.0")) == 2


def test_unknown_bundles_leave_the_device_where_it_is() -> None:
    assert previous_of((None, None), BY_NAME, None) is None
    assert previous_of(("digits", "9.9.9"), BY_NAME, ("digits", "8.8.8")) is None
    assert previous_of(("digits", "1.0.0"), BY_NAME, ("digits", "8.8.8")) == 1
