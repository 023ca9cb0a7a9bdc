"""The HTTP transport of promptfleet's own calls to the Prefect API (the shared rate's).

Prefect's SQLite server answers 503 to a write that met another (SQLITE_BUSY), which
happens to the first slot take of nearly every run while the server records the run's
start. Prefect's client asks again only after a back-off of ~2 s, even with retries set
to 0, so the run's first send waited ~2 s. This transport asks again BUSY_RETRY_S later.
"""

from __future__ import annotations

import asyncio
import ssl

import httpx

BUSY_RETRY_S = 0.02
BUSY_TRIES = 25


class AskAgainWhenBusy(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport):
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for _ in range(BUSY_TRIES - 1):
            response = await self._inner.handle_async_request(request)
            if response.status_code != 503:
                return response
            await response.aclose()
            await asyncio.sleep(BUSY_RETRY_S)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def transport_for(api_url: str) -> AskAgainWhenBusy:
    """Verifying TLS as Prefect's own client does (its settings for skipping verification
    and for a certificate file); a plain-HTTP server needs no SSL context at all."""
    if not api_url.startswith("https:"):
        return AskAgainWhenBusy(httpx.AsyncHTTPTransport(verify=False))
    import certifi
    from prefect.settings import (
        PREFECT_API_SSL_CERT_FILE,
        PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    )

    if PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value():
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=PREFECT_API_SSL_CERT_FILE.value() or certifi.where())
    return AskAgainWhenBusy(httpx.AsyncHTTPTransport(verify=context))
