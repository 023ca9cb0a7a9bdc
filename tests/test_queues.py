"""prompto's rate_limits.md worked examples, as tests."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from promptfleet.core.experiment import ExperimentError
from promptfleet.core.queues import SINGLE_QUEUE, load_limits, queue_for, rate_for

EXAMPLE = [
    ("gemini", "gemini-1.0-pro"), ("gemini", "gemini-1.0-pro"), ("gemini", "gemini-1.5-pro"), ("gemini", "gemini-1.5-pro"),
    ("openai", "gpt3.5-turbo"), ("openai", "gpt3.5-turbo"), ("openai", "gpt4"), ("openai", "gpt4"),
    ("ollama", "llama3"), ("ollama", "llama3"), ("ollama", "mistral"), ("ollama", "mistral"),
]  # fmt: skip


def records(groups: list[str | None] | None = None) -> list[dict]:
    out = []
    for i, (api, model) in enumerate(EXAMPLE):
        record = {"id": i, "api": api, "model_name": model, "prompt": "What is the capital of France?"}
        if groups and groups[i]:
            record["group"] = groups[i]
        out.append(record)
    return out


def plan(recs: list[dict], limits: dict | None, default: int = 5, parallel: bool = True) -> dict[str, tuple[int, int]]:
    counts = Counter(queue_for(r, parallel, limits) for r in recs)
    rates = {queue_for(r, parallel, limits): rate_for(queue_for(r, parallel, limits), r, parallel, limits, default) for r in recs}
    return {q: (counts[q], rates[q]) for q in counts}


def test_without_parallel_everything_is_one_queue_at_max_queries():
    assert plan(records(), None, default=5, parallel=False) == {SINGLE_QUEUE: (12, 5)}


def test_parallel_without_json_groups_by_api_at_the_default_rate():
    assert plan(records(), None) == {"gemini": (4, 5), "openai": (4, 5), "ollama": (4, 5)}


def test_rate_per_api_and_default_for_the_rest():
    assert plan(records(), {"openai": 20, "gemini": 10}) == {"gemini": (4, 10), "openai": (4, 20), "ollama": (4, 5)}


def test_misspelt_api_in_json_falls_back_to_default():
    assert plan(records(), {"openaii": 20})["openai"] == (4, 5)


def test_per_model_limits_make_model_queues():
    limits = {"gemini": {"gemini-1.5-pro": 20}, "openai": {"gpt4": 10, "gpt3.5-turbo": 20}}
    assert plan(records(), limits) == {
        "gemini": (2, 5),
        "gemini-gemini-1.5-pro": (2, 20),
        "openai-gpt3.5-turbo": (2, 20),
        "openai-gpt4": (2, 10),
        "ollama": (4, 5),
    }


def test_default_key_sets_the_api_queue_rate_and_int_equals_default_dict():
    limits = {"gemini": {"default": 30, "gemini-1.5-pro": 20}, "openai": {"gpt4": 10, "gpt3.5-turbo": 20}, "ollama": 4}
    result = plan(records(), limits)
    assert result["gemini"] == (2, 30)
    assert result["gemini-gemini-1.5-pro"] == (2, 20)
    assert result["ollama"] == (4, 4)
    assert plan(records(), {"ollama": {"default": 4}})["ollama"] == (4, 4)


def test_groups_take_precedence_over_api():
    groups = ["group1", "group2"] * 4 + ["group3"] * 4
    assert plan(records(groups), {"group1": 5, "group2": 10, "group3": 15}) == {
        "group1": (4, 5),
        "group2": (4, 10),
        "group3": (4, 15),
    }


def test_mixing_groups_and_apis():
    recs = records() + [
        {"id": 12, "api": "ollama", "model_name": "gemma", "prompt": "x", "group": "group2"},
        {"id": 13, "api": "ollama", "model_name": "phi3", "prompt": "x", "group": "group2"},
    ]
    recs[8]["group"] = recs[9]["group"] = recs[10]["group"] = recs[11]["group"] = "group1"
    assert plan(recs, {"group1": 5, "group2": 10}) == {
        "gemini": (4, 5),
        "openai": (4, 5),
        "group1": (4, 5),
        "group2": (2, 10),
    }


def test_group_with_per_model_limits():
    recs = records(["g"] * 12)
    result = plan(recs, {"g": {"gpt4": 7}})
    assert result["g-gpt4"] == (2, 7)
    assert result["g"] == (10, 5)


def test_limits_file_errors_name_the_file_and_key(tmp_path: Path):
    bad = tmp_path / "limits.json"
    bad.write_text(json.dumps({"openai": {"gpt4": "fast"}, "gemini": -1}))
    with pytest.raises(ExperimentError) as info:
        load_limits(bad)
    text = str(info.value)
    assert "limits.json" in text and "openai.gpt4" in text and "gemini" in text
    broken = tmp_path / "broken.json"
    broken.write_text("{\n  'x': 1}")
    with pytest.raises(ExperimentError, match=r"broken.json:2: invalid JSON"):
        load_limits(broken)
