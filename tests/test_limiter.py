"""Pacing: an even rate from the first send (no minute-sized burst), in-flight cap, pauses."""

from __future__ import annotations

import asyncio

from promptfleet.limiter import Pacer


async def _send_times(pacer: Pacer, n: int) -> list[float]:
    loop = asyncio.get_running_loop()
    times = []
    for _ in range(n):
        await pacer.acquire()
        times.append(loop.time())
        pacer.release()
    return times


async def test_sends_are_spaced_evenly_from_the_start():
    times = await _send_times(Pacer(rate_per_minute=3000), 16)  # one send per 20 ms
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Lower bounds only tighten with a slow machine, so they cannot flake; no burst at start.
    assert min(gaps) >= 0.018
    assert times[-1] - times[0] >= 15 * 0.02 - 0.005
    assert times[-1] - times[0] < 3.0


async def test_high_rates_allow_small_bursts_but_keep_the_average():
    pacer = Pacer(rate_per_minute=60_000)  # 1000/s, bucket of 10 ms
    times = await _send_times(pacer, 300)
    assert times[-1] - times[0] >= (300 - 10) / 1000 - 0.005


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
    pacer = Pacer(rate_per_minute=600_000)
    loop = asyncio.get_running_loop()
    pacer.pause(0.3)
    start = loop.time()
    await pacer.acquire()
    assert loop.time() - start >= 0.29
