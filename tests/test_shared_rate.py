"""A key's rate shared across processes: blocks of a Prefect global concurrency limit, at
the lowest limit of the runs sending on the key.

The schedules run on a virtual clock (tests/virtual_loop.py) against FakeLimits, the two
limits of a key as Prefect's server keeps them; the tests at the end hold that model and
the names to a real server.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import random
import time

import pytest

from promptfleet.orchestration import shared_rate
from promptfleet.core.limiter import Pacer, PacerPool
from promptfleet.orchestration.shared_rate import SLOTS, Bucket, Floor, GlobalRate, PrefectLimits, block_for, fingerprint, limit_name, shared_rate_for
from tests.fakes import FakeServer
from tests.virtual_loop import VirtualLoop

KEY = "sk-shared-secret-0123456789"


class FakeLimits:
    """A key's bucket and floor as Prefect's server keeps them, on the loop's clock: slots
    decay in whole slots from the last write, a refused take changes nothing. Every call
    answers after `latency`, the server acting halfway."""

    def __init__(self, latency: float = 0.01):
        self.latency, self.name = latency, ""
        self.limits: dict[str, list[float]] = {}  # name -> [limit, slots per second, active, written]
        self.grants: list[float] = []
        self.calls = 0

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _active(self, name: str) -> int:
        limit, per_second, active, written = self.limits[name]
        return max(0, int(active) - math.floor(per_second * (self._now() - written)))

    async def _at_server(self, act):
        self.calls += 1
        await asyncio.sleep(self.latency / 2)
        result = act()
        await asyncio.sleep(self.latency / 2)
        return result

    async def open(self, api: str, model: str, credentials) -> None:
        self.name = limit_name(api, model, credentials, b"s" * 64)

    async def read(self) -> Bucket | None:
        return await self._at_server(lambda: Bucket(int(self.limits[self.name][0]), self.limits[self.name][1], self._active(self.name)) if self.name in self.limits else None)

    async def create(self, per_minute: float) -> None:
        await self._at_server(lambda: self.limits.setdefault(self.name, [block_for(per_minute) * SLOTS, per_minute / 60 * SLOTS, 0, self._now()]))

    async def set(self, per_minute: float, active: int) -> None:
        await self._at_server(lambda: self.limits.__setitem__(self.name, [block_for(per_minute) * SLOTS, per_minute / 60 * SLOTS, active, self._now()]))

    async def take(self, slots: int) -> bool:
        def take() -> bool:
            free = self._active(self.name) + slots <= self.limits[self.name][0]
            if free:
                self.limits[self.name][2:] = [self._active(self.name) + slots, self._now()]
                self.grants.append(self._now())
            return free

        return await self._at_server(take)

    async def give_back(self, slots: int, held: float) -> None:
        await self._at_server(lambda: self.limits[self.name].__setitem__(slice(2, 4), [max(0, self._active(self.name) - slots), self._now()]))

    async def read_floor(self) -> Floor | None:
        name = f"{self.name}:floor"
        return await self._at_server(lambda: Floor(self.limits[name][0], self._active(name) > 0) if name in self.limits else None)

    async def write_floor(self, per_minute: float, alive: bool = True) -> None:
        limit = max(1, round(per_minute))
        await self._at_server(lambda: self.limits.__setitem__(f"{self.name}:floor", [limit, limit / shared_rate.LIFE_S, limit if alive else 0, self._now()]))

    async def close(self) -> None:
        pass

    @property
    def per_minute(self) -> float:
        return self.limits[self.name][1] * 60 / SLOTS


def rate_on(limits: FakeLimits, per_minute: float) -> GlobalRate:
    return GlobalRate(limits, "test", "m", {"K": "v"}, per_minute)


async def sends(rate: GlobalRate, per_minute: float, until: float, times: list[float], lag=lambda: 0.0, close: bool = True) -> None:
    """A queue told `per_minute`, sending until `until`; each send reaches the provider
    `lag()` seconds after it leaves."""
    loop = asyncio.get_running_loop()
    pacer = Pacer(per_minute, shared=rate)
    while loop.time() < until:
        await pacer.pace()
        times.append(loop.time() + lag())
    if close:
        await rate.close()


def most_in_a_second(times: list[float]) -> int:
    """Most sends in any one-second window. A microsecond is forgiven: sends spaced exactly
    1/rate add up, in floating point, to a hair less than a second."""
    times = sorted(times)
    return max(bisect.bisect_left(times, t + 1.0 - 1e-6) - i for i, t in enumerate(times))


# -- blocks on a virtual clock --------------------------------------------------------------


@pytest.mark.parametrize("per_minute", [180, 2000])
def test_alone_on_a_key_a_run_sends_at_its_full_rate(per_minute: int):
    """One run alone on its key loses only the server's round trips between its blocks (a
    read and a take each, 20 ms every 2 s or 20 requests here) and, in its first 10 s, the
    2% of a run that does not know yet whether it is alone: about two calls a second, never
    one per request, and never over the rate in any second."""
    limits = FakeLimits()
    times: list[float] = []
    VirtualLoop().run(sends(rate_on(limits, per_minute), per_minute, 60.0, times))
    assert len(times) >= 0.98 * per_minute
    assert most_in_a_second(times) <= math.ceil(per_minute / 60)
    assert limits.calls <= 3 * 60


@pytest.mark.parametrize("per_second", [3, 20, 200])
def test_two_runs_on_one_key_share_it_in_alternating_blocks(per_second: int):
    """Two processes on one key, the server answering in 10 ms: once they have met (the first
    hand-over), no second ever holds more than the key's limit at the provider, even with
    every request arriving up to 15 ms late; blocks alternate, and together they keep at
    least 93% of it."""
    limits = FakeLimits()
    a, b = rate_on(limits, per_second * 60), rate_on(limits, per_second * 60)
    times_a: list[float] = []
    times_b: list[float] = []
    jitter = random.Random(7)
    late = lambda: jitter.uniform(0, 0.015)  # noqa: E731

    async def both() -> None:
        await asyncio.gather(sends(a, per_second * 60, 60.0, times_a, late), sends(b, per_second * 60, 60.0, times_b, late))

    VirtualLoop().run(both())
    together = times_a + times_b
    met = max(min(times_a), min(times_b))  # the first hand-over: the first holder met the other
    assert most_in_a_second([t for t in together if t >= met]) <= per_second
    assert len(together) >= 0.93 * per_second * 60
    assert len(times_a) > 0.4 * len(together) and len(times_b) > 0.4 * len(together)


def test_a_send_woken_after_its_block_waits_for_a_block_of_its_own():
    """The event loop stalls for 3 s while a send waits for its turn near a block's end (a
    busy process): it is not sent late, into a time another process may hold, but after a
    block of its own."""
    limits = FakeLimits()

    async def scenario() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        pacer = Pacer(1200, shared=rate_on(limits, 1200))
        await pacer.pace()
        granted = len(limits.grants)

        async def stall() -> None:
            await asyncio.sleep(0.01)
            loop.now += 3.0  # every timer due meanwhile fires 3 s late

        asyncio.ensure_future(stall())
        await pacer.pace()
        return len(limits.grants) - granted, loop.time() - limits.grants[-1]

    new_grants, after_grant = VirtualLoop().run(scenario())
    assert new_grants == 1 and after_grant > 0


def test_the_lowest_limit_of_the_runs_sending_holds_the_key_and_follows_them():
    """Runs told 60 and 600/min on one key: while the slower one sends, the key stays at
    60/min for both together; once it has ended, the other takes its 600/min within a
    renewal and a block, not a finished run's 60 for the rest of its life."""
    limits = FakeLimits()
    slow, fast = rate_on(limits, 60), rate_on(limits, 600)
    times_slow: list[float] = []
    times_fast: list[float] = []

    async def slow_then_time() -> float:
        await sends(slow, 60, 60.0, times_slow)
        return asyncio.get_running_loop().time()

    async def scenario() -> float:
        ended, _ = await asyncio.gather(slow_then_time(), sends(fast, 600, 120.0, times_fast))
        return ended

    ended = VirtualLoop().run(scenario())
    while_both = [t for t in times_slow + times_fast if t < ended]
    assert len(while_both) <= ended + shared_rate.MIN_BLOCK  # 60/min, plus a block of the faster run at the start (both state their limits at once)
    assert [t for t in times_fast if t < ended]  # the faster run got its share
    followed = ended + 2 * shared_rate.RENEW_S + shared_rate.BLOCK_S  # the slower run's limit lapsed, and the faster one looked again
    after = [t for t in times_fast if followed <= t < 120]
    assert len(after) >= 0.95 * 10 * (120 - followed)
    assert most_in_a_second(after) <= 10


