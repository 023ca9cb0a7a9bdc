"""Rates shared across processes through the Prefect server's global concurrency limits."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import os
import random
import selectors
import stat
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from promptfleet.core.limiter import Pacer, PacerPool
from promptfleet.orchestration import shared_rate
from promptfleet.orchestration.shared_rate import (
    SLOTS,
    GlobalRate,
    PrefectLimits,
    fingerprint,
    limit_name,
    machine_salt,
    shared_rate_for,
)
from tests.conftest import write_jsonl
from tests.fakes import FakeServer

KEY = "sk-shared-secret-0123456789"


# -- the name: a keyed fingerprint, never the key ------------------------------------------


def test_salt_is_created_once_private_and_reused(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(shared_rate.SALT_ENV, raising=False)
    salt = machine_salt(tmp_path)
    path = tmp_path / shared_rate.SALT_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert machine_salt(tmp_path) == salt and len(salt) >= 32
    assert not [p for p in tmp_path.iterdir() if p.name != shared_rate.SALT_FILE]  # no temporary left behind


def test_salt_from_the_environment_wins_so_machines_can_share_it(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(shared_rate.SALT_ENV, "a-salt-shared-by-every-machine-of-the-group")
    assert machine_salt(tmp_path) == b"a-salt-shared-by-every-machine-of-the-group"
    assert not (tmp_path / shared_rate.SALT_FILE).exists()


def test_a_broken_salt_file_is_refused_with_its_path(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(shared_rate.SALT_ENV, raising=False)
    (tmp_path / shared_rate.SALT_FILE).write_text("\n")
    with pytest.raises(RuntimeError, match=str(tmp_path)):
        machine_salt(tmp_path)


def test_limit_name_hides_the_key_and_depends_on_the_salt():
    creds = {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    name = limit_name("openai", "ft:gpt-4o/mini tuned", creds, b"s" * 64)
    assert name.startswith("promptfleet-rate:openai:ft-gpt-4o-mini-tuned:")
    assert KEY not in name and "sk-" not in name and "/" not in name
    import hashlib

    plain = {hashlib.sha256(v.encode()).hexdigest()[:24] for v in (KEY, repr(sorted(creds.items())))}
    assert name.rsplit(":", 1)[1] not in plain  # not an unsalted hash either
    assert fingerprint(creds, b"s" * 64) != fingerprint(creds, b"t" * 64)
    assert fingerprint(creds, b"s" * 64) != fingerprint({**creds, "OPENAI_API_KEY": KEY + "x"}, b"s" * 64)


def test_only_flow_runs_reporting_to_a_server_share(prefect_api: str):
    from prefect import flow

    @flow
    def shares() -> bool:
        return shared_rate_for("openai", "gpt", {"OPENAI_API_KEY": KEY}, 600) is not None

    assert shares()  # a flow run on the server
    assert shared_rate_for("openai", "gpt", {"OPENAI_API_KEY": KEY}, 600) is None  # the plain Python API
    with api_url(""):
        assert not shares()  # a temporary server: nobody else to share with


def api_url(url: str):
    """Prefect reads its settings once per context: change them through a settings context."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: url})


# -- one bucket, several takers, a real Prefect server ---------------------------------------


def _paced(rate: GlobalRate) -> Pacer:
    """The Pacer a queue has in front of its shared rate, at the rate the process believes."""
    return Pacer(rate._believed, shared=rate)


async def _take_for(rate: GlobalRate, seconds: float, times: list[float]) -> None:
    pacer = _paced(rate)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await pacer.pace()
        times.append(time.monotonic())


def _max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    return max(bisect.bisect_right(times, t + window - 1e-9) - i for i, t in enumerate(times))


async def test_two_takers_share_one_rate_in_blocks(prefect_api: str):
    name = limit_name("test", "two-takers", {"K": "v"}, b"x" * 64)
    a, b = GlobalRate(PrefectLimits(name), 600), GlobalRate(PrefectLimits(name), 600)
    await PrefectLimits(name).read()  # Prefect's client imports on first use: not part of the measure
    times_a: list[float] = []
    times_b: list[float] = []
    seconds = 6.0
    await asyncio.gather(_take_for(a, seconds, times_a), _take_for(b, seconds, times_b))
    together = times_a + times_b
    # 10/s together, not 20: at most the rate plus the first block. How close to 10/s they
    # get depends on how fast this (real, local) server answers under load: the rate is
    # measured by the two-run test below and, exactly, on the virtual clock further down.
    assert 10 * seconds / 3 <= len(together) <= 10 * seconds + shared_rate.MIN_BLOCK
    assert _max_in_window(together) <= 10 + 1  # at a hand-over, the answer's latency may shift one in
    assert times_a and times_b  # both got blocks
    # Server grants by the block, not by the request: at most one per process per block's time.
    assert a.blocks + b.blocks <= 2 * (seconds / shared_rate.BLOCK_S + 1) < len(together)


