"""Settings of a run: prompto's flags with prompto's defaults, plus ours."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from promptfleet.core.costs import PriceTable, load_prices
from promptfleet.core.queues import Limits, load_limits


class Settings(BaseModel):
    """prompto's pipeline settings, with prompto's defaults, plus ours."""

    data_folder: Path = Path("data")
    max_queries: int | None = None  # None: prompto's 10/min, or the provider's own default
    max_attempts: int = 5
    parallel: bool = False
    max_queries_json: Path | None = None
    max_in_flight: int = 512
    timeout: float = 120.0
    grace: float | None = None  # seconds in-flight answers get to land after a stop; None: the timeout
    output_as_csv: bool = False
    max_cost: float | None = None
    max_tokens_total: int | None = None
    prices: Path | None = None
    rate_share: float = 1.0  # fraction of every rate to use; with a server, of the key's shared rate
    scorers: list[str] = []
    settle_seconds: float = 10.0  # the pipeline claims a file only after this long unwritten
    lease_seconds: float = 60.0  # a claim not renewed for this long is put back by any host (docs/guarantees.md)
    # Batch mode (docs/batch.md): batchable prompts go through the providers' batch APIs.
    batch: bool = False
    batch_detach: bool = False  # submit and collect what has ended, then return; never wait
    batch_poll: float = 60.0  # ceiling of the polling interval, seconds
    batch_fallback: Literal["batch", "online"] = "batch"  # where a retryable failed line goes next
    batch_max_requests: int | None = None  # lower the providers' per-batch limits
    batch_max_bytes: int | None = None

    @property
    def stop_grace(self) -> float:
        return self.timeout if self.grace is None else self.grace

    @property
    def input_folder(self) -> Path:
        return self.data_folder / "input"

    @property
    def output_folder(self) -> Path:
        return self.data_folder / "output"

    @property
    def media_folder(self) -> Path:
        return self.data_folder / "media"

    @cached_property
    def rate_limits(self) -> Limits | None:
        """The -mqj file, read and checked once."""
        return load_limits(self.max_queries_json) if self.max_queries_json else None

    @cached_property
    def price_table(self) -> PriceTable:
        return load_prices(self.prices)

    def limits(self) -> Limits | None:
        return self.rate_limits