def test_a_rerun_with_a_higher_rate_right_after_a_slower_run_sends_at_its_rate():
    """-mq 60, finished; the same file again with -mq 600: 10/s from its start. (Once a
    finished run's 60/min held the key: 150 prompts took 138 s instead of 18.6 s.)"""
    limits = FakeLimits()
    times: list[float] = []

    async def scenario() -> None:
        await sends(rate_on(limits, 60), 60, 5.0, [])
        await sends(rate_on(limits, 600), 600, 25.0, times)

    VirtualLoop().run(scenario())
    assert times[0] < 5 + 1 + 2 * shared_rate.BLOCK_S  # a spacing at 60/min after the last send (1 s), and the join
    assert len(times) >= 0.95 * 10 * (25 - times[0])
    assert most_in_a_second(times) <= 10


def test_a_killed_runs_limit_lapses_and_the_key_follows_the_runs_left():
    """A run told 60/min is killed (nothing given back, its limit not withdrawn): the run
    left is held to 60/min until the stated limit lapses (LIFE_S), then sends at 600."""
    limits = FakeLimits()
    times: list[float] = []

    async def scenario() -> None:
        killed = rate_on(limits, 60)
        asyncio.ensure_future(sends(killed, 60, 1000.0, [], close=False))
        await asyncio.sleep(5.0)
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()  # the process is gone, and its tasks with it
        await sends(rate_on(limits, 600), 600, 60.0, times)

    VirtualLoop().run(scenario())
    lapsed = 5.0 + shared_rate.LIFE_S + shared_rate.RENEW_S + 2 * shared_rate.BLOCK_S
    assert len([t for t in times if t < 5.0 + shared_rate.LIFE_S]) <= shared_rate.LIFE_S + 2 * shared_rate.MIN_BLOCK
    assert len([t for t in times if lapsed <= t < 60]) >= 0.95 * 10 * (60 - lapsed)


