"""One experiment run in three steps — prepare, run each queue, finish — shared by the
Prefect tasks and the plain-Python API. Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from promptfleet import runtime
from promptfleet.config import Settings
from promptfleet.costs import Budget, Spend, load_prices
from promptfleet.engine import QueueContext, QueueStats, RetryPolicy, run_queue
from promptfleet.experiment import ExperimentError, Issue, check_extension, iter_valid
from promptfleet.plan import Plan, QueuePlan, inspect
from promptfleet.providers.base import ProviderOptions
from promptfleet.queues import queue_for
from promptfleet.rundir import Journal, RunPaths, file_digest, find_unfinished, finished_lines, now_stamp, write_state
from promptfleet.scorers import load_scorer
from promptfleet.tables import write_tables

log = logging.getLogger("promptfleet")


def prepare(file: Path, settings: Settings, move_to_input: bool = False) -> Plan:
    """Validate, place the file in the input folder, and pick or resume the run's output.

    A bad file raises ExperimentError before anything is copied, moved or sent.
    """
    file = Path(file)
    check_extension(file)
    name = file.stem
    out_dir = settings.output_folder / name
    digest = file_digest(file)
    stamp = find_unfinished(out_dir, name, digest) if out_dir.exists() else None
    resumed = stamp is not None
    if not resumed:
        stamp = now_stamp()
        while RunPaths(out_dir, stamp, name).state.exists():
            time.sleep(0.2)
            stamp = now_stamp()
    paths = RunPaths(out_dir, stamp, name, file.suffix)
    done = finished_lines(paths) if resumed else set()

    found = inspect(file, settings, done)
    if not found.ok:
        issues: list[Issue | str] = list(found.issues)
        if found.issue_count > len(found.issues):
            issues.append(f"{file}: ... and {found.issue_count - len(found.issues)} more")
        issues += [
            Issue(str(file), 0, "env", f"{where} needs {', '.join(names)} (set it in the environment, the .env file or a Prefect Secret block)")
            for where, names in found.missing_env.items()
        ]
        raise ExperimentError(issues)

    settings.input_folder.mkdir(parents=True, exist_ok=True)
    target = file
    if not file.resolve().is_relative_to(settings.input_folder.resolve()):  # prompto: a file in input/ runs in place
        target = settings.input_folder / file.name
        (shutil.move if move_to_input else shutil.copyfile)(file, target)
    write_state(
        paths,
        input_sha256=digest,
        input_file=str(target),
        started=datetime.now(timezone.utc).isoformat(),
        finished=False,
        prompts=found.prompts,
    )
    return Plan(
        name=name,
        input_file=target,
        out_dir=out_dir,
        stamp=stamp,
        input_suffix=file.suffix,
        settings=settings,
        queues=list(found.queues.values()),
        prompts=found.prompts,
        resumed=resumed,
    )


def _queue_items(plan: Plan, queue: str, done: set[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    limits = plan.settings.limits()
    for line, record in iter_valid(plan.input_file):
        if line not in done and queue_for(record, plan.settings.parallel, limits) == queue:
            yield line, record


async def run_one_queue(plan: Plan, queue: QueuePlan, policy: RetryPolicy | None = None) -> dict[str, Any]:
    """Send one queue's unfinished prompts; returns its stats as a dict."""
    settings = plan.settings
    state = runtime.open_run(
        plan.run_id,
        ProviderOptions(settings.media_folder, settings.timeout),
        Spend(load_prices(settings.prices)),
        Budget(settings.max_cost, settings.max_tokens_total),
    )
    stats = QueueStats(queue.name, queue.rate_per_minute, total=queue.prompts, skipped=queue.already_done)
    state.stats[queue.name] = stats
    done = finished_lines(plan.paths) if plan.resumed else set()
    journal = Journal(plan.paths)
    tpm = f", {queue.tokens_per_minute:g} tokens/min" if queue.tokens_per_minute else ""
    log.info("queue %s: %d prompts at %g/min%s (%d already done)", queue.name, queue.prompts, queue.rate_per_minute, tpm, queue.already_done)
    limits = (queue.rate_per_minute, queue.tokens_per_minute, settings.max_in_flight)
    try:
        with runtime.shared_pacer(plan.run_id, queue.name, queue.target, *limits) as pacer:
            ctx = QueueContext(
                state.clients, pacer, journal, stats,
                policy or RetryPolicy(max_attempts=settings.max_attempts), state.stop, state.spend, state.budget,
                [load_scorer(name) for name in settings.scorers],
            )  # fmt: skip
            await run_queue(_queue_items(plan, queue.name, done), ctx)
    finally:
        journal.close()
    log.info(
        "queue %s: %d answered, %d failed, %d retries, %d rate-limited in %.1fs, rate at end %.0f/min%s",
        queue.name, stats.answered, stats.failed, stats.retries, stats.rate_limited, stats.elapsed, pacer.rate,
        " (stopped)" if stats.stopped else "",
    )
    return stats.as_dict()


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))


async def finish(plan: Plan, queue_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Tables and summary; when every prompt has landed, close the run prompto's way
    (input moved next to its outputs). An unfinished run stays resumable."""
    state = runtime.get_run(plan.run_id)
    spend = state.spend if state else None
    await runtime.close_run(plan.run_id)
    paths = plan.paths
    answered, failed = _count_lines(paths.completed), _count_lines(paths.failed)
    complete = answered + failed == plan.prompts
    score_keys = sorted({k for q in queue_stats for k in q.get("score_keys", [])})
    per_model = write_tables(paths, csv=plan.settings.output_as_csv, score_keys=score_keys)
    if complete:
        if plan.input_file.exists():
            shutil.move(plan.input_file, paths.input)
        state = json.loads(paths.state.read_text())
        write_state(paths, **{**state, "finished": True, "ended": datetime.now(timezone.utc).isoformat()})
    outputs = {"completed": paths.completed, "failed": paths.failed, "log": paths.log, "parquet": paths.parquet}
    if plan.settings.output_as_csv:
        outputs["csv"] = paths.csv
    if complete:
        outputs["input"] = paths.input
    return {
        "experiment": plan.name,
        "prompts": plan.prompts,
        "answered": answered,
        "failed": failed,
        "unfinished": plan.prompts - answered - failed,
        "complete": complete,
        "resumed": plan.resumed,
        "retries": sum(q["retries"] for q in queue_stats),
        "rate_limited": sum(q["rate_limited"] for q in queue_stats),
        "budget_stop": next((q["budget_stop"] for q in queue_stats if q.get("budget_stop")), None),
        "cost": _cost_summary(spend),
        "wall_s": max((q["wall_s"] for q in queue_stats), default=0.0),
        "queues": queue_stats,
        "models": per_model.to_dicts(),
        "outputs": {k: str(v) for k, v in outputs.items() if Path(v).exists()},
    }


def _cost_summary(spend: Spend | None) -> dict[str, Any] | None:
    """This session's tokens and estimated cost (a resumed run counts what it sent itself)."""
    if spend is None:
        return None
    return {
        "input_tokens": spend.input_tokens,
        "output_tokens": spend.output_tokens,
        "estimated_usd": round(spend.cost, 6),
        "unpriced_models": sorted(spend.unpriced),
        "by_model": spend.by_model,
    }


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Mirror promptfleet's log lines into the run's `-log-` file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
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

