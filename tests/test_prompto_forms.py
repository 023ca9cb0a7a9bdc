"""Every prompt form prompto documents (its docs/ and the experiment files of its examples/),
for every api, in every shape it takes: `check` passes the whole file, and a run sends each
form to a local fake through the official SDK, media read from data/media only."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from promptfleet import Experiment, Settings
from promptfleet.cli import app
from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer
from tests.test_providers import provider_env

MEDIA = {"pantani_giro.jpg": b"\xff\xd8\xff fake cyclists", "mortadella.jpg": b"\xff\xd8\xff fake mortadella",
         "test.mp4": b"\x00\x00\x00 fake video", "test.wav": b"RIFF fake wave", "test.mp3": b"ID3 fake mp3"}  # fmt: skip
SYSTEM = {"role": "system", "content": "You are a helpful assistant designed to answer questions briefly."}
WEB_IMAGE = "https://upload.example.org/boardwalk.jpg"


def chat(api: str, *turns: tuple[str, Any]) -> list[dict[str, Any]]:
    """Chat messages as prompto spells them for `api`: Gemini's `parts` and `model`, else `content` and `assistant`."""
    gemini = api in ("gemini", "vertexai")
    key, answer_role = ("parts", "model") if gemini else ("content", "assistant")
    return [{"role": answer_role if role == "assistant" else role, key: content} for role, content in turns]


def image(api: str, name: str) -> dict[str, Any]:
    """An image in the one form prompto's documentation gives for `api`."""
    if api in ("openai", "azure-openai"):
        return {"type": "image_url", "image_url": name}
    if api == "anthropic":
        return {"type": "image", "source": {"media": name, "media_type": "image/jpeg"}}
    return {"type": "image", "media": name}


def forms() -> list[tuple[str, dict[str, Any], list[str]]]:
    """(name, record, media files its request must carry), text forms for every api first."""
    out = []
    for api in ("openai", "azure-openai", "anthropic", "gemini", "vertexai", "ollama", "huggingface-tgi", "quart"):
        system = ({"role": "system", "parts": SYSTEM["content"]},) if api in ("gemini", "vertexai") else (SYSTEM,)
        out += [
            (f"{api}:string", {"prompt": f"{api} how does technology impact us?"}, []),
            (f"{api}:list", {"prompt": [f"{api} how does trade create jobs?", f"{api} a joke about that"]}, []),
            (f"{api}:chat-system", {"prompt": chat(api, ("system", system[0].get("content", SYSTEM["content"])),
                                                   ("user", f"{api} hakka language?"))}, []),
            (f"{api}:chat-history", {"prompt": chat(api, ("system", SYSTEM["content"]), ("user", "Hello, I'm Bob, 6 years old"),
                                                    ("assistant", "Hi Bob, how may I assist you?"), ("user", f"{api} my age next year?"))}, []),
        ]  # fmt: skip
    for api in ("openai", "azure-openai", "anthropic", "gemini", "vertexai"):
        out += [
            (f"{api}:image-after-text", {"prompt": chat(api, ("user", [f"{api} describe this image", image(api, "pantani_giro.jpg")]))},
             ["pantani_giro.jpg"]),
            (f"{api}:image-first", {"prompt": chat(api, ("user", [image(api, "mortadella.jpg"), f"{api} what is this?"]))},
             ["mortadella.jpg"]),
            (f"{api}:image-in-history", {"prompt": chat(api, ("user", [f"{api} what is in this image?", image(api, "pantani_giro.jpg")]),
                                                        ("assistant", "A group of cyclists."), ("user", f"{api} notable cyclists?"))},
             ["pantani_giro.jpg"]),
            (f"{api}:multimedia-key", {"prompt": f"{api} and this one?", "multimedia": [{"type": "image", "media": "mortadella.jpg"}]},
             ["mortadella.jpg"]),
        ]  # fmt: skip
    for api in ("openai", "azure-openai"):
        web = {"type": "image_url", "image_url": {"url": WEB_IMAGE}}
        out.append((f"{api}:image-url", {"prompt": chat(api, ("user", [{"type": "text", "text": f"{api} what's in this image?"}, web]))}, []))
    for api in ("gemini", "vertexai"):
        for kind, name in (("video", "test.mp4"), ("audio", "test.wav"), ("audio", "test.mp3")):
            out.append((f"{api}:{name}", {"prompt": chat(api, ("user", [f"{api} describe {name}", {"type": kind, "media": name}]))}, [name]))
        out.append((f"{api}:system-after-user", {"prompt": chat(api, ("user", f"{api} hakka, system last"), ("system", SYSTEM["content"])),
                                                 "safety_filter": "most"}, []))  # fmt: skip
    uploaded = {"type": "video", "media": "test.mp4", "uploaded_filename": "files/abc123"}  # after prompto's upload notebook
    out.append(("gemini:uploaded-filename", {"prompt": chat("gemini", ("user", ["gemini describe this video", uploaded]))}, ["test.mp4"]))
    return [(name, {"id": name, "api": name.split(":")[0], "model_name": "model-x", **record}, files) for name, record, files in out]


