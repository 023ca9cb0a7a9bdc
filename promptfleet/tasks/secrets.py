"""API keys from Prefect Secret blocks, for workers that have no .env file.

A block named after a variable, lower-cased with dashes (OPENAI_API_KEY -> `openai-api-key`),
fills that variable when the environment does not set it. Values go into this process's
environment only, never into parameters, logs or artifacts.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client

from promptfleet.providers import known_apis, provider_class
from promptfleet.slug import slug


def block_name(env_var: str) -> str:
    return slug(env_var, distinct=False)


async def env_from_secret_blocks(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Fill unset provider variables from Secret blocks; returns the names filled."""
    wanted = {}
    for api in known_apis():
        cls = provider_class(api)
        for name in cls.required_env + cls.optional_env:
            if not environ.get(name):
                wanted[block_name(name)] = name
    if not wanted:
        return []
    async with get_client() as client:
        documents = await client.read_block_documents_by_type("secret", include_secrets=False)
    filled = []
    for doc in documents:
        if doc.name in wanted:
            secret = await Secret.aload(doc.name)
            environ[wanted[doc.name]] = str(secret.get())
            filled.append(wanted[doc.name])
    return sorted(filled)
