"""prompto-compatible grouping of prompts into rate-limited queues (`-mq`, `-p`, `-mqj`).

Rules (prompto's `rate_limits.md`): without `--parallel` everything is one queue at
`--max-queries`. With it, a prompt goes to its `group`, else its `api`; when the limits
JSON gives that key a dict naming the prompt's model, it goes to `{key}-{model}`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from promptfleet.core.experiment import ExperimentError, Issue

SINGLE_QUEUE = "all"
Limits = dict[str, int | dict[str, int]]


SPEC_KEYS = {"rpm", "tpm"}


def is_spec(value: Any) -> bool:
    """A limit: an int (requests per minute, prompto's form) or {"rpm": int, "tpm": int}."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, dict) and bool(value) and set(value) <= SPEC_KEYS
    )


def _spec(value: Any, default_rpm: int) -> tuple[int, int | None]:
    if isinstance(value, int):
        return value, None
    return value.get("rpm", default_rpm), value.get("tpm")


def load_limits(path: Path) -> Limits:
    """Read and check a `--max-queries-json` file: per api/group an int, an {"rpm", "tpm"}
    object, or per model (and "default") one of those."""
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
        values = [(None, value)] if is_spec(value) or not isinstance(value, dict) else list(value.items())
        for model, limit in values:
            numbers = limit.values() if isinstance(limit, dict) and is_spec(limit) else [limit]
            for number in numbers:
                if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
                    field = f"{key}.{model}" if model else key
                    issues.append(Issue(str(path), 0, field, f"rate limit must be a positive integer or {{rpm, tpm}}, got {limit!r}"))
                    break
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
    if isinstance(per_model, dict) and not is_spec(per_model) and model in per_model and model != "default":
        return f"{key}-{model}"
    return key


def limit_for(queue: str, record: dict[str, Any], parallel: bool, limits: Limits | None, default: int) -> tuple[int, int | None]:
    """(requests, tokens) per minute for the queue `queue_for` gave this record."""
    if not parallel or not limits:
        return default, None
    key = record.get("group") or record["api"]
    value = limits.get(key)
    if value is None:
        return default, None
    if is_spec(value):
        return _spec(value, default)
    if queue != key:
        return _spec(value[record["model_name"]], default)
    return _spec(value.get("default", default), default)


def rate_for(queue: str, record: dict[str, Any], parallel: bool, limits: Limits | None, default: int) -> int:
    """Requests per minute for the queue (prompto's rule)."""
    return limit_for(queue, record, parallel, limits, default)[0]


# The batch queue (batch mode): the prompts a provider's batch API takes, in no rate-limited queue.

BATCH_APIS = ("openai", "azure-openai", "anthropic", "gemini")
BATCH_QUEUE = "(batch)"  # the plan's name for the batchable prompts; no group or api looks like it


def batchable(record: dict[str, Any]) -> bool:
    """A single-request prompt of a batch API. A multi-turn prompt (a list of strings) needs
    each answer before its next turn (up to 24 h per round in a batch): it goes online; so
    does a structured one, whose replies are validated and asked again online."""
    prompt = record["prompt"]
    multi_turn = isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt)
    return record["api"] in BATCH_APIS and not multi_turn and "response_schema" not in record
