"""Which Prefect server a command reports to: the configured one, the background one, or a temporary one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from promptfleet.cli.options import err, fail, missing_env_lines


@contextmanager
def prefect_api(ephemeral: bool) -> Iterator[str]:
    """The Prefect API for this command: the one the user configured, else the background
    server (started by the first command), else with --ephemeral a temporary one."""
    from promptfleet.orchestration import server

    if configured := server.configured_api_url():
        yield configured
        return
    home = server.prefect_home()
    if server.ephemeral_requested(ephemeral):
        err.print("starting a temporary Prefect server (~15 s; it stops with this command)")
        try:
            with server.temporary(home) as info, server.use_api(info.api_url, server.plain_http_env(home)):
                yield info.api_url
        except server.ServerError as error:
            fail(f"cannot start the Prefect server: {error}")
        return
    info = background_server(home)
    with server.use_api(info.api_url, server.plain_http_env(home)):
        yield info.api_url


def background_server(home: Path, port: int | None = None):
    """The background server, started if needed; a failure to start is one line. (Its first
    flow run sets up the automation that marks runs of killed processes Crashed.)"""
    from promptfleet.orchestration import server

    try:
        info, _ = server.start(home, port, announce=lambda line: err.print(line, markup=False, highlight=False))
    except server.ServerError as error:
        fail(f"cannot start the Prefect server: {error}")
    return info


def env_lines_with_secret_blocks(found) -> list[str]:
    """Missing variables, counting Prefect Secret blocks as set when a server is at hand
    (`check` never starts one)."""
    if not found.missing_env:
        return []
    from promptfleet.orchestration import server

    api = server.configured_api_url()
    if api is None and (running := server.status(server.prefect_home())) is not None:
        api = running.api_url
    if api is None:
        return missing_env_lines(found, set(), "not set; Prefect Secret blocks not checked: no Prefect server is running")
    from promptfleet.orchestration.secrets import secret_blocks_for

    with server.use_api(api):
        try:
            present = asyncio.run(secret_blocks_for(n for names in found.missing_env.values() for n in names))
        except Exception as error:  # noqa: BLE001 - an unreachable server is not the file's fault
            return missing_env_lines(found, set(), f"not set; Prefect Secret blocks not checked: {type(error).__name__}")
    return missing_env_lines(found, present, "not set in the environment, the .env file or a Prefect Secret block")


