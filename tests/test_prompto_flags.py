"""Every flag of prompto's commands (from their saved --help text) is accepted by the
matching promptfleet command, and all spellings of one prompto option reach one of ours."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import typer.main
from typer.testing import CliRunner

from promptfleet.cli import app

FIXTURES = Path(__file__).parent / "fixtures" / "prompto_help"
OURS = {
    "prompto_run_experiment": "run",
    "prompto_run_pipeline": "pipeline",
    "prompto_check_experiment": "check",
    "prompto_create_judge_file": "judge",
    "prompto_obtain_missing_jsonl": "missing",
    "prompto_upload_media-upload": "upload-media upload",
    "prompto_upload_media-list": "upload-media list",
    "prompto_upload_media-delete": "upload-media delete",
}


def prompto_options(help_text: str) -> list[list[str]]:
    """Each option line of argparse help as its spellings, e.g. ['--file', '-f']."""
    options = []
    for line in help_text.splitlines():
        match = re.match(r"^  (-\S.*?)(?:\s{2,}|$)", line)
        if not match:
            continue
        options.append([part.split()[0] for part in match.group(1).split(", ")])
    return options


def our_command(path: str) -> click.Command:
    command: click.Command = typer.main.get_command(app)
    for name in path.split():
        command = command.commands[name]  # type: ignore[attr-defined]
    return command


CASES = [
    (fixture.stem, names)
    for fixture in sorted(FIXTURES.glob("*.txt"))
    for names in prompto_options(fixture.read_text())
]


def test_fixtures_cover_every_command_and_parse():
    stems = {stem.removeprefix("main-") for stem, _ in CASES}
    assert stems == set(OURS)
    assert len(CASES) > 50


@pytest.mark.parametrize(("fixture", "names"), CASES, ids=[f"{s}:{n[0]}" for s, n in CASES])
def test_prompto_flag_is_accepted_with_one_meaning(fixture: str, names: list[str]):
    if names == ["-h", "--help"]:  # click's help option is no parameter of the command: ask for it
        for name in names:
            result = CliRunner().invoke(app, [*OURS[fixture.removeprefix("main-")].split(), name])
            assert result.exit_code == 0 and "Usage:" in result.output, f"{name}: {result.output[:300]}"
        return
    command = our_command(OURS[fixture.removeprefix("main-")])
    owners = {param.name for param in command.params for name in names if name in param.opts}
    missing = [name for name in names if not any(name in p.opts for p in command.params)]
    assert not missing, f"{command.name} lacks {missing}"
    assert len(owners) == 1, f"{names} reach several options: {owners}"
