"""Every provider through its real SDK/client against a local server speaking its wire
protocol: success, usage, system messages, images, and the mapping of every failure."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from promptfleet.core.messages import parse_conversation, user
from promptfleet.providers import Clients
from promptfleet.providers.base import ProviderError, ProviderOptions
from promptfleet.providers.errors import classify
from tests.fakes import FakeServer, Scripted

KEY = "sk-provider-test-key-0123456789"


async def classified(request):
    """Await a provider call, mapping a failure the way the engine does (one classify)."""
    try:
        return await request
    except Exception as err:
        raise classify(err) from err


def msgs(raw: list) -> tuple:
    """Typed messages from the chat shape an experiment file uses."""
    return parse_conversation(raw).messages


def provider_env(api: str, url: str) -> dict[str, str]:
    return {
        "openai": {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": f"{url}/v1"},
        "azure-openai": {"AZURE_OPENAI_API_KEY": KEY, "AZURE_OPENAI_API_ENDPOINT": url, "AZURE_OPENAI_API_VERSION": "2024-10-21"},
        "huggingface-tgi": {"HUGGINGFACE_TGI_API_ENDPOINT": url, "HUGGINGFACE_TGI_API_KEY": KEY},
        "anthropic": {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": url},
        "gemini": {"GEMINI_API_KEY": KEY, "GEMINI_BASE_URL": url},
        "vertexai": {"VERTEXAI_PROJECT_ID": "proj", "VERTEXAI_LOCATION_ID": "europe-west2", "VERTEXAI_BASE_URL": url,
                     "VERTEXAI_ACCESS_TOKEN": KEY},  # fmt: skip
        "ollama": {"OLLAMA_API_ENDPOINT": url},
        "quart": {"QUART_API_ENDPOINT": url},
    }[api]


APIS = ["openai", "azure-openai", "huggingface-tgi", "anthropic", "gemini", "vertexai", "ollama"]
ALL_APIS = [*APIS, "quart"]  # quart reports no token usage: left out where usage is asserted


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def make_clients(api: str, server: FakeServer, tmp_path: Path, timeout: float = 30) -> Clients:
    return Clients(ProviderOptions(media_dir=tmp_path, timeout=timeout), environ=provider_env(api, server.url))


@pytest.mark.parametrize("api", APIS)
async def test_answer_usage_and_finish_reason(api: str, server: FakeServer, tmp_path: Path):
    clients = make_clients(api, server, tmp_path)
    reply = await clients.get(api, "model-x").chat("model-x", msgs([{"role": "user", "content": "hello there"}]), {})
    await clients.aclose()
    assert reply.text == "answer to: hello there"
    assert (reply.input_tokens, reply.output_tokens) == (2, 4)
    assert reply.finish_reason in {"stop", "end_turn", "STOP"}
    assert server.state.calls["hello there"] == 1


@pytest.mark.parametrize(
    ("api", "path", "header", "value"),
    [
        ("openai", "/v1/chat/completions", "authorization", f"Bearer {KEY}"),
        ("azure-openai", r"/openai/deployments/model-x/chat/completions\?api-version=2024-10-21", "api-key", KEY),
        ("huggingface-tgi", "/v1/chat/completions", "authorization", f"Bearer {KEY}"),
        ("anthropic", "/v1/messages", "anthropic-version", None),
        ("gemini", r"/v1(beta)?/models/model-x:generateContent", "x-goog-api-key", KEY),
        ("vertexai", r"/v1(beta1)?/projects/proj/locations/europe-west2/publishers/google/models/model-x:generateContent",
         "authorization", f"Bearer {KEY}"),  # fmt: skip
        ("ollama", "/api/generate", None, None),
        ("quart", "/generate", "content-type", "application/json"),
    ],
)
async def test_wire_paths_and_credentials(api, path, header, value, server: FakeServer, tmp_path: Path):
    clients = make_clients(api, server, tmp_path)
    await clients.get(api, "model-x").chat("model-x", msgs([{"role": "user", "content": "hi"}]), {})
    await clients.aclose()
    [seen] = server.state.seen
    assert re.fullmatch(path, seen.path), seen.path
    if header:
        assert header in seen.headers and seen.headers[header] == (value or seen.headers[header])
    if api not in ("ollama", "quart"):  # the key travels in the header the SDK chose, and nowhere in the URL
        assert any(KEY in v for v in seen.headers.values()) and KEY not in seen.path


@pytest.mark.parametrize("api", APIS)
async def test_system_messages_and_history_map_to_the_api(api: str, server: FakeServer, tmp_path: Path):
    messages = [
        {"role": "system", "content": "be terse"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "second"},
    ]
    clients = make_clients(api, server, tmp_path)
    await clients.get(api, "m").chat("m", msgs(messages), {})
    await clients.aclose()
    payload = server.state.requests[0]
    if api == "anthropic":
        assert payload["system"] == "be terse"
        assert [m["role"] for m in payload["messages"]] == ["user", "assistant", "user"]
        assert payload["max_tokens"] == 1024  # Anthropic requires it; we default it
    elif api in ("gemini", "vertexai"):
        assert payload["systemInstruction"]["parts"][0]["text"] == "be terse"
        assert [c["role"] for c in payload["contents"]] == ["user", "model", "user"]
    else:
        assert [m["role"] for m in payload["messages"]] == ["system", "user", "assistant", "user"]
        assert payload["messages"][0]["content"] == "be terse"


@pytest.mark.parametrize("api", ["anthropic", "gemini", "vertexai", "openai", "ollama"])
async def test_a_system_message_made_of_parts_reaches_the_api_as_text(api: str, server: FakeServer, tmp_path: Path):
    """Once sent as the Python repr "[{'type': 'text', ...}]" to Anthropic and Gemini."""
    system = {"role": "system", "content": [{"type": "text", "text": "be"}, {"type": "text", "text": "terse"}]}
    clients = make_clients(api, server, tmp_path)
    await clients.get(api, "m").chat("m", msgs([system, {"role": "user", "content": "hi"}]), {})
    await clients.aclose()
    payload = server.state.requests[0]
    if api == "anthropic":
        assert payload["system"] == "be terse"
    elif api in ("gemini", "vertexai"):
        assert payload["systemInstruction"]["parts"][0]["text"] == "be terse"
    elif api == "openai":
        assert payload["messages"][0]["content"] == [{"type": "text", "text": "be"}, {"type": "text", "text": "terse"}]
    else:
        assert payload["messages"][0]["content"] == "be\nterse"


@pytest.mark.parametrize("api", ["openai", "azure-openai", "anthropic", "gemini", "vertexai", "ollama"])
async def test_images_from_the_media_folder_are_encoded(api: str, server: FakeServer, tmp_path: Path):
    image = b"\x89PNG\r\n\x1a\nfake-image-bytes"
    (tmp_path / "cat.png").write_bytes(image)
    encoded = base64.b64encode(image).decode()
    clients = make_clients(api, server, tmp_path)
    message = {"role": "user", "content": ["what is this?", {"type": "image", "media": "cat.png"}]}
    reply = await clients.get(api, "m").chat("m", msgs([message]), {})
    await clients.aclose()
    assert reply.text == "answer to: what is this?"
    payload = server.state.requests[0]
    if api in ("openai", "azure-openai"):
        assert payload["messages"][0]["content"][1] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}}
    elif api == "anthropic":
        assert payload["messages"][0]["content"][1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": encoded}}
    elif api in ("gemini", "vertexai"):
        inline = payload["contents"][0]["parts"][1]["inlineData"]
        assert inline["data"] == encoded and inline.get("mimeType", inline.get("mime_type")) == "image/png"
    else:
        assert payload["images"] == [encoded]


@pytest.mark.parametrize("api", ALL_APIS)
@pytest.mark.parametrize(
    ("step", "kind", "status", "retryable", "retry_after"),
    [
        (Scripted(400), "bad_request", 400, False, None),
        (Scripted(401), "auth", 401, False, None),
        (Scripted(403), "auth", 403, False, None),
        (Scripted(404), "not_found", 404, False, None),
        (Scripted(429, retry_after=7), "rate_limit", 429, True, 7.0),
        (Scripted(500), "server", 500, True, None),
        (Scripted(503, retry_after=2), "server", 503, True, 2.0),
        (Scripted("malformed"), "invalid_response", None, True, None),
        (Scripted("slow", retry_after=2), "timeout", None, True, None),
    ],
    ids=["400", "401", "403", "404", "429", "500", "503", "malformed", "timeout"],
)
async def test_failures_map_to_the_taxonomy(api, step, kind, status, retryable, retry_after, server: FakeServer, tmp_path: Path):
    server.state.script["q"] = [step]
    clients = make_clients(api, server, tmp_path, timeout=0.5)
    with pytest.raises(ProviderError) as info:
        await classified(clients.get(api, "m").chat("m", msgs([{"role": "user", "content": "q"}]), {}))
    await clients.aclose()
    err = info.value
    assert (err.kind, err.retryable, err.retry_after) == (kind, retryable, retry_after)
    if status is not None:
        assert err.status == status
        assert f"fake error {status}" in err.message  # the server's own words reach the user
    assert KEY not in clients.redact(err.message)


@pytest.mark.parametrize("api", ALL_APIS)
async def test_connection_refused_is_retryable(api: str, tmp_path: Path):
    with FakeServer() as dead:
        url = dead.url
    clients = Clients(ProviderOptions(media_dir=tmp_path, timeout=2), environ=provider_env(api, url))
    with pytest.raises(ProviderError) as info:
        await classified(clients.get(api, "m").chat("m", msgs([{"role": "user", "content": "q"}]), {}))
    await clients.aclose()
    assert info.value.kind == "connection" and info.value.retryable


@pytest.mark.parametrize(
    ("api", "parameters", "check"),
    [
        ("openai", {"temperature": 0.3, "max_tokens": 9, "stop": ["\n"]}, lambda p: p["temperature"] == 0.3 and p["max_tokens"] == 9 and p["stop"] == ["\n"]),
        ("anthropic", {"temperature": 0.3, "max_tokens": 9}, lambda p: p["temperature"] == 0.3 and p["max_tokens"] == 9),
        ("gemini", {"temperature": 0.3, "max_output_tokens": 9, "top_k": 4},
         lambda p: p["generationConfig"] == {"temperature": 0.3, "maxOutputTokens": 9, "topK": 4}),
        ("ollama", {"num_predict": 9, "temperature": 0.3, "keep_alive": "5m"},
         lambda p: p["options"] == {"num_predict": 9, "temperature": 0.3} and p["keep_alive"] == "5m"),
    ],  # fmt: skip
)
async def test_parameters_reach_the_api(api, parameters, check, server: FakeServer, tmp_path: Path):
    clients = make_clients(api, server, tmp_path)
    await clients.get(api, "m").chat("m", msgs([{"role": "user", "content": "q"}]), parameters)
    await clients.aclose()
    assert check(server.state.requests[0]), server.state.requests[0]


async def test_unknown_gemini_parameter_is_refused_by_the_sdk(server: FakeServer, tmp_path: Path):
    clients = make_clients("gemini", server, tmp_path)
    with pytest.raises(ProviderError) as info:
        await classified(clients.get("gemini", "m").chat("m", msgs([{"role": "user", "content": "q"}]), {"temprature": 1}))
    await clients.aclose()
    assert info.value.kind == "bad_request" and not info.value.retryable and "temprature" in info.value.message
    assert server.state.seen == []


async def test_unknown_openai_parameter_goes_to_the_server(server: FakeServer, tmp_path: Path):
    clients = make_clients("openai", server, tmp_path)
    await clients.get("openai", "m").chat("m", msgs([{"role": "user", "content": "q"}]), {"temprature": 1})
    await clients.aclose()
    assert server.state.requests[0]["temprature"] == 1  # not dropped: the real API answers 400 with its reason


async def test_model_specific_env_var_wins_and_one_client_per_credentials(server: FakeServer, tmp_path: Path):
    environ = {"OPENAI_API_KEY": "sk-generic-000000", "OPENAI_API_KEY_gpt_4o_mini": "sk-special-000000", "OPENAI_BASE_URL": f"{server.url}/v1"}
    clients = Clients(ProviderOptions(media_dir=tmp_path), environ=environ)
    generic_a, generic_b = clients.get("openai", "gpt-4"), clients.get("openai", "gpt-3.5")
    special = clients.get("openai", "gpt-4o-mini")
    assert generic_a is generic_b and special is not generic_a
    for model in ("gpt-4", "gpt-4o-mini"):
        await clients.get("openai", model).chat(model, msgs([{"role": "user", "content": "q"}]), {})
    await clients.aclose()
    assert [seen.headers["authorization"] for seen in server.state.seen] == ["Bearer sk-generic-000000", "Bearer sk-special-000000"]


def test_missing_env_is_named_not_valued(tmp_path: Path):
    clients = Clients(ProviderOptions(media_dir=tmp_path), environ={"AZURE_OPENAI_API_KEY": "secret-value-1"})
    with pytest.raises(ProviderError, match="AZURE_OPENAI_API_ENDPOINT") as info:
        clients.get("azure-openai", "dep")
    assert "secret-value-1" not in str(info.value)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_rate_limit_headers_are_surfaced_on_answers_and_429s(api: str, server: FakeServer, tmp_path: Path):
    server.state.headers = {"x-ratelimit-remaining-requests": "7", "anthropic-ratelimit-requests-remaining": "3", "x-other": "1"}
    server.state.script["limited"] = [Scripted(429, retry_after=1)]
    clients = make_clients(api, server, tmp_path)
    provider = clients.get(api, "m")
    reply = await provider.chat("m", msgs([{"role": "user", "content": "fine"}]), {})
    with pytest.raises(ProviderError) as info:
        await classified(provider.chat("m", msgs([{"role": "user", "content": "limited"}]), {}))
    await clients.aclose()
    expected = {"x-ratelimit-remaining-requests": "7", "anthropic-ratelimit-requests-remaining": "3"}
    assert reply.rate_limits == expected and info.value.rate_limits == expected


def test_third_party_provider_from_an_entry_point(monkeypatch):
    from importlib.metadata import EntryPoint

    from promptfleet import providers

    ep = EntryPoint(name="my-api", value="promptfleet.providers.test:TestProvider", group="promptfleet.providers")
    monkeypatch.setattr(providers, "_entry_points", lambda: {"my-api": ep})
    assert "my-api" in providers.known_apis()
    assert providers.provider_class("my-api").__name__ == "TestProvider"


@pytest.mark.parametrize(
    ("api", "version", "fingerprint", "request_id", "seed"),
    [
        ("openai", "model-x-2026-01-01", "fp_fake", "req_fake_1", 7),
        ("azure-openai", "model-x-2026-01-01", "fp_fake", "req_fake_1", 7),
        ("anthropic", "model-x-20260101", None, "req_fake_1", None),  # Anthropic takes no seed
        ("gemini", "fake-model-001", None, "resp_fake", 7),
        ("ollama", "model-x", None, None, 7),
    ],
)
async def test_reply_says_which_model_answered(api, version, fingerprint, request_id, seed, server: FakeServer, tmp_path: Path):
    clients = make_clients(api, server, tmp_path)
    params = {} if api == "anthropic" else {"seed": 7}
    reply = await clients.get(api, "model-x").chat("model-x", [user("hello")], params)
    await clients.aclose()
    assert (reply.model_version, reply.system_fingerprint, reply.request_id, reply.seed) == (version, fingerprint, request_id, seed)


async def test_quart_speaks_promptos_server_protocol(server: FakeServer, tmp_path: Path):
    """prompto's server: `text` (a string for one prompt, the chat for the model's template),
    `model` and `options`; the model the server loaded comes back as the reply's served model."""
    clients = make_clients("quart", server, tmp_path)
    provider = clients.get("quart", "vicgalle/gpt2-open-instruct-v1")
    reply = await provider.chat("vicgalle/gpt2-open-instruct-v1", [user("hello")], {"temperature": 0.5})
    chat = msgs([{"role": "system", "content": "be brief"}, {"role": "user", "content": "again"}])
    await provider.chat("vicgalle/gpt2-open-instruct-v1", chat, {})
    await clients.aclose()
    first, second = server.state.requests
    assert first == {"text": "hello", "model": "vicgalle/gpt2-open-instruct-v1", "options": {"temperature": 0.5}}
    assert second["text"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "again"}]
    assert (reply.text, reply.served_model, reply.input_tokens) == ("answer to: hello", "fake-org/quart-model", None)


def test_quart_model_specific_endpoint_wins(tmp_path: Path):
    environ = {"QUART_API_ENDPOINT": "http://127.0.0.1:1", "QUART_API_ENDPOINT_vicgalle_gpt2_open_instruct_v1": "http://127.0.0.1:2"}
    clients = Clients(ProviderOptions(media_dir=tmp_path), environ=environ)
    assert clients.get("quart", "vicgalle/gpt2-open-instruct-v1") is not clients.get("quart", "other-model")


def test_parameters_an_sdk_refuses_fail_in_one_line_naming_the_field():
    from google.genai import types

    from promptfleet.providers.errors import ErrorKind, classify

    with pytest.raises(Exception) as refused:
        types.GenerateContentConfig(temperature="hot", top_k="many")
    error = classify(refused.value)
    assert error.kind is ErrorKind.BAD_REQUEST and "\n" not in error.message
    assert error.message.startswith("invalid parameters: temperature:") and "(and 1 more)" in error.message
