"""Which columns of a results or study table are scores: each judge (judge:template) whose
verdicts are numbers or yes/no words, and each scorer (`score_<name>`). Higher is better."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

POSITIVE = ("yes", "true", "correct", "pass")
NEGATIVE = ("no", "false", "incorrect", "fail")


@dataclass(frozen=True)
class Metric:
    """A judge (judge:template) or a scorer whose values are numbers, higher being better."""

    column: str  # in the frame the report reads: m0, m1, ...
    label: str
    source: str  # "judge" or "scorer"
    proportion: bool = False  # every value 0 or 1: shown in %, with Wilson intervals


def _judge_metrics(schema: pl.Schema) -> list[tuple[str, pl.Expr]]:
    judged = [c.removeprefix("verdict_text_") for c in schema if c.startswith("verdict_text_")]
    single_template = len({by.rpartition(":")[2] for by in judged}) == 1
    found = []
    for by in judged:
        value = None
        if (score := f"verdict_score_{by}") in schema and schema[score].is_numeric():
            value = pl.col(score).cast(pl.Float64)
        if (label := f"verdict_label_{by}") in schema and schema[label] == pl.String:
            word = pl.col(label).str.to_lowercase()
            yes_no = pl.when(word.is_in(POSITIVE)).then(1.0).when(word.is_in(NEGATIVE)).then(0.0).otherwise(None)
            value = yes_no if value is None else pl.coalesce(value, yes_no)
        if value is not None:
            found.append((by.rpartition(":")[0] if single_template else by, value))
    return found


def find_metrics(schema: pl.Schema) -> tuple[list[Metric], list[pl.Expr]]:
    named = [(label, "judge", value) for label, value in _judge_metrics(schema)]
    named += [(c.removeprefix("score_"), "scorer", pl.col(c).cast(pl.Float64)) for c in schema
              if c.startswith("score_") and (schema[c].is_numeric() or schema[c] == pl.Boolean)]  # fmt: skip
    metrics = [Metric(f"m{i}", label, source) for i, (label, source, _) in enumerate(named)]
    return metrics, [value.alias(m.column) for m, (_, _, value) in zip(metrics, named)]


def with_proportions(table: pl.LazyFrame, metrics: list[Metric]) -> list[Metric]:
    if not metrics:
        return []
    zero_one = table.select(pl.col(m.column).drop_nulls().is_in([0.0, 1.0]).all() & (pl.col(m.column).count() > 0) for m in metrics)
    flags = zero_one.collect().row(0)
    return [Metric(m.column, m.label, m.source, bool(flag)) for m, flag in zip(metrics, flags)]