def test_a_limit_a_provider_states_is_shared_with_every_run_on_the_key():
    """One run reads `x-ratelimit-limit-requests: 300`; the other never sees the header but
    is held to it too (2% under the stated limit) once the limit is stated and read."""
    limits = FakeLimits()
    a, b = rate_on(limits, 1200), rate_on(limits, 1200)
    times_b: list[float] = []

    async def scenario() -> None:
        pacer = Pacer(1200, shared=a)
        await pacer.pace()
        pacer.on_success(1, {"x-ratelimit-limit-requests": "300"})
        told = asyncio.ensure_future(sends(a, 1200, 30.0, []))
        await sends(b, 1200, 30.0, times_b)
        await told

    VirtualLoop().run(scenario())
    held = [t for t in times_b if 8 < t < 26]
    assert held and most_in_a_second(held) <= 5


def test_a_run_that_ends_gives_back_its_block_and_the_next_one_starts_at_once():
    """A run sends 3 requests of a 20-request block and ends; the next run on the key (the
    same command again) starts a spacing and the give-back's slack later, not after the
    2 s the unused block would take to decay."""
    limits = FakeLimits()
    first: list[float] = []
    again: list[float] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        rate = rate_on(limits, 600)
        pacer = Pacer(600, shared=rate)
        for _ in range(3):
            await pacer.pace()
            first.append(loop.time())
        await rate.close()
        await sends(rate_on(limits, 600), 600, loop.time() + 3.0, again)

    VirtualLoop().run(scenario())
    assert 0.1 <= again[0] - first[-1] < 0.1 + shared_rate.GIVE_BACK_SLACK + 0.1
    assert most_in_a_second(first + again) <= 10


def test_the_last_queue_of_a_shared_pacer_closes_its_rate():
    limits = FakeLimits()

    async def scenario() -> None:
        pool = PacerPool()
        async with pool.pacer(("test", "m", "key"), 600, shared=lambda: rate_on(limits, 600)) as first:
            async with pool.pacer(("test", "m", "key"), 600, shared=lambda: pytest.fail("one rate per pacer")):
                await first.pace()
            assert (await limits.read_floor()).alive  # one queue still sends on it
        assert not (await limits.read_floor()).alive

    VirtualLoop().run(scenario())


def test_a_server_slower_than_a_block_leaves_pacing_in_process(warnings_of_shared_rate):
    """Every grant arrives after its block has decayed (a server answering in 2.5 s,
    blocks of 2 s): nothing is sent on those grants, and after a few the queue paces on its
    own, at the key's rate."""
    limits = FakeLimits(latency=2.5)
    times: list[float] = []
    VirtualLoop().run(sends(rate_on(limits, 1200), 1200, 40.0, times, close=False))
    assert len(limits.grants) == shared_rate.LATE_GRANTS
    assert len([t for t in times if 31 <= t < 39]) >= 0.95 * 20 * 8
    [warning] = warnings_of_shared_rate()
    assert "slower than a block" in warning


