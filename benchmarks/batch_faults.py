"""Scenario 9b (issue 30): batch mode pays once, and only for the run's own prompts. The
issue's faults, played by the local fake of the batch APIs (tests/fake_batches.py) and
counted there: what was created, what was answered (what is paid).

    python -m benchmarks.batch_faults       # prints the RESULTS.md section
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from promptfleet.api import run_all
from promptfleet.core.config import Settings
from promptfleet.core.run import open_run
from promptfleet.core.session import Session
from tests.fake_batches import FakeBatchServer

MODELS = {"openai": "gpt-4o-mini", "azure-openai": "gpt-4o", "anthropic": "claude-3-5-haiku", "gemini": "gemini-2.0-flash"}


def _file(folder: Path, name: str, prefix: str, n: int, apis: tuple[str, ...]) -> Path:
    path = folder / f"{name}.jsonl"
    rows = [{"id": f"{prefix}{i}", "api": apis[i % len(apis)], "model_name": MODELS[apis[i % len(apis)]], "prompt": f"{prefix}{i}"}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(path: Path, data: Path, **extra: Any) -> dict[str, Any]:
    settings = Settings(**{"data_folder": data, "batch": True, "batch_poll": 0.01, "max_attempts": 3, **extra})

    async def go() -> dict[str, Any]:
        run = open_run(path, settings, session=Session())
        try:
            return (await run_all(run)).to_dict()
        finally:
            await run.aclose()

    return asyncio.run(go())


def _own(summary: dict[str, Any]) -> int:
    """Answers that are the prompt's own ("answer to: <prompt>", and each prompt is its id)."""
    completed = Path(summary["outputs"]["completed"]).read_text().splitlines()
    return sum(1 for r in map(json.loads, completed) if r["response"] == f"answer to: {r['id']}")


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def _x_and_y(tmp: Path, fake: FakeBatchServer) -> str:
    y = _run(_file(tmp, "y", "y", 5, ("anthropic",)), tmp / "data", batch_detach=True)
    [y_job] = fake.state.jobs.values()
    y_job.held = True
    fake.state.faults["anthropic:create"] = [502, 502, 502]
    x = _run(_file(tmp, "x", "x", 5, ("anthropic",)), tmp / "data")
    once = all(fake.state.answered[f"x{i}"] == 1 for i in range(5))
    return (f"| X (5 Anthropic prompts, create answers 502 three times) while Y (same key, same size) is pending | X adopted Y's batch: "
            f"5/5 answered with Y's answers, X's prompts never sent | X answered {x['answered']}/5, {_own(x)} with X's own answers; each X prompt paid once: "
            f"{_yes(once)}; Y's batch untouched: {_yes(y_job.state == 'running' and y['live_batches'] == 1)} |")  # fmt: skip


def _gemini_reads(tmp: Path, fake: FakeBatchServer) -> str:
    fake.state.faults["gemini:status"] = [404, 404, 500, 500, 500]
    s = _run(_file(tmp, "g", "g", 6, ("gemini",)), tmp / "data", max_attempts=2)
    once = fake.state.answered == Counter({f"g{i}": 1 for i in range(6)})
    return (f"| Gemini status reads fail 404, 404, 500, 500, 500 (`-ma 2`) | 2 batches created, 0/6 answered, 6 failed | "
            f"{fake.state.creates['gemini']} batch submitted; {s['answered']}/6 answered once reads recover: {_yes(once)} |")


def _openai_download(tmp: Path, fake: FakeBatchServer) -> str:
    fake.state.faults["openai:download"] = [500, 500, 500]
    s = _run(_file(tmp, "o", "o", 6, ("openai",)), tmp / "data", max_attempts=2)
    once = fake.state.answered == Counter({f"o{i}": 1 for i in range(6)})
    return (f"| OpenAI output download answers 500 three times (`-ma 2`) | 2 batches created, each prompt paid twice | "
            f"{fake.state.creates['openai']} batch submitted; {s['answered']}/6 answered, each once: {_yes(once)} |")


def _uploads(tmp: Path, fake: FakeBatchServer) -> str:
    fake.state.faults_after["openai:upload"] = [500] * 1000  # each upload lands, then answers 500
    s = _run(_file(tmp, "u", "u", 3, ("openai",)), tmp / "data")
    tries, left = fake.state.calls["openai:upload"], len(fake.state.live_files)
    return (f"| `POST /v1/files` answers 500 (after storing the file), always | 52 tries in 34 s at `--batch-poll 0.5`, no end; 52 files left | "
            f"{tries} tries, then the run stops with one line; {fake.state.creates['openai']} batch created; files left on the account: "
            f"{left} of {len(fake.state.files)}; stopped: {_yes(bool(s['stopped_by']))} |")  # fmt: skip


def _mixed_60(tmp: Path, fake: FakeBatchServer) -> list[str]:
    path = _file(tmp, "mixed", "m", 60, tuple(MODELS))
    fake.state.script = {"m5": [400], "m22": [400], "m1": [500], "m14": [503], "m31": ["expired"], "m47": [500]}
    s = _run(path, tmp / "data")
    twice = sum(1 for c in fake.state.answered.values() if c > 1)
    retried = sum(1 for c in fake.state.submissions.values() if c > 1)
    fresh = _file(tmp, "resumed", "r", 60, tuple(MODELS))
    fake.state.hold = True
    first = _run(fresh, tmp / "data", batch_detach=True)
    created = sum(fake.state.creates.values())
    _run(fresh, tmp / "data", batch_detach=True)
    again = sum(fake.state.creates.values()) - created
    fake.state.hold = False
    final = _run(fresh, tmp / "data")
    resubmitted = sum(1 for i in range(60) if fake.state.submissions[f"r{i}"] > 1)
    return [
        f"| 60 prompts over the four batch APIs; 2 lines refused (400) by design, 4 retryable line errors | — | {s['answered']}/60 "
        f"answered, {s['failed']} failed; {retried} lines went again in a follow-up batch; paid twice: {twice} |",
        f"| the same 60, `--detach`, resumed twice while pending, then collected | — | {first['live_batches']} batches; resumes "
        f"created {again} more; {final['answered']}/60 answered; prompts resubmitted: {resubmitted} |",
    ]


def batch_faults() -> list[str]:
    rows = []
    for scenario in (_x_and_y, _gemini_reads, _openai_download, _uploads, _mixed_60):
        with tempfile.TemporaryDirectory() as tmp, FakeBatchServer() as fake:
            os.environ.update(fake.env())
            fake.state.polls_to_finish = 1
            found = scenario(Path(tmp), fake)
            rows += found if isinstance(found, list) else [found]
    return [
        "## 9b. Batch mode pays once, and only for the run's own prompts (issue 30)",
        "",
        "Against the local fake of the batch APIs, through the official SDKs; paid = answered at the fake. Before: the same "
        "scenarios and fake against main at 947547a (measured once, by hand).",
        "",
        "| scenario | before | now |",
        "|---|---|---|",
        *rows,
        "",
    ]


if __name__ == "__main__":
    print("\n".join(batch_faults()))
