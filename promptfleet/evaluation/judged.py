"""Which completed runs were judged with which judge setting, and the claim that makes each
(run, setting) judged once, whoever asks: the CLI's `--judge`, `promptfleet judge --run`, or
the judge deployment's event trigger.

A judge setting is the chosen judges' settings and the templates' texts; with the judged
run's completed file it makes the judging's key. In the judged run's folder,
`.judge-<key>.claim` is a lease (promptfleet.core.lease) created with O_EXCL and held while
the judging runs, and `.judge-<key>.json` records a judging that finished: a second request
finds one or the other and does nothing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from promptfleet.core.inbox import Taken
from promptfleet.core.lease import Holder, acquire
from promptfleet.core.rundir import RunPaths
from promptfleet.evaluation.judge import load_judge_folder


def run_paths_of(completed: Path) -> RunPaths:
    """The RunPaths of a `<stamp>-completed-<name>.jsonl` file."""
    stamp, _, name = completed.name.removesuffix(".jsonl").partition("-completed-")
    return RunPaths(completed.parent, stamp, name)


def judging_key(completed: Path, folder: Path, judges: list[str], templates: list[str]) -> str:
    """Eight hex digits naming (this completed run, this judge setting); what the setting
    is named or where its folder is does not count, what it sends does."""
    texts, settings = load_judge_folder(folder, templates, judges)
    setting = {"run": completed.name, "judges": [settings[j] for j in judges], "templates": [texts[t] for t in sorted(texts)]}
    return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:8]


@dataclass
class Judging:
    """The judging of one completed run with one setting, claimed by this process."""

    original: RunPaths
    key: str
    holder: Holder

    @property
    def name(self) -> str:
        """The judge experiment's name: its file, its run and its output folder."""
        return f"judge-{self.original.name}-{self.key}"

    @property
    def file(self) -> Path:
        return self.original.out_dir / f"{self.name}.jsonl"  # beside its source, never in the inbox

    @property
    def study(self) -> Path:
        return self.original.out_dir / f"{self.original.stamp}-study-{self.original.name}"

    def done(self, judge_run: RunPaths, judges: list[str], templates: list[str], flow_run: dict[str, Any] | None = None) -> None:
        """Record the finished judging, then let go of the claim."""
        record = {"completed": str(self.original.completed), "judge_run": str(judge_run.completed), "judges": judges,
                  "templates": templates, "study": str(self.study), "prefect": flow_run,
                  "ended": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        path = _done_file(self.original, self.key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, path)
        self.holder.drop()

    def end(self) -> None:
        """Stopped before the end: the claim goes, a later request resumes the judge run."""
        self.holder.drop()


def take_judging(completed: Path, folder: Path, judges: list[str], templates: list[str], ttl: float = 60.0) -> Judging:
    """Claim the judging of `completed` with this setting, or raise `Taken`: it is being
    judged (by whom) or was judged (where the study table is)."""
    original = run_paths_of(completed)
    if not completed.is_file():
        raise FileNotFoundError(f"{completed}: completed file not found")
    state = _state(original)
    if state is not None and not state.get("finished"):
        raise Taken(original.name, f"its run {original.stamp} is not finished; resume it first, then judge it")
    key = judging_key(completed, folder, judges, templates)
    if record := judged(original, key):
        raise Taken(completed.name, f"it was judged with this setting already (study table: {record['study']}.parquet)")
    held = acquire(original.out_dir / f".judge-{key}.claim", ttl)
    if not isinstance(held, Holder):
        raise Taken(completed.name, f"it is being judged with this setting by pid {held.pid} on {held.host}", running=True)
    if record := judged(original, key):  # finished between the look and the claim
        held.drop()
        raise Taken(completed.name, f"it was judged with this setting already (study table: {record['study']}.parquet)")
    held.start()
    return Judging(original, key, held)


def earlier_judgings(original: RunPaths) -> list[dict[str, Any]]:
    """The finished judgings of a run (every setting), oldest first, for its study table."""
    records = []
    for path in sorted(original.out_dir.glob(".judge-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("completed") == str(original.completed):
            records.append(record)
    return sorted(records, key=lambda record: str(record.get("ended", "")))


def judged(original: RunPaths, key: str) -> dict[str, Any] | None:
    """The record of a finished judging of this run with the setting of `key`."""
    try:
        return json.loads(_done_file(original, key).read_text())
    except (OSError, ValueError):
        return None


def finished_run_of(out_dir: Path, name: str, digest: str) -> RunPaths | None:
    """The newest finished run of experiment `name` whose input had this digest: a study
    of the same input judges it instead of sending every prompt again."""
    found = []
    for state_file in out_dir.glob(f"*-run-{glob.escape(name)}.json") if out_dir.is_dir() else []:
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        if state.get("finished") and state.get("input_sha256") == digest:
            paths = RunPaths(out_dir, state_file.name.removesuffix(f"-run-{name}.json"), name)
            if paths.completed.exists() and paths.parquet.exists():
                found.append((str(state.get("ended", "")), paths))
    return max(found, key=lambda item: item[0])[1] if found else None


def flow_run_of(paths: RunPaths) -> dict[str, Any] | None:
    """The Prefect flow run that ran a run, from its manifest (id, name, URL), if any."""
    try:
        return json.loads(paths.manifest.read_text()).get("prefect")
    except (OSError, ValueError, AttributeError):
        return None


def _state(paths: RunPaths) -> dict[str, Any] | None:
    try:
        return json.loads(paths.state.read_text())
    except (OSError, ValueError):
        return None


def _done_file(original: RunPaths, key: str) -> Path:
    return original.out_dir / f".judge-{key}.json"

