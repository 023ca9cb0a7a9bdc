"""Reasoning models through each official SDK against the fakes' real wire shapes: the
parameters as the API takes them, the thoughts and reasoning tokens of the answer, one line
per bad setting at `check`, and a mixed experiment online and in batch mode."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from promptfleet import Experiment, Settings
from promptfleet.cli import app
from promptfleet.core.messages import user
from tests.conftest import read_jsonl, write_jsonl
from tests.fake_batches import FakeBatchServer
from tests.fakes import REASONING_TOKENS, FakeServer, thought_about
from tests.test_batch import run_once
from tests.test_providers import make_clients, provider_env

THINK = {
    "anthropic": {"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2048},
    "gemini": {"thinking_budget": 1024, "include_thoughts": True},
    "vertexai": {"thinking_budget": 1024, "include_thoughts": True},
    "openai": {"reasoning_effort": "low"},
    "ollama": {"think": True},
}


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


async def ask(api: str, server: FakeServer, tmp_path: Path, parameters: dict, model: str = "gemini-2.5-flash"):
    clients = make_clients(api, server, tmp_path)
    try:
        return await clients.get(api, model).chat(model, [user("why?")], parameters)
    finally:
        await clients.aclose()


@pytest.mark.parametrize("api", ["anthropic", "gemini", "vertexai"])
async def test_thoughts_come_apart_from_the_answer(api: str, server: FakeServer, tmp_path: Path):
    reply = await ask(api, server, tmp_path, THINK[api])
    assert reply.text == "answer to: why?" and reply.thoughts == (thought_about("why?"),)
    assert reply.reasoning_tokens == REASONING_TOKENS
    assert reply.output_tokens == 1 + 2 + REASONING_TOKENS  # thinking is billed as output: counted in it


async def test_anthropic_thinking_goes_as_the_api_spells_it(server: FakeServer, tmp_path: Path):
    await ask("anthropic", server, tmp_path, THINK["anthropic"])
    body = server.state.requests[0]
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024} and body["max_tokens"] == 2048


@pytest.mark.parametrize("api", ["gemini", "vertexai"])
async def test_gemini_flat_thinking_parameters_become_its_thinking_config(api: str, server: FakeServer, tmp_path: Path):
    await ask(api, server, tmp_path, {"thinking_budget": 0, "temperature": 0.2})
    config = server.state.requests[0]["generationConfig"]
    assert config["temperature"] == 0.2 and set(config) == {"temperature", "thinkingConfig"}
    assert config["thinkingConfig"] in ({"thinkingBudget": 0}, {"thinking_budget": 0})  # proto JSON reads either; the SDK sends snake_case


@pytest.mark.parametrize("parameters", [{"reasoning_effort": "low"}, {"reasoning": {"effort": "low"}}])
async def test_openai_reasoning_effort_and_tokens(parameters: dict, server: FakeServer, tmp_path: Path):
    reply = await ask("openai", server, tmp_path, parameters, "o4-mini")
    body = server.state.requests[0]
    assert body["reasoning_effort"] == "low" and "reasoning" not in body
    assert reply.reasoning_tokens == REASONING_TOKENS and reply.output_tokens == 3 + REASONING_TOKENS
    assert reply.thoughts == ()  # OpenAI keeps its reasoning to itself


async def test_an_openai_compatible_server_that_returns_its_reasoning_gives_thoughts(server: FakeServer, tmp_path: Path):
    server.state.reasoning_text = True  # vLLM, llama.cpp and DeepSeek send `reasoning_content`
    reply = await ask("openai", server, tmp_path, {"reasoning_effort": "high"}, "qwen3")
    assert reply.thoughts == (thought_about("why?"),) and reply.text == "answer to: why?"


@pytest.mark.parametrize("history", [False, True], ids=["generate", "chat"])
async def test_ollama_think_returns_thinking(history: bool, server: FakeServer, tmp_path: Path):
    clients = make_clients("ollama", server, tmp_path)
    messages = [user("hello"), user("why?")] if history else [user("why?")]
    reply = await clients.get("ollama", "qwen3").chat("qwen3", messages, {"think": True})
    await clients.aclose()
    assert server.state.requests[0]["think"] is True
    assert reply.thoughts == (thought_about("why?"),) and reply.text == "answer to: why?"


def test_check_reports_each_bad_reasoning_setting_on_its_own_line(tmp_path: Path):
    rows = [
        {"api": "gemini", "model_name": "gemini-2.5-pro", "prompt": "q", "parameters": {"thinking_budget": 0}},
        {"api": "gemini", "model_name": "gemini-2.5-flash", "prompt": "q", "parameters": {"thinking_budget": 30000, "include_thoughts": "yes"}},
        {"api": "gemini", "model_name": "gemini-2.0-flash", "prompt": "q", "parameters": {"include_thoughts": True}},
        {"api": "anthropic", "model_name": "claude-sonnet-4-5", "prompt": "q", "parameters": {"thinking": {"type": "enabled", "budget_tokens": 2000}}},
        {"api": "anthropic", "model_name": "claude-sonnet-4-5", "prompt": "q", "parameters": {"thinking": {"type": "enabled", "budget_tokens": 500}, "max_tokens": 4000}},
        {"api": "openai", "model_name": "o3", "prompt": "q", "parameters": {"reasoning_effort": "extreme"}},
        {"api": "gemini", "model_name": "gemini-2.5-flash", "prompt": "q", "parameters": {"temprature": 0.2}},
        {"api": "gemini", "model_name": "gemini-2.5-flash", "prompt": "fine", "parameters": {"thinking_budget": -1, "include_thoughts": True}},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "thinking é.jsonl", rows)
    result = CliRunner().invoke(app, ["check", "-f", str(path), "-d", str(tmp_path / "data"), "-e", str(tmp_path / "none.env")])
    assert result.exit_code == 1
    expected = [
        "1: parameters: thinking_budget 0 is out of range for gemini-2.5-pro: 128 to 32768, -1 for dynamic; thinking cannot be turned off",
        "2: parameters: include_thoughts must be true or false, got 'yes'",
        "2: parameters: thinking_budget 30000 is out of range for gemini-2.5-flash: 1 to 24576, -1 for dynamic, or 0 to turn thinking off",
        "3: parameters: gemini-2.0-flash does not think",
        "4: parameters: max_tokens 1024 (the default, 1024) must be greater than thinking.budget_tokens 2000",
        "5: parameters: thinking.budget_tokens must be an integer of at least 1024, got 500",
        "6: parameters: reasoning effort must be one of none, minimal, low, medium, high",
        "7: parameters: temprature is not a Gemini generation parameter",
    ]
    output = " ".join(result.output.split())  # rich wraps long lines
    for line in expected:
        assert f"{path}:{line}" in output, line
    assert f"{path}:8:" not in output


MIXED = [
    {"id": "g", "api": "gemini", "model_name": "gemini-2.5-flash", "prompt": "g q", "parameters": THINK["gemini"]},
    {"id": "a", "api": "anthropic", "model_name": "claude-sonnet-4-5", "prompt": "a q", "parameters": THINK["anthropic"]},
    {"id": "o", "api": "openai", "model_name": "o4-mini", "prompt": "o q", "parameters": THINK["openai"]},
    {"id": "turns", "api": "gemini", "model_name": "gemini-2.5-flash", "prompt": ["t1", "t2"], "parameters": THINK["gemini"]},
]


def check_mixed(completed: list[dict], table: pl.DataFrame, words: dict[str, int]) -> None:
    by_id = {r["id"]: r for r in completed}
    assert by_id["g"]["thinking_text"] == [thought_about("g q")] and by_id["a"]["thinking_text"] == [thought_about("a q")]
    assert "thinking_text" not in by_id["o"]
    for rid in ("g", "a", "o"):
        usage = by_id[rid]["usage"]
        assert usage["reasoning_tokens"] == REASONING_TOKENS and usage["output_tokens"] == words[rid] + 2 + REASONING_TOKENS
        assert usage["cost_usd"] > 0
    rows = {r["id"]: r for r in table.to_dicts()}
    assert rows["g"]["thinking_text"] == thought_about("g q") and rows["o"]["thinking_text"] is None
    assert rows["a"]["reasoning_tokens"] == REASONING_TOKENS and rows["a"]["cost_usd"] == by_id["a"]["usage"]["cost_usd"]


def test_a_mixed_reasoning_experiment_online(tmp_path: Path, server: FakeServer, monkeypatch: pytest.MonkeyPatch):
    for api in ("gemini", "anthropic", "openai"):
        for key, value in provider_env(api, server.url).items():
            monkeypatch.setenv(key, value)
    path = write_jsonl(tmp_path / "mixed.jsonl", MIXED)
    summary = asyncio.run(Experiment(path, Settings(data_folder=tmp_path / "data", max_queries=600, parallel=True)).process()).to_dict()
    completed = read_jsonl(Path(summary["outputs"]["completed"]))
    check_mixed(completed, pl.read_parquet(summary["outputs"]["parquet"]), {"g": 2, "a": 2, "o": 2})
    turns = next(r for r in completed if r["id"] == "turns")
    assert turns["thinking_text"] == [[thought_about("t1")], [thought_about("t2")]]  # prompto's shape: a list a turn
    assert turns["usage"]["reasoning_tokens"] == 2 * REASONING_TOKENS
    cost = summary["cost"]
    assert cost["estimated_usd"] == pytest.approx(sum(r["usage"]["cost_usd"] for r in completed), abs=1e-6)  # the summary rounds to 6 places
    assert cost["by_model"]["claude-sonnet-4-5"]["reasoning_tokens"] == REASONING_TOKENS


def test_a_mixed_reasoning_experiment_in_batch_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeBatchServer() as fake:
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        fake.state.polls_to_finish = 1
        path = write_jsonl(tmp_path / "mixed.jsonl", MIXED[:3])
        summary = run_once(path, Settings(data_folder=tmp_path / "data", batch=True, batch_poll=0.01, max_attempts=2))
    assert summary["answered"] == 3 and summary["failed"] == 0
    completed = read_jsonl(Path(summary["outputs"]["completed"]))
    assert all(r["batch"] for r in completed)
    check_mixed(completed, pl.read_parquet(summary["outputs"]["parquet"]), {"g": 2, "a": 2, "o": 2})
    assert summary["cost"]["batch_saved_usd"] > 0


def test_the_offline_test_provider_thinks_when_asked(tmp_path: Path):
    rows = [{"id": 1, "api": "test", "model_name": "test-thinker", "prompt": "why?", "parameters": {"thoughts": 2}},
            {"id": 2, "api": "test", "model_name": "test-thinker", "prompt": "plain"}]  # fmt: skip
    summary = asyncio.run(Experiment(write_jsonl(tmp_path / "t.jsonl", rows), Settings(data_folder=tmp_path / "data")).process()).to_dict()
    thinker, plain = sorted(read_jsonl(Path(summary["outputs"]["completed"])), key=lambda r: r["id"])
    assert len(thinker["thinking_text"]) == 2 and thinker["usage"]["reasoning_tokens"] > 0
    assert "thinking_text" not in plain and "reasoning_tokens" not in plain["usage"]
    assert json.loads(json.dumps(thinker))["usage"]["cost_usd"] == 0.0  # the offline models are free


def test_prompto_top_level_keys_reach_batch_requests_as_they_reach_online_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Gemini's `safety_filter` sits beside `parameters` in prompto's files; a batch request
    carries the safety settings it stands for, as the online request does."""
    with FakeBatchServer() as fake:
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        fake.state.polls_to_finish = 1
        row = {"id": 1, "api": "gemini", "model_name": "gemini-2.5-flash", "prompt": "hi", "safety_filter": "most"}
        summary = run_once(write_jsonl(tmp_path / "safe.jsonl", [row]), Settings(data_folder=tmp_path / "data", batch=True, batch_poll=0.01))
        [job] = fake.state.jobs.values()
    assert summary["answered"] == 1
    [(_, request)] = job.requests
    settings = request.get("safetySettings") or request.get("generationConfig", {}).get("safetySettings") or []
    assert settings and all(s["threshold"] == "BLOCK_LOW_AND_ABOVE" for s in settings), request
