"""One experiment run as one object. Opened from a plan, a `Run` owns everything its queues
share — clients, pacers (from the session's pool), spend and budget, the stop signal, the
journal, the record reader, per-queue stats, and the lock that makes it the only owner of
its experiment — and is handed to each queue's task. Nothing here imports Prefect.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import repeat
from pathlib import Path
from typing import Any

from promptfleet.core import inbox, manifest, plan_cache
from promptfleet.core.config import Settings
from promptfleet.core.costs import Budget, Spend
from promptfleet.core.engine import (
    Prompt,
    QueueContext,
    QueueStats,
    RetryPolicy,
    run_queue,
)
from promptfleet.core.experiment import (
    ExperimentError,
    Issue,
    RecordReader,
    check_extension,
)
from promptfleet.core.limiter import SharedRate
from promptfleet.core.plan import Plan, QueuePlan
from promptfleet.core.rundir import (
    Journal,
    JournalIndex,
    RunBusy,
    RunLock,
    RunPaths,
    now_stamp,
    read_journal,
    read_state,
    unfinished_runs,
    write_state,
)
from promptfleet.core.scorers import load_scorer
from promptfleet.core.session import Session, current_session
from promptfleet.core.summary import CostSummary, RunSummary
from promptfleet.core.tables import SEEN_COLUMNS, TableWriter, load_library
from promptfleet.providers import Clients, provider_class
from promptfleet.providers.base import ProviderOptions, resolve_env

log = logging.getLogger("promptfleet")


def _problems(plan: Plan) -> list[Issue | str]:
    issues: list[Issue | str] = list(plan.issues)
    if plan.issue_count > len(plan.issues):
        issues.append(f"{plan.file}: ... and {plan.issue_count - len(plan.issues)} more")
    issues += [
        Issue(str(plan.file), 0, "env", f"{where} needs {', '.join(names)} (set it in the environment, the .env file or a Prefect Secret block)")
        for where, names in plan.missing_env.items()
    ]
    return issues


@dataclass
class _Resume:
    stamp: str
    skip: dict[str, bytearray] = field(default_factory=dict)
    note: str | None = None
    same_input: bool = False  # the run was started on these very bytes (its state's digest)


class Run:
    def __init__(self, plan: Plan, settings: Settings, session: Session, paths: RunPaths, lock: RunLock,
                 resumed: bool, skip: dict[str, bytearray], policy: RetryPolicy | None,
                 claim: inbox.Claim | None = None) -> None:  # fmt: skip
        self.plan, self.settings, self.session, self.paths = plan, settings, session, paths
        self.claim = claim
        self._claim_lost = False
        self.resumed = resumed
        self.queues = list(plan.queues.values())
        self._lock = lock
        self._skip = skip
        self.policy = policy or RetryPolicy(max_attempts=settings.max_attempts)
        self.clients = Clients(ProviderOptions(settings.media_folder, settings.timeout))
        self.spend = Spend(settings.price_table)  # this session's: the budget's
        self.budget = Budget(settings.max_cost, settings.max_tokens_total)
        self.stop = asyncio.Event()
        self.stopped_by: str | None = None
        self.journal_error: str | None = None
        self.earlier_spend = Spend(settings.price_table)  # what earlier sessions' answers cost, read back from the journal
        earlier = paths.completed.stat().st_size if paths.completed.exists() else 0
        self.journal = Journal(paths, on_error=self._journal_failed)
        self.table = TableWriter(paths, plan.parsed_columns, on_answer=lambda record: _paid(self.earlier_spend, record), answers_before=earlier)
        if not settings.scorers:  # scorers name their columns as they go: their runs' tables are written at the end
            self.table.follow()
        self.reader = RecordReader(paths.input)
        self.scorers = [load_scorer(name) for name in settings.scorers]
        self.stats = {q.name: QueueStats(q.name, q.rate_per_minute, total=q.prompts, skipped=q.prompts - self._todo(q)) for q in self.queues}
        if plan.batch:
            self.stats[plan.batch.name] = QueueStats(plan.batch.name, 0.0, total=plan.batch.prompts, skipped=plan.batch.prompts - self._todo(plan.batch))
        self.batches: list[dict[str, Any]] = []
        self.live_batches = 0
        if session.stopping:
            self.stop.set()
        session.runs.append(self)

    @property
    def name(self) -> str:
        return self.plan.name

    def done_marks(self, queue: QueuePlan) -> bytearray | None:
        """Which of the queue's records an earlier session of this run already journaled."""
        return self._skip.get(queue.name)

    def _todo(self, queue: QueuePlan) -> int:
        skip = self._skip.get(queue.name)
        return queue.prompts - (skip.count(1) if skip else 0)

    def _journal_failed(self, error: OSError) -> None:
        if self.journal_error is None:  # even after a Ctrl-C: the resume must know
            self.journal_error = f"cannot write the journal in {self.paths.out_dir}: {error.strerror or error}"
        if not self.stop.is_set():
            self.stopped_by = f"writing {self.paths.out_dir} failed ({error.strerror}); nothing more is sent"
            log.error("%s", self.stopped_by)
            self.stop.set()

    def owns(self) -> bool:
        """Whether this process still owns its inbox file's claim. Once not (its lease
        lapsed or another host took it over), the run stops: nothing more is sent or
        journaled, so a host that resumes the file is never sending beside this one."""
        if self.claim is None or self.claim.held():
            return True
        if not self._claim_lost:
            self._claim_lost = True
            self.stopped_by = f"lost the claim on {self.claim.path.name}: {self.claim.lost}; nothing more is sent from here"
            log.error("%s", self.stopped_by)
            self.stop.set()
        return False

    def prompts(self, queue: QueuePlan) -> Iterator[Prompt]:
        """The queue's unfinished records, read back by their planned place (a resumed run
        jumps over what is done in one search, not a record at a time)."""
        skip = self._skip.get(queue.name) or bytes(queue.prompts)
        i = skip.find(0)
        while i != -1:
            yield Prompt(queue.lines[i], queue.key(i), self.reader.read(queue.offsets[i], queue.lengths[i]))
            i = skip.find(0, i + 1)

    async def send_queue(self, queue: QueuePlan) -> QueueStats:
        stats = self.stats[queue.name]
        tpm = f", {queue.tokens_per_minute:g} tokens/min" if queue.tokens_per_minute else ""
        log.info("queue %s: %d prompts at %g/min%s (%d already done)", queue.name, queue.prompts, queue.rate_per_minute, tpm, stats.skipped)
        limits = (queue.rate_per_minute, queue.tokens_per_minute, self.settings.max_in_flight)
        async with self.session.pacers.pacer(self._pacer_key(queue), *limits, shared=lambda: self._shared_rate(queue)) as pacer:
            ctx = QueueContext(self.clients, pacer, self.journal, stats, self.policy, self.stop, self.spend, self.budget,
                               self.scorers, grace=self.settings.stop_grace, owns=self.owns)  # fmt: skip
            await run_queue(self.prompts(queue), ctx)
        log.info(
            "queue %s: %d answered, %d failed, %d retries, %d rate-limited in %.1fs, rate at end %.0f/min%s",
            queue.name, stats.answered, stats.failed, stats.retries, stats.rate_limited, stats.elapsed, pacer.rate,
            " (stopped)" if stats.stopped else "",
        )  # fmt: skip
        return stats

    def _pacer_key(self, queue: QueuePlan) -> tuple:
        """Queues sending to one model with one key share a pacer; a mixed queue has its own."""
        if queue.target is None:
            return ("queue", id(self), queue.name)
        creds = sorted(_credentials(queue.target).items())
        return ("model", queue.target, hashlib.sha256(repr(creds).encode()).hexdigest())

    def _shared_rate(self, queue: QueuePlan) -> SharedRate | None:
        """The key's rate shared with every process reporting to the same server, when the
        session was given a way to share it (none for a mixed queue)."""
        if queue.target is None or self.session.shared_rates is None:
            return None
        api, _, model = queue.target.partition("/")
        return self.session.shared_rates(api, model, _credentials(queue.target), queue.rate_per_minute)

    def finish(self, orchestration: dict[str, Any] | None = None) -> RunSummary:
        """Tables, manifest and summary; when every prompt has landed, the run is closed
        (state finished). An unfinished run stays resumable. `orchestration` is the Prefect
        flow run (id, URL) when there is one, for the manifest."""
        self.journal.close()
        paths = self.paths
        answered, failed = _count_lines(paths.completed), _count_lines(paths.failed)
        unchanged = paths.input.stat().st_size == self.plan.size  # nobody appended to it meanwhile
        owned = self.owns()  # a run whose claim was lost is never marked finished: its new owner decides
        complete = answered + failed == self.plan.prompts and unchanged and owned and self.stopped_by is None and self.journal_error is None
        stats = list(self.stats.values())
        score_keys = sorted({k for s in stats for k in s.score_keys})
        models, seen = [], []
        if self.journal_error is None:  # a disk that refused the journal would refuse the tables: the resume writes them
            table = self.table.finish(csv=self.settings.output_as_csv, score_keys=score_keys)
            models = table.drop(*SEEN_COLUMNS).to_dicts()
            seen = table.select("api", "model_name", "prompts", "answered", *SEEN_COLUMNS).to_dicts()
        else:
            self.table.stop()
        state = read_state(paths)
        if complete:
            state = {**state, "finished": True, "ended": datetime.now(timezone.utc).isoformat()}
            write_state(paths, **state)
            plan_cache.forget(self.plan.file, self.settings)
        outputs = {"completed": paths.completed, "failed": paths.failed, "log": paths.log, "parquet": paths.parquet, "input": paths.input}
        if self.settings.output_as_csv:
            outputs["csv"] = paths.csv
        summary = RunSummary(
            experiment=self.name,
            prompts=self.plan.prompts,
            answered=answered,
            failed=failed,
            complete=complete,
            resumed=self.resumed,
            retries=sum(s.retries for s in stats),
            rate_limited=sum(s.rate_limited for s in stats),
            budget_stop=next((s.budget_stop for s in stats if s.budget_stop), None),
            cost=_cost_summary(self.spend, self.earlier_spend),
            wall_s=max((s.elapsed for s in stats), default=0.0),
            queues=[s.as_dict() for s in stats],
            models=models,
            outputs={k: v for k, v in outputs.items() if v.exists()},
            paths=paths,
            stopped_by=self.stopped_by,
            batches=self.batches,
            live_batches=self.live_batches,
            journal_error=self.journal_error,
            unsaved=sum(s.unsaved for s in stats),
        )
        if self.journal_error is None:  # likewise the manifest
            manifest.write(paths, manifest.build(paths, self.settings, state, summary, orchestration, seen))
            summary.outputs["manifest"] = paths.manifest
        return summary

    async def aclose(self) -> None:
        if self in self.session.runs:
            self.session.runs.remove(self)
        try:
            await self.clients.aclose()
        finally:
            self.table.stop()
            self.journal.close()
            self.reader.close()
            self._lock.release()


