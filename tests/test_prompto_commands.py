"""prompto's helper commands: `missing` (prompto_obtain_missing_jsonl), `judge -o FOLDER`
(prompto_create_judge_file), `upload-media` (prompto_upload_media) against a fake File API,
and `run` taking prompto 0.2.1's short judge/scorer flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptfleet.cli import app
from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def rec(i: int, **extra) -> dict:
    return {"id": i, "api": "test", "model_name": "m", "prompt": f"q{i}", **extra}


# --- missing ---------------------------------------------------------------------------


def test_missing_writes_unanswered_records_by_id_and_counts_a_torn_answer_as_missing(tmp_path: Path):
    folder = tmp_path / "dossier é"
    exp = write_jsonl(folder / "exp.jsonl", [rec(i) for i in range(5)])
    done = folder / "01-completed-exp.jsonl"
    done.write_text(
        "".join(json.dumps({**rec(i), "response": "r"}) + "\n" for i in (0, 2))
        + json.dumps({**rec(4), "response": "r"})[:20]  # torn last line: prompt 4 is not answered
    )
    new = folder / "missing exp.jsonl"
    result = runner.invoke(app, ["missing", "-i", str(exp), "-o", str(done), "-n", str(new)])
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in read_jsonl(new)] == [1, 3, 4]
    assert read_jsonl(new)[0] == rec(1)  # the input record unchanged, ready to run
    assert "3 of 5 prompt(s) have no answer" in result.output and "1 unreadable line" in result.output


def test_missing_matches_by_input_line_when_records_have_no_id(tmp_path: Path):
    rows = [{k: v for k, v in rec(i).items() if k != "id"} for i in range(3)]
    exp = write_jsonl(tmp_path / "exp.jsonl", rows)
    done = write_jsonl(tmp_path / "c.jsonl", [{**rows[1], "response": "r", "input_line": 2}])
    new = tmp_path / "new.jsonl"
    assert runner.invoke(app, ["missing", "--input", str(exp), "--output", str(done), "--new", str(new)]).exit_code == 0
    assert [r["prompt"] for r in read_jsonl(new)] == ["q0", "q2"]


def test_missing_with_custom_id_refuses_a_line_without_it_and_writes_nothing(tmp_path: Path):
    exp = write_jsonl(tmp_path / "exp.jsonl", [rec(0, key="a"), rec(1)])
    done = write_jsonl(tmp_path / "c.jsonl", [])
    new = tmp_path / "new.jsonl"
    result = runner.invoke(app, ["missing", "-i", str(exp), "-o", str(done), "-n", str(new), "--id", "key"])
    assert result.exit_code == 1
    assert f"{exp}:2: key: is required to match answers" in result.output
    assert not new.exists() and not list(tmp_path.glob("*.tmp"))


def test_missing_when_nothing_is_missing_writes_no_file(tmp_path: Path):
    exp = write_jsonl(tmp_path / "exp.jsonl", [rec(0)])
    done = write_jsonl(tmp_path / "c.jsonl", [{**rec(0), "response": "r"}])
    result = runner.invoke(app, ["missing", "-i", str(exp), "-o", str(done), "-n", str(tmp_path / "n.jsonl")])
    assert result.exit_code == 0 and "no missing prompts" in result.output
    assert not (tmp_path / "n.jsonl").exists()


@pytest.mark.parametrize("new_name", ["exp.jsonl", "n.csv"])
def test_missing_refuses_to_overwrite_its_input_or_write_csv(tmp_path: Path, new_name: str):
    exp = write_jsonl(tmp_path / "exp.jsonl", [rec(0)])
    done = write_jsonl(tmp_path / "c.jsonl", [])
    result = runner.invoke(app, ["missing", "-i", str(exp), "-o", str(done), "-n", str(tmp_path / new_name)])
    assert result.exit_code == 1
    assert read_jsonl(exp) == [rec(0)]


# --- judge -o FOLDER -------------------------------------------------------------------


def test_judge_output_folder_takes_prompto_file_name(tmp_path: Path):
    completed = write_jsonl(tmp_path / "run" / "01-01-2026-00-00-00-completed-exp.jsonl", [{**rec(0), "response": "4"}])
    out = tmp_path / "judges out"
    result = runner.invoke(app, ["judge", "-i", str(completed), "-l", str(REPO / "data/judge"), "-t", "template.txt",
                                 "-j", "test-judge", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    [record] = read_jsonl(out / "judge-01-01-2026-00-00-00-exp.jsonl")
    assert record["id"] == "judge-test-judge-template-0" and "4" in record["prompt"]
    main_style = ["judge", "--input-file", str(completed), "-jf", str(REPO / "data/judge"), "-jt", "template.txt",
                  "--judge", "test-judge", "--output-folder", str(out)]  # fmt: skip
    assert runner.invoke(app, main_style).exit_code == 0


def test_judge_output_folder_that_is_a_file_is_refused(tmp_path: Path):
    completed = write_jsonl(tmp_path / "c.jsonl", [{**rec(0), "response": "4"}])
    clash = tmp_path / "clash"
    clash.write_text("keep me")
    result = runner.invoke(app, ["judge", "-i", str(completed), "-l", str(REPO / "data/judge"), "-j", "test-judge", "-o", str(clash)])
    assert result.exit_code == 1 and "is a file" in result.output
    assert clash.read_text() == "keep me"


def test_run_takes_prompto_021_short_flags(tmp_path: Path):
    """-l/-t/-j/-s are parsed (a usage error would exit 2); the bad file is what stops it."""
    bad = write_jsonl(tmp_path / "exp.jsonl", [{"api": "test"}])
    (tmp_path / "d").mkdir()
    args = ["run", "-f", str(bad), "-d", str(tmp_path / "d"), "-l", str(REPO / "data/judge"), "-t", "template.txt",
            "-j", "test-judge", "-s", "match", "-rp", "default"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert f"{bad}:1: prompt: is required" in result.output


# --- upload-media ----------------------------------------------------------------------


@pytest.fixture
def gemini(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeServer() as server:
        monkeypatch.setenv("GEMINI_API_KEY", "AIza-fake-key-for-tests-0123456789")
        monkeypatch.setenv("GEMINI_BASE_URL", server.url)
        yield server


def media_experiment(tmp_path: Path, video: str = "clips/talk é.mp4") -> Path:
    media = tmp_path / "media"
    (media / "clips").mkdir(parents=True)
    (media / "clips" / "talk é.mp4").write_bytes(b"\x00video" * 100)
    (media / "cat.png").write_bytes(b"\x89PNG fake")
    parts = lambda *m: [{"role": "user", "parts": ["describe", *m]}]  # noqa: E731
    return write_jsonl(tmp_path / "exp.jsonl", [
        {"id": 0, "api": "gemini", "model_name": "g", "prompt": parts({"type": "video", "media": video})},
        {"id": 1, "api": "gemini", "model_name": "g", "prompt": "q", "multimedia": [{"type": "video", "media": video},
                                                                                     {"type": "image", "media": "cat.png"}]},
        {"id": 2, "api": "openai", "model_name": "o", "prompt": "q", "multimedia": [{"type": "image", "media": "cat.png"}]},
    ])  # fmt: skip


def test_upload_media_uploads_each_file_once_and_reuses_by_hash(gemini: FakeServer, tmp_path: Path):
    exp = media_experiment(tmp_path)
    result = runner.invoke(app, ["upload-media", "upload", "-f", str(exp), "-m", str(tmp_path / "media"), "-e", "none.env"])
    assert result.exit_code == 0, result.output
    assert "2 media file(s): 2 uploaded, 0 already there" in result.output
    assert sorted(gemini.state.uploads) == sorted([b"\x00video" * 100, b"\x89PNG fake"])
    out = read_jsonl(tmp_path / "exp_uploaded.jsonl")
    video_name = out[0]["prompt"][0]["parts"][1]["uploaded_filename"]
    assert out[1]["multimedia"][0]["uploaded_filename"] == video_name
    assert gemini.state.files[video_name]["mimeType"] == "video/mp4"
    assert "uploaded_filename" not in out[2]["multimedia"][0]  # not a gemini prompt

    again = runner.invoke(app, ["upload-media", "upload", "-f", str(exp), "-m", str(tmp_path / "media"), "-o", str(tmp_path / "b.jsonl")])
    assert again.exit_code == 0 and "0 uploaded, 2 already there" in again.output
    assert len(gemini.state.uploads) == 2
    assert read_jsonl(tmp_path / "b.jsonl") == out


def test_upload_media_refuses_existing_output_without_w(gemini: FakeServer, tmp_path: Path):
    exp = media_experiment(tmp_path)
    (tmp_path / "exp_uploaded.jsonl").write_text("mine\n")
    result = runner.invoke(app, ["upload-media", "upload", "-f", str(exp), "-m", str(tmp_path / "media")])
    assert result.exit_code == 1 and "--overwrite-output" in result.output
    assert (tmp_path / "exp_uploaded.jsonl").read_text() == "mine\n" and not gemini.state.uploads
    assert runner.invoke(app, ["upload-media", "upload", "-f", str(exp), "-m", str(tmp_path / "media"), "-w"]).exit_code == 0


def test_upload_media_refuses_a_path_outside_the_media_folder(gemini: FakeServer, tmp_path: Path):
    (tmp_path / "secret.mp4").write_bytes(b"secret")
    exp = media_experiment(tmp_path, video="../secret.mp4")
    result = runner.invoke(app, ["upload-media", "upload", "-f", str(exp), "-m", str(tmp_path / "media")])
    assert result.exit_code == 1
    assert f"{exp}:1: multimedia:" in result.output and "outside the media folder" in result.output
    assert not gemini.state.uploads and not (tmp_path / "exp_uploaded.jsonl").exists()


def test_upload_media_waits_for_processing_then_list_and_delete(gemini: FakeServer, tmp_path: Path):
    gemini.state.processing_polls = 1
    exp = media_experiment(tmp_path)
    assert runner.invoke(app, ["upload-media", "upload", "-f", str(exp), "-m", str(tmp_path / "media")]).exit_code == 0
    assert all(f["state"] == "ACTIVE" for f in gemini.state.files.values())
    listed = runner.invoke(app, ["upload-media", "list"])
    assert listed.exit_code == 0 and "2 file(s)" in listed.output and "talk é.mp4" in listed.output
    assert runner.invoke(app, ["upload-media", "delete"]).exit_code == 1 and len(gemini.state.files) == 2
    deleted = runner.invoke(app, ["upload-media", "delete", "--confirm-delete-all"])
    assert deleted.exit_code == 0 and "deleted 2 file(s)" in deleted.output and not gemini.state.files


def test_upload_media_without_a_key_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    result = runner.invoke(app, ["upload-media", "list", "-e", str(tmp_path / "none.env")])
    assert result.exit_code == 1 and "GEMINI_API_KEY is not set" in result.output


def test_upload_media_with_the_server_down_or_no_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GEMINI_API_KEY", "AIza-fake-key-for-tests-0123456789")
    with FakeServer() as gone:
        url = gone.url
    monkeypatch.setenv("GEMINI_BASE_URL", url)  # nothing listens there any more
    exp = media_experiment(tmp_path)
    result = runner.invoke(app, ["upload-media", "upload", "-f", str(exp), "-m", str(tmp_path / "media")])
    assert result.exit_code == 1 and "Gemini File API:" in result.output and "Traceback" not in result.output
    assert "AIza-fake-key" not in result.output and not (tmp_path / "exp_uploaded.jsonl").exists()
    missing_file = runner.invoke(app, ["upload-media", "upload", "-f", str(tmp_path / "nope.jsonl"), "-m", str(tmp_path)])
    assert missing_file.exit_code == 1 and "file not found" in missing_file.output
