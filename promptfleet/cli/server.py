"""`promptfleet server start|status|stop`: the background Prefect server."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console

from promptfleet.cli.options import Debug, err
from promptfleet.cli.prefect_api import background_server
from promptfleet.cli.root import group

server_app = group("server", "The background Prefect server that promptfleet commands share.")


@server_app.command("start")
def server_start(
    port: Annotated[Optional[int], typer.Option(help="Port on 127.0.0.1 [default: PREFECT_SERVER_API_PORT, 4200, or a free one if that is taken].")] = None,
    _debug: Debug = False,
) -> None:
    """Start the background Prefect server (the first `run` does this too)."""
    from promptfleet.orchestration import server

    if configured := server.configured_api_url():
        err.print(f"note: PREFECT_API_URL is set ({configured}); promptfleet commands use that server, not this one", markup=False)
    home = server.prefect_home()
    running = server.status(home)
    info = background_server(home, port)
    Console(soft_wrap=True).print(f"Prefect server {'already running' if running else 'started'}: {info.ui_url} (pid {info.pid})", highlight=False)


@server_app.command("status")
def server_status(_debug: Debug = False) -> None:
    """Where the background server is (UI URL, PID); exit 1 when none is running."""
    from promptfleet.orchestration import server

    info = server.status(server.prefect_home())
    out = Console(soft_wrap=True)
    if configured := server.configured_api_url():
        out.print(f"PREFECT_API_URL is set: commands use {configured}", highlight=False)
    if info is None:
        out.print("no background Prefect server running (the next `promptfleet run` starts one)", highlight=False)
        raise typer.Exit(1)
    state = "answering" if server.healthy(info.api_url) else "not answering"
    out.print(f"Prefect server: {info.ui_url} (pid {info.pid}, since {info.started}, {state})", highlight=False)


@server_app.command("stop")
def server_stop(_debug: Debug = False) -> None:
    """Stop the background Prefect server. Runs stay in its database for the next start."""
    from promptfleet.orchestration import server

    info = server.stop(server.prefect_home())
    out = Console(soft_wrap=True)
    out.print(f"stopped the Prefect server at {info.ui_url} (pid {info.pid})" if info else "no background Prefect server running", highlight=False)


