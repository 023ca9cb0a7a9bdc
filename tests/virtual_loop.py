"""An event loop whose clock jumps to its next timer instead of waiting for it (as
aiolimiter's tests patch the loop's clock): seconds of pacing run in milliseconds, and
every time in them is exact."""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        loop = self

        class Selector(selectors.DefaultSelector):
            def select(self, timeout: float | None = None):
                if timeout is None:
                    raise RuntimeError("deadlock: nothing ready, nothing scheduled")
                loop.now += timeout
                return super().select(0)

        super().__init__(Selector())

    def time(self) -> float:
        return self.now

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro`; then, as `asyncio.run` does, cancel what it left running."""
        try:
            return self.run_until_complete(coro)
        finally:
            if left := asyncio.all_tasks(self):
                for task in left:
                    task.cancel()
                self.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            self.close()


def run_virtually(coro: Coroutine[Any, Any, T]) -> T:
    return VirtualLoop().run(coro)
