"""Audio, video and PDF beyond images: each provider's wire shape against the fakes,
Gemini's File API for files over the inline limit (uploaded once, found again by hash),
and refusal at validation, with file:line, of what a provider cannot take."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptfleet.cli import app
from promptfleet.core.messages import parse_conversation
from promptfleet.providers.base import ProviderError
from tests.conftest import write_jsonl
from tests.fakes import FakeServer
from tests.test_providers import make_clients

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

FILES = {"talk.wav": b"RIFF fake wav", "song.mp3": b"ID3 fake mp3", "clip.mp4": b"\x00\x00 fake mp4" * 50,
         "paper.pdf": b"%PDF-1.4 fake", "voice.ogg": b"OggS fake", "notes.docx": b"PK fake"}  # fmt: skip


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


@pytest.fixture
def media(tmp_path: Path) -> Path:
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def ask(kind: str, ref: str):
    return list(parse_conversation("what is in it?", [{"type": kind, "media": ref}]).messages)


def b64(name: str) -> str:
    return base64.b64encode(FILES[name]).decode()


async def send(api: str, server: FakeServer, media: Path, kind: str, ref: str) -> dict:
    clients = make_clients(api, server, media)
    try:
        await clients.get(api, "m").chat("m", ask(kind, ref), {})
    finally:
        await clients.aclose()
    return server.state.seen[-1].payload


@pytest.mark.parametrize(("name", "fmt"), [("talk.wav", "wav"), ("song.mp3", "mp3")])
async def test_openai_audio_is_input_audio(name: str, fmt: str, server, media):
    payload = await send("openai", server, media, "audio", name)
    part = payload["messages"][0]["content"][1]
    assert part == {"type": "input_audio", "input_audio": {"data": b64(name), "format": fmt}}


@pytest.mark.parametrize("api", ["openai", "azure-openai"])
async def test_openai_pdf_is_a_file_part(api: str, server, media):
    payload = await send(api, server, media, "file", "paper.pdf")
    part = payload["messages"][0]["content"][1]
    assert part == {"type": "file", "file": {"filename": "paper.pdf", "file_data": f"data:application/pdf;base64,{b64('paper.pdf')}"}}


async def test_anthropic_pdf_is_a_document_block(server, media):
    payload = await send("anthropic", server, media, "file", "paper.pdf")
    block = payload["messages"][0]["content"][1]
    assert block == {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": b64("paper.pdf")}}


@pytest.mark.parametrize("api", ["gemini", "vertexai"])
@pytest.mark.parametrize(("kind", "name", "mime"), [("audio", "talk.wav", "audio/x-wav"), ("video", "clip.mp4", "video/mp4"),
                                                    ("file", "paper.pdf", "application/pdf")])  # fmt: skip
async def test_gemini_sends_small_media_inline(api: str, kind: str, name: str, mime: str, server, media):
    payload = await send(api, server, media, kind, name)
    inline = payload["contents"][0]["parts"][1]["inlineData"]
    assert inline["data"] == b64(name) and inline.get("mimeType", inline.get("mime_type")) in (mime, mime.replace("x-", ""))
    assert not server.state.uploads


async def test_gemini_large_media_goes_to_the_file_api_once(server, media):
    clients = make_clients("gemini", server, media)
    provider = clients.get("gemini", "m")
    provider.inline_limit_bytes = 100  # clip.mp4 (550 bytes) is "large"; the others are not
    # three prompts at once with the same video, then one more: one upload
    await asyncio.gather(*(provider.chat("m", ask("video", "clip.mp4"), {}) for _ in range(3)))
    await provider.chat("m", ask("video", "clip.mp4"), {})
    await provider.chat("m", ask("file", "paper.pdf"), {})
    await clients.aclose()
    assert server.state.uploads == [FILES["clip.mp4"]]
    [name] = server.state.files
    for seen in [s for s in server.state.seen if s.protocol == "gemini"][:4]:
        part = seen.payload["contents"][0]["parts"][1]
        file_data = part.get("fileData", part.get("file_data"))
        assert file_data.get("fileUri", file_data.get("file_uri")).endswith(name)
        assert file_data.get("mimeType", file_data.get("mime_type")) == "video/mp4"
    assert {"inlineData", "inline_data"} & set(server.state.seen[-1].payload["contents"][0]["parts"][1])  # the small PDF stayed inline


async def test_gemini_reuses_an_earlier_upload_found_by_hash(server, media):
    """A file uploaded by an earlier run (or `upload-media`) is not uploaded again."""
    first = make_clients("gemini", server, media)
    first.get("gemini", "m").inline_limit_bytes = 100
    await first.get("gemini", "m").chat("m", ask("video", "clip.mp4"), {})
    await first.aclose()
    second = make_clients("gemini", server, media)  # a new run: knows nothing but what the API lists
    second.get("gemini", "m").inline_limit_bytes = 100
    await second.get("gemini", "m").chat("m", ask("video", "clip.mp4"), {})
    await second.aclose()
    assert len(server.state.uploads) == 1


async def test_vertex_refuses_large_inline_media_and_says_what_to_do(server, media):
    clients = make_clients("vertexai", server, media)
    clients.get("vertexai", "m").inline_limit_bytes = 100
    with pytest.raises(ProviderError, match="gs:// URIs") as caught:
        await clients.get("vertexai", "m").chat("m", ask("video", "clip.mp4"), {})
    await clients.aclose()
    assert caught.value.kind == "bad_request" and not caught.value.retryable
    assert not server.state.seen and not server.state.uploads


@pytest.mark.parametrize(
    ("api", "kind", "ref", "message"),
    [
        ("openai", "video", "clip.mp4", "the openai api does not take video"),
        ("openai", "audio", "voice.ogg", "the openai api takes audio as WAV or MP3, not audio/ogg"),
        ("openai", "file", "notes.docx", "the openai api takes PDF files, not application/vnd.openxmlformats"),
        ("openai", "audio", "https://example.org/a.wav", "the openai api takes audio only inline"),
        ("anthropic", "audio", "talk.wav", "the anthropic api does not take audio"),
        ("anthropic", "file", "notes.docx", "the anthropic api takes PDF documents"),
        ("ollama", "file", "paper.pdf", "the ollama api does not take files"),
        ("quart", "image", "paper.pdf", "the quart api does not take images"),
        ("gemini", "audio", "../outside.wav", "media file '../outside.wav' is outside the media folder"),
    ],
)
def test_what_a_provider_cannot_take_is_refused_at_validation(api, kind, ref, message, tmp_path: Path):
    data = tmp_path / "data"
    (data / "media").mkdir(parents=True)
    for name, content in FILES.items():
        (data / "media" / name).write_bytes(content)
    (data / "outside.wav").write_bytes(b"RIFF")
    ok = {"api": "gemini", "model_name": "g", "prompt": "q", "multimedia": [{"type": "audio", "media": "talk.wav"}]}
    bad = {"api": api, "model_name": "m", "prompt": "q", "multimedia": [{"type": kind, "media": ref}]}
    path = write_jsonl(tmp_path / "exp é.jsonl", [ok, bad])
    result = CliRunner().invoke(app, ["check", "-f", str(path), "-d", str(data), "-e", str(tmp_path / "none.env")])
    assert result.exit_code == 1
    assert f"{path}:2: multimedia: {message}" in result.output
    assert f"{path}:1:" not in result.output


async def test_gemini_uploads_the_largest_file_until_the_rest_fits_inline(server, media):
    """Two files each under the limit but over it together: the larger one is uploaded."""
    clients = make_clients("gemini", server, media)
    provider = clients.get("gemini", "m")
    provider.inline_limit_bytes = 560  # clip.mp4 (550) + paper.pdf (13) > 560
    messages = list(parse_conversation("both?", [{"type": "video", "media": "clip.mp4"}, {"type": "file", "media": "paper.pdf"}]).messages)
    await provider.chat("m", messages, {})
    await clients.aclose()
    assert server.state.uploads == [FILES["clip.mp4"]]
    parts = [s for s in server.state.seen if s.protocol == "gemini"][0].payload["contents"][0]["parts"]
    assert {"fileData", "file_data"} & set(parts[1]) and {"inlineData", "inline_data"} & set(parts[2])
