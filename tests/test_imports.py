"""Start-up cost: `check` reads provider classes, so it must not pay for the SDKs (anthropic
alone is ~2 s of imports); they load when a client is made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SDKS = ("openai", "anthropic", "google.genai", "aiohttp")
ROWS = [
    {"api": "openai", "model_name": "gpt-4o", "parameters": {"temperature": 0.2}},
    {"api": "anthropic", "model_name": "claude-sonnet-4-5", "parameters": {"max_tokens": 50, "temperature": 0.2}},
    {"api": "gemini", "model_name": "gemini-2.5-flash"},
    {"api": "vertexai", "model_name": "gemini-2.5-flash"},
]
ENV = {"OPENAI_API_KEY": "sk-a", "ANTHROPIC_API_KEY": "sk-b", "GEMINI_API_KEY": "g", "VERTEXAI_PROJECT_ID": "p", "VERTEXAI_LOCATION_ID": "l"}


def test_check_imports_no_provider_sdk(tmp_path: Path):
    path = tmp_path / "exp.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": "hi", **row}) + "\n" for i, row in enumerate(ROWS)))
    script = (
        "import sys; from promptfleet.cli import main\n"
        "sys.argv = ['promptfleet', 'check', '-f', sys.argv[1], '-d', sys.argv[2]]\n"
        "try:\n    main()\nexcept SystemExit as done:\n"
        f"    print('exit', done.code, *sorted(m for m in {SDKS!r} if m in sys.modules))"
    )
    env = {**os.environ, **ENV}
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "data")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert "4 valid prompt(s)" in done.stdout, done.stdout + done.stderr
    assert done.stdout.split("\n")[-2].split() == ["exit", "0"], done.stdout + done.stderr
