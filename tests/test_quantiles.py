"""The fixed-memory latency sample behind every p50/p95 (queues and models)."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from promptfleet.core.engine import QueueStats
from promptfleet.core import quantiles
from promptfleet.core.quantiles import QuantileSample


def test_exact_while_everything_fits():
    values = list(range(1, 101))
    random.Random(3).shuffle(values)
    sample = QuantileSample(capacity=100)
    for v in values:
        sample.add(v)
    assert (sample.quantile(0.5), sample.quantile(0.95), sample.quantile(0.0), sample.quantile(1.0)) == (51, 96, 1, 100)


def test_memory_stays_fixed_and_quantiles_stay_close_on_a_long_stream():
    tracemalloc.start()
    sample = QuantileSample(capacity=2000)
    n = 300_000
    for v in range(n):  # in order: the worst case for a sample that kept only early values
        sample.add(v)
    # what the sample's own code allocated and still holds: not other threads of a test process
    mine = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, quantiles.__file__)])
    tracemalloc.stop()
    held = sum(stat.size for stat in mine.statistics("filename"))
    assert held < 64_000 and len(sample) == n  # 2,000 values of 8 bytes, whatever the stream's length
    assert sample.quantile(0.5) == pytest.approx(0.5 * n, rel=0.05)
    assert sample.quantile(0.95) == pytest.approx(0.95 * n, rel=0.02)


def test_same_stream_same_answer_and_empty_is_none():
    a, b = QuantileSample(capacity=50), QuantileSample(capacity=50)
    for v in range(10_000):
        a.add(v)
        b.add(v)
    assert a.quantile(0.95) == b.quantile(0.95)
    assert QuantileSample().quantile(0.5) is None
    with pytest.raises(ValueError):
        QuantileSample(capacity=0)


def test_queue_summary_reports_the_sample():
    stats = QueueStats("q", 60)
    for ms in range(1, 201):
        stats.latencies.add(ms / 1000)
    summary = stats.as_dict()
    assert (summary["latency_p50_s"], summary["latency_p95_s"]) == (0.101, 0.191)
    assert QueueStats("empty", 60).as_dict()["latency_p50_s"] is None
