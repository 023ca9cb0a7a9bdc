"""API keys from Prefect Secret blocks, for workers that have no .env file.

A block named after a variable, lower-cased with dashes (OPENAI_API_KEY -> `openai-api-key`),
fills that variable when the environment does not set it. Values go into this process's
environment only, never into parameters, logs or artifacts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, MutableMapping

from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client

from promptfleet.core.slug import slug
from promptfleet.providers import known_apis, provider_class


def block_name(env_var: str) -> str:
    return slug(env_var, distinct=False)


def _provider_env_names() -> set[str]:
    """Every variable a provider reads (imports every provider's SDK: only when needed)."""
    names: set[str] = set()
    for api in known_apis():
        cls = provider_class(api)
        names.update(cls.required_env + cls.optional_env)
    return names


async def _secret_block_names() -> set[str]:
    async with get_client() as client:
        documents = await client.read_block_documents_by_type("secret", include_secrets=False)
    return {doc.name for doc in documents if doc.name}


async def secret_blocks_for(names: Iterable[str]) -> set[str]:
    """The variables among `names` that a Secret block would set (values are not read)."""
    blocks = await _secret_block_names()
    return {name for name in names if block_name(name) in blocks}


async def env_from_secret_blocks(names: Iterable[str] | None = None, environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Fill unset variables among `names` (default: every provider's) from Secret blocks;
    returns the names filled. One API call when there is nothing to fill."""
    blocks = await _secret_block_names()
    candidates = {name.upper().replace("-", "_") for name in blocks}
    candidates = {name for name in candidates if not environ.get(name)}
    if not candidates:
        return []
    wanted = candidates & (set(names) if names is not None else _provider_env_names())
    for name in wanted:
        environ[name] = str((await Secret.aload(block_name(name))).get())
    return sorted(wanted)
