"""Pacing for one queue, or for every queue of this process on one model and key.

- One schedule decides every send time: the next send is the previous one plus 60/r
  seconds, r the lowest of the adaptive rate, the ceiling (`-mq`/`-mqj`, or a limit the
  provider states) and, with a Prefect server, the key's rate shared with other processes.
  Lowering any of them takes effect at the next send. A queue starts at its rate instead of
  bursting a minute's quota (providers enforce limits per second); after a stall it catches
  up at most CATCH_UP_S of sends; sends due within one timer tick leave together, so a fast
  key costs one sleep per tick, not one per send.
- A shared rate (orchestration) hands out blocks of time this process holds alone on the
  key; the schedule asks it for the next block when a send falls past the one it holds.
- The adaptive rate follows what the key has room for, which other clients of the key
  share: it is cut to what the key accepted from us over the last second when 429s make up
  a large share of our recent sends, or when the provider's headers say the key is full
  while we send below its stated limit; then it grows back along a cubic curve, slowly near
  the rate it was cut from and faster beyond, up to the ceiling (docs/rate-limits.md).
- A stated limit (`x-ratelimit-limit-requests`, `anthropic-ratelimit-requests-limit`)
  becomes the ceiling at once; a 429 with headers saying nothing remains holds every send
  for its Retry-After; every 429's own retry waits for its Retry-After (engine).
- Optional tokens per minute: each send takes its estimated tokens from an aiolimiter
  bucket, and the usage the API reports corrects the estimate.
- A cap on requests in flight, so a stalled server cannot pile up unbounded work; and until
  the provider has answered once, FIRST_WINDOW requests at most (TCP's initial window, RFC
  6928): a `-mq` far above the key's limit costs a few 429s, not a latency's worth of them.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Protocol

from aiolimiter import AsyncLimiter

CATCH_UP_S = 0.01  # how far behind schedule sends may go back to back
TICK_S = 0.001  # the event loop's timer granularity (epoll waits in whole milliseconds)
MIN_FRACTION = 0.02  # never slower than 2% of the ceiling
SHARE_WINDOW = 24  # 429s are counted over this many sends, in send order
OVER_SHARE = 0.5  # half of them answered 429: the key is over its limit (random 429s on a fifth of sends: 0.09% of windows)
DECREASE = 0.8  # after a 429, the rate restarts at this share of the room the key had for us
NEAR = 0.9  # after a full key without a 429, at this share of the rate
GROWTH = 0.01  # cubic growth: back at the room after cbrt((1 - DECREASE)/GROWTH) = 2.7 s (2.2 s from NEAR), twice it 4.6 s later
COOLDOWN_S = 1.0  # one cut per second at most, and only for sends made after the last cut
STATED_MARGIN = 0.02  # a stated limit is paced this much under it: arrival jitter at exactly the limit draws 429s
FULL_BELOW = 0.9  # the key full while we send under this share of its stated limit: someone else uses it
FIRST_WINDOW = 10  # requests sent before the first answer
SEND_LOG = 1 << 15  # send times kept: a second's worth up to 32,768/s


class SharedRate(Protocol):
    """A key's rate shared with other processes: blocks of send times this process holds
    alone, at the lowest of the rates the runs sending on the key were given."""

    per_minute: float

    def admit(self, turn: float) -> float | None:
        """The send time of a send due at `turn` in the block this process holds; None when
        `turn` is past it (or before one is held)."""

    def holds(self, moment: float) -> bool:
        """Whether a send leaving at `moment` is still inside our block (a busy event loop
        may wake a send after it)."""

    async def next_block(self, turn: float) -> None:
        """Wait for the key's next block for a send due at `turn`."""

    def state(self, per_minute: float) -> None:
        """This process's limit for the key, lowered (a provider's stated limit)."""

    async def close(self) -> None:
        """Nothing more is sent on the key from here: free what will not be used."""


# How the session makes a key's shared rate: (api, model, credentials, requests per minute) -> a
# SharedRate, or None when nothing is shared (no server). The orchestration layer provides it.
SharedRateFactory = Callable[[str, str, Mapping[str, str], float], "SharedRate | None"]


