"""A child that keeps dying is restarted ever more slowly, not in a tight loop."""

from __future__ import annotations

from edged.daemon.processes import CrashLoopBackoff


def test_a_one_off_crash_restarts_at_once_and_a_crash_loop_backs_off_to_thirty_seconds() -> None:
    backoff = CrashLoopBackoff()
    assert backoff.after_exit(lived_s=0.5) == 0.0
    delays = [backoff.after_exit(lived_s=0.5) for _ in range(10)]
    assert delays[:4] == [0.25, 0.5, 1.0, 2.0]
    assert delays == sorted(delays)
    assert delays[-1] == 30.0


def test_a_child_that_lived_long_enough_starts_the_count_again() -> None:
    backoff = CrashLoopBackoff()
    for _ in range(6):
        backoff.after_exit(lived_s=1.0)
    assert backoff.after_exit(lived_s=1.0) > 1.0
    assert backoff.after_exit(lived_s=60.0) == 0.0  # it was healthy: the count starts again
    assert backoff.after_exit(lived_s=1.0) == 0.0
    assert backoff.after_exit(lived_s=1.0) == 0.25
