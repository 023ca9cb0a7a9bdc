"""A run's summary: the typed outcome a run hands to whoever started it (the CLI, a flow, the
Python API), and its words and tables for the terminal and the Prefect artifacts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from promptfleet.core.rundir import RunPaths


@dataclass
class CostSummary:
    input_tokens: int
    output_tokens: int
    estimated_usd: float
    unpriced_models: list[str]
    by_model: dict[str, dict[str, Any]]
    batch_saved_usd: float = 0.0  # what the batch requests would have cost more online


@dataclass
class RunSummary:
    experiment: str
    prompts: int
    answered: int
    failed: int
    complete: bool
    resumed: bool
    retries: int
    rate_limited: int
    wall_s: float
    queues: list[dict[str, Any]]
    models: list[dict[str, Any]]
    outputs: dict[str, Path]
    paths: RunPaths
    budget_stop: str | None = None
    cost: CostSummary | None = None
    stopped_by: str | None = None  # why sending stopped early, when it did
    batches: list[dict[str, Any]] = field(default_factory=list)  # batch mode: each provider batch and its state
    live_batches: int = 0  # still running at the provider: a rerun collects them
    journal_error: str | None = None  # the disk refused the journal: the run stopped
    unsaved: int = 0  # outcomes that landed but could not be journaled
    flow_run_url: str | None = None  # the Prefect flow run that ran it, when one did
    reused: bool = False  # an earlier finished run of the same input, found on disk: nothing was sent

    @property
    def unfinished(self) -> int:
        return self.prompts - self.answered - self.failed

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "paths"}
        out["unfinished"] = self.unfinished
        out["outputs"] = {k: str(v) for k, v in self.outputs.items()}
        return out

def reused_summary(paths: RunPaths) -> RunSummary:
    """The summary of a finished run found on disk, for a study that judges it instead of
    running it again: counts and outputs, nothing sent now."""
    answered, failed = (_lines(p) for p in (paths.completed, paths.failed))
    outputs = {"completed": paths.completed, "failed": paths.failed, "parquet": paths.parquet, "manifest": paths.manifest}
    return RunSummary(paths.name, answered + failed, answered, failed, complete=True, resumed=False, retries=0, rate_limited=0,
                      wall_s=0.0, queues=[], models=[], outputs={k: v for k, v in outputs.items() if v.exists()}, paths=paths,
                      reused=True)  # fmt: skip


def _lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))


QUEUE_COLUMNS = ("queue", "rate_per_minute", "rate_at_end", "prompts", "already_done", "answered", "failed", "retries", "rate_limited", "latency_p50_s", "latency_p95_s", "wall_s")
# the artifact splits the queue table in two, so that each reads whole in a 1400 px window
QUEUE_COUNT_COLUMNS = ("queue", "prompts", "already_done", "answered", "failed", "retries", "rate_limited")
QUEUE_SPEED_COLUMNS = ("queue", "rate_per_minute", "rate_at_end", "latency_p50_s", "latency_p95_s", "wall_s")
PROGRESS_COLUMNS = ("queue", "done", "answered", "failed", "retries", "rate_limited", "in_flight", "rate_now")
BATCH_COLUMNS = ("batch", "api", "model", "prompts", "state")
MODEL_COLUMNS = ("api", "model_name", "prompts", "answered", "failed", "latency_p50_s", "latency_p95_s", "input_tokens", "output_tokens")
LABELS = {
    "rate_per_minute": "rate/min",
    "rate_at_end": "now/min",
    "already_done": "resumed",
    "rate_limited": "429s",
    "latency_p50_s": "p50 s",
    "latency_p95_s": "p95 s",
    "wall_s": "wall s",
    "model_name": "model",
    "input_tokens": "tok in",
    "output_tokens": "tok out",
    "in_flight": "in flight",
    "rate_now": "now/min",
}


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def headline(summary: RunSummary) -> str:
    state = "complete" if summary.complete else f"stopped with {summary.unfinished} unfinished"
    if summary.budget_stop:
        state += f" ({summary.budget_stop})"
    if summary.journal_error:
        state += " (the journal could not be written)"
    if summary.reused:
        return f"{summary.experiment}: {summary.prompts} prompts, {summary.answered} answered, {summary.failed} failed — complete already ({summary.paths.stamp}), nothing sent"
    resumed = " (resumed)" if summary.resumed else ""
    cost = summary.cost
    spent = f", {cost.input_tokens + cost.output_tokens} tokens, about ${cost.estimated_usd:.4f}" if cost else ""
    if cost and cost.unpriced_models:
        spent += f" + unpriced {', '.join(cost.unpriced_models)}"
    if cost and cost.batch_saved_usd:
        spent += f" (batch prices saved ${cost.batch_saved_usd:.4f})"
    return (
        f"{summary.experiment}{resumed}: {summary.prompts} prompts, {summary.answered} answered, "
        f"{summary.failed} failed, {summary.retries} retries{spent}, {summary.wall_s:.1f}s — {state}"
    )


def table_markdown(rows: list[dict[str, Any]], columns: tuple[str, ...] | None = None) -> str:
    columns = columns or (tuple(rows[0]) if rows else ())
    if not columns:
        return "(nothing)"
    head = "| " + " | ".join(LABELS.get(c, c) for c in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |\n" for r in rows)


def summary_markdown(summary: RunSummary, models: bool = True) -> str:
    """The run's summary artifact; `models=False` when the report appended to it has the models' table."""
    outputs = "".join(f"- {kind}: `{path}`\n" for kind, path in summary.outputs.items())
    batches = f"\n## Batches\n\n{table_markdown(summary.batches, BATCH_COLUMNS)}" if summary.batches else ""
    return (
        f"# {summary.experiment}\n\n{headline(summary)}\n\n## Queues\n\n{table_markdown(summary.queues, QUEUE_COUNT_COLUMNS)}"
        f"\n## Speed\n\n{table_markdown(summary.queues, QUEUE_SPEED_COLUMNS)}"
        + (f"\n## Models\n\n{table_markdown(summary.models, MODEL_COLUMNS)}" if models else "")
        + f"{batches}\n## Outputs\n\n{outputs}"
    )


def progress_markdown(name: str, stats: list[Any], done: bool = False) -> str:
    """Each queue of a run as it goes (QueueStats), for an artifact updated in place."""
    rows = [{"queue": s.name, "done": f"{s.done + s.skipped}/{s.total}", "answered": s.answered, "failed": s.failed,
             "retries": s.retries, "rate_limited": s.rate_limited, "in_flight": s.in_flight,
             "rate_now": round(s.rate_now or s.rate, 1)} for s in stats]  # fmt: skip
    state = "finished" if done else "running"
    return f"# {name}: {state}\n\n{table_markdown(rows, PROGRESS_COLUMNS)}"
