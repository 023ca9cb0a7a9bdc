"""Provider registry: built-ins by `api` name, plus third-party ones from the
`promptfleet.providers` entry point group (name = api value, object = provider class).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from functools import cache
from importlib.metadata import entry_points

from promptfleet.providers.base import (
    Provider,
    ProviderError,
    ProviderOptions,
    resolve_env,
)

BUILTIN = {
    "test": "promptfleet.providers.test:TestProvider",
    "openai": "promptfleet.providers.openai:OpenAIProvider",
    "azure-openai": "promptfleet.providers.openai:AzureOpenAIProvider",
    "huggingface-tgi": "promptfleet.providers.openai:HuggingFaceTGIProvider",
    "anthropic": "promptfleet.providers.anthropic:AnthropicProvider",
    "gemini": "promptfleet.providers.gemini:GeminiProvider",
    "vertexai": "promptfleet.providers.gemini:VertexAIProvider",
    "ollama": "promptfleet.providers.ollama:OllamaProvider",
    "quart": "promptfleet.providers.quart:QuartProvider",
}


@cache
def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group="promptfleet.providers")}


def known_apis() -> set[str]:
    return set(BUILTIN) | set(_entry_points())


def provider_class(api: str) -> type[Provider]:
    if api in BUILTIN:
        module, _, name = BUILTIN[api].partition(":")
        return getattr(importlib.import_module(module), name)
    if api in _entry_points():
        return _entry_points()[api].load()  # type: ignore[attr-defined]
    raise KeyError(f"unknown api {api!r}")


_KEY_SHAPES = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{6,}|AIza[0-9A-Za-z_\-]{20,}|hf_[A-Za-z0-9]{20,})")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove credentials from text meant for people (errors, logs)."""
    for secret in secrets:
        if len(secret) >= 6:
            text = text.replace(secret, "***")
    return _KEY_SHAPES.sub("***", text)


class Clients:
    """One provider instance per (api, credentials) for a whole run: connections are reused."""

    def __init__(self, options: ProviderOptions, environ: Mapping[str, str] = os.environ):
        self._options = options
        self._environ = environ
        self._by_key: dict[tuple, Provider] = {}
        self._secrets: set[str] = set()

    def get(self, api: str, model: str) -> Provider:
        cls = provider_class(api)
        env = resolve_env(cls.required_env + cls.optional_env, model, self._environ)
        key = (api, tuple(sorted(env.items())))
        if key not in self._by_key:
            missing = [name for name in cls.required_env if name not in env]
            if missing:
                raise ProviderError(f"missing environment variable(s) {', '.join(missing)} for {api}/{model}", kind="auth")
            self._secrets.update(v for k, v in env.items() if "KEY" in k or "TOKEN" in k)
            self._by_key[key] = cls(env, self._options)
        return self._by_key[key]

    def redact(self, text: str) -> str:
        return redact(text, tuple(self._secrets))

    async def aclose(self) -> None:
        for provider in self._by_key.values():
            await provider.aclose()
        self._by_key.clear()