@pytest.fixture
def warnings_of_shared_rate(caplog):
    """Prefect's logging setup may disable or detach loggers it does not know (the CLI names
    `promptfleet` to it): listen on the logger itself."""
    logger = logging.getLogger("promptfleet.orchestration.shared_rate")
    logger.disabled = False
    logger.addHandler(caplog.handler)
    seen = lambda: {id(r): r for r in caplog.records if r.name == logger.name and r.levelno >= logging.WARNING}  # noqa: E731
    yield lambda: [r.getMessage() for r in seen().values()]
    logger.removeHandler(caplog.handler)


# -- names: a keyed fingerprint, never the key ---------------------------------------------


def test_limit_name_hides_the_key_and_depends_on_the_salt():
    import hashlib

    creds = {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    name = limit_name("openai", "ft:gpt-4o/mini tuned", creds, b"s" * 64)
    assert name.startswith("promptfleet-rate:openai:ft-gpt-4o-mini-tuned:")
    assert KEY not in name and "sk-" not in name and "/" not in name
    plain = {hashlib.sha256(v.encode()).hexdigest()[:24] for v in (KEY, repr(sorted(creds.items())))}
    assert name.rsplit(":", 1)[1] not in plain  # not an unsalted hash either
    assert fingerprint(creds, b"s" * 64) != fingerprint(creds, b"t" * 64)
    assert fingerprint(creds, b"s" * 64) != fingerprint({**creds, "OPENAI_API_KEY": KEY + "x"}, b"s" * 64)


# -- a real Prefect server -------------------------------------------------------------------


def api_url(url: str):
    """Prefect reads its settings once per context: change them through a settings context."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: url})


async def test_every_process_on_a_server_meets_on_one_name_with_no_setting(prefect_api: str, monkeypatch):
    """Processes with their own PREFECT_HOME (as on two machines) opening a key's limits at
    the same moment: one salt is created on the server, and all name the key alike;
    PROMPTFLEET_RATE_SALT still overrides it."""
    monkeypatch.delenv(shared_rate.SALT_ENV, raising=False)
    creds = {"OPENAI_API_KEY": KEY}
    opened = [PrefectLimits() for _ in range(4)]
    await asyncio.gather(*(limits.open("openai", "gpt", creds) for limits in opened))
    assert len({limits.name for limits in opened}) == 1 and KEY not in opened[0].name
    other = PrefectLimits()
    await other.open("openai", "gpt", {"OPENAI_API_KEY": KEY + "x"})
    assert other.name != opened[0].name
    monkeypatch.setenv(shared_rate.SALT_ENV, "a-salt-shared-by-every-machine-of-the-group")
    overridden = PrefectLimits()
    await overridden.open("openai", "gpt", creds)
    assert overridden.name == limit_name("openai", "gpt", creds, b"a-salt-shared-by-every-machine-of-the-group")
    for limits in (*opened, other, overridden):
        await limits.close()


def test_only_flow_runs_reporting_to_a_server_share(prefect_api: str):
    from prefect import flow

    @flow
    def shares() -> bool:
        return shared_rate_for("openai", "gpt", {"OPENAI_API_KEY": KEY}, 600) is not None

    @flow
    def shares_without_an_api_url() -> bool:
        with api_url(""):  # as in a run on Prefect's own temporary server
            return shared_rate_for("openai", "gpt", {"OPENAI_API_KEY": KEY}, 600) is not None

    assert shares()  # a flow run on the server
    assert shared_rate_for("openai", "gpt", {"OPENAI_API_KEY": KEY}, 600) is None  # the plain Python API
    assert not shares_without_an_api_url()  # nobody else to share with


async def test_two_rates_share_a_key_through_a_real_server(prefect_api: str):
    """The model above, held to Prefect's server: two rates on one key (10/s) for 3 s send
    about 10/s together, never more in any second but for a hand-over's latency, in a few
    server calls; the key's floor and bucket are where the UI shows them."""
    creds = {"K": str(random.random())}
    a, b = GlobalRate(PrefectLimits(), "test", "real", creds, 600), GlobalRate(PrefectLimits(), "test", "real", creds, 600)
    times_a: list[float] = []
    times_b: list[float] = []
    started = time.monotonic()

    async def queue(rate: GlobalRate, times: list[float]) -> None:
        pacer = Pacer(600, shared=rate)
        while time.monotonic() < started + 3.0:
            await pacer.pace()
            times.append(time.monotonic())

    await asyncio.gather(queue(a, times_a), queue(b, times_b))
    names = PrefectLimits()
    await names.open("test", "real", creds)
    bucket, floor = await names.read(), await names.read_floor()
    await asyncio.gather(a.close(), b.close())
    assert bucket is not None and bucket.per_minute == pytest.approx(600) and floor == Floor(600, True)
    assert not (await names.read_floor()).alive  # both ended: nobody holds the key's rate down
    await names.close()
    together = times_a + times_b
    assert 10 * 3 / 3 <= len(together) <= 10 * 3 + 1 and times_a and times_b
    assert most_in_a_second(together) <= 10 + 1


async def test_a_rate_change_does_not_bring_decayed_slots_back(prefect_api: str):
    """The server keeps slots as of the limit's last write and decays them from its
    `updated` time, which any update moves to now: a change that did not write the slots
    would restore long-decayed ones in full, and the next block would wait for them."""
    limits = PrefectLimits()
    await limits.open("test", "rebase", {"K": str(random.random())})
    await limits.create(60_000)  # 100,000 slots a second decay
    assert await limits.take(SLOTS)  # one request's slots, decayed a millisecond later
    decayed = await limits.read()
    assert decayed is not None and decayed.active == 0
    await limits.set(6, decayed.active)  # 10 slots a second: 100 stale slots would take 10 s to decay
    bucket = await limits.read()
    assert bucket is not None and bucket.per_minute == pytest.approx(6) and bucket.active == 0
    await limits.close()


class BusyPrefect:
    """A proxy in front of a real Prefect server that answers its first `busy` slot takes
    503, as Prefect's SQLite server does when a write meets another (SQLITE_BUSY)."""

    def __init__(self, api: str, busy: int):
        import http.server
        import threading

        import httpx

        proxy = self
        self.busy, self.takes = busy, []
        self.upstream_busy = 0  # the real server's own 503s to a take (SQLite meeting another write on a loaded machine)
        self._upstream = httpx.Client(base_url=api.removesuffix("/api"), timeout=10)

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path.endswith("/concurrency_limits/increment"):
                    proxy.takes.append(time.monotonic())
                    if len(proxy.takes) <= proxy.busy:
                        self.send_response(503)
                        self.send_header("content-length", "0")
                        self.end_headers()
                        return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = proxy._upstream.request(self.command, self.path, content=body, headers=headers)
                if self.path.endswith("/concurrency_limits/increment") and answer.status_code == 503:
                    proxy.upstream_busy += 1
                self.send_response(answer.status_code)
                for k, v in answer.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}/api"

    def __enter__(self) -> BusyPrefect:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._upstream.close()


