"""Token bucket pacing for spool backfill."""

from __future__ import annotations

import asyncio

import pytest

from edged.telemetry.ratelimit import TokenBucket

from .helpers import FakeClock


def test_bucket_starts_full_then_refills_at_the_rate() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate_per_s=2.0, burst=5, clock=clock)
    assert bucket.take_up_to(100) == 5
    assert not bucket.try_take()
    clock.advance(0.5)
    assert bucket.try_take()
    assert not bucket.try_take()
    clock.advance(10.0)
    assert bucket.tokens == pytest.approx(5.0)  # capped at the burst


def test_take_up_to_takes_only_whole_tokens() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate_per_s=4.0, burst=4, clock=clock)
    assert bucket.take_up_to(3) == 3
    assert bucket.take_up_to(3) == 1
    clock.advance(0.6)  # 2.4 tokens
    assert bucket.take_up_to(10) == 2
    assert bucket.tokens == pytest.approx(0.4)


def test_wait_time_says_when_tokens_will_be_there() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate_per_s=10.0, burst=10, clock=clock)
    assert bucket.wait_time_s(10) == 0.0
    bucket.take_up_to(10)
    assert bucket.wait_time_s(3) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="at most 10"):
        bucket.wait_time_s(11)


def test_async_take_sleeps_until_the_tokens_arrive() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate_per_s=5.0, burst=5, clock=clock)
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    async def drain() -> None:
        for _ in range(15):
            await bucket.take(sleep=fake_sleep)

    asyncio.run(drain())
    # 5 from the burst, then 10 more at 5/s: two seconds of sleeping in total
    assert sum(slept) == pytest.approx(2.0)
    assert clock.now == pytest.approx(2.0)


def test_backlog_paced_by_the_bucket_never_exceeds_rate_plus_burst() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate_per_s=20.0, burst=20, clock=clock)
    backlog = 1000
    sent_per_tick = []
    while backlog:
        n = bucket.take_up_to(min(backlog, 50))
        backlog -= n
        sent_per_tick.append(n)
        clock.advance(0.1)
    # the initial burst of 20, then 2 per 0.1 s tick at 20/s
    assert sent_per_tick[0] == 20
    assert sent_per_tick[1:] == [2] * 490


@pytest.mark.parametrize(("rate", "burst"), [(0.0, None), (-1.0, None), (1.0, 0.5)])
def test_invalid_parameters_are_refused(rate: float, burst: float | None) -> None:
    with pytest.raises(ValueError, match="must be"):
        TokenBucket(rate, burst)
