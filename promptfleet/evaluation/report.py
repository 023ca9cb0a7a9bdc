"""The numbers of a report, read from a run's results table or a study table.

Per model: prompts, answers, failures, tokens, cost and latency p50/p95. Per judge or
scorer: each model's mean score with its 95% interval, ranked, and the paired comparison
of the top two models on the prompts both answered. Everything is read from the Parquet
on disk (lazily, a few columns at a time), so the flow's artifacts, the offline page and
`promptfleet report` show the same figures, and a run of millions of rows is summed up
without holding it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from promptfleet.core.quantiles import nearest_rank
from promptfleet.evaluation import stats
from promptfleet.evaluation.metrics import Metric, find_metrics, with_proportions
from promptfleet.evaluation.sample import Sample, select_sample

KINDS = {"-study-": "study", "-results-": "run"}
LATENCY_POINTS = 2000  # per model, for the latency chart


@dataclass(frozen=True)
class ModelRow:
    model: str
    api: str
    prompts: int
    answered: int
    failed: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None  # None when no answer of the model was priced
    latency_p50_s: float | None
    latency_p95_s: float | None


@dataclass(frozen=True)
class Score:
    model: str
    rank: int
    interval: stats.Interval | None  # None: no answer of the model was scored
    unscored: int  # answered, but the judge failed or its verdict could not be read
    best: bool


@dataclass(frozen=True)
class Ranking:
    metric: Metric
    scores: list[Score]


@dataclass(frozen=True)
class Paired:
    """The top two models of a ranking on the prompts both have a score for."""

    metric: Metric
    first: str
    second: str
    difference: stats.Interval | None  # first minus second, per prompt
    first_better: int
    second_better: int
    tied: int


@dataclass
class Report:
    name: str
    stamp: str
    kind: str  # "study" or "run"
    source: Path
    models: list[ModelRow]
    rankings: list[Ranking]
    paired: list[Paired]
    sample: Sample
    latencies: dict[str, list[float]]
    batch_saved_usd: float | None = None
    methods: list[str] = field(default_factory=list)  # the interval methods used, in words

    @property
    def html_path(self) -> Path:
        """Beside its table; a study's page is named apart from its run's, which it sits beside."""
        page = "study-report" if self.kind == "study" else "report"
        return self.source.parent / f"{self.stamp}-{page}-{self.name}.html"

    def model(self, name: str) -> ModelRow:
        return next(m for m in self.models if m.model == name)


def parts_of(path: Path) -> tuple[str, str, str]:
    """(stamp, kind, name) of `<stamp>-results-<name>.parquet` or `<stamp>-study-<name>.parquet`."""
    for marker, kind in KINDS.items():
        stamp, found, name = path.name.removesuffix(".parquet").partition(marker)
        if found and stamp and name and path.suffix == ".parquet":
            return stamp, kind, name
    raise ValueError(f"{path.name}: not a results or study table (<stamp>-results-<name>.parquet or <stamp>-study-<name>.parquet)")


def _counts(table: pl.LazyFrame) -> pl.DataFrame:
    """Prompts, answers, failures and tokens per (api, model_name), in one pass."""
    answered = pl.col("status") == "completed"
    return table.group_by("api", "model_name").agg(
        pl.len().alias("prompts"), answered.sum().alias("answered"), (~answered).sum().alias("failed"),
        pl.col("input_tokens").sum(), pl.col("output_tokens").sum(),
    ).collect()  # fmt: skip


def _model_names(counts: pl.DataFrame) -> pl.Expr:
    """`model_name`, or `api/model_name` where two APIs serve a model of the same name."""
    shared = counts.group_by("model_name").len().filter(pl.col("len") > 1)["model_name"].to_list()
    named = pl.col("model_name").fill_null("?")
    return pl.when(pl.col("model_name").is_in(shared)).then(pl.col("api").fill_null("?") + "/" + named).otherwise(named)


def _models(table: pl.LazyFrame, counts: pl.DataFrame) -> tuple[list[ModelRow], dict[str, list[float]]]:
    """Each model's line and a seeded sample of its latencies for the chart. Only the
    latencies and costs are read here (20 bytes a row), and each model's are sorted on their
    own for p50/p95 by the run summary's rule: sorting inside an aggregation over the table
    held it several times over (~250 MB at a million rows). Costs are added exactly (fsum),
    so they do not depend on how polars shares the work between threads."""
    sums = [pl.col(c).sum() for c in ("prompts", "answered", "failed", "input_tokens", "output_tokens")]
    per_model = counts.with_columns(model=_model_names(counts)).group_by("model").agg(pl.col("api").first(), *sums).sort("model")
    names = per_model["model"].to_list()
    values = table.select(pl.col("model").cast(pl.Enum(names)), "latency_s", "cost_usd")
    values = values.filter(pl.col("latency_s").is_not_null() | pl.col("cost_usd").is_not_null()).collect(engine="streaming")
    rows, points = [], {}
    for row in per_model.iter_rows(named=True):
        mine = values["model"] == row["model"]  # a column at a time: a copy of the model's rows would be twice the size
        latencies, costs = values["latency_s"].filter(mine).drop_nulls(), values["cost_usd"].filter(mine).drop_nulls()  # in table order
        ordered = latencies.sort()
        rows.append(ModelRow(**row, cost_usd=math.fsum(costs) if costs.len() else None,
                             latency_p50_s=nearest_rank(ordered, 0.5), latency_p95_s=nearest_rank(ordered, 0.95)))  # fmt: skip
        points[row["model"]] = latencies.shuffle(seed=0).head(LATENCY_POINTS).to_list()
    return rows, points


def _interval(metric: Metric, n: int, mean: float | None, std: float | None, values: pl.LazyFrame) -> stats.Interval | None:
    """From a few sums where they say all (Wilson; the normal interval of many values), else
    from the values, collected only then: a run of millions of rows is never held whole."""
    if n == 0 or mean is None:
        return None
    if metric.proportion:
        return stats.wilson(round(mean * n), n)
    if n > stats.BOOTSTRAP_MAX:
        return stats.normal(mean, std, n)
    return stats.bootstrap_mean(values.collect().to_series())


def _rank(table: pl.LazyFrame, metric: Metric, models: list[str]) -> Ranking:
    column = pl.col(metric.column)
    answered = table.filter(pl.col("status") == "completed")
    sums = answered.group_by("model").agg(column.count().alias("n"), column.mean().alias("mean"), column.std().alias("std"),
                                          column.null_count().alias("unscored")).collect()  # fmt: skip
    found = {row["model"]: row for row in sums.iter_rows(named=True)}
    scores = []
    for model in models:
        row = found.get(model, {"n": 0, "mean": None, "std": None, "unscored": 0})
        mine = answered.filter(pl.col("model") == model).select(column.drop_nulls())
        scores.append((model, _interval(metric, row["n"], row["mean"], row["std"], mine), row["unscored"]))
    ordered = sorted(scores, key=lambda s: (s[1] is None, -(s[1].mean if s[1] else 0.0), s[0]))
    means = [iv.mean for _, iv, _ in ordered if iv is not None]
    ranked = []
    for model, interval, unscored in ordered:  # tied means share a rank; the top one is the best
        above = sum(1 for mean in means if interval is None or mean > interval.mean)
        ranked.append(Score(model, above + 1, interval, unscored, best=interval is not None and above == 0))
    return Ranking(metric, ranked)


def _paired(table: pl.LazyFrame, ranking: Ranking) -> Paired | None:
    scored = [s.model for s in ranking.scores if s.interval is not None]
    if len(scored) < 2:
        return None
    first, second = scored[:2]
    column = ranking.metric.column

    def per_prompt(model: str) -> pl.LazyFrame:  # a prompt asked twice of a model counts once, at its mean
        mine = table.filter((pl.col("model") == model) & pl.col(column).is_not_null())
        return mine.group_by("prompt_key").agg(pl.col(column).mean().alias(model))

    pairs = per_prompt(first).join(per_prompt(second), on="prompt_key").select((pl.col(first) - pl.col(second)).alias("d"))
    d = pl.col("d")
    sums = pairs.select(d.count().alias("n"), d.mean().alias("mean"), d.std().alias("std"), (d > 0).sum().alias("won"), (d < 0).sum().alias("lost"))
    n, mean, std, won, lost = sums.collect().row(0)
    if n == 0:
        return Paired(ranking.metric, first, second, None, 0, 0, 0)
    if n > stats.BOOTSTRAP_MAX:
        difference = stats.normal(mean, std, n)
    else:
        difference = stats.bootstrap_mean(pairs.collect()["d"])
    return Paired(ranking.metric, first, second, difference, won, lost, n - won - lost)


def read_report(path: Path, batch_saved_usd: float | None = None, first: int = 10, disagreeing: int = 10) -> Report:
    """The report of a results table or a study table (raises ValueError for another file)."""
    stamp, kind, name = parts_of(path)
    raw = pl.scan_parquet(path, glob=False)
    schema = raw.collect_schema()
    missing = [c for c in ("input_line", "api", "model_name", "status", "prompt", "response") if c not in schema]
    if missing:
        raise ValueError(f"{path.name}: not a promptfleet table (no {', '.join(missing)} column)")
    metrics, values = find_metrics(schema)
    full = raw.with_columns(pl.lit(None, pl.Float64).alias(c) for c in ("latency_s", "cost_usd") if c not in schema)
    full = full.with_columns(pl.lit(0, pl.Int64).alias(c) for c in ("input_tokens", "output_tokens") if c not in schema)
    counts = _counts(full)
    full = full.with_columns(*values, pl.col("prompt").hash(seed=0).alias("prompt_key"), model=_model_names(counts))
    table = full.select("input_line", "model", "api", "status", "latency_s", "input_tokens", "output_tokens", "cost_usd",
                        "prompt_key", *[m.column for m in metrics])  # fmt: skip
    metrics = with_proportions(table, metrics)
    models, latencies = _models(table, counts)
    rankings = [_rank(table, metric, [m.model for m in models]) for metric in metrics]
    if rankings:  # the models in the order of the first ranking
        order = {s.model: s.rank for s in rankings[0].scores}
        models.sort(key=lambda m: order.get(m.model, len(order)))
    paired = [p for r in rankings if (p := _paired(table, r)) is not None]
    used = {s.interval.method for r in rankings for s in r.scores if s.interval}
    used |= {p.difference.method for p in paired if p.difference}
    sample = select_sample(full, metrics, [m.model for m in models], first, disagreeing)
    return Report(name, stamp, kind, path, models, rankings, paired, sample, latencies, batch_saved_usd,
                  [f"{method}: {stats.METHODS[method]}" for method in sorted(used)])  # fmt: skip
