"""One request rate per API key, shared by every promptfleet process that reports to the
same Prefect server: two runs, two workers or two machines on one key together stay
under the key's limit.

The shared bucket is a Prefect global concurrency limit with slot decay, one per (api,
model, credentials): `slot_decay_per_second` is the key's rate and `limit` one block of
BLOCK_S seconds of sends (at least MIN_BLOCK). A process takes a whole block at once and
hands its requests out evenly over the block's window, so a queue makes about one server
call a second, not one per request. Sends not used by the end of the window are dropped:
a process that slowed down cannot overlap the next holder's window.

The rule that keeps every second under the key's limit at the provider, which counts
arrivals, not sends: sends are spaced SPACING_MARGIN wider than 1/rate, so arrivals may
jitter by that much of a second; a block's sends end before the next holder's grant can
come, and the next holder's first send is one spacing after its grant's answer (after its
own last send, when the block before was its own), so a hand-over is spaced like the sends
within a block; a send woken after its block's window (a busy event loop) waits for a block
of its own.

Why not `prefect.concurrency.asyncio.rate_limit()`: on a 423 it sleeps the server's
`Retry-After`, a random interval around a whole block's decay time, so a process that
lost one race waits about a block for nothing while the bucket refills unused, and the
process that held the last block tends to win the next one too (measured here: two
processes together got 8.4/s of a 10/s limit). Here a process reads the limit first (a
read changes nothing), sleeps until the slots have decayed, and asks then; the process
that held the last block asks a little later, so blocks alternate between waiting
processes.

Alone on a key, none of that is needed: every process sending on the key holds one slot,
under a lease, of a second limit (`promptfleet-senders:...`, a plain count), and a process
that counts itself the only sender keeps pacing in-process at its exact rate, as without a
server, and only keeps the shared bucket holding LEAD_S to 2*LEAD_S of its sends ahead.
Those slots keep a newcomer out until it is seen: the newcomer registers before it asks
for a block, and a block needs the bucket empty. A batch of slots taken ahead counts only
if a read of the senders *after* the take still shows one; then a newcomer registered
after that read, so its grant comes after those slots decayed, and the lone process's
sends (all before they decay) end before it. At the next top-up the lone process sees the
newcomer and goes to blocks; when the other leaves, the count drops and it goes back.
A killed process's lease lapses after LEASE_S (Prefect's shortest) and the server's next
sweep; until then the others keep to blocks, which is slower, never faster.

The limit's name carries a keyed fingerprint of the credentials (HMAC-SHA256 with a salt
kept on the machine), never the key or a plain hash of it: names are shown in the UI and
the API. Processes on several machines share a limit only when they share the salt
(`PROMPTFLEET_RATE_SALT`).

Without a Prefect server (no `PREFECT_API_URL`, a temporary server, or the plain Python
API, which reports nothing) there is nothing to share and pacing stays in-process; when
the server stops answering mid-run, or answers slower than a block lasts, the queue goes
on at its own pace and asks the server again a little later.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("promptfleet.orchestration.shared_rate")

SALT_ENV = "PROMPTFLEET_RATE_SALT"
SALT_FILE = "promptfleet-rate-salt"
PREFIX = "promptfleet-rate"
SENDERS_PREFIX = "promptfleet-senders"
MAX_SENDERS = 10_000  # the senders limit only counts; it never refuses anyone
LEASE_S = 60.0  # a sender's slot lapses this long after its last renewal (Prefect's shortest lease)
RENEW_S = 10.0  # renewed this often; trusted for LEASE_S / 2 after the renewal was asked
LEAD_S = 0.5  # alone: the bucket holds at least this much of our sends ahead, topped up to twice that
BLOCK_S = 2.0  # a block holds this many seconds of sends: fewer hand-overs, less lost to latency
# Sends are spaced 2% wider than 1/rate: a send may then reach the provider up to 20 ms (2%
# of its one-second window) later than the one `rate` sends after it without making that one
# the window's rate+1st. Measured on a busy 2-core box: 1 arrival in 100 ~7 ms late, 1-3
# in 1,000 over 20 ms; spaced exactly 1/rate, 1 send in 100 drew a 429.
SPACING_MARGIN = 0.02
# A hand-over to another process costs one spacing: 20 sends a block keep that under 5% (at
# 3/s, blocks of 2 s would lose 1 send in 6). A process taking its own next block loses
# only the margin, the courtesy and the take's round trip.
MIN_BLOCK = 20
HANDOVER_S = 0.03  # a process that just held a block asks for the next one this much later than a waiting one
CATCH_UP_S = 0.005  # a send this late still keeps its place in the schedule (timer overshoot)
SLOTS = 100  # slots per request: Prefect decays and reports whole slots, so a slot is a fine grain
STALE_S = 60.0  # a limit nobody used for this long takes the next run's rate as it is
ALONE_S = 3 * BLOCK_S  # no sign of another process this long (and for a whole block): a slower rate gives way to ours
OFFLINE_S = 30.0  # after a server error, pace in-process this long before asking again
LATE_GRANTS = 3  # grants in a row that arrive after their block's window: the server is too slow to share through
TOLERANCE = 0.02  # a learned rate this close to the shared one is not written
GIVE_BACK_SLACK = 0.1  # slots kept after the last send, for the time a give-back takes to reach the server


@dataclass(frozen=True)
class Bucket:
    """A global concurrency limit as read: `active` slots left after decay (SLOTS per request)."""

    limit: int
    per_second: float
    active: int
    updated: datetime | None
    enabled: bool = True

    @property
    def per_minute(self) -> float:
        return self.per_second * 60 / SLOTS

    @property
    def requests(self) -> int:
        return max(1, self.limit // SLOTS)


def block_for(per_minute: float) -> int:
    """Requests in one block: BLOCK_S seconds' worth, at least MIN_BLOCK."""
    return max(MIN_BLOCK, round(per_minute / 60 * BLOCK_S))


