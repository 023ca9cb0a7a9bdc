"""Settings of a run: prompto's flags with prompto's defaults, plus ours."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from promptfleet.queues import Limits, load_limits


class Settings(BaseModel):
    """prompto's pipeline settings, with prompto's defaults, plus ours."""

    data_folder: Path = Path("data")
    max_queries: int | None = None  # None: prompto's 10/min, or the provider's own default
    max_attempts: int = 5
    parallel: bool = False
    max_queries_json: Path | None = None
    max_in_flight: int = 512
    timeout: float = 120.0
    output_as_csv: bool = False
    max_cost: float | None = None
    max_tokens_total: int | None = None
    prices: Path | None = None
    rate_share: float = 1.0  # this process's share of every rate, when several processes share a key
    scorers: list[str] = []

    @property
    def input_folder(self) -> Path:
        return self.data_folder / "input"

    @property
    def output_folder(self) -> Path:
        return self.data_folder / "output"

    @property
    def media_folder(self) -> Path:
        return self.data_folder / "media"

    def limits(self) -> Limits | None:
        return load_limits(self.max_queries_json) if self.max_queries_json else None