def open_run(
    file: Path | str,
    settings: Settings,
    *,
    session: Session | None = None,
    move_to_input: bool = False,
    plan: Plan | None = None,
    policy: RetryPolicy | None = None,
    wait: bool = False,
) -> Run:
    """Validate (or reuse the caller's plan), take ownership of the experiment, pick or
    resume its run, and place the input file next to its outputs.

    A bad file raises ExperimentError before anything is copied, moved or sent; another
    owner raises RunBusy (or is waited for)."""
    session = session or current_session()
    file = Path(file)
    check_extension(file)
    if plan is None or plan.file != file or not plan.is_current():
        plan = plan_cache.plan_for(file, settings)
    if not plan.ok:
        raise ExperimentError(_problems(plan))
    name = plan.name
    out_dir = settings.output_folder / name
    lock = session.lock_for(out_dir)
    lock.acquire(wait, on_wait=lambda owner: log.warning("%s is being run by %s; waiting for it", name, owner))
    try:
        resume = _pick_run(plan, out_dir)
        paths = RunPaths(out_dir, resume.stamp, name, file.suffix)
        if resume.note:
            log.warning("%s", resume.note)
        claim = session.claim_for(file)
        if claim is not None and not claim.held():  # its file may be someone else's claim by now: never move it
            raise RunBusy(f"another process ({claim.path.name}: {claim.lost})")
        if not paths.input.exists() or (file.resolve() != paths.input.resolve() and not _placed(paths, plan, resume, move_to_input)):
            if claim is not None and move_to_input:
                claim.moving_to(paths.input)
            inbox.place_working_copy(file, paths.input, move=move_to_input)
        resumed = paths.state.exists()
        state = read_state(paths) if resumed else {"started": datetime.now(timezone.utc).isoformat()}
        write_state(paths, **{**state, "input_sha256": plan.digest, "source": str(file), "finished": False, "prompts": plan.prompts})
        plan_cache.keep(plan, settings)
        return Run(plan, settings, session, paths, lock, resumed, resume.skip, policy, claim)
    except BaseException:
        lock.release()
        raise


