"""Structured responses: each provider's request shape against the fakes, validation with
retries then a `schema` failure, typed Parquet columns, and `check` refusing bad schemas."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import polars as pl
import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from promptfleet import Experiment, Settings
from promptfleet.cli import app
from promptfleet.core.messages import user
from promptfleet.core.schemas import (
    SchemaMismatch,
    parse_reply,
    strict_compatible,
    with_schemas,
)
from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer
from tests.test_engine import FAST, run_file
from tests.test_providers import make_clients

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 1, "maximum": 5},
                   "confidence": {"type": "number"}, "ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["label", "score"],
}  # fmt: skip


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def where_schema_went(api: str, payload: dict) -> dict:
    if api in ("openai", "azure-openai"):
        fmt = payload["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "response"
        assert fmt["json_schema"]["strict"] is False  # SCHEMA is open: strict mode would refuse it
        return fmt["json_schema"]["schema"]
    if api == "anthropic":
        assert payload["output_config"]["format"]["type"] == "json_schema" and "tools" not in payload
        return payload["output_config"]["format"]["schema"]
    if api in ("gemini", "vertexai"):
        assert payload["generationConfig"]["responseMimeType"] == "application/json"
        return payload["generationConfig"]["responseJsonSchema"]
    return payload["format"]  # ollama


@pytest.mark.parametrize("api", ["openai", "azure-openai", "anthropic", "gemini", "vertexai", "ollama"])
async def test_each_provider_asks_for_json_its_own_way(api: str, server: FakeServer, tmp_path: Path):
    clients = make_clients(api, server, tmp_path)
    reply = await clients.get(api, "model-x").chat("model-x", [user("rate this")], {}, response_schema=SCHEMA)
    await clients.aclose()
    [seen] = server.state.seen
    assert where_schema_went(api, seen.payload) == SCHEMA
    assert parse_reply(reply.text, SCHEMA)["label"] in ("yes", "no")


@pytest.mark.parametrize("api", ["openai", "anthropic", "gemini", "ollama"])
async def test_without_a_schema_nothing_json_is_asked(api: str, server: FakeServer, tmp_path: Path):
    clients = make_clients(api, server, tmp_path)
    await clients.get(api, "model-x").chat("model-x", [user("hi")], {})
    await clients.aclose()
    payload = server.state.seen[0].payload
    assert not {"response_format", "output_config", "format"} & set(payload)
    assert "responseMimeType" not in (payload.get("generationConfig") or {})


def test_strict_mode_only_for_closed_schemas():
    closed = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}
    assert strict_compatible(closed) and not strict_compatible(SCHEMA)
    assert not strict_compatible({**closed, "required": []})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Sure! {\"label\": \"yes\"}", "reply is not JSON"),
        ('{"label": "maybe", "score": 3}', "'maybe' is not one of ['yes', 'no'] (at $.label)"),
        ('{"label": "yes"}', "'score' is a required property"),
    ],
)
def test_parse_reply_says_what_is_wrong(text: str, message: str):
    with pytest.raises(SchemaMismatch, match=__import__("re").escape(message)):
        parse_reply(text, SCHEMA)


def test_parse_reply_takes_fenced_json():
    assert parse_reply('```json\n{"label": "no", "score": 2}\n```', SCHEMA) == {"label": "no", "score": 2}


async def test_invalid_reply_is_retried_then_answered(tmp_path: Path, openai_env: FakeServer):
    openai_env.state.schema_replies = ["not json at all", '{"label": "maybe", "score": 9}']
    path = write_jsonl(tmp_path / "exp.jsonl", [{"id": 0, "api": "openai", "model_name": "m", "prompt": "rate", "response_schema": SCHEMA}])
    paths, summary = await run_file(path, tmp_path)
    [done] = read_jsonl(paths.completed)
    assert done["attempts"] == 3 and openai_env.state.calls["rate"] == 3
    assert json.loads(done["response"]) == done["response_parsed"] and done["response_parsed"]["label"] in ("yes", "no")


async def test_reply_never_matching_fails_with_schema_error_after_max_attempts(tmp_path: Path, openai_env: FakeServer):
    openai_env.state.schema_replies = ['{"label": "maybe", "score": 3}'] * 10
    path = write_jsonl(tmp_path / "exp.jsonl", [{"id": 0, "api": "openai", "model_name": "m", "prompt": "rate", "response_schema": SCHEMA}])
    paths, summary = await run_file(path, tmp_path)
    [failed] = read_jsonl(paths.failed)
    assert failed["error"]["type"] == "schema" and failed["error"]["attempts"] == FAST.max_attempts
    assert "'maybe' is not one of ['yes', 'no']" in failed["error"]["message"]
    assert openai_env.state.calls["rate"] == FAST.max_attempts and not read_jsonl(paths.completed)
    assert "response_parsed" not in failed and failed["response_schema"] == SCHEMA  # still a runnable record


class Verdict(BaseModel):
    label: str
    score: int
    confidence: float
    ok: bool
    tags: list[str]


def test_parquet_has_typed_parsed_columns_and_pydantic_schemas(tmp_path: Path):
    rows = [with_schemas({"id": i, "api": "test", "model_name": "m", "prompt": f"q{i}", "response_schema": Verdict}) for i in range(3)]
    rows.append({"id": 9, "api": "test", "model_name": "m", "prompt": "plain"})  # no schema: null parsed_ cells
    rows.append({"id": 10, "api": "test", "model_name": "m", "prompt": ["turn 1", "turn 2"], "response_schema": SCHEMA})
    exp = write_jsonl(tmp_path / "exp.jsonl", rows)
    summary = asyncio.run(Experiment(exp, Settings(data_folder=tmp_path / "data")).process())
    assert summary.answered == 5
    table = pl.read_parquet(summary.outputs["parquet"]).sort("input_line")
    assert table.schema["parsed_score"] == pl.Int64 and table.schema["parsed_confidence"] == pl.Float64
    assert table.schema["parsed_ok"] == pl.Boolean and table.schema["parsed_label"] == pl.String
    assert table.schema["parsed_tags"] == pl.String  # an array: kept as JSON text
    first = table.row(0, named=True)
    assert json.loads(first["response"])["score"] == first["parsed_score"]
    assert isinstance(json.loads(first["parsed_tags"]), list)
    assert table.row(3, named=True)["parsed_score"] is None
    multi = next(r for r in read_jsonl(Path(summary.outputs["completed"])) if r["id"] == 10)
    assert len(multi["response_parsed"]) == 2 and all(p["label"] in ("yes", "no") for p in multi["response_parsed"])


def test_check_validates_the_schema_and_names_providers_that_cannot_honour_it(tmp_path: Path):
    rows = [
        {"api": "test", "model_name": "m", "prompt": "a", "response_schema": SCHEMA},
        {"api": "test", "model_name": "m", "prompt": "b", "response_schema": {"type": "objekt"}},
        {"api": "test", "model_name": "m", "prompt": "c", "response_schema": "json please"},
        {"api": "huggingface-tgi", "model_name": "m", "prompt": "d", "response_schema": SCHEMA},
    ]
    path = write_jsonl(tmp_path / "exp.jsonl", rows)
    result = CliRunner().invoke(app, ["check", "-f", str(path), "-d", str(tmp_path / "data")])
    assert result.exit_code == 1
    assert f"{path}:2: response_schema: not a valid JSON Schema: 'objekt' is not valid" in result.output
    assert f"{path}:3: response_schema: must be a JSON Schema object, got str" in result.output
    assert f"{path}:4: response_schema: the huggingface-tgi api cannot honour a response_schema" in result.output
    assert f"{path}:1:" not in result.output


async def test_rejected_replies_count_towards_spend(tmp_path: Path, openai_env: FakeServer):
    """Each reply refused by the schema was paid for: the budget must see it."""
    openai_env.state.schema_replies = ['{"label": "maybe", "score": 3}'] * 10
    path = write_jsonl(tmp_path / "exp.jsonl", [{"id": 0, "api": "openai", "model_name": "m", "prompt": "rate", "response_schema": SCHEMA}])
    paths, summary = await run_file(path, tmp_path)
    # the fake reports 1 input + 3 output tokens per reply; all four attempts were refused
    assert (summary.cost.input_tokens, summary.cost.output_tokens) == (FAST.max_attempts * 1, FAST.max_attempts * 3)
