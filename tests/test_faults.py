"""A journal the disk refuses stops the run; torn records never glue to the next one and
never block a resume. Disk full is tested with an injected ENOSPC and, as root, on a
real tmpfs that fills up mid-run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptfleet import Experiment, Settings
from promptfleet.cli import app
from promptfleet.core import run as runs
from promptfleet.core.rundir import Journal, RunPaths, read_journal
from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

runner = CliRunner()


def rows(n: int) -> list[dict]:
    return [{"id": i, "api": "openai", "model_name": "gpt-fake", "prompt": f"q{i}"} for i in range(n)]


class FullDisk(Journal):
    """A journal on a disk that fills after `room` records: the next write is torn
    half-way, then every write fails with ENOSPC, as a real full disk does."""

    room = 10
    written = 0

    @staticmethod
    def _append(fd: int, data: bytes) -> None:
        if FullDisk.written >= FullDisk.room:
            if FullDisk.written == FullDisk.room:
                FullDisk.written += 1
                os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        FullDisk.written += 1
        Journal._append(fd, data)


def corrupt_file(path: Path) -> Path:
    return path.with_name(path.name + ".corrupt")


def finished_keys(paths: RunPaths) -> set[str]:
    """What a resume would skip; reading the journal sets its torn lines aside."""
    return set(read_journal(paths).keys)


def test_a_record_after_a_torn_write_starts_on_its_own_line(tmp_path: Path):
    paths = RunPaths(tmp_path, "s", "exp")
    paths.completed.write_text(json.dumps({"input_line": 1}) + "\n" + '{"input_line": 2, "resp')
    journal = Journal(paths)
    journal.write("completed", {"input_line": 3})
    journal.close()
    lines = paths.completed.read_text().splitlines()
    assert lines == ['{"input_line": 1}', '{"input_line": 2, "resp', '{"input_line": 3}']


def test_a_record_after_a_write_this_journal_tore_starts_on_its_own_line(tmp_path: Path):
    class OnceFull(Journal):  # the disk refuses the second write half-way, then has room again
        calls = 0

        def _append(self, fd: int, data: bytes) -> None:
            OnceFull.calls += 1
            if OnceFull.calls == 2:
                os.write(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            Journal._append(fd, data)

    paths = RunPaths(tmp_path, "s", "exp")
    refused: list[OSError] = []
    journal = OnceFull(paths, on_error=refused.append)
    assert journal.write("completed", {"input_line": 1}) and not journal.write("completed", {"input_line": 2, "response": "r"})
    assert journal.write("completed", {"input_line": 3}) and journal.write("completed", {"input_line": 4})
    journal.close()
    assert len(refused) == 1
    assert paths.completed.read_text().splitlines() == ['{"input_line": 1}', '{"input_line": 2,', '{"input_line": 3}', '{"input_line": 4}']


def test_a_bad_line_anywhere_is_set_aside_and_its_prompt_counts_as_unanswered(tmp_path: Path):
    paths = RunPaths(tmp_path, "s", "exp")
    good = [json.dumps({"input_line": n, "input_key": f"k{n}", "response": "r"}) for n in (1, 2, 4)]
    torn = '{"input_line": 3, "resp'
    paths.completed.write_bytes(("\n".join([good[0], torn, good[1], "", good[2]]) + "\n").encode() + b'{"input_line": 5, "x": "\xc3')
    paths.failed.write_text('[1, 2]\n{"input_line": 6, "input_key": "k6", "error": {}}\n')
    assert finished_keys(paths) == {"k1", "k2", "k4", "k6"}
    assert paths.completed.read_text().splitlines() == good  # the journal is whole again
    aside = corrupt_file(paths.completed).read_bytes().splitlines()
    assert aside[0] == torn.encode() and aside[1].startswith(b'{"input_line": 5')
    assert corrupt_file(paths.failed).read_text() == "[1, 2]\n"
    assert finished_keys(paths) == {"k1", "k2", "k4", "k6"}  # idempotent: nothing more set aside
    assert len(corrupt_file(paths.completed).read_bytes().splitlines()) == 2


def test_a_whole_last_record_without_its_newline_counts(tmp_path: Path):
    paths = RunPaths(tmp_path, "s", "exp")
    paths.completed.write_text(json.dumps({"input_line": 1, "input_key": "k1"}) + "\n" + json.dumps({"input_line": 2, "input_key": "k2"}))
    assert finished_keys(paths) == {"k1", "k2"}
    assert not corrupt_file(paths.completed).exists()
    assert paths.completed.read_text().endswith("}\n")  # so counting lines counts it too


def test_a_refused_write_is_reported_to_the_run_and_not_counted_as_written(tmp_path: Path):
    FullDisk.written, FullDisk.room = 0, 1
    errors: list[OSError] = []
    journal = FullDisk(RunPaths(tmp_path, "s", "exp"), on_error=errors.append)
    assert journal.write("completed", {"input_line": 1})
    assert not journal.write("completed", {"input_line": 2})
    journal.close()
    assert [e.errno for e in errors] == [errno.ENOSPC]


async def test_enospc_stops_sending_at_once_and_the_resume_answers_the_rest(tmp_path: Path, openai_env: FakeServer, monkeypatch):
    n = 60
    openai_env.state.latency = 0.05
    path = write_jsonl(tmp_path / "exp.jsonl", rows(n))
    settings = Settings(data_folder=tmp_path / "data", max_queries=6000, max_in_flight=4)
    FullDisk.written, FullDisk.room = 0, 10
    monkeypatch.setattr(runs, "Journal", FullDisk)

    first = await Experiment(path, settings).process()
    sent_first = sum(openai_env.state.calls.values())
    assert first.journal_error and "No space left on device" in first.journal_error
    assert not first.complete and first.unsaved >= 1
    # Stopped at once: beyond the 10 saved and the failing one, only what was in flight then.
    assert sent_first <= 10 + 1 + settings.max_in_flight
    completed = Path(first.outputs["completed"])
    assert not list(completed.parent.glob("*.parquet"))  # no tables from a disk that refuses writes
    assert not json.loads(next(completed.parent.glob("*-run-exp.json")).read_text())["finished"]

    monkeypatch.setattr(runs, "Journal", Journal)  # space is back
    second = await Experiment(path, settings).process()
    assert second.resumed and second.complete and second.answered == n

    lines = Counter(r["input_line"] for r in read_jsonl(completed))
    assert sorted(lines) == list(range(1, n + 1)) and max(lines.values()) == 1
    twice = [p for p, c in openai_env.state.calls.items() if c > 1]
    assert len(twice) == first.unsaved  # only answers that landed but could not be saved
    assert corrupt_file(completed).exists()  # the torn record was set aside


def test_cli_says_in_one_line_what_happened_and_how_to_resume(tmp_path: Path, openai_env: FakeServer, prefect_api: str, monkeypatch):
    path = write_jsonl(tmp_path / "exp.jsonl", rows(30))
    FullDisk.written, FullDisk.room = 0, 5
    monkeypatch.setattr(runs, "Journal", FullDisk)
    result = runner.invoke(app, ["run", "-f", str(path), "-d", str(tmp_path / "data"), "--create-data-folder", "-mq", "600", "--max-in-flight", "2"])
    assert result.exit_code == 74, result.output
    [line] = [x for x in result.output.splitlines() if "Stopped sending" in x]
    assert line.startswith("cannot write the journal in ") and "No space left on device" in line
    assert "Free space, then resume with: promptfleet" in line  # the rest is sys.argv, which pytest sets
    assert "Traceback" not in result.output


def _mount_tmpfs(where: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def _fill(path: Path) -> None:
    """Take every free byte of the filesystem holding `path`."""
    with path.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC


@pytest.mark.slow
def test_real_full_disk_mid_run_then_space_freed_resumes_cleanly(tmp_path: Path, prefect_api: str):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "512k")
    try:
        n = 120
        with FakeServer() as server:
            server.state.latency = 0.05
            path = write_jsonl(tmp_path / "exp.jsonl", rows(n))
            env = {**os.environ, "OPENAI_API_KEY": "sk-disk-test-000000", "OPENAI_BASE_URL": server.base_url, "PREFECT_API_URL": prefect_api}
            cmd = [sys.executable, "-m", "promptfleet.cli", "run", "-f", str(path), "-d", str(disk / "data"), "--create-data-folder", "-mq", "1200", "--max-in-flight", "4"]
            proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and sum(server.state.calls.values()) < 20 and proc.poll() is None:
                time.sleep(0.02)
            _fill(disk / "filler")
            out, err = proc.communicate(timeout=120)
            sent_first = sum(server.state.calls.values())
            assert proc.returncode == 74, err.decode()[-3000:]
            [line] = [x for x in err.decode().splitlines() if "Stopped sending" in x]
            assert "No space left on device" in line and f"resume with: promptfleet run -f {path}" in line
            assert "Traceback" not in err.decode()
            assert sent_first < n  # it did stop sending
            unsaved = int(line.split("Stopped sending: ")[1].split(" answer(s)")[0])

            (disk / "filler").unlink()
            finished = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, timeout=180)
            assert finished.returncode == 0, finished.stderr.decode()[-3000:]

        [completed] = (disk / "data" / "output" / "exp").glob("*-completed-exp.jsonl")
        lines = Counter(r["input_line"] for r in read_jsonl(completed))
        assert sorted(lines) == list(range(1, n + 1)) and max(lines.values()) == 1
        twice = [p for p, c in server.state.calls.items() if c > 1]
        assert len(twice) <= unsaved  # nothing answered twice but what landed and could not be saved
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
        shutil.rmtree(disk, ignore_errors=True)
