"""Pacing for one queue: an even send rate, a cap on requests in flight, and pauses
when the provider says `Retry-After`.

aiolimiter's bucket holds 10 ms of sends (at least one: timers are not finer), so
a queue starts at its rate instead of bursting a minute's quota, which providers
enforce per second.
"""

from __future__ import annotations

import asyncio

from aiolimiter import AsyncLimiter


class Pacer:
    def __init__(self, rate_per_minute: float, max_in_flight: int = 512):
        if rate_per_minute <= 0:
            raise ValueError("rate must be positive")
        self.rate_per_minute = rate_per_minute
        burst = max(1, int(rate_per_minute / 60 / 100))
        self._limiter = AsyncLimiter(burst, burst * 60 / rate_per_minute)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._resume_at = 0.0

    async def acquire(self) -> None:
        """Wait for a free in-flight slot, the end of any pause, then the next send time."""
        await self._slots.acquire()
        try:
            loop = asyncio.get_running_loop()
            while (delay := self._resume_at - loop.time()) > 0:
                await asyncio.sleep(delay)
            await self._limiter.acquire()
        except BaseException:
            self._slots.release()
            raise

    def release(self) -> None:
        self._slots.release()

    def pause(self, seconds: float) -> None:
        """Hold every send of this queue for `seconds` (a 429 with Retry-After)."""
        now = asyncio.get_running_loop().time()
        self._resume_at = max(self._resume_at, now + seconds)