class PrefectLimits:
    """The calls made on one key's two global concurrency limits (its rate, its senders),
    through a Prefect client of its own (opened at the first call, closed by `close`) whose
    transport asks again at once when the server is busy (prefect_transport.py)."""

    def __init__(self, name: str):
        self.name = name
        self.senders_name = SENDERS_PREFIX + name.removeprefix(PREFIX)
        self._client = None

    async def read(self) -> Bucket | None:
        from prefect.exceptions import ObjectNotFound

        try:
            gcl = await self._call(lambda client: client.read_global_concurrency_limit_by_name(self.name))
        except ObjectNotFound:
            return None
        return Bucket(gcl.limit, gcl.slot_decay_per_second, gcl.active_slots, gcl.updated, gcl.active)

    async def create(self, per_minute: float) -> None:
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.exceptions import ObjectAlreadyExists

        spec = GlobalConcurrencyLimitCreate(name=self.name, limit=block_for(per_minute) * SLOTS, slot_decay_per_second=per_minute / 60 * SLOTS)
        try:
            await self._call(lambda client: client.create_global_concurrency_limit(spec))
        except ObjectAlreadyExists:
            pass  # another process was first: its limit is the shared one

    async def set(self, per_minute: float, was: Bucket | None = None) -> None:
        """Change the rate; slots in use keep the time they have left (at half the rate a
        block must not take twice as long to decay). They are always written, none too:
        the server stores slots as of the last write and decays them from `updated`, which
        an update moves to now, so slots that had long decayed would count again in full."""
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        per_second = per_minute / 60 * SLOTS
        spec = GlobalConcurrencyLimitUpdate(limit=block_for(per_minute) * SLOTS, slot_decay_per_second=per_second)
        if was is not None and was.per_second > 0:
            spec.active_slots = round(was.active * per_second / was.per_second)
        await self._call(lambda client: client.update_global_concurrency_limit(self.name, spec))

    async def take(self, slots: int) -> bool:
        """Occupy `slots` at once; False when they are not free (someone was faster) or the
        limit is gone (the server then grants a take on nothing)."""
        import httpx

        try:
            answer = await self._call(lambda client: client.increment_concurrency_slots([self.name], slots, mode="rate_limit"))
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (422, 423):  # taken, or the limit just changed size
                return False
            raise
        return bool(answer.json())

    async def give_back(self, slots: int, held: float) -> None:
        """Free `slots` now instead of letting them decay (the server never goes below 0)."""
        await self._call(lambda client: client.release_concurrency_slots([self.name], slots, max(held, 0.001)))

    async def register(self) -> str | None:
        """Count this process among the key's senders, under a lease; the lease's id, or None
        when the senders limit refuses (switched off, or edited down to full)."""
        import httpx
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.exceptions import ObjectAlreadyExists

        for _ in range(2):
            try:
                answer = await self._call(lambda client: client.increment_concurrency_slots_with_lease(
                    [self.senders_name], 1, mode="concurrency", lease_duration=LEASE_S, holder=_holder()))  # fmt: skip
            except httpx.HTTPStatusError as err:
                if err.response.status_code in (422, 423):
                    return None
                raise
            body = answer.json()
            if body["limits"]:
                return body["lease_id"]
            # No such limit yet (the server grants a lease on nothing): make it, then again.
            try:
                spec = GlobalConcurrencyLimitCreate(name=self.senders_name, limit=MAX_SENDERS)
                await self._call(lambda client: client.create_global_concurrency_limit(spec))
            except ObjectAlreadyExists:
                pass
        return None

    async def renew(self, lease: str) -> bool:
        """Keep our senders slot; False when the lease already lapsed."""
        import httpx

        try:
            await self._call(lambda client: client.renew_concurrency_lease(lease, LEASE_S))
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (404, 410):
                return False
            raise
        return True

    async def unregister(self, lease: str) -> None:
        await self._call(lambda client: client.release_concurrency_slots_with_lease(lease))

    async def senders(self) -> int | None:
        """How many processes hold a senders slot, or None when that cannot be known."""
        from prefect.exceptions import ObjectNotFound

        try:
            gcl = await self._call(lambda client: client.read_global_concurrency_limit_by_name(self.senders_name))
        except ObjectNotFound:
            return None
        return gcl.active_slots if gcl.active else None

    async def _call(self, call):
        if self._client is None:
            from prefect.client.orchestration import get_client
            from prefect.settings import PREFECT_API_URL

            from promptfleet.orchestration.prefect_transport import transport_for

            client = get_client(httpx_settings={"transport": transport_for(PREFECT_API_URL.value() or "")})
            await client.__aenter__()  # entered once: every call after it is a plain request
            self._client = client
        return await call(self._client)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(None, None, None)


