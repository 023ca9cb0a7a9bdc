"""Hostile and careless input (#26): a schema that reaches outside is refused and nothing is
fetched or read; names that would escape output/ are refused; the Prefect server gets no
secrets; each careless input is one line naming file, line or path, and a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from promptfleet.cli import app
from promptfleet.core.media import MediaError, MediaFolder
from promptfleet.core.messages import LocalMedia
from promptfleet.core.schemas import SchemaMismatch, parse_reply, schema_problem
from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer

runner = CliRunner()
PROMPTFLEET = [shutil.which("promptfleet", path=str(Path(sys.executable).parent)) or "promptfleet"]
CANARY = "canary-7f3a9c-do-not-leak"


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


class _Counting(BaseHTTPRequestHandler):
    hits: list[str]

    def do_GET(self) -> None:  # noqa: N802
        self.hits.append(self.path)
        body = json.dumps({"type": "string", "description": CANARY}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def evil() -> Iterator[tuple[str, list[str]]]:
    """A local server that would hand out a schema, counting every request it gets."""
    hits: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Counting,), {"hits": hits}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def hostile_schemas(base: str, canary_file: Path) -> list[dict]:
    string = {"type": "string"}
    return [
        {"$ref": f"{base}/evil.json"},
        {"type": "object", "properties": {"a": {"$ref": "https://127.0.0.1:1/evil.json#/x"}}},
        {"type": "object", "properties": {"a": {"$ref": canary_file.as_uri()}}},
        {"$ref": "evil.json"},  # relative: resolved against the base URI, then fetched
        {"$id": f"{base}/root.json", "type": "object", "properties": {"a": {"$ref": "other.json"}}},
        {"$dynamicRef": f"{base}/dynamic.json"},
        {"$schema": f"{base}/meta.json", **string},
        {"type": "array", "items": {"$ref": "#/$defs/missing"}},
    ]


def test_a_schema_reaching_outside_is_refused_by_check_and_run_and_nothing_is_fetched_or_read(
    tmp_path: Path, evil: tuple[str, list[str]], openai_env: FakeServer
):
    base, hits = evil
    canary_file = tmp_path / "secret.json"
    canary_file.write_text(json.dumps({"type": "string", "description": CANARY}))
    schemas = hostile_schemas(base, canary_file)
    rows = [{"id": i, "api": "openai", "model_name": "m", "prompt": f"q{i}", "response_schema": s} for i, s in enumerate(schemas)]
    path = write_jsonl(tmp_path / "exp.jsonl", rows)
    data = tmp_path / "data"
    data.mkdir()

    checked = runner.invoke(app, ["check", "-f", str(path), "-d", str(data)])
    ran = runner.invoke(app, ["run", "-f", str(path), "-d", str(data)])
    for result in (checked, ran):
        assert result.exit_code == 1
        refusals = [line for line in result.output.splitlines() if ": response_schema: " in line]
        assert [line.split(": response_schema: ")[0] for line in refusals] == [f"{path}:{n}" for n in range(1, len(schemas) + 1)]
        assert "Traceback" not in result.output and CANARY not in result.output
    assert "points outside the schema" in checked.output and "points to nothing inside the schema" in checked.output
    assert hits == [] and sum(openai_env.state.calls.values()) == 0  # nothing fetched, nothing sent
    assert not (data / "output").exists()  # nothing written either


def test_the_validator_itself_never_fetches_or_reads(tmp_path: Path, evil: tuple[str, list[str]]):
    """Even a schema that skipped `check` (the Python API) cannot make validation reach out."""
    base, hits = evil
    canary_file = tmp_path / "secret.json"
    canary_file.write_text(json.dumps({"type": "string", "description": CANARY}))
    for schema in hostile_schemas(base, canary_file)[:6]:
        with pytest.raises(SchemaMismatch) as refused:
            parse_reply('"text"', schema)
        assert CANARY not in str(refused.value)
    assert hits == []
    # a remote $id only names the schema: local references still resolve inside it, unfetched
    named = {"$id": f"{base}/root.json", "$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a"}
    assert schema_problem(named) is None and parse_reply('"x"', named) == "x" and hits == []


def test_ref_loops_depth_and_size_are_refused_with_a_reason():
    assert "loops back on itself" in schema_problem({"$ref": "#"})
    assert "loops back on itself" in schema_problem({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})
    deep: dict = {"type": "string"}
    for _ in range(3000):
        deep = {"type": "array", "items": deep}
    assert "nests more than 100 levels deep" in schema_problem(deep)
    assert "more than 10000 parts" in schema_problem({"enum": list(range(20_000))})
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}  # recursion through data is fine
    assert schema_problem(tree) is None and parse_reply('{"kids": [{"kids": []}]}', tree) == {"kids": [{"kids": []}]}
    with pytest.raises(SchemaMismatch, match="nested too deeply"):
        parse_reply("[" * 5000 + "]" * 5000, {"type": "array"})


def test_a_local_defs_reference_works_end_to_end(tmp_path: Path, prefect_api: str, openai_env: FakeServer):
    schema = {
        "$defs": {"city": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
        "type": "object", "properties": {"capital": {"$ref": "#/$defs/city"}}, "required": ["capital"],
    }  # fmt: skip
    path = write_jsonl(tmp_path / "exp.jsonl", [{"id": 1, "api": "openai", "model_name": "m", "prompt": "capital of France?", "response_schema": schema}])
    result = runner.invoke(app, ["run", "-f", str(path), "-d", str(tmp_path / "data"), "--create-data-folder"])
    assert result.exit_code == 0, result.output
    [sent] = openai_env.state.requests
    assert sent["response_format"]["json_schema"]["schema"] == schema  # the provider got the schema as written
    [done] = read_jsonl(next((tmp_path / "data/output/exp").glob("*-completed-exp.jsonl")))
    assert done["response_parsed"] == json.loads(done["response"]) and isinstance(done["response_parsed"]["capital"]["name"], str)


def _nested(depth: int) -> str:
    """JSON text nested `depth` levels (json.dumps itself gives up near 1,000)."""
    return '{"not": ' * depth + '{"type": "string"}' + "}" * depth


@pytest.mark.parametrize("depth", [150, 3000])
@pytest.mark.parametrize("field", ["prompt", "parameters", "response_schema"])
def test_deep_nesting_is_one_line_naming_file_line_and_field(tmp_path: Path, field: str, depth: int):
    value = f"[{_nested(depth)}]" if field == "prompt" else _nested(depth)
    row = '{"api": "test", "model_name": "m", ' + ('"prompt": "hi", ' if field != "prompt" else "") + f'"{field}": {value}}}'
    path = tmp_path / "exp.jsonl"
    path.write_text(json.dumps({"api": "test", "model_name": "m", "prompt": "fine"}) + "\n" + row + "\n")
    result = runner.invoke(app, ["check", "-f", str(path), "-d", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{path}:2: {field}: nested more than 100 levels deep; flatten it" in result.output.splitlines()
    assert "RecursionError" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("column", ["parameters-tools", "response_schema"])
def test_deep_nesting_in_a_csv_json_cell_is_one_line(tmp_path: Path, column: str):
    path = tmp_path / "exp.csv"
    cell = _nested(3000).replace('"', '""')
    path.write_text(f'prompt,api,model_name,{column}\nhi,test,m,"{cell}"\n')
    result = runner.invoke(app, ["check", "-f", str(path), "-d", str(tmp_path)])
    assert result.exit_code == 1 and f"{path}:2: {column}: nested more than 100 levels deep; flatten it" in result.output.splitlines()


def test_a_csv_experiment_carries_response_schema_as_a_json_cell(tmp_path: Path):
    from promptfleet import Experiment, Settings
    import asyncio

    schema = json.dumps({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}).replace('"', '""')
    good = tmp_path / "good.csv"
    good.write_text(f'id,prompt,api,model_name,parameters-temperature,response_schema\n1,hi,test,m,0.5,"{schema}"\n')
    assert runner.invoke(app, ["check", "-f", str(good), "-d", str(tmp_path / "data")]).exit_code == 0
    summary = asyncio.run(Experiment(good, Settings(data_folder=tmp_path / "data", max_queries=60_000)).process())
    [done] = read_jsonl(summary.paths.completed)
    assert set(done["response_parsed"]) == {"answer"} and done["parameters"] == {"temperature": 0.5}

    bad = tmp_path / "bad.csv"
    bad.write_text('id,prompt,api,model_name,response_schema\n1,hi,test,m,{type: object}\n')
    result = runner.invoke(app, ["check", "-f", str(bad), "-d", str(tmp_path / "data")])
    assert result.exit_code == 1
    assert f"{bad}:2: response_schema: the cell must hold JSON: Expecting property name enclosed in double quotes at column 2" in result.output


def test_invalid_json_messages_read_once(tmp_path: Path):
    path = tmp_path / "exp.jsonl"
    path.write_text('{"api": "test", "model_name": "m", "prompt": "a\tb"}\n{"api": "test", "model_name": "m", "prompt": "x", "parameters": {"max_tokens": Infinity}}\n')
    result = runner.invoke(app, ["check", "-f", str(path), "-d", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{path}:1: invalid JSON: Invalid control character at column 48" in result.output  # not "at at column"
    assert f"{path}:2: invalid JSON: Infinity is not a JSON value; write it as a string or null" in result.output
    assert "at at" not in result.output and "OverflowError" not in result.output


@pytest.mark.parametrize("name", ["...jsonl", "..jsonl", "....csv"])
def test_a_name_that_cannot_be_an_output_folder_is_refused_and_nothing_is_written(tmp_path: Path, name: str):
    data = tmp_path / "data"
    (data / "output").mkdir(parents=True)
    path = tmp_path / name
    path.write_text("prompt,api,model_name\nhi,test,m\n" if name.endswith(".csv") else json.dumps({"api": "test", "model_name": "m", "prompt": "hi"}) + "\n")
    stem = path.stem
    for command in ("check", "run"):
        result = runner.invoke(app, [command, "-f", str(path), "-d", str(data)])
        assert result.exit_code == 1
        assert one_line(result.output) == f"cannot run: {path}: the name {stem!r} cannot name an output folder; rename the file (e.g. to experiment.jsonl)"
    assert sorted(p.name for p in data.rglob("*")) == ["output"]


def test_ordinary_names_and_pattern_characters_keep_their_folder_and_control_characters_are_refused(tmp_path: Path):
    from promptfleet import Experiment, Settings
    import asyncio

    data = tmp_path / "data"
    names = ["données ü 2.jsonl", "-résumé (v2), final.jsonl", "ab.jsonl", "a[b].jsonl", "a?.jsonl", "a*.jsonl"]
    for n, name in enumerate(names):  # "a*", "a?" and "a[b]" read as patterns would match "ab" and each other
        rows = [{"api": "test", "model_name": "m", "prompt": f"{name} {i}"} for i in range(n + 1)]
        summary = asyncio.run(Experiment(write_jsonl(tmp_path / name, rows), Settings(data_folder=data, max_queries=60_000)).process())
        assert summary.paths.out_dir == data / "output" / Path(name).stem and summary.complete
        table = pl.read_parquet(summary.paths.parquet, glob=False)
        assert table.height == n + 1 and all(p.startswith(name) for p in table["prompt"])
    for name in ("new\nline.jsonl", "tab\there.jsonl"):
        path = write_jsonl(tmp_path / name, [{"api": "test", "model_name": "m", "prompt": "hi"}])
        result = runner.invoke(app, ["check", "-f", str(path), "-d", str(data)])
        shown = str(path).replace("\n", "\\x0a").replace("\t", "\\x09")  # one line, even for a name with a newline
        assert result.exit_code == 1 and one_line(result.output).startswith(f"cannot run: {shown}: the file name holds ")
    assert sorted(p.name for p in (data / "output").iterdir()) == sorted(Path(name).stem for name in names)


def test_a_fifo_in_media_is_not_a_regular_file_and_never_blocks(tmp_path: Path):
    media = tmp_path / "data" / "media"
    media.mkdir(parents=True)
    os.mkfifo(media / "pipe.png")
    (media / "folder.png").mkdir()
    rows = [{"api": "test", "model_name": "m", "prompt": [{"role": "user", "content": [{"type": "image", "media": name}]}]}
            for name in ("pipe.png", "folder.png", "nowhere.png")]  # fmt: skip
    path = write_jsonl(tmp_path / "exp.jsonl", rows)
    result = runner.invoke(app, ["check", "-f", str(path), "-d", str(tmp_path / "data")])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert f"{path}:1: multimedia: media file 'pipe.png' in {media} is a FIFO (named pipe), not a regular file; put the file itself there" in lines
    assert f"{path}:2: multimedia: media file 'folder.png' in {media} is a folder, not a regular file; put the file itself there" in lines
    assert f"{path}:3: multimedia: media file 'nowhere.png' not found in {media}" in lines

    # a file swapped for a FIFO between the check and the read is refused, not waited on
    (media / "late.png").write_bytes(b"\x89PNG")
    folder = MediaFolder(media)
    folder.resolve("late.png")
    (media / "late.png").unlink()
    os.mkfifo(media / "late.png")
    with pytest.raises(MediaError, match="not a regular file"):
        folder.read(LocalMedia("image", "late.png"))


def test_env_file_and_experiment_file_that_are_folders_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = write_jsonl(tmp_path / "exp.jsonl", [{"api": "test", "model_name": "m", "prompt": "hi"}])
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").mkdir()  # a virtualenv named .env: the default env file is skipped, as before
    assert runner.invoke(app, ["check", "-f", str(path), "-d", str(tmp_path / "data")]).exit_code == 0
    for command in ("check", "run"):
        result = runner.invoke(app, [command, "-f", str(path), "-d", str(tmp_path / "data"), "-e", str(tmp_path / "data")])
        assert result.exit_code == 1
        assert one_line(result.output) == f"{tmp_path / 'data'}: -e/--env-file names a folder; give the .env file in it (e.g. -e {tmp_path / 'data' / '.env'})"
    (tmp_path / "folder.jsonl").mkdir()
    result = runner.invoke(app, ["check", "-f", str(tmp_path / "folder.jsonl"), "-d", str(tmp_path / "data")])
    assert result.exit_code == 1 and one_line(result.output) == f"cannot run: {tmp_path / 'folder.jsonl'}: is a folder; -f names an experiment file"


def _in_private_mount(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `script` (sh) in a mount namespace of its own, where it may mount what it likes."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user and mount namespaces here")
    return subprocess.run(["unshare", "-rm", "sh", "-ec", script, "sh", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_read_only_or_full_data_folder_fails_check_and_run_in_one_line(tmp_path: Path):
    path = write_jsonl(tmp_path / "exp.jsonl", [{"api": "test", "model_name": "m", "prompt": "hi"}])
    (tmp_path / "ro" / "data").mkdir(parents=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "nearly").mkdir()
    cli = " ".join(PROMPTFLEET)
    script = """
        mount --bind ro ro && mount -o remount,bind,ro ro
        for disk in full nearly; do
          mount -t tmpfs -o size=256k tmpfs $disk && mkdir $disk/data && (dd if=/dev/zero of=$disk/filler bs=4k 2>/dev/null || true)
        done
        truncate -s -8k nearly/filler
        for data in ro/data full/data nearly/data; do
          for command in check run; do
            $0 $command -f "$1" -d $data >/dev/null 2>err.txt && echo "$command $data rc=0" || echo "$command $data rc=$?"
            cat err.txt; rm -f err.txt
          done
        done
    """.replace("$0", cli)
    done = _in_private_mount(script, str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    read_only = "ro/data: cannot write there (Read-only file system); make it writable, or choose another data folder with -d"
    full = "full/data: its disk is full (No space left on device); free space, or choose another data folder with -d"
    nearly = (
        "nearly/data: 8.0 KiB free on its disk, this run needs at least 64.0 KiB (a copy of the input and the answers); "
        "free space, or choose another data folder with -d"
    )
    expected = []
    for data, problem in (("ro/data", read_only), ("full/data", full), ("nearly/data", nearly)):
        expected += [f"check {data} rc=1", problem, f"run {data} rc=74", f"cannot run: {problem}"]
    assert done.stdout.splitlines() == expected


@pytest.mark.parametrize("debug", [False, True])
def test_a_disk_refusing_writes_inside_the_flow_is_our_line_without_prefects_traceback(tmp_path: Path, prefect_api: str, debug: bool):
    path = write_jsonl(tmp_path / "exp.jsonl", [{"api": "test", "model_name": "m", "prompt": "hi"}])
    script = (
        "import errno, sys\nimport promptfleet.core.run as run\n"
        "def full(*args, **kwargs):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "run.write_state = full  # the disk fills between the check and the run's first write\n"
        "from promptfleet.cli import main\nsys.argv = ['promptfleet', *sys.argv[1:]]\nmain()\n"
    )
    args = ["run", "-f", str(path), "-d", str(tmp_path / "data"), "--create-data-folder", *(["--debug"] if debug else [])]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO"}
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 74, done.stderr
    ours = "cannot write: [Errno 28] No space left on device; nothing was sent. Free space, then run the same command again."
    assert ours in done.stderr.splitlines()
    if debug:
        assert "Traceback" in done.stderr and "Encountered exception during execution" in done.stderr
    else:
        assert "Traceback" not in done.stderr and "Errno 28" not in done.stderr.replace(ours, "")
        assert "Beginning flow run" in done.stderr  # Prefect's other lines still show


def test_a_malformed_batch_line_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog):
    from tests import fakes
    from tests.fake_batches import FakeBatchServer
    from tests.test_batch import run_once, settings

    text, ok, err = fakes.PROTOCOLS["openai"]
    monkeypatch.setitem(fakes.PROTOCOLS, "openai", (text, lambda body, answer, n: {"choices": "not a list", "id": 7}, err))
    with FakeBatchServer() as fake:
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        fake.state.polls_to_finish = 1
        path = write_jsonl(tmp_path / "exp.jsonl", [{"id": 0, "api": "openai", "model_name": "gpt-4o-mini", "prompt": "q0"}])
        with caplog.at_level("WARNING"):
            run_once(path, settings(tmp_path / "data", max_attempts=1))
    [failed] = read_jsonl(next((tmp_path / "data/output/exp").glob("*-failed-exp.jsonl")))
    assert "\n" not in failed["error"]["message"] and "validation error" in failed["error"]["message"]
    [logged] = [r.getMessage() for r in caplog.records if "failed in batch" in r.getMessage()]
    assert "\n" not in logged and "errors.pydantic.dev" not in logged


def _temporary_server_of(pid: int, deadline: float) -> bytes:
    """The environment of the Prefect server a command started (a child of `pid`)."""
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in children:
                try:
                    if b"server\0start" in Path(f"/proc/{child}/cmdline").read_bytes():
                        return Path(f"/proc/{child}/environ").read_bytes()
                except OSError:
                    continue
        time.sleep(0.05)
    raise AssertionError("no Prefect server was started")


@pytest.mark.slow
def test_the_temporary_server_gets_no_secrets_and_the_command_ends_cleanly(tmp_path: Path):
    """Canaries in the shell and in the .env file never reach the server; the command ends
    without "Error logging to API", its logs delivered before the server stopped."""
    path = write_jsonl(tmp_path / "exp.jsonl", [{"id": i, "api": "test", "model_name": "m", "prompt": f"q{i}"} for i in range(5)])
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY=sk-{CANARY}-env\nANTHROPIC_API_KEY={CANARY}-anthropic\n")
    canaries = {
        "MY_SERVICE_TOKEN": f"{CANARY}-token", "APP_SECRET": f"{CANARY}-secret", "DB_PASSWORD": f"{CANARY}-password",
        "GEMINI_API_KEY": f"{CANARY}-gemini", "DATABASE_URL": f"postgresql://user:{CANARY}@db.example/app",
        "HTTPS_PROXY": f"http://user:{CANARY}@127.0.0.1:9", "PREFECT_API_KEY": f"{CANARY}-prefect",
        "PREFECT_API_AUTH_STRING": f"admin:{CANARY}", "SOME_UNRELATED_SETTING": f"{CANARY}-plain",
    }  # fmt: skip
    env = {**os.environ, **canaries, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    started = time.monotonic()
    proc = subprocess.Popen([*PROMPTFLEET, "run", "-f", str(path), "-d", "data", "--create-data-folder", "--ephemeral"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        server_env = _temporary_server_of(proc.pid, started + 180)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    names = dict(item.split(b"=", 1) for item in server_env.split(b"\0") if b"=" in item)
    assert CANARY.encode() not in server_env, sorted(k for k, v in names.items() if CANARY.encode() in v)
    assert names[b"PREFECT_HOME"] == str(tmp_path / "prefect").encode() and b"PATH" in names
    assert proc.returncode == 0, err
    assert "Error logging to API" not in err and "All connection attempts failed" not in err
    assert "complete" in out and CANARY not in out + err
    assert time.monotonic() - started < 150  # it used to sit for minutes delivering logs to a stopped server
