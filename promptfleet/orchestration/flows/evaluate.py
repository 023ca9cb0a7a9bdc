"""Evaluation flows chained on finished runs: `judge_experiment` (LLM-as-a-judge and the
study table) and `rephrase_experiment` (prompto's rephrase, then the rephrased run)."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from promptfleet.core.config import Settings
from promptfleet.core.experiment import write_records
from promptfleet.core.inbox import Taken
from promptfleet.core.plan import inspect
from promptfleet.core.rundir import RunPaths
from promptfleet.core.session import current_session
from promptfleet.core.summary import reused_summary
from promptfleet.evaluation import judge as judging
from promptfleet.evaluation.judged import (
    Judging,
    earlier_judgings,
    finished_run_of,
    flow_run_of,
    run_paths_of,
    take_judging,
)
from promptfleet.evaluation.outcomes import Judged, Rephrased, Study
from promptfleet.evaluation.study import StudyTable, write_study
from promptfleet.orchestration.artifacts import publish_study
from promptfleet.orchestration.flows.begin import begin_flow
from promptfleet.orchestration.flows.lean import flow
from promptfleet.orchestration.flows.outcome import ended, result_of
from promptfleet.orchestration.flows.run_experiment import run_experiment
from promptfleet.orchestration.links import link_judging, this_flow_run

log = logging.getLogger("promptfleet")


@task(name="create_judge_file", cache_policy=NO_CACHE)
def create_judge_file(completed: Path, folder: Path, templates: list[str], judges: list[str], out: Path) -> judging.JudgeFile:
    return judging.write_judge_file(completed, folder, templates, judges, out, failed=run_paths_of(completed).failed)


@task(name="write_study_table", cache_policy=NO_CACHE)
def write_study_table(original: RunPaths, judge_run: RunPaths, judges: list[str], templates: list[str]) -> StudyTable:
    """The run's answers with the verdicts of this judging and of earlier ones side by side;
    an earlier judging by the same judge and template name (its text since edited) is
    superseded by this one."""
    files, judges, templates = [judge_run.completed, judge_run.failed], list(judges), list(templates)
    pairs = {(j, t) for j in judges for t in templates}
    for record in reversed(earlier_judgings(original)):  # newest first
        theirs = {(j, t) for j in record.get("judges", []) for t in record.get("templates", [])}
        if not theirs or theirs & pairs:
            continue
        earlier = run_paths_of(Path(record["judge_run"]))
        files += [earlier.completed, earlier.failed]
        judges += [j for j in record["judges"] if j not in judges]
        templates += [t for t in record["templates"] if t not in templates]
        pairs |= theirs
    out = original.out_dir / f"{original.stamp}-study-{original.name}"
    return write_study(original.parquet, files, judges, templates, out)


def _judge_flow_name() -> str:
    from prefect.runtime import flow_run

    original = run_paths_of(Path(str(flow_run.parameters["completed"])))
    return f"judging-{original.name}-{original.stamp}"  # its judge run is `judge-<name>-<key>`


@flow(name="judge_experiment", flow_run_name=_judge_flow_name, log_prints=True)
async def judge_experiment(
    completed: str, judge_folder: str, judges: list[str], templates: list[str] | None = None, settings: Settings | None = None
) -> Judged | None:
    """Judge every answer of a finished run, then join answers and verdicts in one table;
    once per run and judge setting, whoever asks (None when it was, or is being, judged).
    A judging stopped before every verdict landed makes no table and ends Cancelled."""
    begin_flow()
    settings = settings or Settings()
    templates = templates or ["template.txt"]
    try:
        claim = take_judging(Path(completed), Path(judge_folder), judges, templates, settings.lease_seconds)
    except Taken as taken:
        log.info("%s", taken)
        return Completed(message=str(taken))  # type: ignore[return-value]
    try:
        judged = await _judge(claim, Path(judge_folder), judges, templates, settings)
    finally:
        claim.end()  # after `done`, a no-op
    return ended(judged, current_session(), judged.judge_run.unfinished if judged else 0)


async def _judge(claim: Judging, judge_folder: Path, judges: list[str], templates: list[str], settings: Settings) -> Judged | None:
    original = claim.original
    created = create_judge_file(original.completed, judge_folder, templates, judges, claim.file)
    if created.skipped_failed:
        print(f"{created.skipped_failed} failed prompt(s) not judged: failed prompts have no response to judge")
    await link_judging(original.name, flow_run_of(original))
    summary = await result_of(run_experiment, file=str(claim.file), settings=settings)
    if summary is None:  # the judge run was another process's
        return None
    if not summary.complete:
        return Judged(created, summary)
    names = [t.removesuffix(".txt") for t in templates]
    study = write_study_table(original, summary.paths, judges, names)
    report = await publish_study(original.name, study)
    claim.done(summary.paths, judges, names, this_flow_run())
    return Judged(created, summary, study, report)


def _rephrase_flow_name() -> str:
    from prefect.runtime import flow_run

    return "rephrase-" + Path(str(flow_run.parameters["file"])).stem


@flow(name="rephrase_experiment", flow_run_name=_rephrase_flow_name, log_prints=True)
async def rephrase_experiment(
    file: str,
    rephrase_folder: str,
    models: list[str],
    templates: list[str] | None = None,
    remove_original: bool = False,
    only_rephrase: bool = False,
    settings: Settings | None = None,
) -> Rephrased:
    """Rephrase every prompt, then run the rephrased prompts (and the originals) on their models."""
    begin_flow()
    settings = settings or Settings()
    source = Path(file)
    lines, models_settings = judging.load_rephrase_folder(Path(rephrase_folder), templates or ["template.txt"], models)
    rephrase_file = settings.output_folder / source.stem / f"rephrase-{source.stem}.jsonl"  # never in the inbox
    write_records(rephrase_file, judging.rephrase_records(source, lines, models_settings))
    result = Rephrased(await result_of(run_experiment, file=str(rephrase_file), settings=settings))
    if result.rephrase_run is None or not result.rephrase_run.complete:  # taken by another process, or stopped
        log.warning("%s: the rephrasing did not finish here; the rephrased prompts are not run", source.stem)
        return result
    if not only_rephrase:
        post_file = settings.output_folder / source.stem / f"post-rephrased-{source.stem}.jsonl"
        original = None if remove_original else source
        write_records(post_file, judging.post_rephrase_records(result.rephrase_run.paths.completed, original))
        result.post_rephrase_run = await result_of(run_experiment, file=str(post_file), settings=settings)
    return result


def _study_flow_name() -> str:
    from prefect.runtime import flow_run

    return "study-" + Path(str(flow_run.parameters["file"])).stem


@flow(name="run_study", flow_run_name=_study_flow_name, log_prints=True)
async def run_study(
    file: str,
    settings: Settings | None = None,
    move_to_input: bool = False,
    judge_folder: str | None = None,
    judges: list[str] | None = None,
    judge_templates: list[str] | None = None,
    rephrase_folder: str | None = None,
    rephrase_models: list[str] | None = None,
    rephrase_templates: list[str] | None = None,
    remove_original: bool = False,
    only_rephrase: bool = False,
) -> Study:
    """An experiment with its evaluation chained: rephrase first (if asked), run, then judge."""
    begin_flow()
    settings = settings or Settings()
    rephrased = None
    if rephrase_folder:
        rephrased = await rephrase_experiment(
            file, rephrase_folder, rephrase_models or [], rephrase_templates, remove_original, only_rephrase, settings
        )
        run = rephrased.post_rephrase_run or rephrased.rephrase_run
    elif judge_folder and (done := _finished_run(Path(file), settings)):
        log.info("%s: already complete with this input in %s; judging it without sending its prompts again", done.name, done.completed)
        run = reused_summary(done)
    else:
        run = await result_of(run_experiment, file=file, settings=settings, move_to_input=move_to_input)
    study = Study(run, rephrased)
    if judge_folder and run is not None and run.complete and not only_rephrase:
        study.judge = await result_of(judge_experiment, completed=str(run.paths.completed), judge_folder=judge_folder,
                                      judges=judges or [], templates=judge_templates, settings=settings)  # fmt: skip
    return ended(study, current_session(), study.unfinished)


def _finished_run(file: Path, settings: Settings) -> RunPaths | None:
    """A finished run of the same input, unless the file came from the inbox (a file
    dropped there asks for a run)."""
    if current_session().claim_for(file) is not None:
        return None
    plan = inspect(file, settings)
    return finished_run_of(settings.output_folder / plan.name, plan.name, plan.digest) if plan.ok else None
