"""Pacing: one schedule for min(rate, ceiling), even from the first send; the cut to the
room a key has left and the growth back; stated limits and Retry-After; in-flight cap.

Every schedule runs on a virtual clock (the loop's clock jumps to its next timer), so
seconds of sending take milliseconds and every time in them is exact.
"""

from __future__ import annotations

import asyncio
import bisect
import random

import pytest

from promptfleet.core.limiter import Pacer, PacerPool
from tests.virtual_loop import VirtualLoop, run_virtually


async def send_times(pacer: Pacer, n: int) -> list[float]:
    times = []
    for _ in range(n):
        await pacer.acquire()
        times.append(asyncio.get_running_loop().time())
        pacer.release()
    return times


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in zip(times, times[1:])]


def test_sends_are_spaced_evenly_from_the_start():
    assert gaps(run_virtually(send_times(Pacer(3000), 16))) == [0.02] * 15  # one send per 20 ms


def test_a_stated_limit_becomes_the_pace_at_once_a_little_under_it():
    async def scenario() -> list[float]:
        pacer = Pacer(12_000)
        await send_times(pacer, 3)
        pacer.on_success(3, {"x-ratelimit-limit-requests": "500"})
        return await send_times(pacer, 5)

    assert gaps(run_virtually(scenario())) == [round(60 / 490, 6)] * 4  # 2% under: arrival jitter at exactly the limit draws 429s


def test_lowering_the_ceiling_slows_the_next_send_and_a_looser_one_changes_nothing():
    async def scenario() -> list[float]:
        pacer = Pacer(6000)
        pacer.lower_ceiling(600)
        pacer.lower_ceiling(6000)
        return await send_times(pacer, 5)

    assert gaps(run_virtually(scenario())) == [0.1] * 4


def test_queues_on_one_model_and_key_share_a_pacer_and_the_strictest_ceiling_wins():
    async def scenario() -> list[float]:
        pool = PacerPool()
        async with pool.pacer(("openai", "m", "key-a"), 6000) as first:
            async with pool.pacer(("openai", "m", "key-a"), 600) as second, pool.pacer(("openai", "m", "key-b"), 6000) as other:
                assert first is second and other is not first
                times = await send_times(first, 4)
        assert pool.size == 0
        return times

    assert gaps(run_virtually(scenario())) == [0.1] * 3


def test_429s_now_and_then_leave_the_pace_alone():
    """A 429 on a fifth of the sends, at random (an overloaded server, not a limit): only
    each one's own retry waits."""

    async def scenario() -> tuple[float, list[float]]:
        pacer = Pacer(600)
        draw = random.Random(3)
        for seq in range(1, 401):
            await pacer.acquire()
            pacer.release()
            pacer.on_rate_limited(seq, 1.0) if draw.random() < 0.2 else pacer.on_success(seq)
        return pacer.rate, await send_times(pacer, 3)

    rate, times = run_virtually(scenario())
    assert rate == 600 and gaps(times) == [0.1] * 2


def test_half_of_recent_sends_refused_cuts_to_what_the_key_accepted_and_grows_back():
    """200/s against a key that accepts 20/s: the rate drops to 20/s at once, every send
    waits out the Retry-After, and the rate grows back to the ceiling, ten times that, in
    about 12 s (twice it in 7 s)."""

    async def scenario() -> list[tuple[float, float]]:
        pacer = Pacer(12_000)
        for seq in range(1, 21):  # accepted
            await pacer.acquire()
            pacer.on_success(seq)
        for seq in range(21, 33):  # refused, answered at once: 12 of the last 24
            await pacer.acquire()
            pacer.on_rate_limited(seq, 0.5)
        loop = asyncio.get_running_loop()
        cut_at = loop.time()
        seen = [(0.0, pacer.rate)]
        await pacer.pace()
        seen.append((loop.time() - cut_at, pacer.rate))
        for _ in range(14):
            await asyncio.sleep(1.0)
            seen.append((loop.time() - cut_at, pacer.rate))
        return seen

    seen = run_virtually(scenario())
    assert seen[0][1] == pytest.approx(0.8 * 1200)  # under what the key accepted in the second before
    assert seen[1][0] >= 0.5  # waited out the Retry-After
    assert max(rate for t, rate in seen if t < 3) <= 1.01 * 1200  # slowly near the rate that was too much...
    assert next(t for t, rate in seen if rate >= 2400) <= 8  # ...faster beyond it
    assert next(t for t, rate in seen if rate == 12_000) <= 13  # up to the ceiling


def test_a_burst_of_429s_cuts_once_not_once_per_429():
    """50 sends at 100/s against a key that took 20: the 429s of the burst, answered after the
    cut, do not cut again."""

    async def scenario() -> tuple[float, float]:
        pacer = Pacer(6000)
        for seq in range(1, 51):
            await pacer.acquire()
            if seq <= 20:
                pacer.on_success(seq)
        for seq in range(21, 34):
            pacer.on_rate_limited(seq, None)
        cut = pacer.rate
        for seq in range(34, 51):
            pacer.on_rate_limited(seq, None)
        return cut, pacer.rate

    cut, after = run_virtually(scenario())
    assert cut == pytest.approx(0.8 * 1200) and after == cut


