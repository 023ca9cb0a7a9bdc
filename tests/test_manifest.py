"""The run manifest: software versions, effective settings, input hash, timing, the
Prefect flow run, and per model the versions and fingerprints the providers reported."""

from __future__ import annotations

import asyncio
import hashlib
import json
import platform
from importlib.metadata import version
from pathlib import Path

import polars as pl

from promptfleet import Experiment, Settings
from promptfleet.core.summary import summary_markdown
from tests.conftest import write_jsonl
from tests.fakes import FakeServer

KEY = "sk-manifest-secret-0123456789"


def test_manifest_of_a_python_api_run(tmp_path: Path, openai_env: FakeServer, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"openai": {"gpt-fake": 600}, "test": 6000}))
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-fake": {"input": 1.5, "output": 6.0}}))
    rows = [{"id": i, "api": "openai", "model_name": "gpt-fake", "prompt": f"q{i}", "parameters": {"seed": 42}} for i in range(3)]
    rows += [{"id": 9, "api": "test", "model_name": "t", "prompt": "hi"}]
    exp = write_jsonl(tmp_path / "exp é.jsonl", rows)
    digest = hashlib.sha256(exp.read_bytes()).hexdigest()
    settings = Settings(data_folder=tmp_path / "data", parallel=True, max_queries_json=limits, prices=prices, max_attempts=2)

    summary = asyncio.run(Experiment(exp, settings).process())

    path = Path(summary.outputs["manifest"])
    assert path.name.endswith("-manifest-exp é.json") and path.parent == Path(summary.outputs["completed"]).parent
    text = path.read_text()
    assert KEY not in text and "OPENAI_API_KEY" not in text
    manifest = json.loads(text)
    assert manifest["promptfleet"] == version("promptfleet") and manifest["python"] == platform.python_version()
    assert manifest["packages"]["prefect"] == version("prefect") and manifest["packages"]["openai"] == version("openai")
    assert "anthropic" not in manifest["packages"]  # only the SDKs this run used
    assert manifest["input_sha256"] == digest
    assert manifest["started"] <= manifest["ended"] and manifest["complete"] is True
    assert manifest["prefect"] is None  # no flow: the plain Python API
    assert manifest["settings"]["max_attempts"] == 2 and manifest["settings"]["parallel"] is True
    assert manifest["settings"]["rate_limits"] == {"openai": {"gpt-fake": 600}, "test": 6000}
    priced = manifest["settings"]["prices_usd_per_million_tokens"]
    assert priced["gpt-fake"] == {"input": 1.5, "output": 6.0, "batch_input": 0.75, "batch_output": 3.0, "source": str(prices)}
    assert priced["t"]["input"] == priced["t"]["output"] == 0.0  # the offline test api costs nothing, whatever its model's name
    assert manifest["settings"]["prices"] == {"database": f"genai-prices {version('genai-prices')}", "overrides": str(prices)}
    assert manifest["packages"]["genai-prices"] == version("genai-prices")
    by_model = {m["model_name"]: m for m in manifest["models"]}
    assert by_model["gpt-fake"] == {"api": "openai", "model_name": "gpt-fake", "prompts": 3, "answered": 3,
                                    "model_versions": ["gpt-fake-2026-01-01"], "system_fingerprints": ["fp_fake"], "seeds": [42]}  # fmt: skip
    assert by_model["t"]["model_versions"] == ["t"] and by_model["t"]["seeds"] == []
    assert "manifest" in summary_markdown(summary) and str(path) in summary_markdown(summary)

    table = pl.read_parquet(summary.outputs["parquet"]).filter(pl.col("api") == "openai")
    assert set(table["model_version"]) == {"gpt-fake-2026-01-01"} and set(table["seed"]) == {42}
    assert table["request_id"].str.starts_with("req_fake_").all()


def test_manifest_names_the_prefect_flow_run(tmp_path: Path, prefect_api: str):
    from prefect.client.orchestration import get_client

    from promptfleet.orchestration.flows.run_experiment import run_experiment

    exp = write_jsonl(tmp_path / "flowexp.jsonl", [{"api": "test", "model_name": "m", "prompt": "hi"}])
    summary = asyncio.run(run_experiment(file=str(exp), settings=Settings(data_folder=tmp_path / "data")))
    manifest = json.loads(Path(summary.outputs["manifest"]).read_text())
    flow = manifest["prefect"]
    assert flow["flow_name"] == "run_experiment" and flow["flow_run_name"] == "flowexp"

    async def read(flow_run_id: str):
        async with get_client() as client:
            return await client.read_flow_run(flow_run_id)

    assert str(asyncio.run(read(flow["flow_run_id"])).id) == flow["flow_run_id"]
    assert flow["flow_run_url"] is None or flow["flow_run_id"] in flow["flow_run_url"]


async def test_a_stopped_then_resumed_run_has_one_manifest_covering_both_sessions(tmp_path: Path):
    from promptfleet import Session

    rows = [{"id": i, "api": "test", "model_name": "m", "prompt": f"q{i}", "parameters": {"latency": 0.02}} for i in range(30)]
    path = write_jsonl(tmp_path / "exp.jsonl", rows)
    settings = Settings(data_folder=tmp_path / "data", max_queries=1200)

    session = Session()

    async def stop_soon() -> None:
        await asyncio.sleep(0.5)
        session.request_stop()

    stopper = asyncio.create_task(stop_soon())
    first = await Experiment(path, settings, session=session).process()
    await stopper
    early = json.loads(Path(first.outputs["manifest"]).read_text())
    assert early["complete"] is False and 0 < early["answered"] < 30 and early["models"][0]["answered"] == early["answered"]

    second = await Experiment(path, settings, session=Session()).process()
    assert second.outputs["manifest"] == first.outputs["manifest"]
    manifest = json.loads(Path(second.outputs["manifest"]).read_text())
    assert manifest["complete"] is True and manifest["resumed"] is True
    assert manifest["started"] == early["started"] and manifest["ended"] > early["ended"]
    assert manifest["models"][0]["answered"] == 30  # counted from the table: both sessions
    assert len(list(Path(first.outputs["manifest"]).parent.glob("*manifest*"))) == 1  # no stray .tmp
