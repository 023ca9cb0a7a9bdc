"""The OpenAI provider's lean transport (aiohttp + orjson) against the local fake: the SDK's
configuration and error semantics kept, bodies of any other shape refused, connections pooled."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from promptfleet.providers import Clients
from promptfleet.providers.base import ProviderError, ProviderOptions
from promptfleet.providers.http import status_message
from tests.fakes import FakeServer, Scripted
from tests.test_providers import KEY, classified, msgs, provider_env


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def clients_for(server: FakeServer, tmp_path: Path, api: str = "openai", timeout: float = 5) -> Clients:
    return Clients(ProviderOptions(media_dir=tmp_path, timeout=timeout), environ=provider_env(api, server.url))


async def ask(clients: Clients, text: str, api: str = "openai", parameters: dict | None = None):
    return await classified(clients.get(api, "m").chat("m", msgs([{"role": "user", "content": text}]), parameters or {}))


@pytest.mark.parametrize("api", ["openai", "huggingface-tgi"])
async def test_openai_compatible_apis_send_the_request_the_sdk_would(api: str, server: FakeServer, tmp_path: Path):
    clients = clients_for(server, tmp_path, api)
    reply = await ask(clients, "hello there", api, {"temperature": 0.5})
    await clients.aclose()
    assert (reply.text, reply.input_tokens, reply.output_tokens, reply.finish_reason) == ("answer to: hello there", 2, 4, "stop")
    seen = server.state.seen[0]
    assert seen.payload == {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "temperature": 0.5}
    assert seen.headers["authorization"] == f"Bearer {KEY}" and seen.headers["user-agent"].startswith("AsyncOpenAI/")


async def test_the_sdk_still_configures_the_client(server: FakeServer, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("OPENAI_ORG_ID", "org-from-env")
    clients = clients_for(server, tmp_path)
    await ask(clients, "q")
    await clients.aclose()
    assert server.state.seen[0].headers["openai-organization"] == "org-from-env"


@pytest.mark.parametrize(
    "body",
    [b'{"choices": []}', b'{"choices": [{"message": {"content": 5}}]}', b"[1, 2]", b'{"choices": [{"text": "legacy"}]}', b"{not json"],
    ids=["no-choices", "content-not-text", "a-list", "no-message", "not-json"],
)
async def test_a_success_of_another_shape_is_a_malformed_response(body: bytes, server: FakeServer, tmp_path: Path):
    server.state.script["q"] = [Scripted(200, body=body)]
    clients = clients_for(server, tmp_path)
    with pytest.raises(ProviderError) as info:
        await ask(clients, "q")
    await clients.aclose()
    assert info.value.kind == "invalid_response" and info.value.retryable


async def test_an_error_page_that_is_not_json_keeps_its_status_and_words(server: FakeServer, tmp_path: Path):
    server.state.script["q"] = [Scripted(502, body=b"<html>bad gateway</html>", retry_after=3)]
    clients = clients_for(server, tmp_path)
    with pytest.raises(ProviderError) as info:
        await ask(clients, "q")
    await clients.aclose()
    err = info.value
    assert (err.kind, err.status, err.retry_after) == ("server", 502, 3.0) and "bad gateway" in err.message


def test_status_messages_take_the_sdk_form():
    assert status_message(429, b'{"error": {"message": "slow down"}}') == "Error code: 429 - slow down"
    assert status_message(500, b'{"detail": "x"}') == "Error code: 500"
    assert status_message(503, b"") == "Error code: 503"


async def test_a_timeout_then_an_answer_on_the_same_client(server: FakeServer, tmp_path: Path):
    server.state.script["q"] = [Scripted("slow", retry_after=1.5)]
    clients = clients_for(server, tmp_path, timeout=0.5)
    with pytest.raises(ProviderError) as info:
        await ask(clients, "q")
    reply = await ask(clients, "q")  # the pool dropped the timed-out connection
    await clients.aclose()
    assert info.value.kind == "timeout" and reply.text == "answer to: q"
    assert server.state.calls["q"] == 2


async def test_many_at_once_each_sent_once(server: FakeServer, tmp_path: Path):
    clients = clients_for(server, tmp_path, timeout=60)  # a threaded fake on a busy machine can be slow to accept
    replies = await asyncio.gather(*(ask(clients, f"q{i}") for i in range(60)))
    await clients.aclose()
    await clients.aclose()  # closing twice is harmless
    assert [r.text for r in replies] == [f"answer to: q{i}" for i in range(60)]
    assert set(server.state.calls.values()) == {1} and len(server.state.calls) == 60


def test_the_proxy_comes_from_the_environment_once(monkeypatch):
    from promptfleet.providers.http import env_proxy

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    assert env_proxy("https://llm.example.org/v1/chat/completions") == "http://proxy.example:3128"
    assert env_proxy("https://internal.example/v1/chat/completions") is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("https_proxy", raising=False)
    assert env_proxy("https://llm.example.org/v1/chat/completions") is None
