"""One planning pass over an experiment file: issues with file:line, env vars the run
needs, worst-case tokens and cost, and each queue with its rate and the place of each of
its records in the file, so sending reads exactly those records back and nothing else.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptfleet.core.config import Settings
from promptfleet.core.costs import cost_of, estimate_tokens, price_of
from promptfleet.core.experiment import Issue, Scanned, check_extension, validated
from promptfleet.core.messages import Conversation
from promptfleet.core.queues import BATCH_QUEUE, batchable, limit_for, queue_for
from promptfleet.core.schemas import (
    SCHEMA_KEY,
    merge_columns,
    parsed_columns,
    schema_problem_for,
)
from promptfleet.providers import known_apis, provider_class
from promptfleet.providers.base import media_problem, missing_env, parameter_problems, parameters_of

MAX_REPORTED_ISSUES = 200


@dataclass
class QueuePlan:
    name: str
    rate_per_minute: float
    tokens_per_minute: float | None = None
    target: str | None = None  # "api/model" when every prompt of the queue goes to one model
    lines: array = field(default_factory=lambda: array("q"))
    offsets: array = field(default_factory=lambda: array("q"))
    lengths: array = field(default_factory=lambda: array("q"))
    keys: bytearray = field(default_factory=bytearray)  # 12 bytes a record

    @property
    def prompts(self) -> int:
        return len(self.lines)

    def add(self, item: Scanned) -> None:
        self.lines.append(item.line)
        self.offsets.append(item.offset)
        self.lengths.append(item.length)
        self.keys += item.key

    def key(self, i: int) -> str:
        return self.keys[12 * i : 12 * i + 12].hex()


@dataclass
class Plan:
    """What one pass over the file found. It holds places of records, never records."""

    file: Path
    digest: str = ""
    size: int = 0
    mtime_ns: int = 0
    prompts: int = 0
    issues: list[str] = field(default_factory=list)
    issue_count: int = 0
    queues: dict[str, QueuePlan] = field(default_factory=dict)
    missing_env: dict[str, list[str]] = field(default_factory=dict)
    models: list[tuple[str, str]] = field(default_factory=list)  # (api, model) of the prompts
    worst_case_input_tokens: int = 0
    worst_case_output_tokens: int = 0
    worst_case_cost: float = 0.0
    worst_case_cost_batch: float = 0.0  # the same, with the batchable prompts at batch prices
    unpriced_models: list[str] = field(default_factory=list)
    parsed_columns: dict[str, str] = field(default_factory=dict)  # top-level properties of the response schemas: table columns
    batch: QueuePlan | None = None  # with settings.batch: the prompts for the batch APIs, in no queue

    @property
    def batch_prompts(self) -> int:
        return self.batch.prompts if self.batch else 0

    @property
    def name(self) -> str:
        return self.file.stem

    @property
    def ok(self) -> bool:
        return not self.issue_count and not self.missing_env

    def is_current(self) -> bool:
        """Still a plan of this file as it is now (the CLI plans before the flow runs)."""
        try:
            stat = os.stat(self.file)
        except OSError:
            return False
        return (stat.st_size, stat.st_mtime_ns) == (self.size, self.mtime_ns)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.file),
            "prompts": self.prompts,
            "issues": self.issues,
            "issue_count": self.issue_count,
            "queues": {q.name: {"prompts": q.prompts, "rate_per_minute": q.rate_per_minute} for q in self.queues.values()},
            "missing_env": self.missing_env,
            "worst_case_cost": self.worst_case_cost,
            "worst_case_cost_batch": self.worst_case_cost_batch,
            "batch_prompts": self.batch_prompts,
        }


def _media_for_provider(record: dict[str, Any], conversation: Conversation) -> str | None:
    return media_problem(provider_class(record["api"]), conversation) if conversation.media else None


def inspect(file: Path, settings: Settings) -> Plan:
    """Stream the file once: schema per line, queues with their records' places, missing
    env vars, worst-case cost, and the file's sha256."""
    check_extension(file)
    limits = settings.rate_limits
    stat = os.stat(file)
    plan = Plan(file=Path(file), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    apis = known_apis()
    prices = settings.price_table
    models: set[tuple[str, str]] = set()
    unpriced: set[str] = set()
    digest = hashlib.sha256()
    for item in validated(file, settings.media_folder, apis, _media_for_provider, digest):
        record = item.value
        if isinstance(record, Issue):
            plan.issue_count += 1
            if len(plan.issues) < MAX_REPORTED_ISSUES:
                plan.issues.append(str(record))
            continue
        if SCHEMA_KEY in record:
            if problem := schema_problem_for(record[SCHEMA_KEY], provider_class(record["api"])):
                plan.issue_count += 1
                if len(plan.issues) < MAX_REPORTED_ISSUES:
                    plan.issues.append(str(Issue(str(file), item.line, SCHEMA_KEY, problem)))
                continue
            merge_columns(plan.parsed_columns, parsed_columns(record[SCHEMA_KEY]))
        provider = provider_class(record["api"])
        if problems := parameter_problems(provider, record["model_name"], parameters_of(provider, record)):
            plan.issue_count += len(problems)
            room = max(0, MAX_REPORTED_ISSUES - len(plan.issues))
            plan.issues.extend(str(Issue(str(file), item.line, "parameters", p)) for p in problems[:room])
            continue
        plan.prompts += 1
        models.add((record["api"], record["model_name"]))
        ins, outs = estimate_tokens(record)
        plan.worst_case_input_tokens += ins
        plan.worst_case_output_tokens += outs
        if (price := price_of(record["model_name"], prices, record["api"])) is None:
            unpriced.add(record["model_name"])
        else:
            plan.worst_case_cost += cost_of(price, ins, outs)
            plan.worst_case_cost_batch += cost_of(price, ins, outs, batch=batchable(record))
        if settings.batch and batchable(record):
            plan.batch = plan.batch or QueuePlan(name=BATCH_QUEUE, rate_per_minute=0.0)
            plan.batch.add(item)
            continue
        name = queue_for(record, settings.parallel, limits)
        default = settings.max_queries or provider_class(record["api"]).default_rate_per_minute
        rpm, tpm = limit_for(name, record, settings.parallel, limits, default)
        rpm, tpm = rpm * settings.rate_share, tpm * settings.rate_share if tpm else None
        target = f"{record['api']}/{record['model_name']}"
        queue = plan.queues.get(name)
        if queue is None:
            queue = plan.queues[name] = QueuePlan(name=name, rate_per_minute=rpm, tokens_per_minute=tpm, target=target)
        elif rpm < queue.rate_per_minute:  # a queue mixing apis takes the strictest default
            queue.rate_per_minute = rpm
        if queue.target != target:
            queue.target = None
        queue.add(item)
    plan.digest = digest.hexdigest()
    if plan.prompts == 0 and not plan.issue_count:
        plan.issue_count = 1
        plan.issues.append(f"{file}: no prompts in the file")
    plan.models = sorted(models)
    plan.missing_env = env_missing(plan.models)
    plan.unpriced_models = sorted(unpriced)
    return plan


def env_missing(models: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The env vars each `api/model` needs and this environment lacks (it may change between runs)."""
    return {f"{api}/{model}": missing for api, model in models if (missing := missing_env(provider_class(api), model))}
