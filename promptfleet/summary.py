"""Words and tables for a run summary, shared by the terminal and the Prefect artifacts."""

from __future__ import annotations

from typing import Any

QUEUE_COLUMNS = ("queue", "rate_per_minute", "rate_at_end", "prompts", "already_done", "answered", "failed", "retries", "rate_limited", "latency_p50_s", "latency_p95_s", "wall_s")
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
}


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def headline(summary: dict[str, Any]) -> str:
    state = "complete" if summary["complete"] else f"stopped with {summary['unfinished']} unfinished"
    if summary.get("budget_stop"):
        state += f" ({summary['budget_stop']})"
    if summary.get("journal_error"):
        state += " (the journal could not be written)"
    resumed = " (resumed)" if summary["resumed"] else ""
    cost = summary.get("cost") or {}
    spent = f", {cost.get('input_tokens', 0) + cost.get('output_tokens', 0)} tokens, about ${cost.get('estimated_usd') or 0:.4f}"
    if cost.get("unpriced_models"):
        spent += f" + unpriced {', '.join(cost['unpriced_models'])}"
    if cost.get("batch_saved_usd"):
        spent += f" (batch prices saved ${cost['batch_saved_usd']:.4f})"
    return (
        f"{summary['experiment']}{resumed}: {summary['prompts']} prompts, {summary['answered']} answered, "
        f"{summary['failed']} failed, {summary['retries']} retries{spent}, {summary['wall_s']:.1f}s — {state}"
    )


def table_markdown(rows: list[dict[str, Any]], columns: tuple[str, ...] | None = None) -> str:
    columns = columns or (tuple(rows[0]) if rows else ())
    if not columns:
        return "(nothing)"
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |\n" for r in rows)


def summary_markdown(summary: dict[str, Any]) -> str:
    outputs = "".join(f"- {kind}: `{path}`\n" for kind, path in summary["outputs"].items())
    return (
        f"# {summary['experiment']}\n\n{headline(summary)}\n\n## Queues\n\n{table_markdown(summary['queues'], QUEUE_COLUMNS)}"
        f"\n## Models\n\n{table_markdown(summary['models'], MODEL_COLUMNS)}{_batches_markdown(summary)}\n## Outputs\n\n{outputs}"
    )


def _batches_markdown(summary: dict[str, Any]) -> str:
    batches = summary.get("batches")
    return f"\n## Batches\n\n{table_markdown(batches, BATCH_COLUMNS)}" if batches else ""
