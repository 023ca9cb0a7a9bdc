"""`promptfleet worker`: Prefect's process worker, stopped gracefully by one SIGTERM.

`prefect worker start` (Prefect 3.9) turns a SIGTERM into a SIGINT to itself; asyncio
cancels its tasks, and the task awaiting each flow run's process closes it with SIGKILL:
answers in flight are lost and the run stays Running (Prefect issue 22528). So this
command runs that worker as its child and, on SIGTERM or Ctrl-C, first freezes it
(SIGSTOP: it neither takes new runs nor kills the ones it has), sends each of its flow runs
a SIGTERM — promptfleet's flows then stop sending and journal what is in flight, as on
Ctrl-C — waits for them for up to `--grace` seconds, and only then lets the worker go.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Annotated

import typer

from promptfleet.cli.root import app
from promptfleet.core import processes


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    grace: Annotated[float, typer.Option("--grace", min=0, help="Seconds the flow runs get to stop on SIGTERM (Prefect's is 30).")] = 30.0,
) -> None:
    """`prefect worker start ARGS...` that stops on one SIGTERM (or Ctrl-C) after its flow
    runs stopped gracefully; e.g. `promptfleet worker --pool promptfleet`."""
    child = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", *ctx.args], start_new_session=True,
                             preexec_fn=processes.parent_death_signal())  # a kill -9 of this command stops the worker too  # fmt: skip
    asked: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        asked.append(signum)
        if len(asked) > 1:  # a second signal: no more waiting
            _kill_all(child.pid, signal.SIGKILL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    while child.poll() is None and not asked:
        time.sleep(0.2)
    if asked and child.poll() is None:
        _drain(child, grace)
    raise typer.Exit(0 if asked else child.returncode)


def _drain(child: subprocess.Popen, grace: float) -> None:
    print(f"stopping the worker: its flow runs get up to {grace:g}s to stop", file=sys.stderr, flush=True)
    os.kill(child.pid, signal.SIGSTOP)
    runs = processes.children(child.pid)
    _kill_all(child.pid, signal.SIGTERM, runs)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(processes.exists(pid) for pid in runs):
        time.sleep(0.2)
    _kill_all(child.pid, signal.SIGKILL, [pid for pid in runs if processes.exists(pid)])
    os.kill(child.pid, signal.SIGCONT)
    child.send_signal(signal.SIGTERM)  # nothing left to kill: it stops
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _kill_all(worker: int, sig: int, runs: list[int] | None = None) -> None:
    """Signal each flow run's process group (Prefect gives each one of its own)."""
    for pid in processes.children(worker) if runs is None else runs:
        try:
            group = os.getpgid(pid)
            os.kill(pid, sig) if group == worker else os.killpg(group, sig)
        except OSError:
            pass
    if sig == signal.SIGKILL and runs is None:
        try:
            os.killpg(worker, sig)
        except OSError:
            pass