class GlobalRate:
    """A SharedRate on a Prefect global concurrency limit (see the module docstring)."""

    def __init__(self, limits: PrefectLimits, per_minute: float):
        self._limits = limits
        self._own = per_minute  # this process's ceiling when it joined
        self._believed = per_minute  # the last rate the Pacer reported
        self._wanted: float | None = None  # a learned rate not yet written
        self._joined = False
        self._left = 0
        self._until = 0.0
        self._next_at = 0.0
        self._spacing = 0.0
        self._offline_until = 0.0
        self._late = 0  # grants in a row that arrived too late to use
        self._granted = (0.0, 0)  # (when, slots) of our last grant: the slots of ours a read may show
        self._per_second = 0.0  # the decay of that grant's slots
        self._fresh_at: float | None = None  # when we joined a limit nobody had used for a while
        self._others_at = 0.0  # when we last saw another process: its slots in a read, or its grant before ours
        self._quiet = 0  # blocks in a row granted with no sign of another process
        self._lease: str | None = None  # our slot among the key's senders
        self._renewed_at = float("-inf")  # when its last renewal was asked
        self._alone = False  # the only sender: the Pacer paces, our slots ahead keep others out
        self._leaving = False  # alone, but a top-up found another sender: blocks once our slots run out
        self._covered_until = 0.0  # alone: our slots in the bucket last (at least) until then
        self._start_at = 0.0  # alone: our first send, after the slots of another run decayed
        self._alone_at = 0.0  # alone: the next send's place in an exact schedule
        self._top_up: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.blocks = 0  # blocks taken (server grants), for the tests
        self.top_ups = 0  # slots taken ahead while alone, for the tests

    @property
    def name(self) -> str:
        return self._limits.name

    def set_rate(self, per_minute: float) -> None:
        if per_minute != self._believed:
            self._believed = self._wanted = per_minute

    async def take(self) -> None:
        async with self._lock:  # one block request at a time; the other sends wait for it
            loop = asyncio.get_running_loop()
            while loop.time() >= self._offline_until:
                if self._alone:
                    try:
                        if await self._alone_send():
                            return
                    except Exception as err:  # a top-up failed: as below
                        self._alone = False
                        self._go_offline(f"Prefect server unavailable ({err})")
                    continue
                if self._left <= 0 or max(loop.time(), self._next_at) >= self._until:
                    try:
                        await self._next_block()
                    except Exception as err:  # the server is down or answers garbage: keep sending at our own pace
                        self._go_offline(f"Prefect server unavailable ({err})")
                    continue
                # Requests of a block go out evenly over its window, so two processes handing
                # over a block never send a burst across the hand-over.
                turn = max(loop.time(), self._next_at)
                if turn > loop.time():
                    await asyncio.sleep(turn - loop.time())
                if loop.time() >= self._until:
                    # Woken past the window (a busy event loop): this send would land in
                    # the next holder's first second. It waits for a block of its own.
                    self._left = 0
                    continue
                # Spaced from when it leaves: after a late wake-up the next send must not
                # follow at once (the late one and the next would take one turn together).
                self._next_at = max(turn, loop.time() - CATCH_UP_S) + self._spacing
                self._left -= 1
                return

    async def _alone_send(self) -> bool:
        """One send at the Pacer's pace while our slots ahead last; False once another sender
        showed up and they ran out (blocks from then on)."""
        loop = asyncio.get_running_loop()
        # The Pacer spaces sends, but a send held up here (our first, a late answer) would let
        # the next ones, whose turns passed meanwhile, follow at once (the Pacer catches up
        # 10 ms: one more send in a second). So sends also keep a schedule of their own,
        # exact and without catch-up: it lags the Pacer's by its largest timer overshoot, not
        # their sum, since each turn counts from the last turn, not from the last wake-up.
        now = loop.time()
        turn = max(self._start_at, self._alone_at, now)
        if turn > now:
            await asyncio.sleep(turn - now)
        self._alone_at = turn + SLOTS / self._per_second
        if self._top_up is not None and self._top_up.done():
            await self._settle_top_up()
        now = loop.time()
        if not self._leaving and self._top_up is None and self._covered_until - now < LEAD_S:
            # In the background: a send must not wait for the server's answer (the Pacer's
            # schedule would slip by it at every top-up).
            self._top_up = asyncio.create_task(self._top_up_or_leave())
        if now >= self._covered_until and self._top_up is not None:
            await self._settle_top_up()
            now = loop.time()
        if now < self._covered_until:
            self._next_at = now + self._spacing  # as in a block: a hand-over starts one spacing after it
            return True
        log.debug("shared rate %s: another sender on the key, sharing it in blocks", self.name)
        self._alone, self._left = False, 0
        return False

    async def _settle_top_up(self) -> None:
        task, self._top_up = self._top_up, None
        if task is not None:
            await task

    async def _top_up_or_leave(self) -> None:
        if not await self._take_ahead():
            self._leaving = True

    async def _take_ahead(self) -> bool:
        """Put our next sends in the bucket, up to 2 * LEAD_S ahead. They count only when a
        read of the senders after the take shows us alone: a newcomer registers before it
        asks for a block, so it then comes after these slots have decayed."""
        loop = asyncio.get_running_loop()
        if not await self._keep_registered():
            return False
        if self._wanted is not None:  # alone, the rate we learned is the key's
            wanted, self._wanted = self._wanted, None
            bucket = await self._limits.read()
            if bucket is not None and abs(wanted - bucket.per_minute) > TOLERANCE * bucket.per_minute:
                await self._limits.set(wanted, bucket)  # slots keep their time: our cover is unchanged
                self._per_second = wanted / 60 * SLOTS
                self._spacing = SLOTS / self._per_second * (1 + SPACING_MARGIN)
        asked = loop.time()
        start = max(self._covered_until, self._start_at, asked)
        slots = max(SLOTS, math.ceil((asked + 2 * LEAD_S - start) * self._per_second))
        if not await self._limits.take(slots):
            return False  # someone holds slots: another sender
        if await self._limits.senders() != 1 or not self._trusted():
            await self._limits.give_back(slots, 0.001)  # unused: the newcomer need not wait for them
            return False
        # Counted from the later of `asked` and what we held: the server adds the slots to
        # what had not decayed yet, so they last at least this long.
        self._covered_until = start + slots / self._per_second
        self._granted = (asked, round(self._per_second * (self._covered_until - asked)))
        self.top_ups += 1
        self._late = self._late + 1 if loop.time() >= self._covered_until else 0
        if self._late >= LATE_GRANTS:  # the slots are over when the answers arrive, every time
            self._go_offline(f"Prefect server answers slower than a block ({self._late} times in a row)")
        return True

    async def _go_alone(self, bucket: Bucket, asked: float) -> bool:
        """The only sender: pace in-process, from one spacing after the slots of another run
        in the bucket have decayed (counted from now, after the read's answer: they decay
        from when the server read them), or one spacing after our own last send. An empty
        bucket needs no wait: a run that ended gave back all but a spacing after its last
        send, and a killed run's slots decayed long before its lease lapsed."""
        now = asyncio.get_running_loop().time()
        exact = SLOTS / bucket.per_second
        if not self._granted[1] or self._foreign_slots(bucket, asked):
            self._start_at = now + (bucket.active / bucket.per_second + exact if bucket.active else 0.0)
        else:
            self._start_at = max(now, self._next_at - self._spacing + exact)
        self._per_second = bucket.per_second
        self._spacing = exact * (1 + SPACING_MARGIN)
        self._covered_until = 0.0
        if not await self._take_ahead():
            return False
        log.debug("shared rate %s: the only sender on the key, pacing in this process", self.name)
        self._alone, self._leaving, self._left = True, False, 0
        return True

    async def _keep_registered(self) -> bool:
        """Hold our senders slot: register, renew every RENEW_S, register again if it lapsed.
        True while we may trust it."""
        now = asyncio.get_running_loop().time()
        if self._lease is not None and now - self._renewed_at >= RENEW_S:
            if await self._limits.renew(self._lease):
                self._renewed_at = now
            else:
                self._lease = None
        if self._lease is None:
            self._lease = await self._limits.register()
            self._renewed_at = now
        return self._trusted()

    async def _look(self) -> tuple[float, Bucket | None, int | None]:
        """When we asked, the bucket, and the count of senders (None unless our own slot
        counts in it), read together after renewing our slot if due."""
        registered = await self._keep_registered()
        asked = asyncio.get_running_loop().time()
        bucket, senders = await asyncio.gather(self._limits.read(), self._limits.senders())
        return asked, bucket, senders if registered else None

    def _trusted(self) -> bool:
        """Our slot still counts at the server: renewed (asked) less than half a lease ago."""
        return self._lease is not None and asyncio.get_running_loop().time() - self._renewed_at < LEASE_S / 2

    def _go_offline(self, why: str) -> None:
        log.warning("shared rate %s: %s; pacing in this process for %.0fs", self.name, why, OFFLINE_S)
        self._offline_until = asyncio.get_running_loop().time() + OFFLINE_S

    async def _next_block(self) -> None:
        loop = asyncio.get_running_loop()
        first = None if self._joined else await self._join()
        courtesy = HANDOVER_S if self._until else 0.0  # after our own block, let a waiting process go first
        others = False
        while True:
            (asked, bucket, senders), first = first or await self._look(), None
            if senders == 0:  # our slot is gone (the limit deleted, the server restarted)
                self._lease = None
            if bucket is not None and self._foreign_slots(bucket, asked):
                others, self._others_at = True, asked
            if bucket is None:  # deleted meanwhile
                await self._limits.create(self._believed)
                continue
            if not bucket.enabled:  # switched off in the UI: no shared limit for this key, for now
                self._offline_until = loop.time() + OFFLINE_S
                return
            if bucket.per_second <= 0 or bucket.limit < SLOTS:  # edited into something that cannot pace
                await self._limits.set(self._believed, None)
                continue
            if self._wanted is not None:
                wanted, self._wanted = self._wanted, None
                if abs(wanted - bucket.per_minute) > TOLERANCE * bucket.per_minute:
                    await self._limits.set(wanted, bucket)
                    continue
            # The strictest rate of the processes sending wins: a lower one is written at once;
            # a higher one only when nobody else has shown up for a while, so a slower rate
            # left by a stopped run (a rerun with a higher -mq) does not live on through our
            # takes, and if another process was only waiting unseen, it lowers it back.
            alone = senders == 1 or (self._quiet and asked - self._others_at >= ALONE_S)
            if self._believed < bucket.per_minute * (1 - TOLERANCE) or (alone and self._believed > bucket.per_minute * (1 + TOLERANCE)):
                await self._limits.set(self._believed, bucket)
                continue
            if senders == 1:
                if await self._go_alone(bucket, asked):
                    return
                others, self._others_at = True, loop.time()
                continue
            # Counted from when we asked: a late answer must not make us late (a 423 costs
            # nothing but another read, a late take costs the key's capacity).
            if wait := max(0.0, asked + bucket.active / bucket.per_second + courtesy - loop.time()):
                await asyncio.sleep(wait)
            courtesy = 0.0
            asked = loop.time()
            if await self._limits.take(bucket.limit):
                # The grant happened between asking and the answer, and the next holder's
                # grant comes when this block has decayed, so not before `asked` + the
                # block's length: our sends end before it. The hand-over spacing is kept by
                # whoever starts: after our own block, one spacing after our last send;
                # after someone else's, whose last send we do not know, one spacing after
                # the answer (which came after the grant, so after their last send).
                answered = loop.time()
                spacing = SLOTS / bucket.per_second * (1 + SPACING_MARGIN)
                if self._after_our_block(answered):
                    start = max(answered, self._next_at - self._spacing + max(self._spacing, spacing))
                else:
                    start = answered if self._nobody_before(answered) else answered + spacing
                self._left = bucket.requests
                self._granted = (asked, bucket.limit)
                self._per_second = bucket.per_second
                self._quiet = 0 if others else self._quiet + 1
                self._spacing = spacing
                self._until = asked + bucket.limit / bucket.per_second
                self._next_at = start  # from the answer at the earliest: a slow answer must not bunch sends
                self.blocks += 1
                self._late = self._late + 1 if self._next_at >= self._until else 0
                if self._late >= LATE_GRANTS:  # the block is over when the grant arrives, every time
                    self._go_offline(f"Prefect server answers slower than a block ({self._late} times in a row)")
                return
            others, self._others_at = True, loop.time()  # refused: another process was granted first

    def _after_our_block(self, answered: float) -> bool:
        """The block before this one was ours: granted when ours had just decayed, too soon
        for another process's block (BLOCK_S at least) to have come and gone in between."""
        when, slots = self._granted
        return bool(slots) and answered < when + slots / self._per_second + BLOCK_S / 2

    def _nobody_before(self, answered: float) -> bool:
        """Our first block, on a limit nobody had sent on for longer than a block and a
        spacing (or that we created): no last send of another process to keep apart from."""
        fresh, self._fresh_at = self._fresh_at, None
        return fresh is not None and answered < fresh + BLOCK_S / 2

    def _foreign_slots(self, bucket: Bucket, now: float) -> bool:
        """A read shows more slots than ours could still be: another run is sending on this
        key (one request's slack for the time between the server and us)."""
        when, slots = self._granted
        ours = max(0.0, slots - bucket.per_second * (now - when)) if slots else 0.0
        return bucket.active > ours + SLOTS

    async def give_back(self) -> None:
        """Free the rest of our block: a run right after this one (a rerun, the next file)
        need not wait for sends that will never be made. The slots up to one spacing after
        our last send stay, as at a hand-over, plus GIVE_BACK_SLACK for the call's way to
        the server (slots freed late would cut into that spacing)."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            try:
                await self._settle_top_up()
            except Exception:  # the slots it took decay anyway
                pass
            when, slots = self._granted
            self._left, self._granted = 0, (0.0, 0)
            held = max(loop.time(), self._next_at) + GIVE_BACK_SLACK - when
            unused = int(slots - self._per_second * held) if slots and loop.time() >= self._offline_until else 0
            try:
                if unused >= SLOTS:
                    await self._limits.give_back(unused, held)
                if self._lease is not None:
                    await self._limits.unregister(self._lease)
                await self._limits.close()
            except Exception as err:  # they decay anyway
                log.debug("shared rate %s: slots not given back (%s)", self.name, err)

    async def _join(self) -> tuple[float, Bucket | None, int | None] | None:
        """Register among the key's senders; create the key's limit, or take over a stale
        one or one nobody else sends on, or lower it to our ceiling. What was read, when
        nothing was written."""
        loop = asyncio.get_running_loop()
        self._others_at = loop.time()
        asked, bucket, senders = await self._look()
        self._joined = True
        age = _age(bucket) if bucket is not None else float("inf")
        unused_for = (bucket.limit + SLOTS * (1 + SPACING_MARGIN)) / bucket.per_second if bucket and bucket.per_second > 0 else 0.0
        if bucket is None or (unused_for and age > unused_for):  # a block and a spacing since anyone's last write
            self._fresh_at = loop.time()
        if bucket is None:
            await self._limits.create(self._own)
        elif age > STALE_S or bucket.per_minute > self._own * (1 + TOLERANCE):
            await self._limits.set(self._own, bucket)
        elif bucket.per_minute < self._own * (1 - TOLERANCE) and senders == 1:
            # A slower rate nobody sends on: a finished run's (a rerun with a higher -mq).
            await self._limits.set(self._own, bucket)
        else:
            return asked, bucket, senders
        return None


def _holder():
    """Our flow run, shown in the UI as the holder of our senders slot."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    return ConcurrencyLeaseHolder(type="flow_run", id=context.flow_run.id)