class Pacer:
    def __init__(self, rate_per_minute: float, max_in_flight: int = 512, tokens_per_minute: float | None = None,
                 shared: SharedRate | None = None):  # fmt: skip
        if rate_per_minute <= 0:
            raise ValueError("rate must be positive")
        self.ceiling = float(rate_per_minute)
        self.shared = shared
        self._token_bucket = max(1.0, tokens_per_minute / 6) if tokens_per_minute else 0.0
        self._tokens = AsyncLimiter(self._token_bucket, 10) if tokens_per_minute else None  # 10 s worth
        self._token_debt = 0
        self._slots = asyncio.Semaphore(max_in_flight)
        self._answered = asyncio.Event()  # the provider answered once
        self._next_at = float("-inf")
        self._resume_at = float("-inf")
        self._sent = 0  # sequence number of the last send
        self._limited: deque[int] = deque(maxlen=2 * SHARE_WINDOW)  # sends answered 429, by sequence number
        self._send_times: deque[float] = deque(maxlen=SEND_LOG)  # of the last sends, the last one `_sent`
        self._stated: float | None = None  # the provider's stated request limit per minute
        self._cut: tuple[float, float, float] | None = None  # (the room, when cut, seconds to grow back to it) while growing
        self._cut_at = float("-inf")
        self._cut_seq = 0

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    @property
    def rate(self) -> float:
        """The rate in force, per minute."""
        rate = self.ceiling
        if self._cut is not None:
            top, since, offset = self._cut
            grown = top * (1 + GROWTH * (self._now() - since - offset) ** 3)
            if grown >= self.ceiling:
                self._cut = None
            else:
                rate = max(grown, self.ceiling * MIN_FRACTION)
        if self.shared is not None:
            rate = min(rate, self.shared.per_minute)
        return rate

    async def acquire(self, tokens: int = 0) -> int:
        """Wait for a free in-flight slot, then for this send's turn; returns its sequence number."""
        await self._slots.acquire()
        try:
            if self._sent >= FIRST_WINDOW and not self._answered.is_set():
                await self._answered.wait()
            return await self.pace(tokens)
        except BaseException:
            self._slots.release()
            raise

    async def pace(self, tokens: int = 0) -> int:
        """Wait for the send time of one more request (a later turn of a conversation holds its
        slot); returns its sequence number, which the answer's report wants back."""
        if self._tokens is not None and (tokens or self._token_debt):  # before the turn: the schedule has the last word
            owed, self._token_debt = tokens + self._token_debt, 0
            await self._tokens.acquire(min(float(owed), self._token_bucket))
        catch_up = CATCH_UP_S if self._sent else 0.0
        while True:
            now = self._now()
            turn = max(self._next_at, now - catch_up, self._resume_at, self._second_after())
            if self.shared is not None:
                start = self.shared.admit(turn)
                if start is None:
                    await self.shared.next_block(turn)
                    catch_up = 0.0  # a late grant must not bunch the block's first sends
                    continue
                turn = start
            self._next_at = turn + 60.0 / self.rate
            if turn - now > TICK_S:
                await asyncio.sleep(turn - now)
                now = self._now()
                if now < self._resume_at or (self.shared is not None and not self.shared.holds(now)):
                    continue  # paused meanwhile, or woken past our block: a new turn
            self._sent += 1
            self._send_times.append(now)
            return self._sent

    def _second_after(self) -> float:
        """The earliest send that keeps any second at the rate: a send late on its turn and
        the next on time would otherwise put one more in the second before (at exactly a
        key's limit, a 429). Above 1,000/s sends leave in bursts per timer tick anyway."""
        per_second = self.rate / 60
        count = int(per_second)
        if count < 1 or count > 1000 or len(self._send_times) < count:
            return float("-inf")
        return self._send_times[-count] + count / per_second + 2 * TICK_S  # a send may leave a tick early, arrive a tick late

    def release(self) -> None:
        """A request is over (answered, failed or given up): its slot is free."""
        self._answered.set()
        self._slots.release()

    def pause(self, seconds: float) -> None:
        """Hold every send for `seconds`."""
        self._resume_at = max(self._resume_at, self._now() + seconds)

    def on_success(self, seq: int, headers: Mapping[str, str] | None = None) -> None:
        self._answered.set()
        if headers and self._follow_headers(headers) is not None and self.rate < FULL_BELOW * (self._stated or math.inf):
            # The key full after our request while we send well under its limit: another
            # client takes the rest. (At its limit, a full key is just our own pace.)
            self._cut_to_room(seq, NEAR)

    def on_rate_limited(self, seq: int, retry_after: float | None, headers: Mapping[str, str] | None = None) -> None:
        """A 429 on send `seq`. With headers saying the key is full, it is over its limit:
        hold every send for the Retry-After. Without, only a large share of 429s among our
        recent sends says so; a 429 now and then (an overloaded server) only delays its own
        retry."""
        self._answered.set()
        self._limited.append(seq)
        reset = self._follow_headers(headers) if headers else None
        recent = sum(1 for s in self._limited if max(seq - SHARE_WINDOW, self._cut_seq) < s <= seq)  # since the last cut
        if reset is not None or recent >= OVER_SHARE * SHARE_WINDOW:
            self._cut_to_room(seq, DECREASE)
            if wait := retry_after or reset:
                self.pause(wait)

    def _cut_to_room(self, seq: int, decrease: float) -> None:
        """Cut the rate to the room the key has for us: how many of our sends of the second
        before send `seq` it did not refuse (those still unanswered included: refusals come
        at once). Once per COOLDOWN_S, and only for sends made after the last cut or lowered
        ceiling."""
        now = self._now()
        if now - self._cut_at < COOLDOWN_S or seq <= self._cut_seq:
            return
        top = current = self.rate
        times = list(self._send_times)
        first = self._sent - len(times) + 1  # the sequence number of times[0]
        if first <= seq <= self._sent and self._resume_at <= times[seq - first] - 1.0:  # no pause held that second back
            sent_at, refused, room = times[seq - first], set(self._limited), 0
            for i in range(seq - first - 1, -1, -1):
                if times[i] <= sent_at - 1.0:
                    break
                room += first + i not in refused
            top = min(current, 60.0 * room) if room else current / 2
        self._cut = (top, now, math.cbrt((1 - decrease) / GROWTH))
        self._cut_at, self._cut_seq = now, self._sent

    @property
    def limits_tokens(self) -> bool:
        return self._tokens is not None

    def owe_tokens(self, extra: int) -> None:
        """Tokens the estimate missed (the API reported more than we guessed): the next send
        takes them from the bucket with its own, so an answer never waits for the bucket."""
        if self._tokens is not None and extra > 0:
            self._token_debt += extra

    def lower_ceiling(self, rate_per_minute: float) -> None:
        """Never send faster than this again: the strictest stated or configured limit wins."""
        if rate_per_minute < self.ceiling:
            self.ceiling = float(rate_per_minute)
            self._cut_seq = self._sent  # 429s on sends made faster than this cut nothing more
            if self.shared is not None:
                self.shared.state(self.ceiling)  # the key's limit, for every process on it

    def _follow_headers(self, headers: Mapping[str, str]) -> float | None:
        """Follow the provider's stated limits. When one of them has nothing left, the
        seconds until it resets (0 when not said); else None."""
        if limit := _number(_first(headers, "x-ratelimit-limit-requests", "anthropic-ratelimit-requests-limit")):
            self._stated = limit
            self.lower_ceiling(limit * (1 - STATED_MARGIN))
        full = None
        for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
            remaining = _number(_first(headers, f"x-ratelimit-remaining-{kind}", f"anthropic-ratelimit-{kind}-remaining"))
            if remaining is not None and remaining < 1:
                reset = _seconds_until(_first(headers, f"x-ratelimit-reset-{kind}", f"anthropic-ratelimit-{kind}-reset"))
                full = max(full or 0.0, reset or 0.0)
        return full


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
    async def pacer(self, key: Hashable, rpm: float, tpm: float | None = None, max_in_flight: int = 512,
                    shared: Callable[[], SharedRate | None] | None = None) -> AsyncIterator[Pacer]:  # fmt: skip
        """`shared` makes the rate shared with other processes, when a new pacer is made;
        the last queue to leave closes it."""
        if key in self._pacers:
            pacer, users = self._pacers[key]
            pacer.lower_ceiling(rpm)
        else:
            pacer, users = Pacer(rpm, max_in_flight, tpm, shared=shared() if shared else None), 0
        self._pacers[key] = (pacer, users + 1)
        try:
            yield pacer
        finally:
            pacer, users = self._pacers[key]
            if users == 1:
                del self._pacers[key]
                if pacer.shared is not None:
                    await pacer.shared.close()
            else:
                self._pacers[key] = (pacer, users - 1)