def _pick_run(plan: Plan, out_dir: Path) -> _Resume:
    """The unfinished run to continue, and which planned records it already answered.

    Answers are matched to records by content key, so an input edited after a crash keeps
    the answers of its unchanged lines; the change is said, never silently resent."""
    for stamp, state in unfinished_runs(out_dir, plan.name):
        paths = RunPaths(out_dir, stamp, plan.name)
        log.info("%s: resuming run %s; reading what it has done", plan.name, stamp)
        done = read_journal(paths, progress=lambda n: log.info("%s: %s prompt(s) done so far", plan.name, f"{n:,}"))
        same = state.get("input_sha256") == plan.digest
        skip, matched = _skips(plan, done)
        if done.corrupt:
            log.warning("%s: %d torn journal line(s) set aside in *.corrupt; their prompts will be sent again", plan.name, done.corrupt)
        answered = sum(done.keys.values())
        if same or matched or not answered:
            note = None
            if not same:
                stale = answered - matched
                note = (
                    f"{plan.file} changed since the unfinished run {stamp}: {matched} answered prompt(s) are unchanged and kept, "
                    f"{plan.prompts - matched} will be sent"
                    + (f"; {stale} answer(s) of lines no longer in the file stay in its journal" if stale else "")
                )
            return _Resume(stamp, skip, note, same)
        log.warning("%s: the unfinished run %s is of a different file (no answer matches); starting a new run", plan.name, stamp)
        break
    stamp = now_stamp()
    while RunPaths(out_dir, stamp, plan.name).state.exists():
        time.sleep(0.2)
        stamp = now_stamp()
    return _Resume(stamp)


