"""95% intervals for the report, so that "model A scored 6.1" comes with how sure that is.

Proportions (yes/no verdicts, match/includes scorers: every value 0 or 1) get the Wilson
score interval, which stays inside [0, 1] and behaves at 0% and 100% where the normal one
does not. Other means (a judge's 1-10 score) get a percentile bootstrap: 2,000 resamples,
seeded, so a report is the same every time it is written. Past BOOTSTRAP_MAX values the
bootstrap costs seconds and agrees with the normal interval (mean ± 1.96 standard errors)
to within its own resampling noise, so the normal interval is used and named.

A paired difference (two models on the same prompts) is the mean of per-prompt differences
with the same bootstrap, which keeps the pairing: prompts that are hard for both models do
not widen it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

Z95 = 1.959963984540054
RESAMPLES = 2000
BOOTSTRAP_MAX = 10_000
_DRAWS_AT_ONCE = 2_000_000  # values drawn per polars call: ~16 MB, whatever the experiment's size

WILSON = "Wilson"
BOOTSTRAP = "bootstrap"
NORMAL = "normal"


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None  # None with fewer than two values: one value says nothing of its spread
    high: float | None
    n: int
    method: str

    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def wilson(successes: int, n: int) -> Interval:
    p = successes / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exactly, not 1e-17 off
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high, n, WILSON)


def _bootstrap_means(values: pl.Series, resamples: int, seed: int) -> pl.Series:
    n = values.len()
    per_call = max(1, _DRAWS_AT_ONCE // n)
    means, done = [], 0
    while done < resamples:
        k = min(per_call, resamples - done)
        draws = values.sample(n * k, with_replacement=True, seed=seed + done)
        means.append(draws.reshape((k, n)).arr.sum() / n)  # one resample a row
        done += k
    return pl.concat(means)


def normal(mean: float, std: float | None, n: int) -> Interval:
    half = Z95 * (std or 0.0) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, NORMAL)


def bootstrap_mean(values: pl.Series, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    values = values.drop_nulls().cast(pl.Float64).sort()  # the same values, in whatever order a query gave them, draw the same resamples
    n, mean = values.len(), float(values.mean() or 0.0)  # type: ignore[arg-type]
    if n < 2:
        return Interval(mean, None, None, n, BOOTSTRAP)
    if n > BOOTSTRAP_MAX:
        return normal(mean, values.std(), n)  # type: ignore[arg-type]
    means = _bootstrap_means(values, resamples, seed)
    return Interval(mean, means.quantile(0.025, "linear"), means.quantile(0.975, "linear"), n, BOOTSTRAP)  # type: ignore[arg-type]


METHODS = {
    WILSON: "Wilson score interval (scores that are all 0 or 1)",
    BOOTSTRAP: f"percentile bootstrap, {RESAMPLES:,} resamples, seeded",
    NORMAL: f"normal approximation, mean ± 1.96 standard errors (over {BOOTSTRAP_MAX:,} values)",
}
