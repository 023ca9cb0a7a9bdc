"""LLM-as-a-judge and rephrasing as experiment files (prompto's formats), and parsing
of the judges' verdicts. No Prefect here; flows chain these.

Judge records are `{id: judge-<judge>-<template>-<id>, template_name, prompt, api,
model_name, parameters, input-<key>...}` for every judge x template x answered prompt, in
that order, so a judge file made here and one made by prompto from the same completed
file hold the same records.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptfleet.core.experiment import ExperimentError, Issue, write_records

INPUT = "{INPUT_PROMPT}"
OUTPUT = "{OUTPUT_RESPONSE}"


def _settings(folder: Path, wanted: list[str], what: str) -> dict[str, dict[str, Any]]:
    path = folder / "settings.json"
    try:
        settings = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExperimentError([Issue(str(path), 0, None, f"{what} folder needs a settings.json")]) from None
    except json.JSONDecodeError as err:
        raise ExperimentError([Issue(str(path), err.lineno, None, f"invalid JSON: {err.msg}")]) from None
    issues: list[Issue | str] = []
    for name in wanted:
        entry = settings.get(name)
        if not isinstance(entry, dict):
            issues.append(Issue(str(path), 0, name, f"unknown {what} {name!r}; settings.json has {', '.join(sorted(settings))}"))
        elif missing := [k for k in ("api", "model_name") if k not in entry]:
            issues.append(Issue(str(path), 0, name, f"missing {', '.join(missing)}"))
    if issues:
        raise ExperimentError(issues)
    return {name: {k: settings[name][k] for k in ("api", "model_name", "parameters") if k in settings[name]} for name in wanted}


def load_judge_folder(folder: Path, templates: list[str], judges: list[str]) -> tuple[dict[str, str], dict[str, dict]]:
    """(template name -> text, judge -> {api, model_name, parameters}); errors before anything is sent."""
    texts: dict[str, str] = {}
    issues: list[Issue | str] = []
    for name in templates:
        path = folder / name
        if not name.endswith(".txt"):
            issues.append(Issue(str(path), 0, None, "templates must be .txt files"))
        elif not path.is_file():
            issues.append(Issue(str(path), 0, None, "template not found"))
        else:
            text = path.read_text()
            if OUTPUT not in text:
                issues.append(Issue(str(path), 0, None, f"template has no {OUTPUT} placeholder"))
            texts[name.removesuffix(".txt")] = text
    if issues:
        raise ExperimentError(issues)
    return texts, _settings(folder, judges, "judge")


def _fill(template: str, prompt: Any, response: Any) -> str:
    # Same text as prompto's str.format for these two placeholders, without breaking on
    # other braces a template may contain (JSON examples, say).
    return template.replace(INPUT, str(prompt)).replace(OUTPUT, str(response))


def judge_records(completed: Path, templates: dict[str, str], judges: dict[str, dict]) -> Iterator[dict[str, Any]]:
    for judge, settings in judges.items():
        for template_name, template in templates.items():
            with completed.open(encoding="utf-8") as fh:
                for line in fh:
                    response = json.loads(line)
                    yield {
                        "id": f"judge-{judge}-{template_name}-{response.get('id', 'NA')}",
                        "template_name": template_name,
                        "prompt": _fill(template, response["prompt"], response["response"]),
                        **settings,
                        **{f"input-{k}": v for k, v in response.items()},
                    }


def judge_file_name(input_file: Path) -> str:
    """prompto's name for the judge file of `input_file`: `judge-` + its name without `completed-`."""
    return "judge-" + input_file.name.replace("completed-", "")


def _count(path: Path) -> int:
    return sum(1 for _ in path.open()) if path.exists() else 0


@dataclass(frozen=True)
class JudgeFile:
    """A judge experiment written from a completed run."""

    file: Path
    records: int
    skipped_failed: int  # failed prompts have no response to judge


