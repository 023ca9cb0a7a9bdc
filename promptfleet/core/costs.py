"""Tokens and money: estimates before sending, spend while running, and the budget stop.

Prices come from genai-prices (pydantic's price database of each provider's list, batch,
long-context and reasoning prices, released as vendors change them). Its data ships inside
that package: nothing is fetched at run time, and the manifest names the version that priced
a run. A model is looked up once; `--prices FILE` adds or overrides models. A model with no
price is reported as unknown, never as free.

`output_tokens` counts every billed output token, reasoning included (OpenAI and Anthropic
report them so; Gemini's thoughts are added to its answer's count), so reasoning is priced as
the output it is billed as.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from promptfleet.core.messages import parse_conversation

OUTPUT_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict", "max_new_tokens")
DEFAULT_OUTPUT_TOKENS = 1024  # worst case assumed when a prompt does not cap its answer
CHARS_PER_TOKEN = 4
BATCH_DISCOUNT = 0.5  # OpenAI, Azure global batch, Anthropic and Gemini all bill batches at half price
DATABASE = "genai-prices"
# Where genai-prices keeps each cloud api's models. Self-hosted apis (ollama, huggingface-tgi,
# quart) have no list price: a model of the same name at some host is not what they cost.
PROVIDER_OF_API = {"openai": "openai", "azure-openai": "azure", "anthropic": "anthropic", "gemini": "google", "vertexai": "google"}
FREE = ("test-",)  # the offline `test` provider's models, as the examples name them (when the api is not known)


@dataclass(frozen=True, slots=True)
class Rate:
    """USD per million tokens. Long-context pricing: a request whose input passes a tier's
    start pays that tier's rate on all its tokens (Anthropic's and Gemini's rule)."""

    base: float
    tiers: tuple[tuple[int, float], ...] = ()

    def usd(self, tokens: int, input_tokens: int) -> float:
        if not self.tiers:  # most models: priced four times an answer
            return tokens * self.base / 1e6
        rate = next((r for start, r in reversed(self.tiers) if input_tokens > start), self.base)
        return tokens * rate / 1e6

    def scaled(self, factor: float) -> Rate:
        return Rate(self.base * factor, tuple((start, r * factor) for start, r in self.tiers))


@dataclass(frozen=True, slots=True)
class Price:
    input: Rate
    output: Rate
    batch_input: Rate
    batch_output: Rate
    source: str  # "genai-prices 0.2.5: openai/gpt-4o-mini", or the --prices file

    @classmethod
    def of_entry(cls, entry: dict[str, float], source: str) -> Price:
        """A `--prices` entry: `input`, `output`, optionally `batch_input`/`batch_output` (else half)."""
        ins, outs = Rate(float(entry["input"])), Rate(float(entry["output"]))
        batch_in = Rate(float(entry["batch_input"])) if "batch_input" in entry else ins.scaled(BATCH_DISCOUNT)
        batch_out = Rate(float(entry["batch_output"])) if "batch_output" in entry else outs.scaled(BATCH_DISCOUNT)
        return cls(ins, outs, batch_in, batch_out, source)

    def as_dict(self) -> dict[str, Any]:
        """For the manifest: the base rates, the long-context tiers, and where they came from."""
        out: dict[str, Any] = {}
        for name in ("input", "output", "batch_input", "batch_output"):
            rate: Rate = getattr(self, name)
            out[name] = rate.base
            if rate.tiers:
                out[f"{name}_above_input_tokens"] = {str(start): r for start, r in rate.tiers}
        return {**out, "source": self.source}


def database_version() -> str:
    return f"{DATABASE} {metadata.version(DATABASE)}"


def _rate(value: Any) -> Rate | None:
    """A genai-prices price (a Decimal, or tiered prices) as a Rate."""
    if value is None:
        return None
    tiers = getattr(value, "tiers", None)
    if tiers is None:
        return Rate(float(value))
    return Rate(float(value.base), tuple((tier.start, float(tier.price)) for tier in tiers))


def _from_database(model: str, provider: str | None) -> Price | None:
    from genai_prices import Usage, calc_price  # ~0.2 s of import, only once a price is needed

    try:
        found = calc_price(Usage(), model_ref=model, provider_id=provider)
        batch = calc_price(Usage(), model_ref=model, provider_id=provider, price_context={"processing": "batch"})
    except LookupError:
        return None
    standard = (_rate(found.model_price.input_mtok), _rate(found.model_price.output_mtok))
    if standard[0] is None or standard[1] is None:
        return None  # priced per image, second or request: not by tokens
    batched = (_rate(batch.model_price.input_mtok), _rate(batch.model_price.output_mtok))
    if batched == standard or None in batched:  # the database has no batch rate for it: the APIs' half price
        batched = (standard[0].scaled(BATCH_DISCOUNT), standard[1].scaled(BATCH_DISCOUNT))
    return Price(*standard, *batched, f"{database_version()}: {found.provider.id}/{found.model.id}")  # type: ignore[arg-type]


