"""Scenario 10 (issue 29): a million prompts on one machine (`test` provider, `-mq` high),
`kill -9` half way, then the same command again: when the rerun sends its first request and
what it prints before, how long the end takes after the last answer, peak memory, whether
the results table is in input order, and whether the summary counts the whole run.

    python -m benchmarks resume                       # with the others, into RESULTS.md
    python -m benchmarks.resume_million 100000        # a smaller run, printed

prompto cannot resume: run again, it starts over. Beside it, the time its command takes to
send its first request on the same file (to the OpenAI fake: its `test` api sleeps a second
a prompt), which is when its rerun would start sending — everything again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

N = int(os.environ.get("PROMPTFLEET_BENCH_RESUME_PROMPTS", "1000000"))


def _rows(n: int):
    return ({"id": i, "api": "test", "model_name": "test-m", "prompt": f"question {i}"} for i in range(n))


def _lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 22), b""))


def _peak_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return int(next((x.split()[1] for x in status.splitlines() if x.startswith("VmHWM")), 0)) / 1024


class _Stderr:
    """The command's stderr lines, each with the seconds since `start` it arrived."""

    def __init__(self, proc: subprocess.Popen, start: float) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(proc, start), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen, start: float) -> None:
        for line in iter(proc.stderr.readline, b""):
            self.lines.append((time.monotonic() - start, line.decode(errors="replace").rstrip()))

    def join(self) -> None:
        self._thread.join(10)


def resume_million(n: int = N) -> list[str]:
    from benchmarks.__main__ import HERE, PROMPTFLEET, WORK, experiment, free_port  # the harness's, imported when run

    name = f"resume-{n}"
    file = experiment(name, _rows(n))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PROMPTFLEET_EPHEMERAL")}
    env.update(PREFECT_HOME=str(WORK / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.setdefault("PREFECT_SERVER_API_PORT", str(free_port()))  # 4200 may be someone else's
    subprocess.run([*PROMPTFLEET, "server", "start"], env=env, capture_output=True, check=True, cwd=HERE.parent)
    data = WORK / "data" / f"{name}-{time.time_ns()}"
    data.mkdir(parents=True)
    cmd = [*PROMPTFLEET, "run", "-f", str(file), "-d", str(data), "-mq", "6000000"]
    out = data / "output" / name
    try:
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE.parent)
        while not list(out.glob("*-completed-*.jsonl")) or _lines(next(out.glob("*-completed-*.jsonl"))) < n // 2:
            assert first.poll() is None, "the first run ended before half way"
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
        completed = next(out.glob("*-completed-*.jsonl"))
        at_kill = completed.stat().st_size
        done_at_kill = _lines(completed)

        start = time.monotonic()
        rerun = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE.parent)
        err = _Stderr(rerun, start)
        first_answer = last_answer = None
        peak = 0.0
        while rerun.poll() is None:
            peak = max(peak, _peak_mb(rerun.pid))
            size = completed.stat().st_size
            if first_answer is None and size > at_kill:
                first_answer = time.monotonic() - start
            if last_answer is None and size > at_kill and _lines(completed) >= n:
                last_answer = time.monotonic() - start
            time.sleep(0.05)
        ended = time.monotonic() - start
        stdout = rerun.stdout.read().decode(errors="replace")
        err.join()
    finally:
        subprocess.run([*PROMPTFLEET, "server", "stop"], env=env, capture_output=True, cwd=HERE.parent)

    import polars as pl

    table = pl.read_parquet(next(out.glob("*-results-*.parquet")), columns=["input_line", "input_tokens", "output_tokens"])
    in_order = table.height == n and bool((table["input_line"].diff().drop_nulls() > 0).all())
    table_tokens = int(table["input_tokens"].sum() + table["output_tokens"].sum())
    said = re.search(r"(\d+) tokens", stdout)
    summary_tokens = int(said.group(1)) if said else None
    keys = [json.loads(line)["input_key"] for line in completed.read_text().splitlines()]
    twice = len(keys) - len(set(keys))
    printed = [(t, line) for t, line in err.lines if line.strip()]
    before_first = [line for t, line in printed if first_answer is None or t <= first_answer]
    prompto_first = _prompto_first_request(file)

    def seconds(value: float | None) -> str:
        return "not seen" if value is None else f"{value:.1f} s"

    first_line = f", the first after {printed[0][0]:.1f} s" if printed else ""
    prompto = f"first request after {seconds(prompto_first)}, then all {n:,} again" if prompto_first is not None else "did not start"
    tokens = f"{summary_tokens:,} vs {table_tokens:,}" if summary_tokens is not None else f"not in the output vs {table_tokens:,}"
    return [
        f"## 10. Resume at {n:,} prompts: `kill -9` half way, then the same command (issue 29)", "",
        f"`promptfleet run -f FILE -d DATA -mq 6000000` with the `test` provider on the background server, killed with -9 once "
        f"{n // 2:,} answers were journaled ({done_at_kill:,} were), then run again. Seconds from the rerun's start.", "",
        "| measure | promptfleet | prompto | bar |", "|---|---|---|---|",
        f"| first new answer journaled | {seconds(first_answer)} | {prompto} | ≤ 5 s |",
        f"| lines printed before it | {len(before_first)}{first_line} | – | progress while it reads |",
        f"| last answer → command ended (table, manifest, summary) | {seconds(None if last_answer is None else ended - last_answer)} | – | ≤ 10 s |",
        f"| peak RSS of the rerun | {peak:.0f} MB | – | flat |",
        f"| table in input order, one row a prompt | {'yes' if in_order else 'NO'} | – | yes |",
        f"| summary tokens vs the table's (the whole run) | {tokens} | – | equal |",
        f"| prompts answered twice | {twice} | – | 0 |", "",
        "What the rerun printed before its first new answer:", "", "```", *before_first[:12], "```", "",
    ]  # fmt: skip


def _prompto_first_request(file: Path) -> float | None:
    """Seconds until prompto's command sends its first request on this file (as OpenAI prompts)."""
    from benchmarks.__main__ import HERE, WORK, env_for, experiment, fake, prompto_python, stats

    rows = (dict(json.loads(line), api="openai", model_name="gpt-3.5-turbo") for line in file.open())
    openai_file = experiment(f"{file.stem}-openai", rows)
    data = WORK / "data" / f"prompto-{file.stem}-{time.time_ns()}"
    data.mkdir(parents=True)
    with fake({"latency": {"default": 0.0}}) as url:
        cmd = [prompto_python(), str(HERE / "runner.py"), "prompto", str(openai_file), str(data), "6000000", "1", "0", "{}"]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env={**os.environ, **env_for({"openai": url})}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=HERE.parent)  # fmt: skip
        try:
            while stats(url)["requests"] == 0:
                if proc.poll() is not None:
                    return None
                time.sleep(0.05)
            return time.monotonic() - start
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    print("\n".join(resume_million(int(sys.argv[1]) if len(sys.argv) > 1 else N)))