def _placed(paths: RunPaths, plan: Plan, resume: _Resume, move_to_input: bool) -> bool:
    """Whether the working copy already holds the planned bytes: a resumed run's state names
    the digest of the file its copy was made from, written once the copy was in place. Not
    copying a million prompts again saves a resumed run ~0.3 s before it sends. A file to
    move (-m) is always moved: it must leave the inbox."""
    return resume.same_input and not move_to_input and paths.input.stat().st_size == plan.size


def _paid(spend: Spend, record: dict[str, Any]) -> None:
    """A journaled answer, counted as it was when it landed (by the engine, or the batch runner)."""
    if not (usage := record.get("usage")):
        return
    model = record.get("model_name") or ""
    if record.get("batch"):
        spend.add(model, usage.get("input_tokens"), usage.get("output_tokens"), batch=True)
    else:
        spend.add(model, usage.get("input_tokens"), usage.get("output_tokens"), api=record.get("api"), reasoning_tokens=usage.get("reasoning_tokens"))


def _skips(plan: Plan, done: JournalIndex) -> tuple[dict[str, bytearray], int]:
    """Which planned records the journal answered: as many of each content key as it holds
    (a line repeated in the input is answered once per time it appears), the first ones in
    planned order. Each answered key is taken off a copy of the index as it is matched, so
    the planned keys pass once, in chunks (a million of them as strings would cost ~80 MB),
    and once every answer is matched the rest are unanswered without a look."""
    left = dict(done.keys)
    repeated = max(left.values(), default=1) > 1
    skip = {}
    for queue in [*plan.queues.values(), *([plan.batch] if plan.batch else [])]:
        marks = skip[queue.name] = bytearray()
        for chunk in _key_chunks(queue):
            if not left:
                marks += bytes(len(chunk) // 12)
                continue
            hexed = chunk.hex()
            keys = [hexed[i : i + 24] for i in range(0, len(hexed), 24)]
            if not repeated:  # each key once: pop answers 1 for its first planned record, 0 after
                marks += bytes(map(left.pop, keys, repeat(0)))
                continue
            for key in keys:
                count = left.pop(key, 0)
                if count > 1:
                    left[key] = count - 1
                marks.append(1 if count else 0)
    return skip, sum(marks.count(1) for marks in skip.values())


def _key_chunks(queue: QueuePlan, records: int = 1 << 16) -> Iterator[bytearray]:
    for start in range(0, len(queue.keys), 12 * records):
        yield queue.keys[start : start + 12 * records]


def _credentials(target: str) -> dict[str, str]:
    """The env values that pick an `api/model`'s account (keys, endpoints)."""
    api, _, model = target.partition("/")
    cls = provider_class(api)
    return resolve_env(cls.required_env + cls.optional_env, model)


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))


def _cost_summary(*spends: Spend) -> CostSummary:
    """The run's tokens and estimated cost: this session's as it paid them, earlier sessions'
    as their journal says (a reply a schema refused back then was paid and not journaled)."""
    by_model: dict[str, dict[str, Any]] = {}
    for spend in spends:
        for model, entry in spend.by_model.items():
            total = by_model.setdefault(model, dict.fromkeys(entry, 0))
            for key, value in entry.items():
                total[key] = None if value is None or total.get(key, 0) is None else total.get(key, 0) + value
    return CostSummary(sum(s.input_tokens for s in spends), sum(s.output_tokens for s in spends), round(sum(s.cost for s in spends), 6),
                       sorted(set().union(*(s.unpriced for s in spends))), by_model, round(sum(s.batch_saved for s in spends), 6))  # fmt: skip


class _QuietFileHandler(logging.FileHandler):
    """A run log on a full disk drops its lines instead of printing a traceback per line:
    the journal failure that matters is reported once, on the console."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
        pass


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Mirror promptfleet's log lines into the run's `-log-` file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _QuietFileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("promptfleet")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


async def load_tables_meanwhile(after: float = 1.0) -> None:
    """Once the queues are sending (and mostly waiting on answers), load what writing the
    tables needs in a thread, off the path between the last answer and the run's end.
    Cancelled first, a short run loads it when it writes its tables."""
    await asyncio.sleep(after)
    await asyncio.to_thread(load_library)
