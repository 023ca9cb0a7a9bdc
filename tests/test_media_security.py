"""No local file outside data/media/ ever reaches a request body, in any form a provider
accepts; URLs still pass through unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptfleet.api import run_all
from promptfleet.cli import app
from promptfleet.core.config import Settings
from promptfleet.core.media import MediaError
from promptfleet.core.messages import (
    LocalMedia,
    Message,
    Role,
    Text,
    parse_conversation,
)
from promptfleet.core.run import open_run
from promptfleet.core.session import Session
from promptfleet.providers import Clients
from promptfleet.providers.base import ProviderOptions
from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer
from tests.test_providers import provider_env

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

SECRET = "TOP-SECRET-7f3a9c"
IMAGE_APIS = ["openai", "azure-openai", "anthropic", "gemini", "vertexai", "ollama"]
runner = CliRunner()


def hostile_rows(api: str, secret: Path) -> list[dict]:
    """Every shape in which a record can name a file, each pointing outside media/."""
    base = {"api": api, "model_name": "m", "prompt": "describe"}
    chat = lambda part: {**base, "prompt": [{"role": "user", "content": ["what?", part]}]}  # noqa: E731
    return [
        {**base, "multimedia": [{"type": "image_url", "image_url": str(secret)}]},
        {**base, "multimedia": [{"type": "image_url", "image_url": {"url": "../secret.txt"}}]},
        {**base, "multimedia": [{"type": "image", "media": "../secret.txt"}]},
        {**base, "multimedia": [{"type": "image", "media": str(secret)}]},
        {**base, "multimedia": [{"media": "link.png"}]},  # a symlink inside media/ pointing out
        {**base, "multimedia": [{"type": "file", "media": "../secret.txt"}]},
        chat({"type": "image_url", "image_url": {"url": str(secret)}}),
        chat({"type": "image", "media": "sub/../../secret.txt"}),
        {**base, "prompt": [{"role": "user", "parts": [{"type": "image", "media": "../secret.txt"}]}]},
    ]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "media").mkdir(parents=True)
    (data / "media" / "cat.png").write_bytes(b"\x89PNG-cat")
    (data / "secret.txt").write_text(SECRET)
    (data / "media" / "link.png").symlink_to(data / "secret.txt")
    return data


def _env(api: str, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in provider_env(api, url).items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("api", IMAGE_APIS + ["huggingface-tgi"])
def test_check_and_run_name_every_hostile_line_and_send_nothing(api: str, data: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeServer() as server:
        _env(api, server.url, monkeypatch)
        rows = hostile_rows(api, data / "secret.txt")
        path = write_jsonl(data.parent / "hostile.jsonl", rows)
        checked = runner.invoke(app, ["check", "-f", str(path), "-d", str(data)])
        ran = runner.invoke(app, ["run", "-f", str(path), "-d", str(data)])
        assert server.state.seen == []
    for result in (checked, ran):
        assert result.exit_code == 1, result.output
        for line in range(1, len(rows) + 1):
            assert f"{path}:{line}: multimedia:" in result.output, (line, result.output)
        assert SECRET not in result.output
    assert not (data / "output").exists()


@pytest.mark.parametrize("api", IMAGE_APIS)
async def test_providers_refuse_an_escaping_reference_at_read_time(api: str, data: Path):
    """Even a reference that skipped validation cannot be read by a provider."""
    with FakeServer() as server:
        clients = Clients(ProviderOptions(media_dir=data / "media", timeout=5), environ=provider_env(api, server.url))
        for ref in ("../secret.txt", str(data / "secret.txt"), "link.png"):
            message = Message(Role.USER, (Text("what?"), LocalMedia("image", ref)))
            with pytest.raises(MediaError):
                await clients.get(api, "m").chat("m", [message], {})
        await clients.aclose()
        assert server.state.seen == []


@pytest.mark.parametrize("api", IMAGE_APIS)
async def test_a_file_swapped_for_a_symlink_after_validation_is_not_sent(api: str, data: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeServer() as server:
        _env(api, server.url, monkeypatch)
        row = {"api": api, "model_name": "m", "prompt": "what?", "multimedia": [{"type": "image", "media": "cat.png"}]}
        path = write_jsonl(data.parent / "swap.jsonl", [row])
        settings = Settings(data_folder=data, max_queries=6000)
        opened = open_run(path, settings, session=Session())  # validated: cat.png is a real file inside media/
        cat = data / "media" / "cat.png"
        cat.unlink()
        cat.symlink_to(data / "secret.txt")
        try:
            summary = (await run_all(opened)).to_dict()
        finally:
            await opened.aclose()
        bodies = [json.dumps(s.payload) for s in server.state.seen]
    assert summary["failed"] == 1 and summary["answered"] == 0
    assert not any(SECRET in body or "VE9QLVNFQ1JFVC03ZjNhOWM" in body for body in bodies)  # plain or base64
    [failed] = read_jsonl(Path(summary["outputs"]["failed"]))
    assert failed["error"]["type"] == "bad_request" and "outside the media folder" in failed["error"]["message"]


def test_reading_inside_media_still_works_and_a_directory_swap_is_caught(data: Path):
    from promptfleet.core.media import MediaFolder

    folder = MediaFolder(data / "media")
    assert folder.read(LocalMedia("image", "cat.png")).data == b"\x89PNG-cat"
    os.mkdir(data / "media" / "sub")
    (data / "media" / "sub" / "ok.png").write_bytes(b"ok")
    assert folder.read(LocalMedia("image", "sub/ok.png")).mime_type == "image/png"
    (data / "media" / "sub" / "ok.png").unlink()
    (data / "media" / "sub").rmdir()
    (data / "media" / "sub").symlink_to(data)  # the folder now leads outside
    (data / "ok.png").write_text(SECRET)
    with pytest.raises(MediaError, match="outside the media folder"):
        folder.read(LocalMedia("image", "sub/ok.png"))


@pytest.mark.parametrize("api", ["openai", "anthropic", "gemini"])
async def test_urls_pass_through_unchanged(api: str, data: Path, monkeypatch: pytest.MonkeyPatch):
    url = "https://example.org/cat.png"  # never fetched: the fake only records the body
    row = {"api": api, "model_name": "m", "prompt": "what?", "multimedia": [{"type": "image_url", "image_url": url}]}
    path = write_jsonl(data.parent / "url.jsonl", [row])
    with FakeServer() as server:
        _env(api, server.url, monkeypatch)
        assert runner.invoke(app, ["check", "-f", str(path), "-d", str(data)]).exit_code == 0
        clients = Clients(ProviderOptions(media_dir=data / "media"), environ=provider_env(api, server.url))
        conversation = parse_conversation(row["prompt"], row["multimedia"])
        await clients.get(api, "m").chat("m", conversation.messages, {})
        await clients.aclose()
        body = server.state.seen[0].payload
    assert url in json.dumps(body)
    if api == "openai":
        assert body["messages"][0]["content"][1] == {"type": "image_url", "image_url": {"url": url}}


def test_ollama_refuses_an_image_url_at_validation(data: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OLLAMA_API_ENDPOINT", "http://127.0.0.1:9")
    row = {"api": "ollama", "model_name": "m", "prompt": "?", "multimedia": [{"type": "image_url", "image_url": "https://example.org/a.png"}]}
    path = write_jsonl(data.parent / "o.jsonl", [row])
    result = runner.invoke(app, ["check", "-f", str(path), "-d", str(data)])
    assert result.exit_code == 1 and f"{path}:1: multimedia: the ollama api does not take media URLs" in result.output