async def test_a_lone_sender_is_counted_under_a_lease_and_leaves_nothing_behind(prefect_api: str):
    """On a real server: alone, a run tops up slots ahead instead of taking blocks, is counted
    among the key's senders while it sends, and is not once it has ended."""
    name = limit_name("test", "lone", {"K": "v"}, b"x" * 64)
    rate = GlobalRate(PrefectLimits(name), 1200)
    times: list[float] = []
    await _take_for(rate, 2.0, times)
    assert rate.blocks == 0 and rate.top_ups >= 2
    assert await PrefectLimits(name).senders() == 1
    assert 20 * 2.0 * 0.75 <= len(times) <= 20 * 2.0 + 1
    # Spaced exactly 1/rate, as without a server: a window's first send woken a little later
    # than the one 20 sends on can let that one in.
    assert _max_in_window(times) <= 20 + 1
    await rate.give_back()
    assert await PrefectLimits(name).senders() == 0


async def test_a_learned_rate_is_shared_with_the_next_block(prefect_api: str):
    name = limit_name("test", "learned", {"K": "v"}, b"x" * 64)
    a, b = GlobalRate(PrefectLimits(name), 1200), GlobalRate(PrefectLimits(name), 1200)
    await a.take()
    a.set_rate(300)  # the provider's headers told `a` that the key allows 5/s
    await _take_for(a, 2.5, [])  # written with a's next block
    bucket = await PrefectLimits(name).read()
    assert bucket is not None and bucket.per_minute == pytest.approx(300) and bucket.limit == shared_rate.block_for(300) * SLOTS
    times: list[float] = []
    await _take_for(b, 4.0, times)  # `b` never saw those headers, but gets 5/s now
    assert len(times) <= 5 * 4 + 10


async def test_joining_lowers_a_faster_limit_and_takes_over_a_stale_one(prefect_api: str, monkeypatch):
    name = limit_name("test", "join", {"K": "v"}, b"x" * 64)
    limits = PrefectLimits(name)
    await limits.create(6000)
    await GlobalRate(limits, 600).take()
    assert (await limits.read()).per_minute == pytest.approx(600)  # the strictest ceiling wins
    await GlobalRate(limits, 1200).take()
    assert (await limits.read()).per_minute == pytest.approx(600)  # a run in use is not raised by a newcomer
    monkeypatch.setattr(shared_rate, "STALE_S", 0.0)
    await GlobalRate(limits, 1200).take()
    assert (await limits.read()).per_minute == pytest.approx(1200)  # nobody uses it: the newcomer's rate


async def test_a_rate_change_does_not_bring_decayed_slots_back(prefect_api: str):
    """The server keeps slots as of the limit's last write and decays them from its
    `updated` time, which any update moves to now: a change that did not write the slots
    would restore long-decayed ones in full, and the next block would wait for them (a
    60 s first block was measured after a run at a higher rate)."""
    name = limit_name("test", "rebase", {"K": "v"}, b"x" * 64)
    limits = PrefectLimits(name)
    await limits.create(60_000)  # 100,000 slots a second decay
    assert await limits.take(SLOTS)  # one request's slots, decayed a millisecond later
    decayed = await limits.read()
    assert decayed is not None and decayed.active == 0
    await limits.set(6, decayed)  # 10 slots a second: 100 stale slots would take 10 s to decay
    bucket = await limits.read()
    assert bucket is not None and bucket.per_minute == pytest.approx(6) and bucket.active == 0


async def test_a_deleted_limit_is_made_again(prefect_api: str):
    from prefect.client.orchestration import get_client

    name = limit_name("test", "deleted", {"K": "v"}, b"x" * 64)
    rate = GlobalRate(PrefectLimits(name), 6000)
    await rate.take()
    async with get_client() as client:
        await client.delete_global_concurrency_limit_by_name(name)
    await _take_for(rate, 2.5, [])  # past the block in hand
    assert await PrefectLimits(name).read() is not None


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


async def test_a_server_that_is_gone_leaves_pacing_in_process(warnings_of_shared_rate):
    with socket_closed() as port, api_url(f"http://127.0.0.1:{port}/api"):
        rate = GlobalRate(PrefectLimits("promptfleet-rate:test:gone:0"), 600)
        started = time.monotonic()
        for _ in range(50):
            await asyncio.wait_for(rate.take(), 30)
    assert time.monotonic() - started < 25  # one failed attempt, then no more waiting on the server
    assert [w for w in warnings_of_shared_rate() if "Prefect server unavailable" in w] == warnings_of_shared_rate()
    assert len(warnings_of_shared_rate()) == 1


