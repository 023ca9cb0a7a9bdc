"""Pacing for one queue (or one model and key shared by several queues).

- An even send rate under a ceiling (the `-mq`/`-mqj` value): aiolimiter's bucket holds
  10 ms of sends (at least one: timers are not finer), so a queue starts at its rate
  instead of bursting a minute's quota, which providers enforce per second.
- A closed loop under that ceiling: a 429 halves the rate (at most once per second),
  each success adds back a fiftieth of the ceiling; `Retry-After` pauses every send;
  OpenAI `x-ratelimit-*` and Anthropic `anthropic-ratelimit-*` headers lower the ceiling
  to the provider's stated limit and slow down before the wall, not after.
- Optional tokens per minute: each send takes its estimated tokens from a second bucket,
  and the usage the API reports corrects the estimate.
- A cap on requests in flight, so a stalled server cannot pile up unbounded work.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from datetime import datetime

from aiolimiter import AsyncLimiter

MIN_FRACTION = 0.02  # never slower than 2% of the ceiling
DECREASE = 0.5
COOLDOWN_S = 1.0


class Pacer:
    def __init__(self, rate_per_minute: float, max_in_flight: int = 512, tokens_per_minute: float | None = None):
        if rate_per_minute <= 0:
            raise ValueError("rate must be positive")
        self.ceiling = float(rate_per_minute)
        self.rate = self.ceiling
        burst = max(1, int(rate_per_minute / 60 / 100))
        self._limiter = AsyncLimiter(burst, burst * 60 / rate_per_minute)
        self._token_bucket = max(1.0, tokens_per_minute / 6) if tokens_per_minute else 0.0
        self._tokens = AsyncLimiter(self._token_bucket, 10) if tokens_per_minute else None  # 10 s worth
        self._slots = asyncio.Semaphore(max_in_flight)
        self._resume_at = 0.0
        self._next_at = 0.0
        self._last_decrease = 0.0

    async def acquire(self, tokens: int = 0) -> None:
        """Wait for a free in-flight slot, then for this send's turn."""
        await self._slots.acquire()
        try:
            await self.pace(tokens)
        except BaseException:
            self._slots.release()
            raise

    async def pace(self, tokens: int = 0) -> None:
        """Wait for the send time of one more request (a later turn of a conversation holds its slot)."""
        loop = asyncio.get_running_loop()
        while (delay := self._resume_at - loop.time()) > 0:
            await asyncio.sleep(delay)
        if self.rate < self.ceiling:  # the adaptive gate, below the ceiling's even pacing
            now = loop.time()
            turn = max(now, self._next_at)
            self._next_at = turn + 60.0 / self.rate
            if turn > now:
                await asyncio.sleep(turn - now)
        await self._limiter.acquire()
        if self._tokens is not None and tokens:
            await self._tokens.acquire(min(float(tokens), self._token_bucket))

    def release(self) -> None:
        self._slots.release()

    def pause(self, seconds: float) -> None:
        """Hold every send for `seconds`."""
        now = asyncio.get_running_loop().time()
        self._resume_at = max(self._resume_at, now + seconds)

    def on_success(self, headers: Mapping[str, str] | None = None) -> None:
        self.rate = min(self.ceiling, self.rate + self.ceiling / 50)
        if headers:
            self._follow_headers(headers)

    def on_rate_limited(self, retry_after: float | None, headers: Mapping[str, str] | None = None) -> None:
        now = time.monotonic()
        if now - self._last_decrease >= COOLDOWN_S:  # many 429s of one burst count once
            self.rate = max(self.ceiling * MIN_FRACTION, self.rate * DECREASE)
            self._last_decrease = now
        if retry_after:
            self.pause(retry_after)
        if headers:
            self._follow_headers(headers)

    @property
    def limits_tokens(self) -> bool:
        return self._tokens is not None

    async def charge_tokens(self, extra: int) -> None:
        """Take tokens the estimate missed (the API reported more than we guessed)."""
        if self._tokens is not None and extra > 0:
            await self._tokens.acquire(min(float(extra), self._token_bucket))

    def lower_ceiling(self, rate_per_minute: float) -> None:
        """Never send faster than this again (the even pacing below it is the adaptive gate's)."""
        if rate_per_minute < self.ceiling:
            self.ceiling = rate_per_minute
            self.rate = min(self.rate, rate_per_minute)

    def _follow_headers(self, headers: Mapping[str, str]) -> None:
        limit = _number(_first(headers, "x-ratelimit-limit-requests", "anthropic-ratelimit-requests-limit"))
        if limit:
            self.lower_ceiling(limit)  # the provider's stated limit is the real ceiling
        for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
            remaining = _number(_first(headers, f"x-ratelimit-remaining-{kind}", f"anthropic-ratelimit-{kind}-remaining"))
            reset = _seconds_until(_first(headers, f"x-ratelimit-reset-{kind}", f"anthropic-ratelimit-{kind}-reset"))
            if remaining is None or reset is None:
                continue
            if remaining < 1:
                self.pause(reset)
            elif kind == "requests" and reset > 0:
                # Spread what is left over the time left, so the wall is never hit.
                self.rate = max(self.ceiling * MIN_FRACTION, min(self.rate, remaining / reset * 60))


def _first(headers: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        if (value := headers.get(name)) is not None:
            return value
    return None


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def _seconds_until(value: str | None) -> float | None:
    """OpenAI durations ('1s', '6m0s', '20ms') or Anthropic RFC 3339 times, as seconds from now."""
    if not value:
        return None
    if "T" in value:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return max(0.0, (moment - datetime.now().astimezone()).total_seconds())
        except ValueError:
            return None
    parts = _DURATION.findall(value)
    return sum(float(n) * _UNIT[u] for n, u in parts) if parts else _number(value)
