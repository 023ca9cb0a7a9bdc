"""Reports in the Prefect UI.

A study gets a markdown artifact (rankings with 95% intervals, the top two compared prompt
by prompt, charts) and a table artifact of answers side by side, both keyed per experiment
so the Artifacts page keeps their history. A run's summary artifact gains its models' cost,
latency and charts. Each also writes the offline page beside the outputs. The answers are
in by then: a report that fails costs a warning and the report, never the run.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

from promptfleet.core.slug import slug
from promptfleet.core.summary import table_markdown

if TYPE_CHECKING:
    from promptfleet.core.summary import RunSummary
    from promptfleet.evaluation.html import Written
    from promptfleet.evaluation.study import StudyTable

log = logging.getLogger("promptfleet")


async def load_charts_meanwhile(after: float = 1.0) -> None:
    """Like the tables' library, the charts' one (~0.5 s of imports) loads while the queues
    wait on answers, when the run lasts long enough for that to help."""
    from promptfleet.evaluation.charts import load_library

    await asyncio.sleep(after)
    await asyncio.to_thread(load_library)


async def _written(table: Path, batch_saved_usd: float | None = None) -> Written | None:
    from promptfleet.evaluation.html import write_report

    try:  # polars and matplotlib work in a thread: other flows in this process keep running
        return await asyncio.to_thread(write_report, table, batch_saved_usd)
    except Exception as error:  # noqa: BLE001 - the report is extra; the answers and tables are what the run owes
        log.warning("%s: no report (%s: %s)", table.name, type(error).__name__, error)
        return None


async def publish_study(name: str, study: StudyTable) -> Path | None:
    """The study and answers artifacts of experiment `name`; the offline page's path."""
    from promptfleet.evaluation.charts import INSTALL_HINT
    from promptfleet.evaluation.markdown import answer_table, study_markdown

    written = await _written(study.parquet)
    if written is None:
        markdown = f"# Study: {name}\n\n{table_markdown(study.summary)}\n\n- table: `{study.parquet}`\n"
    else:
        answers_key = f"answers-{slug(name)}"
        rows, left_out = answer_table(written.report)
        sampled = len(written.report.sample.rows) - left_out
        more = f"; {left_out} more in the offline report" if left_out else ""
        await acreate_table_artifact(table=rows, key=answers_key, description=(
            f"{name}: {sampled} of {written.report.sample.prompts} prompts, each model's answer and verdicts (trimmed{more})"))  # fmt: skip
        markdown = study_markdown(written.report, written.charts, INSTALL_HINT, answers_key)
    await acreate_markdown_artifact(key=f"study-{slug(name)}", markdown=markdown, description=f"answers and verdicts of {name}")
    return written.html if written else None


async def run_report(summary: RunSummary) -> str:
    """Write the run's offline page and return what its summary artifact gains (markdown).
    Judge runs get none: their study has the report."""
    from promptfleet.evaluation.charts import INSTALL_HINT
    from promptfleet.evaluation.markdown import run_markdown

    table = summary.paths.parquet
    if summary.paths.name.startswith("judge-") or not table.exists():
        return ""
    written = await _written(table, summary.cost.batch_saved_usd if summary.cost else None)
    if written is None:
        return ""
    summary.outputs["report"] = written.html
    return run_markdown(written.report, written.charts, INSTALL_HINT)
