"""Pacing for one queue (or one model and key shared by several queues).

- One clock: the next send time is the previous one plus 60 / min(rate, ceiling) s, so the
  ceiling (the `-mq`/`-mqj` value, or the limit the provider states in its headers) and the
  adaptive rate below it are one schedule, and lowering either takes effect at the next send.
  A queue starts at its rate instead of bursting a minute's quota (providers enforce limits
  per second); after a stall it may catch up at most `CATCH_UP_S` of sends at once.
- A closed loop under the ceiling that tells a key over its limit from a lone 429. A 429 on
  one request (overload, a hiccup) only delays that request's retry. When `RUN_OF_429`
  requests sent one after the other all get 429s, or headers say nothing remains, the key
  is over its limit: the rate drops to what the provider accepted in the last second (at
  most once per `COOLDOWN_S`), the queue waits out the Retry-After, and that rate becomes a
  learned limit relaxing back toward the ceiling. Runs are counted in send order, not
  answer order, because a failure often answers faster than a success sent before it.
  docs/rate-limits.md has the numbers.
- Optional tokens per minute: each send takes its estimated tokens from an aiolimiter bucket,
  and the usage the API reports corrects the estimate.
- A cap on requests in flight, so a stalled server cannot pile up unbounded work.
- Optionally a rate shared with other processes on the same key (shared_rate.py): each
  send also waits for the shared bucket, and a lowered ceiling lowers it for everyone.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Protocol

from aiolimiter import AsyncLimiter


class SharedRate(Protocol):
    """What the Pacer needs from a rate shared with other processes."""

    async def take(self) -> None:
        """Wait until this process may send one more request."""

    def set_rate(self, per_minute: float) -> None:
        """The key's rate as this process learned it (a provider's stated limit); shared
        with the next block it asks for."""

    async def give_back(self) -> None:
        """This process sends nothing more on the key: free what it will not use."""


# How the session makes a key's shared rate: (api, model, credentials, requests per minute) -> a
# SharedRate, or None when nothing is shared (no server). The orchestration layer provides it.
SharedRateFactory = Callable[[str, str, Mapping[str, str], float], "SharedRate | None"]

MIN_FRACTION = 0.02  # never slower than 2% of the ceiling
DECREASE = 0.5
COOLDOWN_S = 1.0
RUN_OF_429 = 6  # consecutive sends answered 429: over the limit (random 20% 429s: 0.0064% of sends)
INCREASE = 1.01
RELEARN_HALF_LIFE_S = 120.0  # a learned limit relaxes toward the ceiling (in log space) this slowly
CATCH_UP_S = 0.01  # how far behind schedule sends may run back to back (timer granularity)


class Pacer:
    def __init__(
        self,
        rate_per_minute: float,
        max_in_flight: int = 512,
        tokens_per_minute: float | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        shared: SharedRate | None = None,
    ):
        if rate_per_minute <= 0:
            raise ValueError("rate must be positive")
        self.ceiling = float(rate_per_minute)
        self.rate = self.ceiling
        self._clock = clock
        self._sleep = sleep
        self._token_bucket = max(1.0, tokens_per_minute / 6) if tokens_per_minute else 0.0
        self._tokens = AsyncLimiter(self._token_bucket, 10) if tokens_per_minute else None  # 10 s worth
        self._slots = asyncio.Semaphore(max_in_flight)
        self._next_at = float("-inf")
        self._resume_at = 0.0
        self._last_decrease = float("-inf")
        self._sent = 0  # sequence number of the last send
        self._limited: deque[int] = deque(maxlen=64)  # sequence numbers of recent sends answered 429
        self._learned: tuple[float, float] | None = None  # (rate per minute, when) the key accepted when over
        self._accepted: deque[float] = deque()  # times of answers in the last second
        self.shared = shared

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    @property
    def limit(self) -> float:
        """The ceiling, or lower: what the key accepted when it was over its limit, relaxing
        back toward the ceiling so a limit that was raised is found again."""
        if self._learned is None:
            return self.ceiling
        learned, since = self._learned
        if learned >= self.ceiling:
            return self.ceiling
        relaxed = 1 - 0.5 ** ((self._now() - since) / RELEARN_HALF_LIFE_S)
        return min(self.ceiling, learned * (self.ceiling / learned) ** relaxed)

    @property
    def interval(self) -> float:
        return 60.0 / min(self.rate, self.limit)

    async def acquire(self, tokens: int = 0) -> int:
        """Wait for a free in-flight slot, then for this send's turn; returns its sequence number."""
        await self._slots.acquire()
        try:
            return await self.pace(tokens)
        except BaseException:
            self._slots.release()
            raise

    async def pace(self, tokens: int = 0) -> int:
        """Wait for the send time of one more request (a later turn of a conversation holds its
        slot); returns its sequence number, which `on_rate_limited` wants back."""
        while (delay := self._resume_at - self._now()) > 0:
            await self._sleep(delay)
        now = self._now()
        # Behind schedule by more than CATCH_UP_S (a busy loop), the schedule restarts that far back.
        turn = max(self._next_at, now - CATCH_UP_S if self._sent else now, self._resume_at)
        self._next_at = turn + self.interval
        if turn > now:
            await self._sleep(turn - now)
        if self._tokens is not None and tokens:
            await self._tokens.acquire(min(float(tokens), self._token_bucket))
        if self.shared is not None:
            await self.shared.take()
        self._sent += 1
        return self._sent

    def release(self) -> None:
        self._slots.release()

    def pause(self, seconds: float) -> None:
        """Hold every send for `seconds`."""
        self._resume_at = max(self._resume_at, self._now() + seconds)

    def on_success(self, headers: Mapping[str, str] | None = None) -> None:
        now = self._now()
        self._accepted.append(now)
        while self._accepted and self._accepted[0] < now - 1.0:
            self._accepted.popleft()
        self.rate = min(self.ceiling, self.rate * INCREASE)
        if headers:
            self._follow_headers(headers)

    def on_rate_limited(self, retry_after: float | None, headers: Mapping[str, str] | None = None, seq: int | None = None) -> bool:
        """Record a 429 on send `seq`; True when it says the key is over its limit (the queue
        slowed down). Without a sequence number, sends are taken to follow each other."""
        seq = seq if seq is not None else (self._limited[-1] + 1 if self._limited else self._sent)
        self._limited.append(seq)
        exhausted = self._follow_headers(headers) if headers else False
        if not exhausted and not self._in_a_run(seq):
            return False  # a lone 429: only its own retry waits
        now = self._now()
        if now - self._last_decrease >= COOLDOWN_S:  # many 429s of one burst count once
            accepted = sum(1 for t in self._accepted if t >= now - 1.0) * 60.0
            current = min(self.rate, self.limit)
            self.rate = max(self.ceiling * MIN_FRACTION, min(current, accepted) if accepted else current * DECREASE)
            self._learned = (self.rate, now)
            self._last_decrease = now
        if retry_after:
            self.pause(retry_after)
        return True

    def _in_a_run(self, seq: int) -> bool:
        limited = set(self._limited)
        start = seq
        while start - 1 in limited:
            start -= 1
        end = seq
        while end + 1 in limited:
            end += 1
        return end - start + 1 >= RUN_OF_429

    @property
    def limits_tokens(self) -> bool:
        return self._tokens is not None

    async def charge_tokens(self, extra: int) -> None:
        """Take tokens the estimate missed (the API reported more than we guessed)."""
        if self._tokens is not None and extra > 0:
            await self._tokens.acquire(min(float(extra), self._token_bucket))

    def lower_ceiling(self, rate_per_minute: float) -> None:
        """Never send faster than this again: the strictest stated or configured limit wins."""
        if self.shared is not None and rate_per_minute < self.ceiling:
            self.shared.set_rate(rate_per_minute)  # the key's limit, for every process on it
        self.ceiling = min(self.ceiling, float(rate_per_minute))
        self.rate = min(self.rate, self.ceiling)

    def _follow_headers(self, headers: Mapping[str, str]) -> bool:
        """Follow the provider's stated limits; True when one of them is exhausted."""
        limit = _number(_first(headers, "x-ratelimit-limit-requests", "anthropic-ratelimit-requests-limit"))
        if limit:
            self.lower_ceiling(limit)  # the provider's stated limit is the real ceiling
        exhausted = False
        for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
            remaining = _number(_first(headers, f"x-ratelimit-remaining-{kind}", f"anthropic-ratelimit-{kind}-remaining"))
            reset = _seconds_until(_first(headers, f"x-ratelimit-reset-{kind}", f"anthropic-ratelimit-{kind}-reset"))
            if remaining is None or reset is None:
                continue
            if remaining < 1:
                self.pause(reset)
                exhausted = True
            elif kind == "requests" and reset > 0:
                # Spread what is left over the time left, so the wall is never hit; a spacing
                # of the next sends, not a lasting cut of the rate.
                self.pause(reset / remaining)
        return exhausted


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


