"""One planning pass over an experiment file: issues with file:line, env vars the run
needs, worst-case tokens and cost, and the queues with their rates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from promptfleet.config import Settings
from promptfleet.costs import estimate_tokens, load_prices, price_of
from promptfleet.experiment import Issue, check_extension, read_records
from promptfleet.messages import Conversation
from promptfleet.providers import known_apis, provider_class
from promptfleet.providers.base import media_problem, missing_env
from promptfleet.queues import limit_for, queue_for
from promptfleet.rundir import RunPaths

MAX_REPORTED_ISSUES = 200


class QueuePlan(BaseModel):
    name: str
    rate_per_minute: float
    prompts: int
    already_done: int = 0
    tokens_per_minute: float | None = None
    target: str | None = None  # "api/model" when every prompt of the queue goes to one model


class Plan(BaseModel):
    """Everything a run needs to know except the records themselves."""

    name: str
    input_file: Path
    out_dir: Path
    stamp: str
    input_suffix: str
    settings: Settings
    queues: list[QueuePlan]
    prompts: int
    resumed: bool = False

    @property
    def run_id(self) -> str:
        return f"{self.out_dir}/{self.stamp}"

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.out_dir, self.stamp, self.name, self.input_suffix)


class Inspection(BaseModel):
    """What validating a file found: issues, queues, env vars the run would need."""

    file: Path
    prompts: int = 0
    issues: list[str] = []
    issue_count: int = 0
    queues: dict[str, QueuePlan] = {}
    missing_env: dict[str, list[str]] = {}
    worst_case_input_tokens: int = 0
    worst_case_output_tokens: int = 0
    worst_case_cost: float = 0.0
    unpriced_models: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.issue_count and not self.missing_env


def _media_for_provider(record: dict[str, Any], conversation: Conversation) -> str | None:
    return media_problem(provider_class(record["api"]), conversation) if conversation.media else None


def inspect(file: Path, settings: Settings, done: set[int] = frozenset()) -> Inspection:  # type: ignore[assignment]
    """Stream the file once: schema per line, queue sizes and rates, missing env vars."""
    check_extension(file)
    limits = settings.limits()
    result = Inspection(file=file)
    apis = known_apis()
    prices = load_prices(settings.prices)
    models: set[tuple[str, str]] = set()
    unpriced: set[str] = set()
    for line, record in read_records(file, settings.media_folder, apis, _media_for_provider):
        if isinstance(record, Issue):
            result.issue_count += 1
            if len(result.issues) < MAX_REPORTED_ISSUES:
                result.issues.append(str(record))
            continue
        result.prompts += 1
        name = queue_for(record, settings.parallel, limits)
        default = settings.max_queries or provider_class(record["api"]).default_rate_per_minute
        rpm, tpm = limit_for(name, record, settings.parallel, limits, default)
        rpm, tpm = rpm * settings.rate_share, tpm * settings.rate_share if tpm else None
        target = f"{record['api']}/{record['model_name']}"
        queue = result.queues.get(name)
        if queue is None:
            queue = result.queues[name] = QueuePlan(name=name, rate_per_minute=rpm, tokens_per_minute=tpm, prompts=0, target=target)
        elif rpm < queue.rate_per_minute:  # a queue mixing apis takes the strictest default
            queue.rate_per_minute = rpm
        if queue.target != target:
            queue.target = None
        queue.prompts += 1
        queue.already_done += line in done
        models.add((record["api"], record["model_name"]))
        if line not in done:
            ins, outs = estimate_tokens(record)
            result.worst_case_input_tokens += ins
            result.worst_case_output_tokens += outs
            if (price := price_of(record["model_name"], prices)) is None:
                unpriced.add(record["model_name"])
            else:
                result.worst_case_cost += (ins * price["input"] + outs * price["output"]) / 1e6
    if result.prompts == 0 and not result.issue_count:
        result.issue_count = 1
        result.issues.append(f"{file}: no prompts in the file")
    for api, model in sorted(models):
        if missing := missing_env(provider_class(api), model):
            result.missing_env[f"{api}/{model}"] = missing
    result.unpriced_models = sorted(unpriced)
    return result
