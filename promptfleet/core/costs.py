"""Tokens and money: estimates before sending, spend while running, and the budget stop.

Prices come from a shipped table (promptfleet/data/prices.json) that the user can extend
or override; a model with no price is reported as unknown, never as free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from promptfleet.core.messages import parse_conversation

OUTPUT_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict", "max_new_tokens")
DEFAULT_OUTPUT_TOKENS = 1024  # worst case assumed when a prompt does not cap its answer
CHARS_PER_TOKEN = 4


def load_prices(override: Path | None = None) -> dict[str, dict[str, float]]:
    prices = json.loads(files("promptfleet").joinpath("data/prices.json").read_text())
    if override:
        prices.update(json.loads(Path(override).read_text()))
    return {k: v for k, v in prices.items() if not k.startswith("_")}


def price_of(model: str, prices: dict[str, dict[str, float]]) -> dict[str, float] | None:
    if model in prices:
        return prices[model]
    matches = [name for name in prices if model.startswith(name)]
    return prices[max(matches, key=len)] if matches else None


BATCH_DISCOUNT = 0.5  # OpenAI, Azure global batch, Anthropic and Gemini all bill batches at half price


def cost_of(price: dict[str, float], input_tokens: int, output_tokens: int, batch: bool = False) -> float:
    """USD for these tokens; batch requests at the entry's `batch_input`/`batch_output`, else at BATCH_DISCOUNT."""
    if batch:
        per_in = price.get("batch_input", price["input"] * BATCH_DISCOUNT)
        per_out = price.get("batch_output", price["output"] * BATCH_DISCOUNT)
        return (input_tokens * per_in + output_tokens * per_out) / 1e6
    return (input_tokens * price["input"] + output_tokens * price["output"]) / 1e6


def _turn_texts(record: dict[str, Any]) -> list[str]:
    conv = parse_conversation(record["prompt"])
    return [m.text for m in conv.messages] + list(conv.later_turns or ())


def estimate_tokens(record: dict[str, Any]) -> tuple[int, int]:
    """(input, output) tokens a prompt may use at most: its text at ~4 characters a token,
    its output cap (or DEFAULT_OUTPUT_TOKENS) per request; multi-turn resends history."""
    texts = _turn_texts(record)
    params = record.get("parameters") or {}
    cap = next((int(params[k]) for k in OUTPUT_TOKEN_KEYS if isinstance(params.get(k), (int, float))), DEFAULT_OUTPUT_TOKENS)
    multi_turn = isinstance(record["prompt"], list) and all(isinstance(p, str) for p in record["prompt"])
    if not multi_turn:
        return sum(len(t) for t in texts) // CHARS_PER_TOKEN + 1, cap
    inputs, history = 0, 0
    for text in texts:  # each turn resends the conversation so far
        history += len(text) // CHARS_PER_TOKEN + 1
        inputs += history
        history += cap
    return inputs, cap * len(texts)


@dataclass
class Spend:
    """Tokens and estimated cost of a run so far, per model."""

    prices: dict[str, dict[str, float]]
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    batch_saved: float = 0.0  # what the batch requests would have cost more online
    unpriced: set[str] = field(default_factory=set)
    by_model: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, model: str, input_tokens: int | None, output_tokens: int | None, batch: bool = False) -> None:
        ins, outs = input_tokens or 0, output_tokens or 0
        self.input_tokens += ins
        self.output_tokens += outs
        entry = self.by_model.setdefault(model, {"input_tokens": 0, "output_tokens": 0, "cost": 0.0})
        entry["input_tokens"] += ins
        entry["output_tokens"] += outs
        if (price := price_of(model, self.prices)) is None:
            self.unpriced.add(model)
            entry["cost"] = None  # type: ignore[assignment]
            return
        cost = cost_of(price, ins, outs, batch)
        if batch:
            self.batch_saved += cost_of(price, ins, outs) - cost
        self.cost += cost
        if entry["cost"] is not None:
            entry["cost"] += cost

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class Budget:
    max_cost: float | None = None
    max_tokens: int | None = None

    def exceeded_by(self, spend: Spend) -> str | None:
        if self.max_cost is not None and spend.cost >= self.max_cost:
            return f"estimated cost ${spend.cost:.4f} reached --max-cost ${self.max_cost:g}"
        if self.max_tokens is not None and spend.tokens >= self.max_tokens:
            return f"{spend.tokens} tokens reached --max-tokens-total {self.max_tokens}"
        return None