async def test_a_server_answering_garbage_leaves_pacing_in_process(warnings_of_shared_rate):
    with FakeServer() as garbage, api_url(f"{garbage.url}/api"):  # no Prefect route answers sensibly
        rate = GlobalRate(PrefectLimits("promptfleet-rate:test:garbage:0"), 600)
        for _ in range(20):
            await asyncio.wait_for(rate.take(), 30)
    [warning] = warnings_of_shared_rate()
    assert "Prefect server unavailable" in warning


class socket_closed:
    """A port on 127.0.0.1 that nobody listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        pass


# -- two `promptfleet run` processes on one key ----------------------------------------------


def _experiment(path: Path, tag: str, n: int) -> Path:
    return write_jsonl(path, [{"id": i, "api": "openai", "model_name": "gpt-shared", "prompt": f"{tag}{i}"} for i in range(n)])


def _start(file: Path, data: Path, env: dict, rpm: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "promptfleet.cli", "run", "-f", str(file), "-d", str(data), "-mq", str(rpm)]
    data.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, env=env, cwd=data.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, (out.decode()[-2000:], err.decode()[-3000:])


def _rate_while_both_ran(accepted: list[float], first: list[float], second: list[float]) -> float:
    lo, hi = max(min(first), min(second)), min(max(first), max(second))
    assert hi - lo > 3, "the two runs barely overlapped"
    inside = [t for t in accepted if lo <= t <= hi]
    return (len(inside) - 1) / (hi - lo)


NOISE_429S = 3


def _seconds_before_429s(state) -> list[list[int]]:
    """For each 429, the gaps (ms) between the accepted arrivals of the second before it."""
    accepted = sorted(state.accepted)
    calls = sorted(t for ts in state.times.values() for t in ts if t >= accepted[0])  # not the solo run's
    # The fake stamps a call, then (under the same lock) its acceptance: a call is refused
    # when no acceptance comes before the next call.
    refused = [t for t, after in zip(calls, [*calls[1:], float("inf")]) if bisect.bisect_left(accepted, t) == bisect.bisect_left(accepted, after)]
    seconds = [accepted[bisect.bisect_left(accepted, t - 1.0) : bisect.bisect_right(accepted, t)] for t in refused]
    return [[round((b - a) * 1000) for a, b in zip(second, second[1:])] for second in seconds]


@pytest.mark.slow
def test_two_runs_on_one_key_share_its_limit(tmp_path: Path, prefect_api: str):
    """Two processes, each told the key's full rate (-mq 1200 = 20/s), against a server that
    allows 20 requests per second: together they send about 20/s and draw no more 429s
    than one run alone does."""
    limit, n = 20, 160
    env = {**os.environ, "OPENAI_API_KEY": KEY, "PREFECT_API_URL": prefect_api}
    with FakeServer() as server:
        server.state.limit, server.state.window = limit, 1.0
        env["OPENAI_BASE_URL"] = server.base_url

        alone = tmp_path / "alone"
        _finish(_start(_experiment(tmp_path / "solo.jsonl", "s", n), alone / "data", env, limit * 60))
        rejected_alone = server.state.rejected

        time.sleep(1.5)  # the solo run's last block decays
        server.state.rejected = 0
        server.state.accepted.clear()
        work = tmp_path / "two" / "data"
        first = _start(_experiment(tmp_path / "first.jsonl", "a", n), work, env, limit * 60)
        second = _start(_experiment(tmp_path / "second.jsonl", "b", n), work, env, limit * 60)
        _finish(first)
        _finish(second)
        state = server.state
        times_a = [t for p, ts in state.times.items() if p.startswith("a") for t in ts]
        times_b = [t for p, ts in state.times.items() if p.startswith("b") for t in ts]
        accepted = sorted(state.accepted)

    assert all(state.calls[f"a{i}"] >= 1 and state.calls[f"b{i}"] >= 1 for i in range(n))
    rate = _rate_while_both_ran(accepted, times_a, times_b)
    print(f"429s alone {rejected_alone}, together {state.rejected}; combined rate {rate:.2f}/s of {limit}/s")
    # Sharing draws no 429 of its own. The allowance is the box's noise, not the pacing's:
    # a request reaching the fake more than 20 ms after it was sent (seen: 48 ms, between
    # the client's socket and the fake's handler thread) makes a later one its second's
    # 21st. Measured on this busy 2-core box (22 runs): 0-2 such 429s per 160 requests
    # alone, 0-3 per 320 together (two client processes, twice the requests). A 429 message lists the
    # arrivals of the second before each 429: a late first arrival is noise, a burst is not.
    assert state.rejected <= rejected_alone + NOISE_429S, _seconds_before_429s(state)
    assert 0.9 * limit <= rate <= 1.05 * limit  # about the limit: not 2x, not half


# -- the hook in the Pacer -------------------------------------------------------------------


class CountingRate:
    """A SharedRate that records what the Pacer asks of it."""

    def __init__(self) -> None:
        self.taken = 0
        self.rates: list[float] = []
        self.given_back = 0

    async def take(self) -> None:
        self.taken += 1

    def set_rate(self, per_minute: float) -> None:
        self.rates.append(per_minute)

    async def give_back(self) -> None:
        self.given_back += 1


async def test_every_send_waits_for_the_shared_rate_and_a_lowered_ceiling_is_shared():
    from promptfleet.core.limiter import Pacer

    shared = CountingRate()
    pacer = Pacer(60_000, shared=shared)
    for _ in range(3):
        await pacer.acquire()
        pacer.release()
    await pacer.pace()  # a later turn of a conversation is a request too
    assert shared.taken == 4
    pacer.on_rate_limited(None)  # a 429 slows this process only
    pacer.on_success({"x-ratelimit-limit-requests": "500"})  # the provider states the key's limit
    pacer.lower_ceiling(900)  # higher than what we know: nothing to share
    assert shared.rates == [500]


# -- hand-over on a virtual clock ------------------------------------------------------------


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to its next timer instead of waiting for it: seconds
    of sends and server calls run in milliseconds, and every time in them is exact."""

    def __init__(self) -> None:
        self.now = 0.0
        loop = self

        class Selector(selectors.DefaultSelector):
            def select(self, timeout: float | None = None):
                if timeout is None:
                    raise RuntimeError("deadlock: nothing ready, nothing scheduled")
                loop.now += timeout
                return super().select(0)

        super().__init__(Selector())

    def time(self) -> float:
        return self.now

    def run(self, coro):
        try:
            return self.run_until_complete(coro)
        finally:
            self.close()