@dataclass
class PriceTable:
    """Prices by model, from the database and the `--prices` file, each looked up once."""

    override: Path | None = None
    _entries: dict[str, dict[str, float]] = field(default_factory=dict, init=False)
    _found: dict[tuple[str, str | None], Price | None] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.override:
            entries = json.loads(Path(self.override).read_text())
            self._entries = {k: v for k, v in entries.items() if not k.startswith("_")}

    def price(self, model: str, api: str | None = None) -> Price | None:
        key = (model, api)
        if key not in self._found:
            self._found[key] = self._lookup(model, api)
        return self._found[key]

    def _lookup(self, model: str, api: str | None) -> Price | None:
        matches = [name for name in self._entries if model == name or model.startswith(name)]
        if matches:
            return Price.of_entry(self._entries[max(matches, key=len)], str(self.override))
        if api == "test" or model.startswith(FREE):
            return Price.of_entry({"input": 0.0, "output": 0.0}, "free: the offline test provider")
        if api is not None and api not in PROVIDER_OF_API:
            return None
        providers = [PROVIDER_OF_API[api]] if api is not None else sorted(set(PROVIDER_OF_API.values()))
        return next((p for provider in providers if (p := _from_database(model, provider))), None)

    def describe(self) -> dict[str, Any]:
        """Which price data priced a run, for the manifest."""
        return {"database": database_version(), "overrides": str(self.override) if self.override else None}


def load_prices(override: Path | None = None) -> PriceTable:
    return PriceTable(override)


def price_of(model: str, prices: PriceTable, api: str | None = None) -> Price | None:
    return prices.price(model, api)


def cost_of(price: Price, input_tokens: int, output_tokens: int, batch: bool = False) -> float:
    """USD for one request's tokens (long-context tiers by its input), at batch rates for a batch request."""
    ins, outs = (price.batch_input, price.batch_output) if batch else (price.input, price.output)
    return ins.usd(input_tokens, input_tokens) + outs.usd(output_tokens, input_tokens)


def _turn_texts(record: dict[str, Any]) -> list[str]:
    conv = parse_conversation(record["prompt"])
    return [m.text for m in conv.messages] + list(conv.later_turns or ())


def _thinking_budget(params: dict[str, Any]) -> int:
    """Tokens a reasoning model may think on top of an uncapped answer (Gemini's flat
    `thinking_budget`, Anthropic's `thinking.budget_tokens`); a cap set by the prompt includes them."""
    thinking = params.get("thinking")
    budget = params.get("thinking_budget", thinking.get("budget_tokens") if isinstance(thinking, dict) else None)
    return budget if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0 else 0


def estimate_tokens(record: dict[str, Any]) -> tuple[int, int]:
    """(input, output) tokens a prompt may use at most: its text at ~4 characters a token,
    its output cap (or DEFAULT_OUTPUT_TOKENS) per request; multi-turn resends history."""
    texts = _turn_texts(record)
    params = record.get("parameters") or {}
    cap = next((int(params[k]) for k in OUTPUT_TOKEN_KEYS if isinstance(params.get(k), (int, float))), None)
    cap = cap if cap is not None else DEFAULT_OUTPUT_TOKENS + _thinking_budget(params)
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

    prices: PriceTable
    input_tokens: int = 0
    output_tokens: int = 0  # reasoning included
    reasoning_tokens: int = 0
    cost: float = 0.0
    batch_saved: float = 0.0  # what the batch requests would have cost more online
    unpriced: set[str] = field(default_factory=set)
    by_model: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(
        self, model: str, input_tokens: int | None, output_tokens: int | None, batch: bool = False,
        api: str | None = None, reasoning_tokens: int | None = None,
    ) -> None:  # fmt: skip
        """One answer's usage; `reasoning_tokens` are a part of `output_tokens`, counted apart."""
        ins, outs = input_tokens or 0, output_tokens or 0
        self.input_tokens += ins
        self.output_tokens += outs
        self.reasoning_tokens += reasoning_tokens or 0
        entry = self.by_model.setdefault(model, {"input_tokens": 0, "output_tokens": 0, "reasoning_tokens": 0, "cost": 0.0})
        entry["input_tokens"] += ins
        entry["output_tokens"] += outs
        entry["reasoning_tokens"] += reasoning_tokens or 0
        if (price := price_of(model, self.prices, api)) is None:
            self.unpriced.add(model)
            entry["cost"] = None  # type: ignore[assignment]
            return
        cost = cost_of(price, ins, outs, batch)
        if batch:
            self.batch_saved += cost_of(price, ins, outs) - cost
        self.cost += cost
        if entry["cost"] is not None:
            entry["cost"] += cost

    def cost_of(
        self, model: str, input_tokens: int | None, output_tokens: int | None, batch: bool = False, api: str | None = None
    ) -> float | None:
        """USD of one answer's tokens; None when the model has no price."""
        price = price_of(model, self.prices, api)
        return None if price is None else cost_of(price, input_tokens or 0, output_tokens or 0, batch)

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
