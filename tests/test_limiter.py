"""Pacing: one clock for min(rate, ceiling), even from the first send, in-flight cap, pauses,
and the rule that tells a key over its limit from a lone 429.

Schedules are asserted on a fake clock (sleeping advances it), never on wall time.
"""

from __future__ import annotations

import asyncio

import pytest

from promptfleet.core.limiter import RUN_OF_429, Pacer, PacerPool


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


def fake_pacer(rate: float, **kwargs) -> tuple[Pacer, FakeClock]:
    clock = FakeClock()
    return Pacer(rate, clock=clock.time, sleep=clock.sleep, **kwargs), clock


async def send_times(pacer: Pacer, clock: FakeClock, n: int) -> list[float]:
    times = []
    for _ in range(n):
        await pacer.acquire()
        times.append(clock.now)
        pacer.release()
    return times


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in zip(times, times[1:])]


async def test_sends_are_spaced_evenly_from_the_start():
    pacer, clock = fake_pacer(3000)  # one send per 20 ms
    assert gaps(await send_times(pacer, clock, 16)) == [0.02] * 15


async def test_a_stated_limit_becomes_the_pace_at_once():
    """Once: Pacer(12000) after a header stating 500/min still sent every 4.5 ms."""
    pacer, clock = fake_pacer(12_000)
    await send_times(pacer, clock, 3)
    pacer.on_success({"x-ratelimit-limit-requests": "500"})
    assert gaps(await send_times(pacer, clock, 5)) == [0.12] * 4


async def test_lowering_the_ceiling_slows_the_next_send():
    """Once: Pacer(6000).lower_ceiling(600) still sent every 10.2 ms."""
    pacer, clock = fake_pacer(6000)
    pacer.lower_ceiling(600)
    assert gaps(await send_times(pacer, clock, 5)) == [0.1] * 4
    pacer.lower_ceiling(6000)  # a looser ceiling never raises it again
    assert pacer.ceiling == 600


async def test_the_strictest_ceiling_of_a_shared_pacer_wins():
    pool = PacerPool()
    clock = FakeClock()
    async with pool.pacer(("openai", "m", "key-a"), 6000, clock=clock.time, sleep=clock.sleep) as first:
        async with pool.pacer(("openai", "m", "key-a"), 600) as second:
            assert first is second
            assert gaps(await send_times(first, clock, 4)) == [0.1] * 3
        async with pool.pacer(("openai", "m", "key-b"), 6000) as other:
            assert other is not first
    assert pool.size == 0


async def test_a_lone_429_leaves_the_pace_alone():
    pacer, clock = fake_pacer(600)
    outcomes = ([429] * (RUN_OF_429 - 1) + [200]) * 5  # 83% 429s, but never a run: one success between
    for seq, outcome in enumerate(outcomes, start=1):
        pacer.on_rate_limited(1.0, seq=seq) if outcome == 429 else pacer.on_success()
    assert pacer.rate == 600
    assert gaps(await send_times(pacer, clock, 4)) == [0.1] * 3


async def test_a_run_of_429s_in_send_order_slows_the_queue_and_waits_out_retry_after():
    pacer, clock = fake_pacer(600)
    await send_times(pacer, clock, 1)
    for seq in (12, 10, 15, 13, 11, 14):  # answered out of order, but sent one after the other
        pacer.on_rate_limited(2.0, seq=seq)
    assert pacer.rate == 300
    times = await send_times(pacer, clock, 3)
    assert times[0] >= 2.0 and gaps(times) == [0.2, 0.2]


async def test_headers_saying_nothing_remains_slow_the_queue_on_the_first_429():
    pacer, clock = fake_pacer(600)
    assert pacer.on_rate_limited(1.0, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "3s"})
    await pacer.acquire()
    assert clock.now >= 3.0


async def test_catching_up_after_a_stall_is_bounded():
    pacer, clock = fake_pacer(60_000)  # 1 ms apart
    await send_times(pacer, clock, 1)
    clock.now += 5.0  # nobody sent for 5 s: no 5,000-send burst follows
    times = await send_times(pacer, clock, 30)
    assert sum(1 for g in gaps(times) if g == 0) <= 10


async def test_in_flight_cap_blocks_until_release():
    pacer = Pacer(rate_per_minute=600_000, max_in_flight=2)
    await pacer.acquire()
    await pacer.acquire()
    third = asyncio.create_task(pacer.acquire())
    await asyncio.sleep(0.05)
    assert not third.done()
    pacer.release()
    await asyncio.wait_for(third, 1)


async def test_pause_holds_every_send():
    pacer, clock = fake_pacer(600_000)
    pacer.pause(0.3)
    await pacer.acquire()
    assert clock.now >= 0.3


def test_rate_must_be_positive():
    with pytest.raises(ValueError):
        Pacer(0)


async def test_over_the_limit_the_rate_drops_to_what_was_accepted():
    pacer, clock = fake_pacer(12_000)  # 200/s against a key that accepts 20/s
    for _ in range(20):
        clock.now += 0.005
        pacer.on_success()
    for seq in range(21, 21 + RUN_OF_429):
        pacer.on_rate_limited(0.5, seq=seq)
    assert pacer.rate == pacer.limit == 20 * 60
    for _ in range(250):
        pacer.on_success()
    assert pacer.rate == 12_000 and pacer.limit == 1200  # the learned limit governs, not the recovered rate
    clock.now += 120
    assert 3700 < pacer.limit < 3850  # half way back to the ceiling in log space after one half-life