class FakeLimits:
    """A global concurrency limit as Prefect's server keeps it, on the loop's clock: slots
    decay in whole slots from the last grant, reads show them decayed, a refused take
    changes nothing (checked against Prefect 3). Every call answers after `latency`
    seconds, the server acting halfway."""

    def __init__(self, name: str, latency: float = 0.01, sweep_s: float = 15.0):
        self.name, self.latency, self.sweep_s = name, latency, sweep_s
        self.limit, self.per_second, self.active, self.written = 0, 0.0, 0, 0.0
        self.grants: list[float] = []
        self.leases: dict[int, float] = {}  # lease -> when it lapses
        self.counting = True  # the senders limit switched on

    def _swept(self) -> None:
        """Lapsed leases leave the count at the server's next sweep (Prefect's repossessor)."""
        now = self._now()
        self.leases = {lease: end for lease, end in self.leases.items() if now < end + self.sweep_s}

    async def register(self):
        await self._at_server()
        lease = len(self.grants) * 1000 + len(self.leases) + int(self._now() * 1e6)
        self.leases[lease] = self._now() + shared_rate.LEASE_S
        await self._at_server()
        return lease

    async def renew(self, lease) -> bool:
        await self._at_server()
        self._swept()
        alive = lease in self.leases and self._now() < self.leases[lease]
        if alive:
            self.leases[lease] = self._now() + shared_rate.LEASE_S
        await self._at_server()
        return alive

    async def unregister(self, lease) -> None:
        await self._at_server()
        self.leases.pop(lease, None)
        await self._at_server()

    async def senders(self):
        await self._at_server()
        self._swept()
        count = len(self.leases) if self.counting else None
        await self._at_server()
        return count

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _decayed(self) -> int:
        return max(0, self.active - math.floor(self.per_second * (self._now() - self.written)))

    async def _at_server(self) -> None:
        await asyncio.sleep(self.latency / 2)

    async def read(self):
        await self._at_server()
        bucket = shared_rate.Bucket(self.limit, self.per_second, self._decayed(), datetime.now(timezone.utc)) if self.limit else None
        await self._at_server()
        return bucket

    async def create(self, per_minute: float) -> None:
        await self.set(per_minute)

    async def set(self, per_minute: float, was=None) -> None:
        await self._at_server()
        per_second = per_minute / 60 * SLOTS
        if was is not None and was.per_second > 0:  # as PrefectLimits writes them: the time they have left
            self.active, self.written = round(was.active * per_second / was.per_second), self._now()
        self.limit, self.per_second = shared_rate.block_for(per_minute) * SLOTS, per_second
        await self._at_server()

    async def give_back(self, slots: int, held: float) -> None:
        await self._at_server()
        self.active, self.written = max(0, self._decayed() - slots), self._now()
        await self._at_server()

    async def close(self) -> None:
        pass

    async def take(self, slots: int) -> bool:
        await self._at_server()
        if free := self._decayed() + slots <= self.limit:
            self.active, self.written = self._decayed() + slots, self._now()
            self.grants.append(self._now())
        await self._at_server()
        return free


