"""What chained evaluation steps hand back: typed, so the CLI and the flows agree on them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # polars, which the study table needs, loads only when a study is made
    from promptfleet.core.summary import RunSummary
    from promptfleet.evaluation.judge import JudgeFile
    from promptfleet.evaluation.study import StudyTable


@dataclass
class Judged:
    """A completed run judged: the judge file, the judge run, the study table joining them
    (None when the judge run was stopped before every verdict landed), and the offline
    report (None when it could not be made)."""

    judge_file: JudgeFile
    judge_run: RunSummary
    study: StudyTable | None = None
    report: Path | None = None


@dataclass
class Rephrased:
    rephrase_run: RunSummary | None  # None when another process had the rephrasing
    post_rephrase_run: RunSummary | None = None  # None with --only-rephrase


@dataclass
class Study:
    """An experiment with its evaluation chained (`run --judge-folder/--rephrase-folder`)."""

    run: RunSummary | None  # None when another process had the rephrasing it runs on
    rephrase: Rephrased | None = None
    judge: Judged | None = None

    @property
    def unfinished(self) -> int:
        """Prompts left by a stop, the judge's included: the study is finished when none are."""
        return (self.run.unfinished if self.run else 0) + (self.judge.judge_run.unfinished if self.judge else 0)
