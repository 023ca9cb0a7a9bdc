"""prompto-compatible grouping of prompts into rate-limited queues (`-mq`, `-p`, `-mqj`).

Rules (prompto's `rate_limits.md`): without `--parallel` everything is one queue at
`--max-queries`. With it, a prompt goes to its `group`, else its `api`; when the limits
JSON gives that key a dict naming the prompt's model, it goes to `{key}-{model}`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from promptfleet.experiment import ExperimentError, Issue

SINGLE_QUEUE = "all"
Limits = dict[str, int | dict[str, int]]


def load_limits(path: Path) -> Limits:
    """Read and check a `--max-queries-json` file; values are ints or {model: int} dicts."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExperimentError([Issue(str(path), 0, None, "file not found")]) from None
    except json.JSONDecodeError as err:
        raise ExperimentError([Issue(str(path), err.lineno, None, f"invalid JSON: {err.msg}")]) from None
    if not isinstance(data, dict):
        raise ExperimentError([Issue(str(path), 0, None, "must be a JSON object")])
    issues = []
    for key, value in data.items():
        values = value.items() if isinstance(value, dict) else [(None, value)]
        for model, rate in values:
            field = f"{key}.{model}" if model else key
            if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
                issues.append(Issue(str(path), 0, field, f"rate limit must be a positive integer, got {rate!r}"))
    if issues:
        raise ExperimentError(issues)
    return data


def queue_for(record: dict[str, Any], parallel: bool, limits: Limits | None) -> str:
    """The queue a prompt belongs to."""
    if not parallel:
        return SINGLE_QUEUE
    key = record.get("group") or record["api"]
    per_model = (limits or {}).get(key)
    model = record.get("model_name")
    if isinstance(per_model, dict) and model in per_model and model != "default":
        return f"{key}-{model}"
    return key


def rate_for(queue: str, record: dict[str, Any], parallel: bool, limits: Limits | None, default: int) -> int:
    """Queries per minute for the queue `queue_for` gave this record."""
    if not parallel or not limits:
        return default
    key = record.get("group") or record["api"]
    value = limits.get(key)
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if queue != key:
            return value[record["model_name"]]
        return value.get("default", default)
    return default