async def _sends(rate: GlobalRate, seconds: float, times: list[float], lag=lambda: 0.0) -> None:
    """Send through a Pacer until `seconds`; each send reaches the provider `lag()` seconds
    after it leaves."""
    loop = asyncio.get_running_loop()
    pacer = _paced(rate)
    while loop.time() < seconds:
        await pacer.pace()
        times.append(loop.time() + lag())


def _most_in_a_second(times: list[float]) -> int:
    """Most sends in any one-second window. A microsecond is forgiven: sends spaced exactly
    1/rate add up, in floating point, to a hair less than a second."""
    times = sorted(times)
    return max(bisect.bisect_left(times, t + 1.0 - 1e-6) - i for i, t in enumerate(times))


@pytest.mark.parametrize("per_second", [20, 3, 200])
def test_two_holders_hand_over_without_overlap_and_keep_the_rate(per_second: int):
    """Two processes on one key, the server answering in 10 ms: no second ever holds more
    than the key's limit, even with every send reaching the provider up to 15 ms late, and
    together they keep at least 93% of it."""
    random.seed(7)
    limits = FakeLimits("promptfleet-rate:test:virtual:0")
    a, b = GlobalRate(limits, per_second * 60), GlobalRate(limits, per_second * 60)
    times_a: list[float] = []
    times_b: list[float] = []
    seconds = 60.0
    jitter = lambda: random.uniform(0, 0.015)  # noqa: E731

    async def both() -> None:
        await asyncio.gather(_sends(a, seconds, times_a, jitter), _sends(b, seconds, times_b, jitter))

    VirtualLoop().run(both())
    together = times_a + times_b
    assert _most_in_a_second(together) <= per_second
    assert len(together) >= 0.93 * per_second * seconds
    assert len(times_a) > 0.4 * len(together) and len(times_b) > 0.4 * len(together)  # blocks alternate


def test_a_holder_woken_late_sends_nothing_into_the_next_window():
    """The event loop stalls for 300 ms near a block's end (a busy process): the sends the
    holder owed are not sent late into the next holder's first second, and the send after
    a late one does not follow at once."""
    limits = FakeLimits("promptfleet-rate:test:stall:0")
    a, b = GlobalRate(limits, 1200), GlobalRate(limits, 1200)
    times_a: list[float] = []
    times_b: list[float] = []

    async def stall_a_at(moments: list[float]) -> None:
        loop = asyncio.get_running_loop()
        for moment in moments:
            await asyncio.sleep(moment - loop.time())
            loop.now += 0.3  # every timer due meanwhile fires 300 ms late

    async def both() -> None:
        await asyncio.gather(_sends(a, 20.0, times_a), _sends(b, 20.0, times_b), stall_a_at([1.8, 5.9, 9.5, 14.1]))

    VirtualLoop().run(both())
    assert _most_in_a_second(times_a + times_b) <= 20
    assert min(later - earlier for earlier, later in zip(sorted(times_a), sorted(times_a)[1:])) > 0.04


def test_a_server_slower_than_a_block_leaves_pacing_in_process(warnings_of_shared_rate):
    """Every grant arrives after the slots it holds decayed (a server answering in 2.5 s,
    slots ahead for 1 s alone, blocks of 2 s): nothing is sent on those grants, and after a
    few the queue paces on its own."""
    limits = FakeLimits("promptfleet-rate:test:slow:0", latency=2.5)
    rate = GlobalRate(limits, 1200)

    async def five() -> float:
        for _ in range(5):
            await rate.take()
        return asyncio.get_running_loop().time()

    took = VirtualLoop().run(five())
    assert len(limits.grants) == shared_rate.LATE_GRANTS
    # each try a read, a take and a read of the senders; then the five sends went at once, unshared
    assert took < 5 * shared_rate.LATE_GRANTS * limits.latency
    [warning] = warnings_of_shared_rate()
    assert "slower than a block" in warning