FORMS = forms()


def last_text(record: dict[str, Any]) -> str:
    """The text of the last user turn: the fake answers "answer to: <it>"."""
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return prompt
    if all(isinstance(p, str) for p in prompt):
        return prompt[-1]
    last = [m for m in prompt if m["role"] != "system"][-1]
    content = last.get("content", last.get("parts"))
    items = [content] if isinstance(content, str) else content
    return next(i if isinstance(i, str) else i["text"] for i in items if isinstance(i, str) or i.get("type") == "text")


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One file of every form: checked, then run against one fake that speaks every protocol."""
    root = tmp_path_factory.mktemp("forms")
    (root / "data" / "media").mkdir(parents=True)
    for name, data in MEDIA.items():
        (root / "data" / "media" / name).write_bytes(data)
    path = write_jsonl(root / "prompto forms.jsonl", [record for _, record, _ in FORMS])
    with FakeServer() as server, pytest.MonkeyPatch.context() as mp:
        for api in ("openai", "azure-openai", "anthropic", "gemini", "vertexai", "ollama", "huggingface-tgi"):
            for key, value in provider_env(api, server.url).items():
                mp.setenv(key, value)
        mp.setenv("QUART_API_ENDPOINT", server.url)
        check = CliRunner().invoke(app, ["check", "-f", str(path), "-d", str(root / "data"), "-e", str(root / "none.env")])
        settings = Settings(data_folder=root / "data", max_queries=6000, parallel=True)
        summary = asyncio.run(Experiment(path, settings).process()).to_dict()
        seen = list(server.state.seen)
    completed = {r["id"]: r for r in read_jsonl(Path(summary["outputs"]["completed"]))}
    return {"check": check, "summary": summary, "completed": completed, "seen": seen}


def test_check_passes_every_documented_form(ran: dict[str, Any]):
    assert ran["check"].exit_code == 0, ran["check"].output
    assert ran["summary"]["answered"] == len(FORMS) and ran["summary"]["failed"] == 0


@pytest.mark.parametrize(("name", "record", "files"), FORMS, ids=[name for name, _, _ in FORMS])
def test_each_documented_form_runs(name: str, record: dict[str, Any], files: list[str], ran: dict[str, Any]):
    done = ran["completed"].get(name)
    assert done is not None, f"{name} did not complete"
    question = last_text(record)
    expected = [f"answer to: {t}" for t in record["prompt"]] if name.endswith(":list") else f"answer to: {question}"
    assert done["response"] == expected
    sent = [json.dumps(s.payload) for s in ran["seen"] if question in json.dumps(s.payload)]
    assert sent, f"no request carried {question!r}"
    for file in files:  # the media went inline, read from data/media (google-genai sends URL-safe base64)
        encoded = (base64.b64encode(MEDIA[file]).decode(), base64.urlsafe_b64encode(MEDIA[file]).decode())
        assert any(e in body for body in sent for e in encoded), file
    if name.endswith(":image-url"):
        assert WEB_IMAGE in sent[-1]  # a web image stays a URL
    if "safety_filter" in record:  # prompto's top-level key, as the safety settings it stands for
        thresholds = {s["threshold"] for s in json.loads(sent[-1])["safetySettings"]}
        assert thresholds == {"BLOCK_LOW_AND_ABOVE"}
    if name.startswith("quart:"):
        assert done["model"] == "fake-org/quart-model"  # the model the server reports, kept as prompto keeps it


@pytest.mark.parametrize("api", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize("ref", ["../outside.jpg", "/etc/hostname", "missing.jpg"])
def test_each_apis_image_form_stays_inside_the_media_folder(api: str, ref: str, tmp_path: Path):
    """prompto's forms name files relative to media/: nothing else is read, and `check` says so."""
    (tmp_path / "data" / "media").mkdir(parents=True)
    (tmp_path / "data" / "outside.jpg").write_bytes(b"\xff\xd8\xff secret")
    record = {"api": api, "model_name": "m", "prompt": chat(api, ("user", ["what is it?", image(api, ref)]))}
    path = write_jsonl(tmp_path / "exp.jsonl", [record])
    result = CliRunner().invoke(app, ["check", "-f", str(path), "-d", str(tmp_path / "data"), "-e", str(tmp_path / "none.env")])
    assert result.exit_code == 1
    reason = "not found in" if ref == "missing.jpg" else "is outside the media folder"
    assert f"{path}:1: multimedia: media file {ref!r} {reason}" in " ".join(result.output.split())
