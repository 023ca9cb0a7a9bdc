"""A lean JSON POST for the hot path of OpenAI-compatible endpoints.

At hundreds of requests a second the official SDK costs more CPU than everything else
together: its request transform and response models, and httpcore's pool, which looks at
every pooled connection (a socket poll each) for every request. aiohttp's pool hands out an
idle connection in constant time and orjson parses a reply in microseconds. The SDK still
configures the client (key, base URL, organization and project, its headers); only the
transport is ours, and every failure still goes through `errors.classify`.
"""

from __future__ import annotations

import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:  # imported when the first poster is made: `check` only reads provider classes
    import aiohttp


class JsonPoster:
    """POSTs JSON bodies to one URL over one pooled aiohttp session, opened on first use
    (aiohttp sessions belong to the running event loop)."""

    def __init__(self, url: str, headers: Mapping[str, str], timeout: float) -> None:
        import aiohttp

        self.url = url
        self._headers = {**headers, "Content-Type": "application/json", "Accept": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._proxy = env_proxy(url)
        self._session: aiohttp.ClientSession | None = None

    async def post(self, body: dict[str, Any]) -> tuple[int, Mapping[str, str], bytes]:
        """(status, headers, content) of any answer; transport failures and timeouts raise."""
        if self._session is None:
            import aiohttp

            # limit=0: the pacer already caps requests in flight
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=self._timeout)
        async with self._session.post(self.url, data=orjson.dumps(body), headers=self._headers, proxy=self._proxy) as response:
            return response.status, response.headers, await response.read()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def env_proxy(url: str) -> str | None:
    """The proxy HTTPS_PROXY/HTTP_PROXY name for `url` unless NO_PROXY exempts it, as the SDK's
    httpx client would use it. Looked up once: aiohttp's own `trust_env` reads ~/.netrc in a
    thread on every request."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass_environment(parts.hostname or ""):
        return None
    return urllib.request.getproxies_environment().get(parts.scheme)


def status_message(status: int, content: bytes) -> str:
    """The words an error response carries, in the SDK's own form ("Error code: 429 - ...")."""
    message = f"Error code: {status}"
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        text = content.decode("utf-8", "replace").strip()
        return f"{message} - {text[:500]}" if text else message
    error = body.get("error", body) if isinstance(body, dict) else None
    detail = error.get("message") if isinstance(error, dict) else None
    return f"{message} - {detail}" if isinstance(detail, str) and detail else message
