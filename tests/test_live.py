"""Opt-in: a real OpenAI-compatible model server on this machine (see docs/providers.md)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pytest

from promptfleet import Experiment, Settings
from tests.conftest import read_jsonl, write_jsonl

BASE_URL = os.environ.get("PROMPTFLEET_LIVE_OPENAI_BASE_URL")

pytestmark = pytest.mark.skipif(not BASE_URL, reason="set PROMPTFLEET_LIVE_OPENAI_BASE_URL to run against a local model server")


async def test_twenty_prompts_against_a_local_model_server(tmp_path: Path, monkeypatch):
    assert urlparse(BASE_URL).hostname in ("127.0.0.1", "localhost", "::1"), "local servers only"
    monkeypatch.setenv("OPENAI_BASE_URL", BASE_URL)
    monkeypatch.setenv("OPENAI_API_KEY", os.environ.get("PROMPTFLEET_LIVE_API_KEY", "local"))
    model = os.environ.get("PROMPTFLEET_LIVE_MODEL", "local-model")
    rows = [{"id": i, "api": "openai", "model_name": model, "prompt": f"Say the number {i}.", "parameters": {"max_tokens": 8}}
            for i in range(20)]  # fmt: skip
    summary = await Experiment(write_jsonl(tmp_path / "live.jsonl", rows), Settings(data_folder=tmp_path, max_queries=600, timeout=300)).process()
    assert summary.complete and summary.answered == 20, summary
    records = read_jsonl(Path(summary.outputs["completed"]))
    assert sorted(r["id"] for r in records) == list(range(20))
    assert all(isinstance(r["response"], str) and r["usage"]["output_tokens"] > 0 for r in records)