def test_a_key_full_while_we_send_under_its_limit_is_shared_and_at_its_limit_is_ours():
    """Headers saying nothing remains after a success: with our rate well under the stated
    limit, another client takes the rest (cut); at the stated limit, it is our own pace."""
    full = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "90ms"}

    async def scenario(ceiling: float) -> float:
        pacer = Pacer(ceiling)
        for seq in range(1, 6):
            await pacer.acquire()
            pacer.on_success(seq, full)
        return pacer.rate

    assert run_virtually(scenario(300)) < 300
    assert run_virtually(scenario(6000)) == 588


@pytest.mark.parametrize("headers", [
    {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"},
    {"anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": "__IN_1.5_S__"},
    {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1s500ms"},
])  # fmt: skip
def test_a_429_saying_nothing_remains_holds_every_send_until_the_reset(headers: dict[str, str]):
    from datetime import datetime, timedelta, timezone

    async def scenario() -> float:
        pacer = Pacer(6000)
        await pacer.acquire()
        stated = {k: (datetime.now(timezone.utc) + timedelta(seconds=1.5)).isoformat() if v == "__IN_1.5_S__" else v for k, v in headers.items()}
        pacer.on_rate_limited(1, None, stated)
        await pacer.acquire()
        return asyncio.get_running_loop().time()

    assert 1.4 <= run_virtually(scenario()) <= 1.6


def test_a_retry_after_of_a_429_saying_nothing_remains_wins_over_the_reset():
    async def scenario() -> float:
        pacer = Pacer(6000)
        await pacer.acquire()
        pacer.on_rate_limited(1, 3.0, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"})
        await pacer.acquire()
        return asyncio.get_running_loop().time()

    assert run_virtually(scenario()) == pytest.approx(3.0, abs=0.01)


def test_a_send_late_on_its_turn_never_puts_one_more_in_a_second():
    """At exactly a key's limit (10/s), the event loop stalls now and then (a busy process):
    the sends that catch up never make a second hold 11."""

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        pacer = Pacer(600)

        async def stall() -> None:
            for moment in (1.23, 2.57, 4.01, 5.5, 7.77):
                await asyncio.sleep(moment - loop.time())
                loop.now += 0.009  # every timer due meanwhile fires 9 ms late

        asyncio.ensure_future(stall())
        return await send_times(pacer, 100)

    times = run_virtually(scenario())
    assert max(bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)) <= 10
    assert times[-1] < 10.1  # and the rate holds


def test_catching_up_after_a_stall_is_bounded():
    async def scenario() -> list[float]:
        pacer = Pacer(60_000)  # 1 ms apart
        await send_times(pacer, 1)
        await asyncio.sleep(5.0)  # nobody sent for 5 s: no 5,000-send burst follows
        return await send_times(pacer, 30)

    assert sum(1 for g in gaps(run_virtually(scenario())) if g == 0) <= 11


class CountingLoop(VirtualLoop):
    """Counts the loop's waits for a timer."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def _run_once(self) -> None:
        if self._scheduled and not self._ready:
            self.waits += 1
        super()._run_once()


def test_a_fast_key_costs_one_wait_per_timer_tick_not_one_per_send():
    loop = CountingLoop()
    times = loop.run(send_times(Pacer(600_000), 10_000))  # 10,000/s
    assert times[-1] == pytest.approx(1.0, abs=0.002)
    assert loop.waits <= 1_100  # ~1,000 ticks of a millisecond


def test_until_the_provider_answers_once_ten_requests_go_out():
    """-mq 12000 on a key whose limit only its answers will tell: 10 sends, then a wait for
    the first answer (any: an error counts), then the pace."""

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        pacer = Pacer(12_000)
        times = []
        for _ in range(10):
            await pacer.acquire()
            times.append(loop.time())
        eleventh = asyncio.ensure_future(pacer.acquire())
        await asyncio.sleep(1.0)
        assert not eleventh.done()
        pacer.release()  # the first request is over
        await eleventh
        times.append(loop.time())
        return times

    times = run_virtually(scenario())
    assert times[9] < 0.05 and times[10] >= 1.0


def test_in_flight_cap_blocks_until_release():
    async def scenario() -> None:
        pacer = Pacer(600_000, max_in_flight=2)
        await pacer.acquire()
        await pacer.acquire()
        third = asyncio.create_task(pacer.acquire())
        await asyncio.sleep(1.0)
        assert not third.done()
        pacer.release()
        await asyncio.wait_for(third, 1)

    run_virtually(scenario())


def test_pause_holds_every_send():
    async def scenario() -> float:
        pacer = Pacer(600_000)
        pacer.pause(0.3)
        await pacer.acquire()
        return asyncio.get_running_loop().time()

    assert run_virtually(scenario()) >= 0.3


def test_tokens_per_minute_space_long_prompts():
    async def scenario() -> float:
        pacer = Pacer(60_000, tokens_per_minute=6_000)  # 100 tokens/s, a 1,000-token bucket
        for _ in range(6):
            await pacer.acquire(500)
        return asyncio.get_running_loop().time()

    assert run_virtually(scenario()) == pytest.approx(20.0, abs=0.5)  # 3,000 tokens, 1,000 at once, then 100/s


def test_tokens_an_estimate_missed_are_paid_by_the_next_send_not_by_the_answer():
    async def scenario() -> tuple[float, float]:
        pacer = Pacer(60_000, tokens_per_minute=6_000)  # 100 tokens/s, a 1,000-token bucket
        await pacer.acquire(1_000)
        pacer.owe_tokens(500)  # the answer reported 500 more than estimated: nothing waits here
        owed_at = asyncio.get_running_loop().time()
        await pacer.acquire(100)  # this send pays 600
        return owed_at, asyncio.get_running_loop().time()

    owed_at, sent_at = run_virtually(scenario())
    assert owed_at == pytest.approx(0.0, abs=0.01) and sent_at == pytest.approx(6.0, abs=0.3)


def test_rate_must_be_positive():
    with pytest.raises(ValueError):
        Pacer(0)


# -- a key shared with another client ---------------------------------------------------


class SlidingKey:
    """A key allowing `limit` requests in any second, stating it in OpenAI's headers; refusals
    answer at once, answers after `latency`."""

    def __init__(self, limit: int = 10, latency: float = 0.3):
        self.limit, self.latency = limit, latency
        self.arrivals: list[float] = []
        self.refused: dict[str, int] = {"us": 0, "colleague": 0}
        self.sent: dict[str, int] = {"us": 0, "colleague": 0}
        self.accepted_us: list[float] = []
        self.jitter = random.Random(5)

    async def call(self, who: str) -> tuple[int, float | None, dict[str, str]]:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.001 + self.jitter.uniform(0, 0.002))
        now = loop.time()
        self.sent[who] += 1
        recent = self.arrivals[bisect.bisect_right(self.arrivals, now - 1.0):]
        headers = {"x-ratelimit-limit-requests": str(self.limit * 60), "x-ratelimit-reset-requests": "1s"}
        if len(recent) >= self.limit:
            self.refused[who] += 1
            return 429, recent[0] + 1.0 - now, {**headers, "x-ratelimit-remaining-requests": "0"}
        self.arrivals.append(now)
        if who == "us":
            self.accepted_us.append(now)
        await asyncio.sleep(self.latency)
        return 200, None, {**headers, "x-ratelimit-remaining-requests": str(self.limit - len(recent) - 1)}


async def colleague(key: SlidingKey, per_second: float, until: float) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        asyncio.ensure_future(key.call("colleague"))
        await asyncio.sleep(1 / per_second)


async def our_run(key: SlidingKey, prompts: int, per_minute: float) -> float:
    """Prompts sent as the engine sends them: paced, each retried after its Retry-After."""
    pacer = Pacer(per_minute)

    async def prompt(seq: int) -> None:
        while True:
            status, retry_after, headers = await key.call("us")
            pacer.release()
            if status == 200:
                return pacer.on_success(seq, headers)
            pacer.on_rate_limited(seq, retry_after, headers)
            await asyncio.sleep(retry_after + 0.05)
            seq = await pacer.acquire()

    tasks = [asyncio.ensure_future(prompt(await pacer.acquire())) for _ in range(prompts)]
    await asyncio.gather(*tasks)
    return asyncio.get_running_loop().time()


def test_a_colleague_on_the_key_keeps_its_share_and_we_take_ours_back_when_it_stops():
    """The key allows 10/s; a colleague's script sends 5/s from 2 s before our run to 30 s
    into it; we run 300 prompts at the key's full rate. We keep under what the colleague
    leaves (few 429s for either), and climb back to the full rate within ~10 s of its
    stopping."""
    key = SlidingKey()

    async def scenario() -> float:
        asyncio.ensure_future(colleague(key, 5.0, until=32.0))
        await asyncio.sleep(2.0)
        return await our_run(key, 300, 600)

    took = VirtualLoop().run(scenario())
    assert key.refused["us"] <= 10
    assert key.refused["colleague"] <= 0.05 * key.sent["colleague"]
    while_shared = [t for t in key.accepted_us if 7 <= t < 32]
    assert len(while_shared) >= 0.7 * 5 * 25  # at least 3.5/s of the 5/s left
    back = [t for t in key.accepted_us if 42 <= t < 47]
    assert len(back) >= 0.9 * 10 * 5 and took < 62
