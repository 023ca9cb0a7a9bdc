"""Evaluation flows chained on finished runs: `judge_experiment` (LLM-as-a-judge and the
study table) and `rephrase_experiment` (prompto's rephrase, then the rephrased run)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import NO_CACHE

from promptfleet.core.config import Settings
from promptfleet.core.experiment import write_records
from promptfleet.core.rundir import RunPaths
from promptfleet.core.signals import stop_on_signals
from promptfleet.core.slug import slug
from promptfleet.core.summary import table_markdown
from promptfleet.evaluation import judge as judging
from promptfleet.evaluation.outcomes import Judged, Rephrased, Study
from promptfleet.evaluation.study import StudyTable, write_study
from promptfleet.orchestration.flows.lean import flow
from promptfleet.orchestration.flows.run_experiment import run_experiment


def run_paths_of(completed: Path) -> RunPaths:
    """The RunPaths of a `<stamp>-completed-<name>.jsonl` file."""
    stamp, _, name = completed.name.removesuffix(".jsonl").partition("-completed-")
    return RunPaths(completed.parent, stamp, name)


@task(name="create_judge_file", cache_policy=NO_CACHE)
def create_judge_file(completed: Path, folder: Path, templates: list[str], judges: list[str], out: Path) -> judging.JudgeFile:
    return judging.write_judge_file(completed, folder, templates, judges, out, failed=run_paths_of(completed).failed)


@task(name="write_study_table", cache_policy=NO_CACHE)
def write_study_table(original: RunPaths, judge_run: RunPaths, judges: list[str], templates: list[str]) -> StudyTable:
    out = original.out_dir / f"{original.stamp}-study-{original.name}"
    return write_study(original.parquet, [judge_run.completed, judge_run.failed], judges, templates, out)


def _judge_flow_name() -> str:
    from prefect.runtime import flow_run

    return "judge-" + run_paths_of(Path(str(flow_run.parameters["completed"]))).name


@flow(name="judge_experiment", flow_run_name=_judge_flow_name, log_prints=True)
async def judge_experiment(
    completed: str, judge_folder: str, judges: list[str], templates: list[str] | None = None, settings: Settings | None = None
) -> Judged:
    """Judge every answer of a finished run, then join answers and verdicts in one table."""
    stop_on_signals()
    settings = settings or Settings()
    templates = templates or ["template.txt"]
    original = run_paths_of(Path(completed))
    judge_file = original.out_dir / f"judge-{original.name}.jsonl"  # beside its source, never in the inbox
    created = create_judge_file(Path(completed), Path(judge_folder), templates, judges, judge_file)
    if created.skipped_failed:
        print(f"{created.skipped_failed} failed prompt(s) not judged: failed prompts have no response to judge")
    summary = await run_experiment(file=str(judge_file), settings=settings)
    judge_run = summary.paths
    names = [t.removesuffix(".txt") for t in templates]
    study = write_study_table(original, judge_run, judges, names)
    await acreate_markdown_artifact(
        key=f"study-{slug(original.name)}",
        markdown=f"# Study: {original.name}\n\n{table_markdown(study.summary)}\n\n- table: `{study.parquet}`\n",
        description=f"answers and verdicts of {original.name}",
    )
    return Judged(created, summary, study)


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
    stop_on_signals()
    settings = settings or Settings()
    source = Path(file)
    lines, models_settings = judging.load_rephrase_folder(Path(rephrase_folder), templates or ["template.txt"], models)
    rephrase_file = settings.output_folder / source.stem / f"rephrase-{source.stem}.jsonl"  # never in the inbox
    write_records(rephrase_file, judging.rephrase_records(source, lines, models_settings))
    result = Rephrased(await run_experiment(file=str(rephrase_file), settings=settings))
    if not only_rephrase:
        post_file = settings.output_folder / source.stem / f"post-rephrased-{source.stem}.jsonl"
        original = None if remove_original else source
        write_records(post_file, judging.post_rephrase_records(result.rephrase_run.paths.completed, original))
        result.post_rephrase_run = await run_experiment(file=str(post_file), settings=settings)
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
    stop_on_signals()
    settings = settings or Settings()
    rephrased = None
    if rephrase_folder:
        rephrased = await rephrase_experiment(
            file, rephrase_folder, rephrase_models or [], rephrase_templates, remove_original, only_rephrase, settings
        )
        run = rephrased.post_rephrase_run or rephrased.rephrase_run
    else:
        run = await run_experiment(file=file, settings=settings, move_to_input=move_to_input)
    study = Study(run, rephrased)
    if judge_folder and run.complete and not only_rephrase:
        study.judge = await judge_experiment(str(run.paths.completed), judge_folder, judges or [], judge_templates, settings)
    return study