def _age(bucket: Bucket) -> float:
    if bucket.updated is None:
        return float("inf")
    return (datetime.now(timezone.utc) - bucket.updated).total_seconds()


def reporting_to_a_server() -> bool:
    """This code runs in a Prefect flow run that reports to a server other processes can
    see (PREFECT_API_URL set: not a temporary server, not the plain Python API).

    A process that never imported Prefect is in no flow run; asking would import it, 1-3 s
    at the start of every queue of the plain Python API."""
    if "prefect" not in sys.modules:
        return False
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import PREFECT_API_URL

    in_a_run = FlowRunContext.get() is not None or TaskRunContext.get() is not None
    return in_a_run and bool(PREFECT_API_URL.value())


def shared_rate_for(api: str, model: str, credentials: Mapping[str, str], per_minute: float) -> GlobalRate | None:
    """The shared rate of this model and key, or None when there is no server to share it."""
    if not reporting_to_a_server():
        return None
    return GlobalRate(PrefectLimits(limit_name(api, model, credentials, machine_salt())), per_minute)


def limit_name(api: str, model: str, credentials: Mapping[str, str], salt: bytes) -> str:
    """`promptfleet-rate:<api>:<model>:<fingerprint>`, readable in the UI, no secret in it."""
    return f"{PREFIX}:{_slug(api)}:{_slug(model)}:{fingerprint(credentials, salt)}"


def fingerprint(credentials: Mapping[str, str], salt: bytes) -> str:
    """A keyed hash of the credentials: equal keys meet, a leaked name reveals nothing."""
    data = "\n".join(f"{k}={v}" for k, v in sorted(credentials.items())).encode()
    return hmac.new(salt, data, hashlib.sha256).hexdigest()[:24]


def machine_salt(home: Path | None = None) -> bytes:
    """`PROMPTFLEET_RATE_SALT`, else a random salt created once under PREFECT_HOME (0600)."""
    if value := os.environ.get(SALT_ENV):
        return value.encode()
    if home is None:
        from prefect.settings import PREFECT_HOME

        home = Path(PREFECT_HOME.value())
    path = home / SALT_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        tmp = home / f".{SALT_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # atomic: two processes starting at once end with one salt
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    salt = path.read_text().strip()
    if len(salt) < 32:
        raise RuntimeError(f"{path} does not hold a salt; delete it to make a new one")
    return salt.encode()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "-"