def test_a_slower_rate_left_by_a_stopped_run_gives_way_to_a_rerun():
    """A run at -mq 60 took a block and stopped; its rerun with -mq 600 joins a second later.
    The rerun starts at the shared 60/min, and once it has seen nobody else's slots for a
    while, the key's rate is its own: a stopped run's statement does not outlive it."""
    limits = FakeLimits("promptfleet-rate:test:rerun:0")
    rerun = GlobalRate(limits, 600)
    times: list[float] = []

    async def scenario() -> None:
        stopped = GlobalRate(limits, 60)
        await stopped.take()  # its block of 20 sends decays over 20 s, unused
        await asyncio.sleep(1.0)
        await _sends(rerun, 120.0, times)

    VirtualLoop().run(scenario())
    assert limits.per_second == pytest.approx(600 / 60 * SLOTS)
    # 20 s waiting out the stopped run's block, two blocks of 20 at 60/min (one seeing
    # nobody), then 10/s: at 60/min all along it would be about 100
    assert len(times) > 400
    assert _most_in_a_second(times) <= 10


def test_a_slower_run_still_sending_keeps_the_key_at_its_rate():
    """Two runs on one key told 60 and 600/min: while the slower one sends, the key stays at
    60/min for both together; the faster one does not raise it."""
    limits = FakeLimits("promptfleet-rate:test:both:0")
    slow, fast = GlobalRate(limits, 60), GlobalRate(limits, 600)
    times_slow: list[float] = []
    times_fast: list[float] = []

    async def both() -> None:
        await asyncio.gather(_sends(slow, 60.0, times_slow), _sends(fast, 60.0, times_fast))

    VirtualLoop().run(both())
    assert limits.per_second == pytest.approx(60 / 60 * SLOTS)
    assert len(times_slow + times_fast) <= 60 + shared_rate.MIN_BLOCK  # the rate, plus the block in hand at the end
    assert times_fast  # the faster run got its share


def test_a_run_that_ends_gives_back_its_block_and_the_next_one_starts_at_once():
    """A run sends 3 requests of a 20-request block and ends; the next run on the key (the
    same command again) starts after one spacing, not after the 2 s the unused block would
    take to decay, and the two runs' sends are spaced as within a block."""
    limits = FakeLimits("promptfleet-rate:test:give-back:0")
    first_times: list[float] = []
    next_times: list[float] = []

    async def scenario() -> None:
        first = GlobalRate(limits, 600)
        for _ in range(3):
            await first.take()
            first_times.append(asyncio.get_running_loop().time())
        await first.give_back()
        nxt = GlobalRate(limits, 600)
        for _ in range(3):
            await nxt.take()
            next_times.append(asyncio.get_running_loop().time())

    VirtualLoop().run(scenario())
    gap = next_times[0] - first_times[-1]
    assert 0.1 <= gap < 0.5  # at least a spacing (1/10 s); the block would have lasted until 2 s
    assert _most_in_a_second(first_times + next_times) <= 10


def test_a_rerun_with_a_higher_rate_after_a_finished_run_takes_its_rate_at_once():
    """-mq 60, finished; the same file again at once with -mq 600: the rerun sends at
    600/min from its start, not at the finished run's 60/min for its first blocks."""
    limits = FakeLimits("promptfleet-rate:test:faster-rerun:0")
    times: list[float] = []

    async def scenario() -> None:
        finished = GlobalRate(limits, 60)
        await finished.take()
        await finished.give_back()
        await asyncio.sleep(1.0)
        rerun = GlobalRate(limits, 600)
        start = asyncio.get_running_loop().time()
        await _sends(rerun, start + 5.0, times)

    VirtualLoop().run(scenario())
    assert limits.per_second == pytest.approx(600 / 60 * SLOTS)
    assert len(times) >= 40  # ~10/s for 5 s; at 60/min it would be 5
    assert _most_in_a_second(times) <= 10


async def test_the_last_queue_on_a_shared_pacer_gives_its_rate_back():
    pool = PacerPool()
    shared = CountingRate()
    async with pool.pacer(("openai", "m", "key"), 600, shared=lambda: shared) as first:
        async with pool.pacer(("openai", "m", "key"), 600, shared=lambda: CountingRate()) as second:
            assert first is second
        assert shared.given_back == 0  # one queue still sends on it
    assert shared.given_back == 1


class BusyPrefect:
    """A proxy in front of a real Prefect server that answers its first `busy` slot takes
    503, as Prefect's SQLite server does when a write meets another (SQLITE_BUSY)."""

    def __init__(self, api: str, busy: int):
        import http.server
        import threading

        import httpx

        proxy = self
        self.busy, self.takes = busy, []
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
    name = limit_name("test", "busy", {"K": "v"}, b"x" * 64)
    await PrefectLimits(name).create(600)
    with BusyPrefect(prefect_api, busy=2) as proxy, api_url(proxy.url):
        assert await PrefectLimits(name).take(SLOTS)
    assert len(proxy.takes) == 3
    assert max(b - a for a, b in zip(proxy.takes, proxy.takes[1:])) < 1.0  # Prefect's own back-off starts at ~2 s
    bucket = await PrefectLimits(name).read()
    assert bucket is not None and bucket.active > 0  # the third take was granted


