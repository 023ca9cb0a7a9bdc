"""Flow `run_experiment`: load_and_validate -> one run_queue per queue, concurrently -> write_results.

While queues run, a progress artifact follows them; at the end a summary artifact and the
event `promptfleet.experiment.completed` (which judge deployments and automations can
trigger on) carry the output paths.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from uuid import UUID

from prefect import get_client
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    aupdate_progress_artifact,
)
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.events import emit_event
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.utilities.urls import url_for

from promptfleet.core import inbox
from promptfleet.core.config import Settings
from promptfleet.core.experiment import ExperimentError
from promptfleet.core.run import Run, load_tables_meanwhile, run_log
from promptfleet.core.session import current_session
from promptfleet.core.slug import slug
from promptfleet.core.summary import RunSummary, progress_markdown, summary_markdown
from promptfleet.orchestration.artifacts import load_charts_meanwhile, run_report
from promptfleet.orchestration.flows.begin import begin_flow
from promptfleet.orchestration.flows.lean import flow
from promptfleet.orchestration.flows.outcome import ended
from promptfleet.orchestration.secrets import env_from_secret_blocks
from promptfleet.orchestration.shared_rate import shared_rate_for
from promptfleet.orchestration.tasks import (
    load_and_validate,
    run_batches,
    run_queue,
    write_results,
)

log = logging.getLogger("promptfleet")

COMPLETED_EVENT = "promptfleet.experiment.completed"


def _run_name() -> str:
    return Path(str(flow_run.parameters["file"])).stem


def _percent(done: int, prompts: int) -> float:
    return round(100.0 * done / max(prompts, 1), 1)


async def _follow_progress(run: Run, artifact: UUID, queues: UUID, interval: float = 2.0) -> None:
    """The percentage and the queue table, updated in place while the queues run."""
    last, table = 0.0, ""
    try:
        async with get_client() as client:
            while True:
                await asyncio.sleep(interval)
                percent = _percent(sum(s.done + s.skipped for s in run.stats.values()), run.plan.prompts)
                if percent != last:
                    await aupdate_progress_artifact(artifact, percent, client=client)
                    last = percent
                if (now := progress_markdown(run.name, list(run.stats.values()))) != table:
                    await client.update_artifact(queues, ArtifactUpdate(data=now))
                    table = now
    except asyncio.CancelledError:
        pass


@flow(name="run_experiment", flow_run_name=_run_name, log_prints=True)
async def run_experiment(file: str, settings: Settings | None = None, move_to_input: bool = False, wait: bool = False) -> RunSummary | None:
    """Run one prompto-format experiment file; every queue is a task in one event loop.
    None (a Completed flow run saying why) when the file or the experiment is another
    process's, or the file was run already."""
    settings = settings or Settings()
    session = current_session()
    begin_flow(session)
    if session.shared_rates is None:  # a key's rate is shared with every process on this server
        session.shared_rates = shared_rate_for
    try:  # the one claim: a CLI run took it already, a poll or a deployment run takes it here
        work = inbox.take(Path(file), settings, session, wait,
                          on_wait=lambda owner: log.warning("%s is being run by %s; waiting for it", Path(file).stem, owner))  # fmt: skip
    except inbox.Taken as taken:
        log.info("%s", taken)
        return Completed(message=str(taken))  # type: ignore[return-value]
    summary = None
    try:
        summary = await _run(work, settings, session, move_to_input or work.move, wait)
    except ExperimentError as error:  # the flow run fails in one line; its caller gets the ExperimentError
        more = f" (and {len(error.issues) - 1} more)" if len(error.issues) > 1 else ""
        if target := work.reject(str(error), settings.data_folder):
            first = f", first: {error.issues[0]}" if error.issues else ""
            log.error("%s cannot run (%d problem(s)%s); moved to %s with the full report", Path(file).name, len(error.issues), first, target)
        return Failed(message=f"cannot run: {error.issues[0] if error.issues else error}{more}", data=error)  # type: ignore[return-value]
    finally:
        if work.claim:
            session.let_go(work.claim)
        work.settle(summary is not None and summary.complete, summary.paths.input if summary else None, settings.input_folder)
    return ended(summary, session, summary.unfinished)


async def _run(work: inbox.Work, settings: Settings, session, move_to_input: bool, wait: bool) -> RunSummary:
    if not session.planned(work.file) and (filled := await env_from_secret_blocks()):
        log.info("API keys from Prefect Secret blocks: %s", ", ".join(filled))
    run = await load_and_validate(work.file, settings, session, move_to_input, wait)
    if isinstance(run, ExperimentError):
        raise run
    try:
        artifact = await acreate_progress_artifact(0.0, key=f"progress-{slug(run.name)}", description=f"{run.name}: prompts done")
        queues = await acreate_markdown_artifact(key=f"queues-{slug(run.name)}", markdown=progress_markdown(run.name, list(run.stats.values())),
                                                 description=f"{run.name}: each queue as it runs")  # fmt: skip
        with run_log(run.paths.log):
            progress = asyncio.create_task(_follow_progress(run, artifact, queues))
            tables = asyncio.create_task(load_tables_meanwhile())
            charts = asyncio.create_task(load_charts_meanwhile())
            try:
                batches = [run_batches(run)] if run.plan.batch else []
                await asyncio.gather(*(run_queue(run, queue) for queue in run.queues), *batches)
            finally:
                progress.cancel()
                tables.cancel()
                charts.cancel()
                await progress
            summary = await write_results(run)
    finally:
        await run.aclose()
    # the last word on progress: what landed, so a finished run reads 100%
    await aupdate_progress_artifact(artifact, _percent(summary.answered + summary.failed, summary.prompts))
    async with get_client() as client:
        await client.update_artifact(queues, ArtifactUpdate(data=progress_markdown(run.name, list(run.stats.values()), done=True)))
    if flow_run.id and (url := url_for("flow-run", obj_id=flow_run.id)):
        summary.flow_run_url = url
    report = await run_report(summary)  # first: it adds the offline page to the outputs
    await acreate_markdown_artifact(
        key=f"summary-{slug(run.name)}",
        markdown=summary_markdown(summary, models=not report) + report,
        description=f"promptfleet summary of {run.name}",
    )
    if summary.complete:
        emit_event(
            event=COMPLETED_EVENT,
            resource={
                "prefect.resource.id": f"promptfleet.experiment.{run.name}",
                "prefect.resource.name": run.name,
                # judge runs say so, so a judge trigger does not judge its own verdicts
                "promptfleet.role": "judge" if run.name.startswith("judge-") else "experiment",
            },
            related=[
                {"prefect.resource.id": f"promptfleet.file.{path}", "prefect.resource.role": kind}
                for kind, path in summary.outputs.items()
            ],
            payload={"experiment": summary.experiment, "prompts": summary.prompts, "answered": summary.answered,
                     "failed": summary.failed, "outputs": {k: str(v) for k, v in summary.outputs.items()},
                     "data_folder": str(settings.data_folder)},  # fmt: skip
        )
    return summary
