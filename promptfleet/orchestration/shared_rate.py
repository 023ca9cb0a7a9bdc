"""One request rate per API key, shared by every promptfleet process that reports to the
same Prefect server: runs, workers and machines on one key together stay under its limit.

The bucket is a Prefect global concurrency limit with slot decay, one per (api, model,
credentials): `slot_decay_per_second` is the key's rate (SLOTS slots per request) and
`limit` one block of BLOCK_S seconds of sends. A process takes the whole bucket at once, so
a take succeeds only once the bucket has decayed to empty: blocks never overlap, and a
queue makes one or two server calls a block, never one per request. The Pacer's schedule
places the sends inside the block this process holds (one clock per send).

Why every second stays under the key's limit: a block granted at g decays at g + N/r (N
requests at rate r). The holder sends from the grant's answer (after g) until asked + N/r,
asked being when it asked (before g), which is before the next grant can come. The next
holder, if another process, starts one spacing after its grant's answer (which came after
the grant, so after the last holder's last send); after its own block, its schedule keeps
the spacing from its own last send. So a hand-over is spaced like the sends within a block,
whatever the server's latency. A send woken after its block (a busy event loop) waits for
a block of its own. Blocks alternate between processes by themselves: a waiting process
has read the bucket and asks the moment it has decayed, while the holder starts to read
only when its block ends.

Why not `prefect.concurrency.asyncio.rate_limit()`: on a 423 it sleeps the server's
`Retry-After`, a random interval around a whole block's decay time, so a process that
lost one race waits about a block for nothing while the bucket refills unused (measured
here: two processes together got 8.4/s of a 10/s limit). Here a process reads the bucket
first (a read changes nothing), sleeps until it has decayed, and asks then.

The rate is the lowest of the limits of the runs sending on the key (their `-mq`, lowered
by a limit the provider states). Each run states its limit in a second global limit, the
floor (`<name>:floor`): its `limit` is the lowest stated rate per minute, and its slots
count down over LIFE_S (they decay), renewed every RENEW_S by the run whose limit it is. A
lower limit replaces it at once; a run that ends lets it lapse at once, a killed run
after LIFE_S, and the next run's limit takes its place. The bucket's decay follows the
floor at the next block.

The limit's name carries a keyed fingerprint of the credentials (HMAC-SHA256), never the
key or a plain hash of it: names are shown in the UI and the API. The salt is created once
on the server itself (a Prefect Variable: the first process to create it wins, the others
read it), so every process that reports to the same server meets on the same name with no
setting; `PROMPTFLEET_RATE_SALT` overrides it.

Without a Prefect server (no `PREFECT_API_URL`, a temporary server, or the plain Python
API, which reports nothing) there is nothing to share and pacing stays in-process; when
the server stops answering mid-run, or answers slower than a block lasts, the queue goes
on at the last rate it knew and asks the server again OFFLINE_S later.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("promptfleet.orchestration.shared_rate")

SALT_ENV = "PROMPTFLEET_RATE_SALT"
SALT_VARIABLE = "promptfleet-rate-salt"
PREFIX = "promptfleet-rate"
SLOTS = 100  # slots per request: Prefect decays and reports whole slots, so a slot is a fine grain
BLOCK_S = 2.0  # a block holds this many seconds of sends
MIN_BLOCK = 20  # requests: a hand-over to another process costs one spacing, under 5% of a block
LIFE_S = 10.0  # a stated limit lapses this long after its last renewal (its run killed)
RENEW_S = 2.0  # the run whose limit is the floor renews it this often
TOLERANCE = 0.02  # rates this close are the same rate
OFFLINE_S = 30.0  # after a server error, pace in-process this long before asking again
LATE_GRANTS = 3  # grants in a row that arrive after their block: the server is too slow to share through
GIVE_BACK_SLACK = 0.1  # slots kept after the last send, for the time a give-back takes to reach the server
# Sharing with another process, sends are spaced 2% wider than the key's rate: two clocks and
# two ways to the provider add their jitter, and a send arriving 20 ms late (2% of a second)
# must not make a later one the second's rate+1st. Measured on a busy 2-core box with two
# workers at exactly a 10/s key: 5-6 429s in 240 requests without it, 0-1 with it. Alone,
# the Pacer keeps every second at the rate itself.
SHARED_MARGIN = 0.02
MET_BLOCKS = 3  # another process seen on the key within this many blocks (SHARING_S at least): sharing
SHARING_S = 10.0


@dataclass(frozen=True)
class Bucket:
    """A global concurrency limit as read: `active` slots left after decay."""

    limit: int
    per_second: float
    active: int
    enabled: bool = True

    @property
    def per_minute(self) -> float:
        return self.per_second * 60 / SLOTS


@dataclass(frozen=True)
class Floor:
    """The lowest limit stated for a key, and whether its run still renews it."""

    per_minute: float
    alive: bool


def block_for(per_minute: float) -> int:
    """Requests in one block: BLOCK_S seconds' worth, at least MIN_BLOCK."""
    return max(MIN_BLOCK, round(per_minute / 60 * BLOCK_S))


