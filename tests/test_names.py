"""Any file name works: spaces, accents and symbols reach Prefect only through `slug`."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptfleet.cli import app
from promptfleet.core.slug import slug
from promptfleet.orchestration.secrets import block_name
from tests.conftest import read_jsonl, write_jsonl

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

runner = CliRunner()
PREFECT_KEY = re.compile(r"^[a-z0-9-]+$")  # prefect.types.names: artifact keys and block names
NAMES = ["données ü", "name with spaces ✓", "UPPER_case", "--", "日本語", "a/b\\c", "x" * 3]


@pytest.mark.parametrize("name", NAMES)
def test_slug_is_always_a_valid_prefect_key(name: str):
    assert PREFECT_KEY.match(slug(name))
    assert not slug(name).startswith("-") and not slug(name).endswith("-") and "--" not in slug(name).rsplit("-", 1)[0]


def test_slug_rules():
    assert slug("quickstart") == "quickstart"  # already a slug: unchanged, so known keys stay stable
    assert slug("judge-quickstart") == "judge-quickstart"
    assert slug("données ü").startswith("donnees-u-")  # accents folded, readable
    assert slug("Données") != slug("donnees")  # but names that differ keep apart keys
    assert slug("Données") == slug("Données")  # and the same name always gives the same key
    assert slug("日本語").startswith("experiment-")  # nothing left to read: fallback plus hash
    assert slug("日本語") != slug("中文")
    assert block_name("OPENAI_API_KEY") == "openai-api-key"  # typed by users: no hash


def test_prefect_accepts_every_slug():
    from prefect.client.schemas.actions import ArtifactCreate

    for name in NAMES:
        ArtifactCreate(key=f"summary-{slug(name)}", type="markdown", data="x")
    with pytest.raises(ValueError):
        ArtifactCreate(key="summary-données ü", type="markdown", data="x")


@pytest.mark.parametrize("name", ["données ü", "name with spaces ✓"])
def test_run_completes_for_any_file_name(tmp_path: Path, prefect_api: str, name: str):
    path = write_jsonl(tmp_path / f"{name}.jsonl", [{"api": "test", "model_name": "m", "prompt": f"q{i}"} for i in range(3)])
    data = tmp_path / "data"
    data.mkdir()
    result = runner.invoke(app, ["run", "-f", str(path), "-d", str(data)])
    assert result.exit_code == 0, result.output
    [out] = (data / "output").iterdir()
    assert out.name == name
    assert len(read_jsonl(next(out.glob(f"*-completed-{name}.jsonl")))) == 3

    from prefect.client.orchestration import get_client

    async def keys() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}

    assert f"summary-{slug(name)}" in asyncio.run(keys())


def test_pipeline_runs_a_file_with_spaces_and_accents_and_leaves_no_claim(tmp_path: Path, prefect_api: str):
    data = tmp_path / "data"
    name = "données ü ✓"
    write_jsonl(data / "input" / f"{name}.jsonl", [{"api": "test", "model_name": "m", "prompt": f"q{i}"} for i in range(3)])
    result = runner.invoke(app, ["pipeline", "-d", str(data), "--once", "--settle", "0"])
    assert result.exit_code == 0, result.output
    assert "1 run(s)" in result.output
    assert len(read_jsonl(next((data / "output" / name).glob("*-completed-*.jsonl")))) == 3
    assert [p.name for p in (data / "input").rglob("*") if p.is_file()] == []  # no stale file or .owner claim

