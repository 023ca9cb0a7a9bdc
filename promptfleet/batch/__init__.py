"""Batch mode: the providers' batch APIs at batch prices (docs/batch.md)."""

from __future__ import annotations

from typing import Any

BATCH_APIS = ("openai", "azure-openai", "anthropic", "gemini")
BATCH_QUEUE = "(batch)"  # the plan's name for the batchable prompts; no group or api looks like it


def batchable(record: dict[str, Any]) -> bool:
    """A single-request prompt of a batch API. A multi-turn prompt (a list of strings) needs
    each answer before its next turn (up to 24 h per round in a batch): it goes online; so
    does a structured one, whose replies are validated and asked again online."""
    prompt = record["prompt"]
    multi_turn = isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt)
    return record["api"] in BATCH_APIS and not multi_turn and "response_schema" not in record
