"""Claims across hosts: a claim holds a lease; any host puts back a claim whose lease
expired, its holder stops acting once its lease is not renewed in time, and no two
processes act on one file. Time is a fake clock except in the end-to-end poll."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptfleet import Session, Settings
from promptfleet.cli import app
from promptfleet.core import inbox
from promptfleet.core.lease import Holder, Lease, read_lease, take_over, write_lease
from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

TTL = 60.0
KEY = "sk-lease-test-000000"


class FakeClock:
    def __init__(self) -> None:
        self.wall, self.mono = 1_800_000_000.0, 0.0

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def rows(n: int) -> list[dict]:
    return [{"id": i, "api": "openai", "model_name": "gpt-fake", "prompt": f"q{i}"} for i in range(n)]


def foreign_claim(input_dir: Path, name: str, renewed_at: float, n: int = 3) -> Path:
    """A file claimed by a process on another host, with a pid that is alive here."""
    claimed = write_jsonl(input_dir / ".running" / name, rows(n))
    write_lease(owner_of(claimed), Lease("f0reign", "another-host", os.getpid(), renewed_at, TTL))
    return claimed


def owner_of(claimed: Path) -> Path:
    return claimed.with_name(f".{claimed.name}.owner")


def test_a_lease_expires_after_its_ttl_and_a_renewal_pushes_it(tmp_path: Path):
    clock = FakeClock()
    subject = write_jsonl(tmp_path / "exp.jsonl", rows(1))
    holder = Holder(tmp_path / ".exp.jsonl.owner", subject, TTL, clock)
    start = clock.now()
    lease = read_lease(holder.path, TTL)
    assert lease == holder.lease and lease.ttl == TTL and lease.host and lease.pid == os.getpid()
    assert not lease.expired(start + TTL - 0.001) and lease.expired(start + TTL + 0.001)
    clock.advance(TTL / 4)
    assert holder.renew()
    renewed = read_lease(holder.path, TTL)
    assert renewed.token == lease.token and renewed.renewed_at == start + TTL / 4
    assert not renewed.expired(start + TTL + 0.001) and renewed.expired(start + TTL / 4 + TTL + 0.001)


def test_a_claim_from_another_host_is_put_back_only_after_its_lease_expired(tmp_path: Path):
    clock = FakeClock()
    input_dir = tmp_path / "input"
    claimed = foreign_claim(input_dir, "exp.jsonl", renewed_at=clock.now())
    clock.advance(TTL - 0.01)
    assert inbox.requeue_orphans(input_dir, clock) == []  # its pid lives here, but that says nothing of another host
    assert claimed.exists() and owner_of(claimed).exists()
    clock.advance(0.02)
    assert inbox.requeue_orphans(input_dir, clock) == [input_dir / "exp.jsonl"]
    assert (input_dir / "exp.jsonl").exists() and not claimed.exists() and not owner_of(claimed).exists()
    assert not list((input_dir / ".running").iterdir())  # no marker or temp file left behind


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="tells a zombie by /proc")
def test_a_claim_whose_process_died_here_is_put_back_at_once_even_before_it_is_reaped(tmp_path: Path):
    """A worker killed with everything it started leaves its flow run's process a zombie until
    some ancestor reaps it: dead all the same, its claim goes back at once."""
    import socket
    import subprocess
    import sys

    clock = FakeClock()
    input_dir = tmp_path / "input"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for: a zombie once it ends
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{dead.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.05)
    try:
        claimed = write_jsonl(input_dir / ".running" / "exp.jsonl", rows(3))
        write_lease(owner_of(claimed), Lease("d3ad", socket.gethostname(), dead.pid, clock.now(), TTL))
        assert inbox.requeue_orphans(input_dir, clock) == [input_dir / "exp.jsonl"]  # no waiting for the lease
    finally:
        dead.wait()


def test_a_renewing_owner_is_never_put_back(tmp_path: Path):
    clock = FakeClock()
    input_dir, output_dir = tmp_path / "input", tmp_path / "output"
    claim = inbox.claim(write_jsonl(input_dir / "exp.jsonl", rows(2)), TTL, clock)
    for step in range(20):  # five TTLs, renewed every quarter
        clock.advance(TTL / 4)
        assert claim.holder.renew() and claim.held()
        if step == 8:  # halfway, its run starts: the file becomes a working copy next to the outputs
            working = output_dir / "exp" / "20260101-000000-input-exp.jsonl"
            claim.moving_to(working)
            inbox.place_working_copy(claim.path, working, move=True)
            state = {"source": str(claim.path), "finished": False}
            (working.parent / "20260101-000000-run-exp.json").write_text(json.dumps(state))
        assert inbox.requeue_orphans(input_dir, clock, TTL) == []
        assert inbox.requeue_stranded(input_dir, output_dir, clock, TTL) == []
    assert working.exists() and claim.holder.ours_on_disk()
    clock.advance(TTL + 1)  # it stops renewing (its host went down): now it goes back
    assert inbox.requeue_stranded(input_dir, output_dir, clock, TTL) == [input_dir / "exp.jsonl"]
    assert not working.exists() and not claim.holder.path.exists()


def test_an_owner_paused_for_half_a_ttl_stops_before_anyone_may_take_over(tmp_path: Path):
    clock = FakeClock()
    input_dir = tmp_path / "input"
    claim = inbox.claim(write_jsonl(input_dir / "exp.jsonl", rows(1)), TTL, clock)
    clock.advance(TTL / 2 - 0.01)
    assert claim.held()
    clock.advance(0.02)  # paused: no renewal for half a TTL
    assert not claim.held() and "not renewed for 30s" in claim.lost
    assert inbox.requeue_orphans(input_dir, clock) == []  # nobody may take it yet...
    assert not claim.holder.renew()  # ...but a lapsed lease is never revived
    clock.advance(TTL / 2)
    assert inbox.requeue_orphans(input_dir, clock) == [input_dir / "exp.jsonl"]


def test_an_owner_whose_claim_was_taken_over_says_so_and_touches_nothing(tmp_path: Path):
    clock = FakeClock()
    input_dir = tmp_path / "input"
    path = write_jsonl(input_dir / "exp.jsonl", rows(1))
    old = inbox.claim(path, TTL, clock)
    other = FakeClock()  # a host whose clock runs a TTL ahead: more skew than leases allow
    other.wall = clock.wall + TTL + 1
    assert inbox.requeue_orphans(input_dir, other) == [path]
    new = inbox.claim(path, TTL, other)  # and claims it again at once
    assert not old.holder.renew() and "another process took it over" in old.lost
    assert inbox.release(old) is None  # the old owner's put-back leaves the new claim alone
    assert new.path.exists() and new.holder.ours_on_disk()
    old.end()
    assert new.holder.path.exists()
    assert new.holder.renew()


def test_a_claim_whose_file_was_moved_away_is_lost(tmp_path: Path):
    clock = FakeClock()
    claim = inbox.claim(write_jsonl(tmp_path / "input" / "exp.jsonl", rows(1)), TTL, clock)
    os.rename(claim.path, tmp_path / "input" / "exp.jsonl")  # put back, and its owner record rewritten late
    assert not claim.holder.renew() and "moved away" in claim.lost


def test_a_torn_garbage_or_old_owner_record_counts_from_when_it_was_written(tmp_path: Path):
    clock = FakeClock()
    input_dir = tmp_path / "input"
    torn = write_jsonl(input_dir / ".running" / "torn.jsonl", rows(1))
    owner_of(torn).write_text('{"token": "abc", "host": "another-h')
    garbage = write_jsonl(input_dir / ".running" / "garbage.jsonl", rows(1))
    owner_of(garbage).write_bytes(b"\x00\xff[1, 2]")
    old = write_jsonl(input_dir / ".running" / "old.jsonl", rows(1))  # a version without leases: {host, pid}
    owner_of(old).write_text(json.dumps({"host": "another-host", "pid": os.getpid()}))
    bare = write_jsonl(input_dir / ".running" / "bare.jsonl", rows(1))  # its claimer died before writing a record
    written = owner_of(torn).stat().st_mtime
    for claimed in (torn, garbage, old, bare):
        os.utime(owner_of(claimed) if owner_of(claimed).exists() else claimed, (written, written))
    clock.wall = written + TTL - 1
    assert inbox.requeue_orphans(input_dir, clock, TTL) == []
    clock.wall = max(written, bare.stat().st_ctime) + TTL + 1
    back = inbox.requeue_orphans(input_dir, clock, TTL)
    assert sorted(p.name for p in back) == ["bare.jsonl", "garbage.jsonl", "old.jsonl", "torn.jsonl"]
    assert not list((input_dir / ".running").iterdir())


def test_two_polls_racing_put_back_an_expired_claim_exactly_once(tmp_path: Path):
    clock = FakeClock()
    input_dir = tmp_path / "input"
    for round_ in range(5):
        claimed = foreign_claim(input_dir, "exp.jsonl", renewed_at=clock.now() - TTL - 1)
        start = threading.Barrier(8)
        results: list[list[Path]] = []

        def poll(start: threading.Barrier, results: list[list[Path]]) -> None:
            start.wait()
            results.append(inbox.requeue_orphans(input_dir, clock))

        threads = [threading.Thread(target=poll, args=(start, results)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(len(r) for r in results) == 1, (round_, results)
        assert (input_dir / "exp.jsonl").exists() and not claimed.exists()
        (input_dir / "exp.jsonl").unlink()


def test_a_poll_that_judged_a_lease_before_it_was_replaced_does_nothing(tmp_path: Path):
    clock = FakeClock()
    input_dir = tmp_path / "input"
    claimed = foreign_claim(input_dir, "exp.jsonl", renewed_at=clock.now() - TTL - 1)
    seen = read_lease(owner_of(claimed), TTL)
    assert inbox.requeue_orphans(input_dir, clock) == [input_dir / "exp.jsonl"]  # the faster poll
    again = inbox.claim(input_dir / "exp.jsonl", TTL, clock)  # claimed again by another host
    assert not take_over(owner_of(claimed), seen)  # the slower poll acts on what it saw: refused
    assert again.path.exists() and again.holder.ours_on_disk()


async def test_a_run_that_lost_its_claim_stops_sending_and_another_host_resumes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from promptfleet.api import run_all
    from promptfleet.core.run import open_run

    clock = FakeClock()
    settings = Settings(data_folder=tmp_path / "data", max_queries=1200, lease_seconds=TTL)
    path = write_jsonl(settings.input_folder / "exp.jsonl", rows(40))
    with FakeServer() as server:
        server.state.latency = 0.05
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        first = inbox.claim(path, TTL, clock)
        session = Session()
        session.hold(first)
        run = open_run(first.path, settings, session=session, move_to_input=True)

        async def pause_after_ten() -> None:  # the process is frozen past half its lease
            while sum(server.state.calls.values()) < 10:
                await asyncio.sleep(0.005)
            clock.advance(TTL / 2 + 1)

        pauser = asyncio.create_task(pause_after_ten())
        try:
            lost = await run_all(run)
        finally:
            await run.aclose()
        await pauser
        sent_by_first = sum(server.state.calls.values())
        assert not lost.complete and lost.stopped_by.startswith("lost the claim on exp.jsonl")
        assert 10 <= sent_by_first < 40
        journaled = {r["prompt"] for r in read_jsonl(run.paths.completed)}
        assert len(journaled) == lost.answered < sent_by_first  # in flight at the fence: not journaled here

        clock.advance(TTL)  # another host's poll, a whole TTL later
        assert inbox.requeue_stranded(settings.input_folder, settings.output_folder, clock, TTL) == [path]
        assert inbox.give_back_claimed(first, run.paths.input, settings.input_folder) is None  # the old owner keeps off

        second = inbox.claim(path, TTL, clock)
        session = Session()
        session.hold(second)
        resumed = open_run(second.path, settings, session=session, move_to_input=True)
        try:
            done = await run_all(resumed)
        finally:
            await resumed.aclose()
        second.end()
    assert done.complete and done.resumed and done.answered == 40
    answers = [r["prompt"] for r in read_jsonl(run.paths.completed)]
    assert sorted(answers) == sorted(f"q{i}" for i in range(40))  # each prompt journaled once
    assert all(server.state.calls[f"q{i}"] >= 1 for i in range(40))
    assert sum(server.state.calls.values()) - 40 == sent_by_first - len(journaled)  # resent: only those in flight at the fence


def test_a_claim_that_lapsed_before_its_run_started_is_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from promptfleet.core.run import open_run
    from promptfleet.core.rundir import RunBusy, RunLock

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    clock = FakeClock()
    settings = Settings(data_folder=tmp_path / "data")
    claim = inbox.claim(write_jsonl(settings.input_folder / "exp.jsonl", rows(2)), TTL, clock)
    session = Session()
    session.hold(claim)
    clock.advance(TTL / 2 + 1)  # frozen between its claim and its run
    with pytest.raises(RunBusy, match="not renewed"):
        open_run(claim.path, settings, session=session, move_to_input=True)
    assert claim.path.exists() and not list((settings.output_folder / "exp").glob("*-input-*"))
    RunLock(settings.output_folder / "exp").acquire()  # released


def test_a_pipeline_poll_resumes_what_a_vanished_host_left(tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch):
    """One file claimed but not started, one halfway through its run, both by a host that
    stopped renewing an hour ago: one poll runs both, each prompt answered exactly once."""
    from promptfleet.api import run_all
    from promptfleet.core.run import open_run

    data = tmp_path / "data"
    settings = Settings(data_folder=data, max_queries=6000)
    input_dir = settings.input_folder
    an_hour_ago = time.time() - 3600
    with FakeServer() as server:
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        foreign_claim(input_dir, "waiting.jsonl", renewed_at=an_hour_ago, n=5)
        # "halfway": a complete run whose journal loses its last 6 answers, reopened as the vanished host left it
        half = write_jsonl(input_dir / ".running" / "half.jsonl", [{**r, "prompt": f"h{i}"} for i, r in enumerate(rows(12))])
        run = open_run(half, settings, session=Session(), move_to_input=True)

        async def whole_run() -> None:
            try:
                await run_all(run)
            finally:
                await run.aclose()

        asyncio.run(whole_run())
        kept = run.paths.completed.read_text().splitlines(keepends=True)[:6]
        run.paths.completed.write_text("".join(kept))
        state = json.loads(run.paths.state.read_text())
        run.paths.state.write_text(json.dumps({**state, "finished": False}))
        write_lease(owner_of(half), Lease("vanished", "another-host", os.getpid(), an_hour_ago, TTL))
        before = dict(server.state.calls)

        result = CliRunner().invoke(app, ["pipeline", "-d", str(data), "--once", "--settle", "0", "-mq", "6000"])
        assert result.exit_code == 0, result.output
    assert "waiting: 5 answered" in result.output and "half: 12 answered" in result.output
    sent = {k: v - before.get(k, 0) for k, v in server.state.calls.items() if v - before.get(k, 0)}
    kept_prompts = {json.loads(line)["prompt"] for line in kept}
    assert sent == {p: 1 for p in [f"q{i}" for i in range(5)] + [f"h{i}" for i in range(12)] if p not in kept_prompts}
    for name in ("waiting", "half"):
        [completed] = (data / "output" / name).glob(f"*-completed-{name}.jsonl")
        assert len(read_jsonl(completed)) == (5 if name == "waiting" else 12)
    assert not list((input_dir / ".running").iterdir()) and not list(input_dir.glob("*.jsonl"))


def test_the_holder_renews_in_the_background_until_stopped(tmp_path: Path):
    subject = write_jsonl(tmp_path / "exp.jsonl", rows(1))
    holder = Holder(tmp_path / ".exp.jsonl.owner", subject, ttl=2.0)
    first = read_lease(holder.path, 2.0).renewed_at
    holder.start()
    deadline = time.monotonic() + 10
    while read_lease(holder.path, 2.0).renewed_at == first and time.monotonic() < deadline:
        time.sleep(0.01)
    holder.drop()
    assert holder.lost is None and not holder.path.exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("lease ")]  # the renewing thread ended
    assert not list(tmp_path.glob(".exp.jsonl.owner*"))  # no temp file left


@pytest.mark.parametrize("name", ["my exp é.jsonl", "résumé — ünïcode.jsonl", "two  spaces.csv"])
def test_a_claim_named_with_spaces_and_accents_is_leased_and_put_back(tmp_path: Path, name: str):
    """The lease's record and take-over marker are named after the claimed file: any name
    a user drops works, and nothing of either is left after the put-back."""
    clock = FakeClock()
    input_dir = tmp_path / "input"
    claimed = foreign_claim(input_dir, name, renewed_at=clock.now())
    clock.advance(TTL + 0.01)
    assert inbox.requeue_orphans(input_dir, clock) == [input_dir / name]
    assert (input_dir / name).read_bytes() and not claimed.exists()
    assert sorted(p.name for p in (input_dir / ".running").iterdir()) == []
