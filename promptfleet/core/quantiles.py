"""p50/p95 of a stream in fixed memory: a uniform sample of at most `capacity` values.

Exact while the stream fits (every value is kept); beyond that each value has the same
chance to be kept (reservoir sampling), so a quantile's rank is off by about
sqrt(q(1 - q) / capacity): ±0.25% of the ranks for p95 at the default 8,192 values (64 KB),
whether the run has ten thousand prompts or ten million. Seeded, so a run's summary is
reproducible.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Sequence


def nearest_rank(ordered: Sequence[float], q: float) -> float | None:
    """The nearest-rank q-quantile of sorted values: the value below which a share q of them
    lie. The run summary and the report both take theirs here, so they agree."""
    if not len(ordered):
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class QuantileSample:
    __slots__ = ("capacity", "count", "_values", "_random")

    def __init__(self, capacity: int = 8192, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.count = 0
        self._values = array("d")
        self._random = random.Random(seed)

    def add(self, value: float) -> None:
        self.count += 1
        if len(self._values) < self.capacity:
            self._values.append(value)
            return
        slot = self._random.randrange(self.count)
        if slot < self.capacity:
            self._values[slot] = value

    def quantile(self, q: float) -> float | None:
        return nearest_rank(sorted(self._values), q)

    def __len__(self) -> int:
        return self.count
