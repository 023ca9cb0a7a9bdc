"""The warm runner, for real: `promptfleet` commands as subprocesses beside a background
server of their own PREFECT_HOME, handed to the runner and checked to have run there
(a child of the runner's process), with their folder, environment, streams and signals."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from promptfleet import server, warm
from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer
from tests.test_server import PROMPTFLEET, cli, processes_of

pytestmark = pytest.mark.slow


def children_of(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(proc.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A background server and its warm runner, ready to serve."""
    home = tmp_path_factory.mktemp("warm") / "prefect home"
    started = cli(["server", "start"], home, home.parent)
    assert started.returncode == 0, started.stderr[-2000:]
    deadline = time.monotonic() + 120
    while not (home / warm.SOCKET_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert warm.pid_of(home), (home / warm.LOG_FILE).read_text()[-2000:]
    yield home
    runner = warm.pid_of(home)
    server.stop(home)
    try:
        assert runner is None or gone(runner, 10), "the runner outlived `server stop`"
    finally:
        for pid in processes_of(home):
            os.kill(pid, signal.SIGKILL)


def environment(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PROMPTFLEET_EPHEMERAL")}
    return env | {"PREFECT_HOME": str(home), **extra}


def watch_children(proc: subprocess.Popen, runner: int, until: float = 60) -> set[int]:
    """The runner's children seen while `proc` runs: the process running the command."""
    seen: set[int] = set()
    deadline = time.monotonic() + until
    while proc.poll() is None and time.monotonic() < deadline:
        seen.update(children_of(runner))
        time.sleep(0.02)
    return seen


def openai_rows(n: int, tag: str) -> list[dict]:
    return [{"id": f"{tag}{i}", "api": "openai", "model_name": "gpt-4o-mini", "prompt": f"{tag} question {i}"} for i in range(n)]


def test_a_command_runs_in_the_runner_with_its_folder_environment_and_streams(home: Path, tmp_path: Path):
    runner = warm.pid_of(home)
    folder = tmp_path / "données x"
    write_jsonl(folder / "exp one.jsonl", openai_rows(20, "a"))
    (folder / "data").mkdir()
    with FakeServer() as fake:
        fake.state.latency = 0.05
        env = environment(home, OPENAI_API_KEY="sk-from-the-command-0123456789", OPENAI_BASE_URL=fake.base_url)
        proc = subprocess.Popen(PROMPTFLEET + ["run", "-f", "exp one.jsonl", "-mq", "1200"], cwd=folder, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            seen = watch_children(proc, runner)
            out, errors = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 0, errors[-3000:]
    assert seen, "the command did not run in the warm runner"
    assert set(fake.state.auth_headers) == {"Bearer sk-from-the-command-0123456789"}  # the command's environment
    assert sum(fake.state.answered.values()) == 20
    [completed] = (folder / "data" / "output" / "exp one").glob("*completed-exp one.jsonl")  # the command's folder
    assert len(read_jsonl(completed)) == 20
    assert "exp one: 20 prompts, 20 answered, 0 failed" in out  # its stdout, not the runner's log
    assert "sk-from-the-command" not in (home / warm.LOG_FILE).read_text()
    assert b"sk-from-the-command" not in Path(f"/proc/{runner}/environ").read_bytes()

    usage = cli(["run", "-f", "x.jsonl", "--no-such-flag"], home, folder)
    assert usage.returncode == 2 and "Usage: promptfleet run" in usage.stderr  # named as the script, not the runner


def test_two_commands_at_once_run_side_by_side_in_the_runner(home: Path, tmp_path: Path):
    runner = warm.pid_of(home)
    procs = []
    for name in ("left", "right"):
        rows = [{"id": i, "api": "test", "model_name": name, "prompt": f"q{i}", "parameters": {"latency": 0.05}} for i in range(30)]
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
        procs.append(subprocess.Popen(PROMPTFLEET + ["run", "-f", f"{name}.jsonl", "-d", ".", "-mq", "1200"], cwd=tmp_path,
                                      env=environment(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        most = 0
        deadline = time.monotonic() + 60
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            most = max(most, len(children_of(runner)))
            time.sleep(0.02)
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outputs]
    assert most == 2  # both at once, each in a child of its own
    assert "left: 30 prompts, 30 answered" in outputs[0][0] and "right: 30 prompts, 30 answered" in outputs[1][0]


def test_the_command_keeps_its_own_prefect_settings(home: Path, tmp_path: Path):
    write_jsonl(tmp_path / "few.jsonl", [{"id": i, "api": "test", "model_name": "m", "prompt": f"q{i}"} for i in range(3)])
    quiet = cli(["run", "-f", "few.jsonl", "-d", ".", "-mq", "60000"], home, tmp_path)
    loud = cli(["run", "-f", "few.jsonl", "-d", ".", "-mq", "60000"], home, tmp_path, PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="INFO")
    assert quiet.returncode == loud.returncode == 0, quiet.stderr[-2000:] + loud.stderr[-2000:]
    assert "Beginning flow run" not in quiet.stderr  # the suite's WARNING level, from the command's environment
    assert "Beginning flow run 'few'" in loud.stderr


def start_sending(home: Path, tmp_path: Path, fake: FakeServer, name: str, n: int = 40, answered: int = 5, **popen) -> tuple[subprocess.Popen, list[str], dict]:
    """A run of `n` prompts against `fake`, returned once `answered` of them were answered."""
    write_jsonl(tmp_path / f"{name}.jsonl", openai_rows(n, name))
    env = environment(home, OPENAI_API_KEY="sk-test-0123456789abcdef", OPENAI_BASE_URL=fake.base_url)
    args = PROMPTFLEET + ["run", "-f", f"{name}.jsonl", "-d", ".", "-mq", "600"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    deadline = time.monotonic() + 60
    while sum(fake.state.answered.values()) < answered and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc, args, env


def test_ctrl_c_reaches_the_command_and_the_same_command_resumes_sending_each_prompt_once(home: Path, tmp_path: Path):
    runner = warm.pid_of(home)
    with FakeServer() as fake:
        fake.state.latency = 0.2
        proc, args, env = start_sending(home, tmp_path, fake, "stop")
        try:
            assert children_of(runner), "the command did not run in the warm runner"
            proc.send_signal(signal.SIGINT)
            out, errors = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 130, errors[-3000:]
        assert "to resume, run the same command again" in errors
        assert sum(fake.state.answered.values()) < 40
        again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr[-3000:]
    assert len(fake.state.answered) == 40 and max(fake.state.answered.values()) == 1  # each answered, none paid twice


def test_kill_9_of_the_command_ends_its_process_in_the_runner_too(home: Path, tmp_path: Path):
    runner = warm.pid_of(home)
    with FakeServer() as fake:
        fake.state.latency = 0.2
        proc, args, env = start_sending(home, tmp_path, fake, "killed")
        [child] = children_of(runner)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert gone(child, 5), "the command's process in the runner went on after the command was killed"
        sent = len(fake.state.seen)
        time.sleep(0.5)
        assert len(fake.state.seen) == sent  # nothing sent after it died
        again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr[-3000:]
    assert len(fake.state.answered) == 40
    assert sum(1 for n in fake.state.answered.values() if n > 1) <= 3  # only what was in flight at the kill


def state_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def suspended_run(home: Path, tmp_path: Path, fake: FakeServer, name: str) -> tuple[subprocess.Popen, int]:
    """A run whose script got Ctrl-Z (SIGTSTP) once it was sending: both stopped. The script
    gets a process group of its own, as a shell's job does (in an orphaned group the kernel
    discards SIGTSTP)."""
    proc, _, _ = start_sending(home, tmp_path, fake, name, n=100, answered=3, process_group=0)
    [child] = children_of(warm.pid_of(home))
    proc.send_signal(signal.SIGTSTP)
    deadline = time.monotonic() + 5
    while (state_of(proc.pid), state_of(child)) != ("T", "T") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (state_of(proc.pid), state_of(child)) == ("T", "T")
    return proc, child


def test_ctrl_z_suspends_both_processes_and_sigterm_stops_the_run(home: Path, tmp_path: Path):
    with FakeServer() as fake:
        fake.state.latency = 0.1
        proc, child = suspended_run(home, tmp_path, fake, "pause")
        try:
            time.sleep(0.3)
            paused = len(fake.state.seen)
            time.sleep(0.5)
            assert len(fake.state.seen) == paused  # suspended means nothing sent
            proc.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 5
            while len(fake.state.seen) == paused and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(fake.state.seen) > paused  # and sending again after `fg`
            proc.send_signal(signal.SIGTERM)
            out, errors = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 130 and "to resume, run the same command again" in errors, errors[-2000:]


def test_kill_9_of_a_suspended_command_ends_its_stopped_run(home: Path, tmp_path: Path):
    with FakeServer() as fake:
        fake.state.latency = 0.1
        proc, child = suspended_run(home, tmp_path, fake, "stopped")
        proc.kill()
        proc.wait()
        assert gone(child, 5)  # the runner ends it: a stopped process cannot notice by itself


def test_a_terminal_stays_a_terminal(home: Path, tmp_path: Path):
    write_jsonl(tmp_path / "tty.jsonl", [{"id": i, "api": "test", "model_name": "m", "prompt": f"q{i}"} for i in range(3)])
    pid, fd = pty.fork()
    if pid == 0:  # the command, on a pseudo-terminal
        os.chdir(tmp_path)
        os.execve(PROMPTFLEET[0], PROMPTFLEET + ["run", "-f", "tty.jsonl", "-d", ".", "-mq", "60000"], environment(home, COLUMNS="120"))
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output[-2000:]
    assert b"\x1b[" in output  # rich styles what it prints on a terminal, and only there
    piped = cli(["run", "-f", "tty.jsonl", "-d", ".", "-mq", "60000"], home, tmp_path)
    assert piped.returncode == 0 and "\x1b[" not in piped.stdout + piped.stderr


def test_a_command_of_another_interpreter_runs_in_its_own_process(home: Path, tmp_path: Path):
    runner = warm.pid_of(home)
    write_jsonl(tmp_path / "dev.jsonl", [{"id": i, "api": "test", "model_name": "m", "prompt": f"q{i}"} for i in range(3)])
    args = [sys.executable, "-X", "dev", "-m", "promptfleet.launch", "run", "-f", "dev.jsonl", "-d", ".", "-mq", "60000"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=environment(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = watch_children(proc, runner)
    out, errors = proc.communicate(timeout=120)
    assert proc.returncode == 0, errors[-3000:]
    assert not seen and "dev: 3 prompts, 3 answered" in out
    assert warm.pid_of(home) == runner  # a refusal leaves the runner serving


def test_the_runner_leaves_when_its_server_is_gone(home: Path):
    runner = warm.pid_of(home)
    info = server.status(home)
    os.kill(info.pid, signal.SIGKILL)
    assert gone(runner, warm.CHECK_S + 10)
    assert not (home / warm.SOCKET_FILE).exists()


def test_a_socket_answering_garbage_leaves_the_command_to_run_itself(tmp_path: Path):
    """Not our runner at the socket's path (or a broken one): one bad answer, and the command
    runs in its own process, once."""
    import socket
    import threading

    home = tmp_path / "home"
    home.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(home / warm.SOCKET_FILE))
    listener.listen(4)
    answered = []

    def garbage() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"\x00not json\n")
        answered.append(True)
        conn.close()

    threading.Thread(target=garbage, daemon=True).start()
    write_jsonl(tmp_path / "g é.jsonl", [{"id": 0, "api": "test", "model_name": "m", "prompt": "q"}])
    checked = cli(["check", "-f", "g é.jsonl"], home, tmp_path)
    listener.close()
    assert answered == [True]
    assert checked.returncode == 0 and "g é.jsonl: 1 valid prompt(s), 0 bad line(s)" in checked.stdout, checked.stderr[-2000:]


# --- which commands it serves, without processes ----------------------------------------


def test_it_refuses_another_interpreter_a_shadowed_package_and_changed_code(tmp_path: Path):
    runner = warm.Runner(tmp_path)
    runner.loaded = ["prefect"]
    runner.stamp = warm._code_stamp(runner.loaded)
    request = {"interpreter": warm.interpreter(), "cwd": str(tmp_path), "path": sys.path}
    assert runner.compatible(request) is None
    assert "interpreter" in runner.compatible(request | {"interpreter": warm.interpreter() | {"flags": [9]}})
    (tmp_path / "shadow" / "prefect").mkdir(parents=True)
    assert "prefect" in runner.compatible(request | {"path": ["shadow", *sys.path]})  # relative to the command's folder
    runner.stamp = [*runner.stamp, ["a file that changed", 0]]
    assert "changed" in runner.compatible(request) and runner.stopping
