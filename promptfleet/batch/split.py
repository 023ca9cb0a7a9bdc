"""Chunking requests into batches within a provider's documented limits.

The limits are the providers' own (see each protocol module) and can be lowered per run
(`Settings.batch_max_requests`, `batch_max_bytes`), e.g. for an account with a smaller
enqueued-token quota, or in a test.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    max_requests: int
    max_bytes: int

    def capped(self, max_requests: int | None = None, max_bytes: int | None = None) -> Limits:
        return Limits(
            min(self.max_requests, max_requests or self.max_requests),
            min(self.max_bytes, max_bytes or self.max_bytes),
        )


class Chunker(Generic[T]):
    """Fills one batch at a time. Each batch has its token from the start, since the requests'
    keys carry it; the caller asks `has_room` before `add` and flushes when there is none.
    An item larger than a whole batch is the caller's to refuse (see `fits`)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.items: list[T] = []
        self.size = 0
        self.token = secrets.token_hex(4)

    def fits(self, size: int) -> bool:
        return size <= self.limits.max_bytes

    def has_room(self, size: int) -> bool:
        return not self.items or (len(self.items) < self.limits.max_requests and self.size + size <= self.limits.max_bytes)

    def add(self, item: T, size: int) -> None:
        self.items.append(item)
        self.size += size

    def flush(self) -> tuple[str, list[T]]:
        """The batch so far and its token; the next batch gets a token of its own."""
        token, items = self.token, self.items
        self.items, self.size, self.token = [], 0, secrets.token_hex(4)
        return token, items