def write_judge_file(
    completed: Path, folder: Path, templates: list[str], judges: list[str], out: Path, failed: Path | None = None
) -> JudgeFile:
    """Write the judge experiment; failed prompts are not judged, and the report says how many."""
    texts, settings = load_judge_folder(folder, templates, judges)
    count = write_records(out, judge_records(completed, texts, settings))
    return JudgeFile(out, count, _count(failed) if failed else 0)


# --- rephrasing -------------------------------------------------------------------------


def load_rephrase_folder(folder: Path, templates: list[str], models: list[str]) -> tuple[list[str], dict[str, dict]]:
    """Template lines (each line of each file is one template) and rephrase model settings."""
    lines: list[str] = []
    for name in templates:
        path = folder / name
        if not path.is_file():
            raise ExperimentError([Issue(str(path), 0, None, "template not found")])
        for n, text in enumerate(path.read_text().splitlines(), start=1):
            if text.strip():
                if INPUT not in text:
                    raise ExperimentError([Issue(str(path), n, None, f"template line has no {INPUT} placeholder")])
                lines.append(text.replace("\\n", "\n"))
    return lines, _settings(folder, models, "rephrase model")


def rephrase_records(experiment: Path, templates: list[str], models: dict[str, dict]) -> Iterator[dict[str, Any]]:
    from promptfleet.core.experiment import iter_valid

    for model, settings in models.items():
        for index, template in enumerate(templates):
            for _, record in iter_valid(experiment):
                if not isinstance(record["prompt"], str):
                    continue  # only single prompts can be rephrased
                yield {
                    "id": f"rephrase-{model}-{index}-{record.get('id', 'NA')}",
                    "template_index": index,
                    "prompt": template.replace(INPUT, record["prompt"]),
                    **settings,
                    **{f"input-{k}": v for k, v in record.items()},
                }


def parse_rephrased(text: str) -> str:
    """The default rephrase parser: the answer without surrounding quotes and blank space."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def post_rephrase_records(completed: Path, original: Path | None, parser=parse_rephrased) -> Iterator[dict[str, Any]]:
    """The experiment to run after rephrasing: originals (unless None) then each rephrased prompt
    sent to the model of the prompt it rephrases."""
    from promptfleet.core.experiment import iter_valid

    if original is not None:
        for _, record in iter_valid(original):
            yield record
    with completed.open(encoding="utf-8") as fh:
        for line in fh:
            done = json.loads(line)
            source = {k.removeprefix("input-"): v for k, v in done.items() if k.startswith("input-")}
            yield {**source, "id": f"rephrased-{done['id'].removeprefix('rephrase-')}", "prompt": parser(done["response"]),
                   "input-prompt": source["prompt"]}  # fmt: skip


# --- verdicts ---------------------------------------------------------------------------

_JSON = re.compile(r"\{.*\}", re.DOTALL)
_SCORE = re.compile(r"(?:score|rating|grade)\s*[:=]?\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_LEADING_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+)?\s*\.?\s*$")
_LABELS = ("yes", "no", "true", "false", "correct", "incorrect", "pass", "fail", "a", "b", "tie")


def parse_verdict(text: Any) -> dict[str, Any]:
    """A judge's answer as fields: a JSON object's keys, a `score`, or a `label`. Anything
    else is flagged `verdict_unparsable` with the text kept — never dropped or coerced."""
    if not isinstance(text, str):
        return {"verdict_unparsable": True}
    if match := _JSON.search(text):
        try:
            value = json.loads(match.group(0))
            if isinstance(value, dict) and value:
                return {f"verdict_{k}": v for k, v in value.items()}
        except json.JSONDecodeError:
            pass
    if match := _SCORE.search(text) or _LEADING_NUMBER.match(text):
        return {"verdict_score": float(match.group(1))}
    word = text.strip().strip(".!").lower()
    if word in _LABELS:
        return {"verdict_label": word}
    return {"verdict_unparsable": True}