class PrefectLimits:
    """The calls made on one key's two global concurrency limits, through a Prefect client
    of its own (opened at the first call, closed by `close`) whose transport asks again at
    once when the server is busy (prefect_transport.py)."""

    def __init__(self) -> None:
        self.name = ""
        self._client = None

    async def open(self, api: str, model: str, credentials: Mapping[str, str]) -> None:
        """Name the key's limits, with the salt of the server (created by the first process)."""
        if not (salt := os.environ.get(SALT_ENV, "")):
            from prefect.client.schemas.actions import VariableCreate
            from prefect.exceptions import ObjectAlreadyExists

            variable = await self._call(lambda client: client.read_variable_by_name(SALT_VARIABLE))
            if variable is None:
                try:
                    spec = VariableCreate(name=SALT_VARIABLE, value=secrets.token_hex(32))
                    variable = await self._call(lambda client: client.create_variable(spec))
                except ObjectAlreadyExists:  # another process was first: its salt is the one
                    variable = await self._call(lambda client: client.read_variable_by_name(SALT_VARIABLE))
            salt = str(variable.value) if variable is not None else ""
            if len(salt) < 32:
                raise RuntimeError(f"the Prefect variable {SALT_VARIABLE!r} does not hold a salt; delete it to make a new one")
        self.name = limit_name(api, model, credentials, salt.encode())

    async def read(self) -> Bucket | None:
        gcl = await self._read(self.name)
        return None if gcl is None else Bucket(gcl.limit, gcl.slot_decay_per_second, gcl.active_slots, gcl.active)

    async def create(self, per_minute: float) -> None:
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.exceptions import ObjectAlreadyExists

        spec = GlobalConcurrencyLimitCreate(name=self.name, limit=block_for(per_minute) * SLOTS, slot_decay_per_second=per_minute / 60 * SLOTS)
        try:
            await self._call(lambda client: client.create_global_concurrency_limit(spec))
        except ObjectAlreadyExists:
            pass  # another process was first: its limit is the shared one

    async def set(self, per_minute: float, active: int) -> None:
        """Change the rate, with the slots in use. They are always written: the server
        stores slots as of the last write and decays them from `updated`, which an update
        moves to now, so slots that had long decayed would count again in full. Written by
        the holder of a block right after its grant, or on a bucket nobody can take (edited
        into something that cannot pace): no take can come between the read and the write
        and be written over."""
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        spec = GlobalConcurrencyLimitUpdate(limit=block_for(per_minute) * SLOTS, slot_decay_per_second=per_minute / 60 * SLOTS, active_slots=active)
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

    async def read_floor(self) -> Floor | None:
        gcl = await self._read(f"{self.name}:floor")
        return None if gcl is None else Floor(float(gcl.limit), gcl.active_slots > 0)

    async def write_floor(self, per_minute: float, alive: bool = True) -> None:
        """State `per_minute` as the key's lowest limit for LIFE_S more (or let it lapse):
        its slots, all of them, decay over LIFE_S."""
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
        from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

        limit = max(1, round(per_minute))
        fields = dict(limit=limit, slot_decay_per_second=limit / LIFE_S, active_slots=limit if alive else 0)
        name = f"{self.name}:floor"
        try:
            await self._call(lambda client: client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(**fields)))
        except ObjectNotFound:
            try:
                await self._call(lambda client: client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, **fields)))
            except ObjectAlreadyExists:  # made meanwhile: write it as an update
                await self._call(lambda client: client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(**fields)))

    async def _read(self, name: str):
        from prefect.exceptions import ObjectNotFound

        try:
            return await self._call(lambda client: client.read_global_concurrency_limit_by_name(name))
        except ObjectNotFound:
            return None

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
    """A SharedRate (core/limiter.py) on a Prefect global concurrency limit, taken in blocks."""

    def __init__(self, limits: PrefectLimits, api: str, model: str, credentials: Mapping[str, str], per_minute: float):
        self._limits = limits
        self._key = (api, model, dict(credentials))
        self._own = per_minute  # this run's limit for the key
        self._floor = per_minute  # the key's lowest stated limit, as last read
        self._start = self._until = float("-inf")  # the block we hold: its first send time, its end
        self._latest_end = float("-inf")  # the latest its slots can last (counted from the grant's answer)
        self._sharing_until = float("-inf")  # another process seen on the key (its slots, or a take it won): sharing until then
        self._decay = 0.0  # its slots' decay per second
        self._sent_at = float("-inf")  # our last send
        self._offline_until = float("-inf")
        self._late = 0  # grants in a row that arrived too late to use
        self._keeper: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self._limits.name

    @property
    def per_minute(self) -> float:
        """The key's rate: the floor as last read, SHARED_MARGIN under it while another
        process sends on the key. It governs sends within a block too: the block is ours
        alone, its length set by the bucket's rate when it was granted."""
        sharing = asyncio.get_running_loop().time() < self._sharing_until
        return self._floor * (1 - SHARED_MARGIN) if sharing else self._floor

    def admit(self, turn: float) -> float | None:
        if asyncio.get_running_loop().time() < self._offline_until:
            return turn
        start = max(turn, self._start)
        if start >= self._until:
            return None
        self._sent_at = max(self._sent_at, start)
        return start

    def holds(self, moment: float) -> bool:
        return moment < self._offline_until or moment < self._until

    def state(self, per_minute: float) -> None:
        self._own = min(self._own, per_minute)  # written to the floor by the keeper

    async def next_block(self, turn: float) -> None:
        async with self._lock:  # one block request at a time; the other sends wait for it
            if self.admit(turn) is not None:
                return  # taken meanwhile
            loop = asyncio.get_running_loop()
            if turn > loop.time():  # a slow queue: a block taken now would end before its turn
                await asyncio.sleep(turn - loop.time())
            try:
                if self._keeper is None:
                    await self._join()
                await self._take_block()
            except Exception as err:  # the server is down or answers garbage: keep sending at our own pace
                self._go_offline(f"Prefect server unavailable ({err})")

    async def _join(self) -> None:
        """Name the limits, state our limit, and keep stating it while we send. A run that
        just joined counts as sharing until it has seen nobody else for a while: another
        process between two blocks leaves no trace in the bucket."""
        self._sharing_until = asyncio.get_running_loop().time() + SHARING_S
        await self._limits.open(*self._key)
        await self._state_limit()
        self._keeper = asyncio.create_task(self._keep_stating())

    async def _keep_stating(self) -> None:
        while True:
            await asyncio.sleep(RENEW_S)
            try:
                await self._state_limit()
            except Exception as err:  # the blocks notice too; the floor lapses, which is slower, never faster
                log.debug("shared rate %s: limit not stated (%s)", self.name, err)

    async def _state_limit(self) -> None:
        """Lower the floor to our limit, renew it when it is ours, take it over when it
        lapsed. Two runs writing at once: the last write wins, so a write is read back, and
        a slower run whose limit was written over writes it again."""
        for _ in range(3):
            floor = await self._limits.read_floor()
            if floor is not None and floor.alive and self._own > floor.per_minute * (1 + TOLERANCE):
                self._floor = floor.per_minute  # a slower run's, still sending
                return
            if floor is not None and floor.alive and self._own >= floor.per_minute * (1 - TOLERANCE):
                await self._limits.write_floor(floor.per_minute)  # ours (or the same as ours): renewed
                self._floor = floor.per_minute
                return
            await self._limits.write_floor(self._own)  # lower than the floor, or the floor lapsed
            self._floor = self._own

    async def _take_block(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            bucket = await self._limits.read()
            if bucket is None:  # the first run on the key, or the limit was deleted
                await self._limits.create(self._floor)
                continue
            if not bucket.enabled:  # switched off in the UI: no shared limit for this key, for now
                self._offline_until = loop.time() + OFFLINE_S
                return
            if bucket.per_second <= 0 or bucket.limit < MIN_BLOCK * SLOTS:  # edited into something that cannot pace
                await self._limits.set(self._floor, 0)
                continue
            length = bucket.limit / bucket.per_second
            met = asked + max(SHARING_S, MET_BLOCKS * length)
            if bucket.active > max(0.0, self._latest_end - asked) * bucket.per_second + SLOTS:
                self._sharing_until = met  # more slots than ours can be
            # Counted from when we asked: a late answer must not make us late (a 423 costs
            # nothing but another read, a late take costs the key's capacity).
            wait = max(0.0, asked + bucket.active / bucket.per_second - loop.time())
            if wait > RENEW_S:  # a long block of another run: look again meanwhile (it may end early, the floor may move)
                await asyncio.sleep(RENEW_S)
                continue
            await asyncio.sleep(wait)
            asked = loop.time()
            if not await self._limits.take(bucket.limit):
                self._sharing_until = met  # another process was granted first
                continue
            answered = loop.time()
            # No block of another process (at least `length` long) fits between our last one
            # and this grant: ours was the last, and our schedule keeps its spacing.
            after_ours = answered < self._until + length
            self._start = answered if after_ours else answered + SLOTS / bucket.per_second
            self._until, self._decay, self._latest_end = asked + length, bucket.per_second, answered + length
            self._late = self._late + 1 if self._start >= self._until else 0
            if self._late >= LATE_GRANTS:  # the block is over when the grant arrives, every time
                self._go_offline(f"Prefect server answers slower than a block ({self._late} times in a row)")
            elif abs(bucket.per_minute - self._floor) > TOLERANCE * self._floor:
                # The floor moved: the next blocks at its rate. Ours keeps the time it has left.
                self._decay = self._floor / 60 * SLOTS
                await self._limits.set(self._floor, max(0, round((self._until - loop.time()) * self._decay)))
            return

    def _go_offline(self, why: str) -> None:
        log.warning("shared rate %s: %s; pacing in this process for %.0fs", self.name, why, OFFLINE_S)
        self._offline_until = asyncio.get_running_loop().time() + OFFLINE_S

    async def close(self) -> None:
        """Free the rest of our block, so a run right after this one (a rerun, the next
        file) need not wait for sends that will never be made: all but GIVE_BACK_SLACK
        after our last send, for the call's way to the server (the next holder's first
        send is a spacing after its grant). Let our stated limit lapse, so the key's rate
        follows the runs still sending."""
        async with self._lock:
            if self._keeper is None:  # never joined: nothing to free
                await self._limits.close()
                return
            self._keeper.cancel()
            loop = asyncio.get_running_loop()
            keep = max(loop.time(), self._sent_at) + GIVE_BACK_SLACK  # the next holder adds a spacing after its grant
            unused = int((self._until - keep) * self._decay)
            held = keep - self._start
            self._start = self._until = float("-inf")
            try:
                if unused > 0 and loop.time() >= self._offline_until:
                    await self._limits.give_back(unused, held)
                floor = await self._limits.read_floor()
                if floor is not None and floor.alive and abs(floor.per_minute - self._own) <= TOLERANCE * self._own:
                    await self._limits.write_floor(floor.per_minute, alive=False)
            except Exception as err:  # they lapse anyway
                log.debug("shared rate %s: not given back (%s)", self.name, err)
            finally:
                await self._limits.close()


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
    return GlobalRate(PrefectLimits(), api, model, credentials, per_minute)


def limit_name(api: str, model: str, credentials: Mapping[str, str], salt: bytes) -> str:
    """`promptfleet-rate:<api>:<model>:<fingerprint>`, readable in the UI, no secret in it."""
    return f"{PREFIX}:{_slug(api)}:{_slug(model)}:{fingerprint(credentials, salt)}"


def fingerprint(credentials: Mapping[str, str], salt: bytes) -> str:
    """A keyed hash of the credentials: equal keys meet, a leaked name reveals nothing."""
    data = "\n".join(f"{k}={v}" for k, v in sorted(credentials.items())).encode()
    return hmac.new(salt, data, hashlib.sha256).hexdigest()[:24]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "-"
