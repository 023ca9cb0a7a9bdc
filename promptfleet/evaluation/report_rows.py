"""A report's tables as rows of display strings: the Prefect artifacts and the offline page
render these same rows, so both show the same figures, formatted once."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from promptfleet.evaluation.sample import Sample, trim

if TYPE_CHECKING:
    from promptfleet.evaluation.report import Paired, Ranking, Report
    from promptfleet.evaluation.stats import Interval

BEST_MARK = "★"


def number(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" if percent else f"{value:.2f}"


def interval_text(interval: Interval | None, percent: bool = False) -> str:
    if interval is None or interval.low is None or interval.high is None:
        return "-"
    return f"[{number(interval.low, percent)}, {number(interval.high, percent)}]"


def mean_interval(interval: Interval | None, percent: bool = False) -> str:
    """The mean and its interval as one cell or one chart label: `71% [62%, 79%]`."""
    mean = number(interval.mean if interval else None, percent)
    return f"{mean} {interval_text(interval, percent)}".removesuffix(" -")


def usd(value: float | None) -> str:
    """Dollars with two significant digits below a cent ($0.000018), cents above."""
    if value is None:
        return "unpriced"
    if value == 0:
        return "$0"
    return f"${value:.{max(2, 1 - math.floor(math.log10(value)))}f}" if value < 1 else f"${value:,.2f}"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def difference(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.0f} pts" if percent else f"{value:+.2f}"


def ranking_rows(report: Report, ranking: Ranking) -> list[dict[str, str]]:
    """One row per model, ranked, with what it cost and how fast it answered."""
    percent = ranking.metric.proportion
    rows = []
    for score in ranking.scores:
        model = report.model(score.model)
        iv = score.interval
        rows.append({
            "rank": f"{BEST_MARK} {score.rank}" if score.best else str(score.rank),
            "model": score.model,
            "mean [95%]": mean_interval(iv, percent),
            "n": str(iv.n if iv else 0),
            "failed": str(model.failed),
            "unscored": str(score.unscored),
            "cost": usd(model.cost_usd),
            "p50 / p95 s": f"{seconds(model.latency_p50_s)} / {seconds(model.latency_p95_s)}",
        })  # fmt: skip
    return rows


PAIRED_NONE = "The top two models of each ranking have no prompt scored for both: no paired comparison."


def reading(paired: Paired) -> str:
    """What the interval says, in words."""
    assert paired.difference is not None
    if paired.difference.low is None:
        return "too few prompts to tell"
    if paired.difference.excludes_zero():
        return f"{paired.first if paired.difference.mean > 0 else paired.second} is better"
    return "no clear difference"


def paired_rows(report: Report) -> list[dict[str, str]]:
    """The comparisons that have prompts scored for both models."""
    rows = []
    for paired in (p for p in report.paired if p.difference is not None):
        percent, iv = paired.metric.proportion, paired.difference
        assert iv is not None
        shown = interval_text(iv, percent).replace("%", " pts") if percent else interval_text(iv)
        rows.append({
            "metric": paired.metric.label,
            "first − second": f"{paired.first} − {paired.second}",
            "difference [95%]": f"{difference(iv.mean, percent)} {shown}".removesuffix(" -"),
            "won / lost / tied": f"{paired.first_better} / {paired.second_better} / {paired.tied} of {iv.n}",
            "reads": reading(paired),
        })  # fmt: skip
    return rows


def model_rows(report: Report) -> list[dict[str, str]]:
    rows = []
    for model in report.models:
        per_1k = usd(1000 * model.cost_usd / model.answered) if model.cost_usd is not None and model.answered else usd(model.cost_usd)
        rows.append({
            "model": model.model, "answered": str(model.answered), "failed": str(model.failed),
            "tokens in / out": f"{model.input_tokens:,} / {model.output_tokens:,}", "cost": usd(model.cost_usd),
            "per 1k answers": per_1k, "p50 / p95 s": f"{seconds(model.latency_p50_s)} / {seconds(model.latency_p95_s)}",
        })  # fmt: skip
    return rows


PROMPT_IN_ROW = 100  # the prompt repeats on each of its rows: shorter than in the page


def answer_rows(sample: Sample) -> list[list[dict[str, str]]]:
    """Per sampled prompt, one row per model: each judge's verdict in a column of its own,
    then the answer. Prefect's table does not wrap, so verdicts come before the long text
    and a prompt's models are read one under the other."""
    groups = []
    for row in sample.rows:
        prompt = trim(row.prompt, PROMPT_IN_ROW)
        groups.append([{"#": str(row.number), "why": row.why, "prompt": prompt, "model": model, **answer.verdicts, "answer": answer.text}
                       for model in sample.models if (answer := row.answers.get(model)) is not None])  # fmt: skip
    return groups


def headline(report: Report) -> str:
    judges = [r.metric.label for r in report.rankings if r.metric.source == "judge"]
    scorers = [r.metric.label for r in report.rankings if r.metric.source == "scorer"]
    answered = sum(m.answered for m in report.models)
    failed = sum(m.failed for m in report.models)
    line = f"{report.sample.prompts} distinct prompts, {len(report.models)} model(s), {answered} answers, {failed} failed"
    if judges:
        line += f"; judged by {', '.join(judges)}"
    if scorers:
        line += f"; scored by {', '.join(scorers)}"
    priced = [m.cost_usd for m in report.models if m.cost_usd is not None]
    if priced:
        line += f"; cost {usd(sum(priced))}"
    if report.batch_saved_usd:
        line += f" (batch prices saved {usd(report.batch_saved_usd)} against online prices)"
    return line + f" — run {report.stamp}"


def best_lines(report: Report) -> list[str]:
    lines = []
    for ranking in report.rankings:
        best = [s for s in ranking.scores if s.best and s.interval]
        if best:
            shown = number(best[0].interval.mean, ranking.metric.proportion)  # type: ignore[union-attr]
            lines.append(f"{BEST_MARK} {ranking.metric.label}: {', '.join(s.model for s in best)} ({shown})")
    return lines
