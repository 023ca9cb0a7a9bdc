"""Validation: every bad line reported with file:line and the field at fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptfleet.core.config import Settings
from promptfleet.core.experiment import (
    ExperimentError,
    Issue,
    check_extension,
    validated,
)
from promptfleet.core.plan import inspect
from promptfleet.providers import known_apis
from tests.conftest import write_jsonl

GOOD = {"api": "test", "model_name": "m", "prompt": "hi"}


def issues_of(path: Path, media: Path | None = None) -> list[Issue]:
    return [r for _, r in ((i.line, i.value) for i in validated(path, media, known_apis())) if isinstance(r, Issue)]


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ('{"api": "test", "model_name": "m", "prompt": "hi"', None, "invalid JSON"),
        ('["not", "an", "object"]', None, "expected a JSON object"),
        ({"api": "test", "model_name": "m"}, "prompt", "is required"),
        ({"model_name": "m", "prompt": "x"}, "api", "is required"),
        ({"api": "test", "prompt": "x"}, "model_name", "is required"),
        ({**GOOD, "api": "openia"}, "api", "unknown api 'openia'"),
        ({**GOOD, "prompt": 42}, "prompt", "must be a string"),
        ({**GOOD, "prompt": []}, "prompt", "must be a string"),
        ({**GOOD, "prompt": ["a", {"role": "user", "content": "b"}]}, "prompt", "mix of strings and messages"),
        ({**GOOD, "prompt": [{"role": "robot", "content": "b"}]}, "prompt", "role 'robot'"),
        ({**GOOD, "prompt": [{"role": "user"}]}, "prompt", "no 'content'"),
        ({**GOOD, "parameters": [1, 2]}, "parameters", "must be an object"),
        ({**GOOD, "model_name": " "}, "model_name", "must not be empty"),
    ],
)
def test_bad_line_is_reported_with_line_and_field(tmp_path: Path, line, field, message):
    path = write_jsonl(tmp_path / "exp.jsonl", [GOOD, "", line, GOOD])
    [issue] = issues_of(path)
    assert issue.line == 3  # the blank line still counts in the numbering
    assert issue.field == field
    assert message in issue.message
    assert str(issue).startswith(f"{path}:3: ")


def test_media_missing_or_escaping_is_refused(tmp_path: Path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "cat.png").write_bytes(b"\x89PNG")
    (tmp_path / "secret.txt").write_text("x")
    rows = [
        {**GOOD, "multimedia": [{"type": "image", "media": "cat.png"}]},
        {**GOOD, "multimedia": [{"type": "image", "media": "dog.png"}]},
        {**GOOD, "multimedia": [{"type": "image", "media": "../secret.txt"}]},
        {**GOOD, "prompt": [{"role": "user", "content": [{"type": "image", "media": "/etc/passwd"}, "what?"]}]},
        {**GOOD, "prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
    ]
    issues = issues_of(write_jsonl(tmp_path / "exp.jsonl", rows), media)
    assert [(i.line, i.field) for i in issues] == [(2, "multimedia"), (3, "multimedia"), (4, "multimedia")]
    assert "not found" in issues[0].message
    assert "outside the media folder" in issues[1].message
    assert "outside the media folder" in issues[2].message


def test_all_prompt_shapes_and_extra_keys_are_accepted(tmp_path: Path):
    rows = [
        {**GOOD, "id": 1, "extra": {"nested": True}, "group": "g"},
        {**GOOD, "prompt": ["turn one", "turn two"]},
        {**GOOD, "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
    ]
    path = write_jsonl(tmp_path / "exp.jsonl", rows)
    records = list(((i.line, i.value) for i in validated(path, None, known_apis())))
    assert [r for _, r in records] == rows


def test_csv_parameters_columns_become_parameters(tmp_path: Path):
    path = tmp_path / "exp.csv"
    path.write_text(
        "id,prompt,api,model_name,parameters-temperature,parameters-max_tokens\n"
        'id-0,"What is the capital of France?",test,m,0.5,100\n'
        'id-1,"multi\nline",test,m,,7\n'
        "id-2,,test,m,1,1\n"
    )
    records = list(((i.line, i.value) for i in validated(path, None, known_apis())))
    assert records[0] == (2, {"id": "id-0", "prompt": "What is the capital of France?", "api": "test", "model_name": "m", "parameters": {"temperature": 0.5, "max_tokens": 100}})
    assert records[1][1]["parameters"] == {"max_tokens": 7}
    assert records[1][1]["prompt"] == "multi\nline"
    line, issue = records[2]
    assert isinstance(issue, Issue) and line == 5 and issue.field == "prompt"


def test_wrong_extension_and_missing_file(tmp_path: Path):
    with pytest.raises(ExperimentError, match="must end in .jsonl or .csv"):
        check_extension(tmp_path / "exp.txt")
    with pytest.raises(ExperimentError, match="file not found"):
        check_extension(tmp_path / "nope.jsonl")


def test_inspect_reports_queues_and_missing_env_names_only(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY_gpt_4o", "sk-model-specific-key-value")
    rows = [GOOD, {**GOOD, "api": "openai", "model_name": "gpt-4o"}, {**GOOD, "api": "openai", "model_name": "gpt-3.5"}]
    found = inspect(write_jsonl(tmp_path / "exp.jsonl", rows), Settings(data_folder=tmp_path, parallel=True, max_queries=50))
    assert {q.name: (q.prompts, q.rate_per_minute) for q in found.queues.values()} == {"test": (1, 50), "openai": (2, 50)}
    assert found.missing_env == {"openai/gpt-3.5": ["OPENAI_API_KEY"]}
    assert "sk-model" not in json.dumps(found.to_dict())
    assert not found.ok


def test_images_for_an_api_that_cannot_take_them_are_refused(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HUGGINGFACE_TGI_API_ENDPOINT", "http://127.0.0.1:9")
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "cat.png").write_bytes(b"png")
    row = {"api": "huggingface-tgi", "model_name": "tgi", "prompt": "what?", "multimedia": [{"type": "image", "media": "cat.png"}]}
    found = inspect(write_jsonl(tmp_path / "exp.jsonl", [GOOD, row]), Settings(data_folder=tmp_path))
    assert found.issues == [f"{tmp_path / 'exp.jsonl'}:2: multimedia: the huggingface-tgi api does not take images"]
