"""The typer application every command module registers with; `-h` works wherever `--help` does, as in prompto."""

from __future__ import annotations

import typer

HELP = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings=HELP,
                  help="`promptfleet` command line: prompto's commands and flags, Prefect underneath.")  # fmt: skip


def group(name: str, help: str) -> typer.Typer:
    """A command group (`promptfleet NAME ...`)."""
    sub = typer.Typer(no_args_is_help=True, help=help, context_settings=HELP)
    app.add_typer(sub, name=name)
    return sub
