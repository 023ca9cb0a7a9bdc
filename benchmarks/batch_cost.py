"""Scenario 9: what batch mode saves on a 10,000-prompt mixed experiment, priced from the
shipped price table, run through the batch APIs of the local fake (tests/fake_batches.py);
then 9b, what its faults cost (benchmarks/batch_faults.py).

    python -m benchmarks.batch_cost        # prints the RESULTS.md sections
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from promptfleet.api import run_all
from promptfleet.core.config import Settings
from promptfleet.core.plan import inspect
from promptfleet.core.run import open_run
from promptfleet.core.session import Session
from benchmarks.batch_faults import batch_faults
from tests.fake_batches import FakeBatchServer

N = 10_000
MODELS = [("openai", "gpt-4o-mini"), ("azure-openai", "gpt-4o"), ("anthropic", "claude-3-5-haiku"), ("gemini", "gemini-2.0-flash")]
WORDS = 100  # the fake answers with usage: input = words in the prompt, output = words + 2
MAX_TOKENS = 256


def _rows() -> list[dict]:
    rows = []
    for i in range(N):
        api, model = MODELS[i % len(MODELS)]
        cap = "max_output_tokens" if api == "gemini" else "max_tokens"
        prompt = f"p{i} " + " ".join(["word"] * (WORDS - 1))
        rows.append({"id": i, "api": api, "model_name": model, "prompt": prompt, "parameters": {cap: MAX_TOKENS}})
    return rows


def batch_cost() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp, FakeBatchServer() as fake:
        os.environ.update(fake.env())
        fake.state.polls_to_finish = 1
        path = Path(tmp) / "mixed10k.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
        settings = Settings(data_folder=Path(tmp) / "data", batch=True, batch_poll=0.05)
        found = inspect(path, settings)

        async def go() -> dict:
            run = open_run(path, settings, session=Session(), plan=found)
            try:
                return (await run_all(run)).to_dict()
            finally:
                await run.aclose()

        start = time.monotonic()
        summary = asyncio.run(go())
        wall = time.monotonic() - start
        once = all(c == 1 for c in fake.state.submissions.values()) and len(fake.state.submissions) == N
        batches = sum(fake.state.creates.values())
    cost = summary["cost"]
    paid, saved = cost["estimated_usd"], cost["batch_saved_usd"]
    lines = [
        "## 9. Batch mode: 10,000 prompts across OpenAI, Azure OpenAI, Anthropic and Gemini",
        "",
        f"{N:,} single-turn prompts of {WORDS} words, max {MAX_TOKENS} output tokens, 2,500 each to gpt-4o-mini, gpt-4o "
        "(Azure deployment), claude-3-5-haiku and gemini-2.0-flash, priced from the genai-prices database (each "
        "provider's batch price, or 50% of the list price where it has none). The worst case is `promptfleet check --batch` (every answer at its cap); the actual cost is what the run "
        f"spent on the usage the fake reported ({WORDS} tokens in, {WORDS + 2} out per prompt), and what the same tokens cost online.",
        "",
        "| cost (USD) | online | batch | saved |",
        "|---|---|---|---|",
        f"| worst case (check --batch) | {found.worst_case_cost:.2f} | {found.worst_case_cost_batch:.2f} | "
        f"{found.worst_case_cost - found.worst_case_cost_batch:.2f} ({1 - found.worst_case_cost_batch / found.worst_case_cost:.0%}) |",
        f"| actual (run summary) | {paid + saved:.2f} | {paid:.2f} | {saved:.2f} ({saved / (paid + saved):.0%}) |",
        "",
        f"Run: {summary['answered']:,} answered, {summary['failed']} failed, {batches} batches (one per api/model), "
        f"every prompt submitted exactly once: {'yes' if once else 'NO'}; {wall:.1f} s against the fake, which finishes a "
        "batch on its second poll (real batches take minutes to 24 h).",
        "",
    ]
    return lines + batch_faults()


if __name__ == "__main__":
    print("\n".join(batch_cost()))