@pytest.mark.parametrize("per_minute", [500, 2000])
def test_alone_on_a_key_a_run_sends_at_its_full_rate(per_minute: int):
    """The only sender on its key paces in-process, as without a server: it loses only the
    join's round trips, not the 2% block margin, the hand-over courtesy or a round trip per
    block (those cost 2-3% here, 1 s of a 30 s run). Never over the rate in any second, and
    about two server calls per LEAD_S, not one per request."""
    limits = FakeLimits("promptfleet-rate:test:lone:0")
    rate = GlobalRate(limits, per_minute)
    times: list[float] = []
    VirtualLoop().run(_sends(rate, 60.0, times))
    assert len(times) >= 0.998 * per_minute
    assert _most_in_a_second(times) <= math.ceil(per_minute / 60)
    assert min(b - a for a, b in zip(times, times[1:])) >= 60 / per_minute - 1e-6
    assert rate.blocks == 0 and 60 / (2 * shared_rate.LEAD_S) <= rate.top_ups <= 60 / shared_rate.LEAD_S + 2
    assert len(limits.leases) == 1  # renewed all along: a minute is longer than a lease


def test_a_newcomer_gets_its_share_and_the_lone_sender_gets_it_back():
    """A sends alone for 70 s (past its first lease: renewals keep it counted); B joins and
    both share the key in blocks, never over its rate in any second; A ends, and B is alone
    again at the full rate."""
    per_second = 10
    limits = FakeLimits("promptfleet-rate:test:newcomer:0")
    a, b = GlobalRate(limits, per_second * 60), GlobalRate(limits, per_second * 60)
    times_a: list[float] = []
    times_b: list[float] = []

    async def scenario() -> None:
        async def a_until_90() -> None:
            await _sends(a, 90.0, times_a)
            await a.give_back()

        async def b_from_70() -> None:
            await asyncio.sleep(70.0)
            await _sends(b, 130.0, times_b)

        await asyncio.gather(a_until_90(), b_from_70())

    VirtualLoop().run(scenario())
    together = sorted(times_a + times_b)
    assert _most_in_a_second(together) <= per_second
    assert len([t for t in times_a if t < 70]) >= 0.995 * 70 * per_second  # alone: the full rate
    b_first = min(times_b)
    assert b_first < 70 + 3 * shared_rate.LEAD_S + shared_rate.BLOCK_S  # seen at A's next top-up, in after A's slots decay
    both = [t for t in together if b_first <= t < 90]
    assert len(both) >= 0.9 * (90 - b_first) * per_second
    assert len([t for t in times_a if t > b_first]) > 0.3 * len(both) < len([t for t in times_b if t < 90])
    assert len([t for t in times_b if 95 <= t < 130]) >= 0.995 * 35 * per_second  # alone again
    assert b.top_ups > 0 and len(limits.leases) == 1


def test_two_runs_starting_together_are_never_both_alone():
    """Both register, take slots ahead and read the count at the same moments: at most one
    may count itself alone, and the other waits for its slots."""
    per_second = 20
    limits = FakeLimits("promptfleet-rate:test:together:0")
    a, b = GlobalRate(limits, per_second * 60), GlobalRate(limits, per_second * 60)
    times_a: list[float] = []
    times_b: list[float] = []

    async def both() -> None:
        await asyncio.gather(_sends(a, 30.0, times_a), _sends(b, 30.0, times_b))

    VirtualLoop().run(both())
    assert _most_in_a_second(times_a + times_b) <= per_second
    assert len(times_a + times_b) >= 0.9 * 30 * per_second
    assert len(times_a) > 0.3 * len(times_a + times_b) < len(times_b)


class Stalled:
    """One process's way to the shared limits with a stall: its first count of the senders
    answers `answer_late` seconds late, its first take reaches the server `take_late` late."""

    def __init__(self, limits: FakeLimits, answer_late: float, take_late: float):
        self._limits, self._late = limits, {"senders": answer_late, "take": take_late}

    def __getattr__(self, name: str):
        return getattr(self._limits, name)

    async def senders(self):
        count = await self._limits.senders()
        await asyncio.sleep(self._late.pop("senders", 0.0))
        return count

    async def take(self, slots: int) -> bool:
        await asyncio.sleep(self._late.pop("take", 0.0))
        return await self._limits.take(slots)