class PacerPool:
    """Pacers shared by every queue that sends to the same model with the same credentials,
    so runs going on at once in one process share its limit. Owned by whoever starts the
    runs (a `Session`), never module state."""

    def __init__(self) -> None:
        self._pacers: dict[Hashable, tuple[Pacer, int]] = {}

    @property
    def size(self) -> int:
        return len(self._pacers)

    @asynccontextmanager
    async def pacer(
        self,
        key: Hashable,
        rpm: float,
        tpm: float | None = None,
        max_in_flight: int = 512,
        shared: Callable[[], SharedRate | None] | None = None,
        **clock: Any,
    ) -> AsyncIterator[Pacer]:
        """`shared` makes the rate shared with other processes, when a new pacer is made;
        the last queue to leave it gives back what it did not use of the shared rate."""
        if key in self._pacers:
            pacer, users = self._pacers[key]
            pacer.lower_ceiling(rpm)
        else:
            pacer, users = Pacer(rpm, max_in_flight, tpm, shared=shared() if shared else None, **clock), 0
        self._pacers[key] = (pacer, users + 1)
        try:
            yield pacer
        finally:
            pacer, users = self._pacers[key]
            if users == 1:
                del self._pacers[key]
                if pacer.shared is not None:
                    await pacer.shared.give_back()
            else:
                self._pacers[key] = (pacer, users - 1)
