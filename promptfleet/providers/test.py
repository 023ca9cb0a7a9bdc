"""The built-in `test` provider: offline, deterministic replies, optional latency and failures.

It lets the example, the tests and the benchmarks run with no keys and no network.
Parameters it reads (all optional):
  latency        seconds to wait before answering
  fail_status    HTTP status to fail with (429, 500, 400, ...)
  fail_attempts  fail only the first N attempts of a prompt, then answer (default: always)
  retry_after    seconds sent as Retry-After with a failure
  raise_error    "true"/"yes" fails every attempt with a 400 (prompto's test api option)
  reply_with     "score": answer "Score: N" with N from 1 to 10, derived from the prompt
                 (a judge stand-in); any other string is answered as it is
  thoughts       answer as a reasoning model: N thoughts, their tokens counted as reasoning
A record's `response_schema` is answered with JSON of that shape (unless `reply_with`
says otherwise, which is how a schema failure is rehearsed).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from promptfleet.core.messages import Message
from promptfleet.core.schemas import example_instance
from promptfleet.providers.base import (
    ProviderOptions,
    Reply,
    error_for_status,
    seed_sent,
)


class TestProvider:
    api: ClassVar[str] = "test"
    required_env: ClassVar[tuple[str, ...]] = ()
    optional_env: ClassVar[tuple[str, ...]] = ()
    default_rate_per_minute: ClassVar[int] = 600  # nothing to protect; keeps the example quick
    media_kinds: ClassVar[frozenset[str]] = frozenset({"image", "audio", "video", "file"})
    media_urls: ClassVar[bool] = True
    structured_output: ClassVar[bool] = True

    @classmethod
    def parameter_problems(cls, model: str, parameters: Mapping[str, Any]) -> list[str]:
        thoughts = parameters.get("thoughts", 0)
        ok = isinstance(thoughts, int) and not isinstance(thoughts, bool) and thoughts >= 0
        return [] if ok else [f"thoughts must be a whole number of thoughts, got {thoughts!r}"]

    def __init__(self, env: Mapping[str, str], options: ProviderOptions) -> None:
        self._attempts: Counter[str] = Counter()

    async def chat(
        self, model: str, messages: Sequence[Message], parameters: dict[str, Any], response_schema: dict[str, Any] | None = None
    ) -> Reply:
        if latency := float(parameters.get("latency", 0)):
            await asyncio.sleep(latency)
        if str(parameters.get("raise_error", "")).lower() in ("true", "yes"):
            raise error_for_status(400, "test provider: raise_error was set")
        if status := int(parameters.get("fail_status", 0)):
            key = hashlib.sha1(repr((model, messages)).encode()).hexdigest()
            self._attempts[key] += 1
            if self._attempts[key] <= int(parameters.get("fail_attempts", 1 << 30)):
                retry_after = parameters.get("retry_after")
                headers = {"retry-after": str(retry_after)} if retry_after is not None else None
                raise error_for_status(status, f"test provider: injected {status}", headers)
        question = messages[-1].text
        digest = hashlib.sha1(f"{model}\n{question}".encode()).hexdigest()[:8]
        words = len(question.split())
        answer = f"test reply {digest} from {model} to: {question[:200]}"
        if response_schema is not None:  # JSON of the asked shape, unless reply_with says otherwise
            answer = json.dumps(example_instance(response_schema, f"{model}\n{question}"))
        if (reply := parameters.get("reply_with")) is not None:
            answer = f"Score: {int(digest, 16) % 10 + 1}" if reply == "score" else str(reply)
        thoughts = tuple(f"thought {n + 1} of {model} on: {question[:100]}" for n in range(int(parameters.get("thoughts", 0))))
        reasoning = sum(len(t.split()) for t in thoughts)
        return Reply(
            answer, input_tokens=sum(len(m.text.split()) for m in messages), output_tokens=words + 5 + reasoning,
            finish_reason="stop",
            model_version=model, request_id=f"test-{digest}", seed=seed_sent(parameters),
            thoughts=thoughts, reasoning_tokens=reasoning if thoughts else None,
        )  # fmt: skip

    async def aclose(self) -> None:
        return None
