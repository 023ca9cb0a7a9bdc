"""Answers side by side: a bounded sample of prompts with every model's answer and verdicts.

The sample is the first prompts in input order, then those where the models (on one
metric) or the judges (on one answer) disagree most. Disagreement is measured on each
metric scaled to [0, 1] by its lowest and highest value in the study, so a 1-10 judge and
a yes/no judge weigh alike. A prompt is its text: the same text sent to several models is
one row. Texts are trimmed; the full ones stay in the tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

from promptfleet.evaluation.metrics import Metric

PROMPT_CHARS = 400
ANSWER_CHARS = 300
_SPACE = re.compile(r"\s+")


def trim(text: str | None, limit: int) -> str:
    text = _SPACE.sub(" ", text or "").strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


@dataclass(frozen=True)
class Answer:
    text: str  # trimmed; a failure reads "failed: <why>"
    verdicts: dict[str, str]  # metric label -> the verdict as shown ("7", "yes", "-")


@dataclass(frozen=True)
class SampleRow:
    number: int  # the prompt's place among the distinct prompts, in input order, from 1
    why: str  # "first" or "disagreement 0.67"
    prompt: str
    answers: dict[str, Answer]  # model -> its answer (models that had this prompt)


@dataclass(frozen=True)
class Sample:
    rows: list[SampleRow]
    models: list[str]
    prompts: int  # distinct prompts in the table


def _disagreement(table: pl.LazyFrame, metrics: list[Metric]) -> pl.LazyFrame:
    """(prompt_key, disagreement): the widest spread on one prompt, across models or judges.
    Worked out with a column per metric, as the table has them: a row per answer and metric
    held and grouped three times over was most of a large study's report."""
    answered = table.filter(pl.col("status") == "completed")
    bounds = answered.select(*(pl.col(m.column).min() for m in metrics), *(pl.col(m.column).max().name.suffix("_high") for m in metrics)).collect().row(0)
    # a metric that gave every answer the same value tells nothing about disagreement
    spread = [(m.column, low, high) for m, low, high in zip(metrics, bounds, bounds[len(metrics):]) if low is not None and high > low]
    if not spread:
        return pl.LazyFrame(schema={"prompt_key": pl.UInt64, "disagreement": pl.Float64})
    columns = [column for column, _, _ in spread]
    scaled = answered.group_by("prompt_key", "model").agg(((pl.col(c) - low) / (high - low)).mean() for c, low, high in spread)
    across_judges = (pl.max_horizontal(columns) - pl.min_horizontal(columns)).max().alias("across_judges")
    across_models = [(pl.col(c).max() - pl.col(c).min()) for c in columns]
    per_prompt = scaled.group_by("prompt_key").agg(*across_models, across_judges)
    return per_prompt.select("prompt_key", pl.max_horizontal(*columns, "across_judges").alias("disagreement"))


def _shown(value: float | None, metric: Metric) -> str:
    if value is None:
        return "-"
    if metric.proportion:
        return "yes" if value == 1.0 else "no"
    return f"{value:g}"


def _answer(row: dict, metrics: list[Metric]) -> Answer:
    if row["status"] == "completed":
        text = trim(row["response"], ANSWER_CHARS)
    else:
        text = "failed: " + trim(" ".join(str(row.get(k) or "") for k in ("error_type", "error_message")), ANSWER_CHARS - 8)
    return Answer(text, {m.label: _shown(row[m.column], m) for m in metrics})


def _lines(full: pl.LazyFrame) -> pl.DataFrame:
    """(prompt_key, input_line) of every row, 16 bytes a row: all that is held of the table to
    count the distinct prompts and place the sampled ones. Sorting and counting these costs
    a third of what grouping a million keys in a hash table does."""
    return full.select("prompt_key", "input_line").collect(engine="streaming")


def _in_input_order(lines: pl.DataFrame, count: int) -> list[int]:
    """The first `count` distinct prompts in input order, looked for in the fewest first lines
    that hold them rather than in all of them sorted."""
    rows = min(count, lines.height)
    while rows:
        head = lines.filter(pl.col("input_line") <= lines["input_line"].bottom_k(rows).max()).sort("input_line", "prompt_key")
        taken = head["prompt_key"].unique(maintain_order=True).head(count).to_list()
        if len(taken) == count or rows == lines.height:
            return taken
        rows = min(4 * rows, lines.height)
    return []


def _number(lines: pl.DataFrame, key: int) -> int:
    """A prompt's place among the distinct prompts in input order, from 1."""
    first = lines.filter(pl.col("prompt_key") == key)["input_line"].min()
    return lines.filter(pl.col("input_line") < first)["prompt_key"].n_unique() + 1


def select_sample(full: pl.LazyFrame, metrics: list[Metric], models: list[str], first: int, disagreeing: int) -> Sample:
    """`full`: the table with `prompt_key`, `model` and the metric columns added."""
    lines = _lines(full)
    firsts = _in_input_order(lines, first)
    numbers = {key: n for n, key in enumerate(firsts, start=1)}
    chosen = dict.fromkeys(firsts, "first")
    if metrics and disagreeing:
        ranked = _disagreement(full, metrics).filter(pl.col("disagreement") > 0).sort("disagreement", "prompt_key", descending=[True, False])
        for key, spread in ranked.filter(~pl.col("prompt_key").is_in(firsts)).head(disagreeing).collect().iter_rows():
            chosen[key], numbers[key] = f"disagreement {spread:.2f}", _number(lines, key)
    prompts = lines["prompt_key"].sort().n_unique()  # on sorted keys: counted without a hash table
    del lines
    columns = ["prompt_key", "model", "input_line", "status", "prompt", "response", *[m.column for m in metrics]]
    columns += [c for c in ("error_type", "error_message") if c in full.collect_schema()]
    texts = full.filter(pl.col("prompt_key").is_in(list(chosen))).select(columns).collect(engine="streaming").sort("input_line")
    rows = []
    for key, why in chosen.items():
        mine = texts.filter(pl.col("prompt_key") == key)
        answers: dict[str, Answer] = {}
        for row in mine.iter_rows(named=True):
            answers.setdefault(row["model"], _answer(row, metrics))  # a prompt asked twice of a model: its first answer
        rows.append(SampleRow(numbers[key], why, trim(mine["prompt"][0], PROMPT_CHARS), answers))
    return Sample(rows, models, prompts)