def test_slots_taken_ahead_count_only_if_the_count_after_the_take_says_alone():
    """A counts itself alone, then stalls; B registers and is granted a block meanwhile; A's
    take lands after B's block has partly decayed, so it fits. The count A reads after its
    take shows B: A gives the slots back and sends nothing on them (trusting the count read
    before the take, A would send into B's block: 24 requests in one second of a 20/s key)."""
    per_second = 20
    limits = FakeLimits("promptfleet-rate:test:stalled:0")
    a, b = GlobalRate(Stalled(limits, answer_late=0.3, take_late=0.8), per_second * 60), GlobalRate(limits, per_second * 60)
    times_a: list[float] = []
    times_b: list[float] = []

    async def scenario() -> None:
        async def b_soon_after() -> None:
            await asyncio.sleep(0.05)
            await _sends(b, 10.0, times_b)

        await limits.create(per_second * 60)  # a key used before: the count is read once at the join
        await asyncio.gather(_sends(a, 10.0, times_a), b_soon_after())

    VirtualLoop().run(scenario())
    assert _most_in_a_second(times_a + times_b) <= per_second
    assert min(times_b) < 0.2 and min(times_a) > 2.0  # B was first in; A's early slots went unused
    assert times_a and len(times_a + times_b) >= 0.9 * 9 * per_second


def test_a_killed_lone_sender_keeps_others_in_blocks_until_its_lease_lapses():
    """A is killed (no give-back, no unregister) while alone; B, starting right after, waits
    for A's slots, shares in blocks while A's lease still counts (a killed run looks like a
    slow one), and is alone once the lease has lapsed and been swept."""
    per_second = 20
    limits = FakeLimits("promptfleet-rate:test:killed:0")
    a, b = GlobalRate(limits, per_second * 60), GlobalRate(limits, per_second * 60)
    times_a: list[float] = []
    times_b: list[float] = []

    async def scenario() -> None:
        killed = asyncio.ensure_future(_sends(a, 100.0, times_a))
        await asyncio.sleep(5.0)
        killed.cancel()
        if a._top_up is not None:
            a._top_up.cancel()  # the process is gone, and its task with it
        await _sends(b, 120.0, times_b)

    VirtualLoop().run(scenario())
    assert _most_in_a_second(times_a + times_b) <= per_second
    assert min(times_b) >= max(times_a) + 1 / per_second
    lapsed = 5.0 + shared_rate.LEASE_S + limits.sweep_s
    assert b.blocks > 0 and b.top_ups > 0
    in_blocks = [t for t in times_b if t < lapsed]
    assert len(in_blocks) >= 0.93 * (lapsed - 6.0) * per_second
    assert len([t for t in times_b if lapsed + 2 <= t < 120]) >= 0.995 * (118 - lapsed) * per_second


def test_a_switched_off_senders_limit_means_blocks():
    """Nobody can be counted (the senders limit switched off in the UI): never alone."""
    limits = FakeLimits("promptfleet-rate:test:uncounted:0")
    limits.counting = False
    rate = GlobalRate(limits, 1200)
    times: list[float] = []
    VirtualLoop().run(_sends(rate, 10.0, times))
    assert rate.top_ups == 0 and rate.blocks > 0
    assert _most_in_a_second(times) <= 20


def test_a_stopped_run_leaves_no_count_and_the_same_command_again_is_alone_at_once():
    """Ctrl-C or SIGTERM cancels a run's queues while it is alone: the pool's exit still
    gives back its slots ahead and its senders slot, so the same command again is counted
    alone and sends at the full rate from its start, without waiting out a lease."""
    per_second = 20
    limits = FakeLimits("promptfleet-rate:test:stopped:0")
    first: list[float] = []
    again: list[float] = []

    async def queue(times: list[float], until: float) -> None:
        async with PacerPool().pacer(("test", "m", "key"), per_second * 60, shared=lambda: GlobalRate(limits, per_second * 60)) as pacer:
            while asyncio.get_running_loop().time() < until:
                await pacer.pace()
                times.append(asyncio.get_running_loop().time())

    async def scenario() -> None:
        stopped = asyncio.ensure_future(queue(first, 100.0))
        await asyncio.sleep(5.0)
        stopped.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopped
        assert not limits.leases  # unregistered on the way out
        await queue(again, 15.0)

    VirtualLoop().run(scenario())
    # two spacings and the give-back's slack (0.2 s), not a lease (60 s) nor the slots it held ahead
    assert again[0] - first[-1] < 2 / per_second + shared_rate.GIVE_BACK_SLACK + 0.05
    assert len(again) >= 0.99 * (15.0 - again[0]) * per_second
    assert _most_in_a_second(first + again) <= per_second