async def test_a_take_the_server_answers_busy_is_asked_again_at_once(prefect_api: str):
    """Prefect's client would wait ~2 s (its back-off) before asking again: measured before
    the first send of nearly every run. Asked again BUSY_RETRY_S later, the take is granted
    on the third try, and nothing is lost to it."""
    limits = PrefectLimits()
    await limits.open("test", "busy", {"K": str(random.random())})
    await limits.create(6)  # the granted slots decay over 10 s, not 0.1 s: still there when read on a busy machine
    with BusyPrefect(prefect_api, busy=2) as proxy, api_url(proxy.url):
        busy = PrefectLimits()
        busy.name = limits.name
        assert await busy.take(SLOTS)
        await busy.close()
    assert len(proxy.takes) == 3 + proxy.upstream_busy  # asked again after each busy answer, until granted
    assert max(b - a for a, b in zip(proxy.takes, proxy.takes[1:])) < 1.0  # Prefect's own back-off starts at ~2 s
    bucket = await limits.read()
    assert bucket is not None and bucket.active > 0  # the third take was granted
    await limits.close()


@pytest.mark.parametrize("server", ["gone", "garbage"])
async def test_a_server_gone_or_answering_garbage_leaves_pacing_in_process(server: str, warnings_of_shared_rate, monkeypatch):
    monkeypatch.setenv(shared_rate.SALT_ENV, "s" * 64)  # as far as the first block: the salt is read from the server otherwise
    with FakeServer() as garbage:
        url = garbage.url if server == "garbage" else _closed_port()
        with api_url(f"{url}/api"):
            pacer = Pacer(6000, shared=GlobalRate(PrefectLimits(), "test", server, {"K": "v"}, 6000))
            started = time.monotonic()
            for _ in range(20):
                await asyncio.wait_for(pacer.pace(), 30)
            await pacer.shared.close()
    assert time.monotonic() - started < 5  # one failed attempt, then no more waiting on the server
    [warning] = warnings_of_shared_rate()
    assert "Prefect server unavailable" in warning


def _closed_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"
