"""The batch journal of one run: what makes batch mode resumable without a second submission.

`<stamp>-batches-<name>.jsonl` beside the completed file, append-only, one fsynced write per
record. Submitting a batch writes, in order:

    intent     the batch's identity (run id, token), api, model, lines, before the provider hears of it
    uploaded   the file of its requests (OpenAI), as soon as the upload answered
    submitted  the provider's batch id, as soon as the create answered (or a lookup found it)
    ended      once every line of it is in the completed or failed file

An intent without a batch id is unresolved: its lines stay held until the provider is asked
for a batch carrying its identity; found, it is adopted, not found, the intent is
`abandoned` and its lines are free to go again. So no line is ever in two live batches.
Besides: `read` (a batch's state as last read, or unreadable since when and why, written
when it changes), `deleted` (an uploaded file removed) and `swept` (an intent's uploads
looked for and removed where no batch needs them).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from promptfleet.batch.jobs import BatchState, Intent, LiveBatch


@dataclass(frozen=True)
class ReadNote:
    """A batch as last read: the provider's state, or the error that kept it unreadable."""

    at: datetime
    state: str | None = None
    counts: str | None = None
    error: str | None = None
    since: datetime | None = None  # unreadable since


@dataclass
class Ledger:
    """What the batch journal says."""

    intents: dict[str, Intent] = field(default_factory=dict)
    submitted: dict[str, str] = field(default_factory=dict)  # token -> batch id
    ended: dict[str, str] = field(default_factory=dict)  # batch id -> final state
    abandoned: set[str] = field(default_factory=set)
    files: dict[str, list[str]] = field(default_factory=dict)  # token -> uploaded files
    retried_uploads: set[str] = field(default_factory=set)  # tokens whose upload took several tries: strays may exist
    deleted: dict[str, str] = field(default_factory=dict)  # file -> token
    swept: set[str] = field(default_factory=set)
    reads: dict[str, ReadNote] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)  # batch id -> what its answers cost
    torn: int = 0  # unreadable lines set aside (a crash mid-write)

    @property
    def run(self) -> str | None:
        return next((i.run for i in self.intents.values() if i.run), None)

    def batches(self) -> Iterator[LiveBatch]:
        for token, batch_id in self.submitted.items():
            yield LiveBatch(batch_id, self.intents[token])

    def live(self) -> list[LiveBatch]:
        return [b for b in self.batches() if b.batch_id not in self.ended]

    def unresolved(self) -> list[Intent]:
        return [i for t, i in self.intents.items() if t not in self.submitted and t not in self.abandoned]

    def held_lines(self) -> set[int]:
        """Lines a live batch (or a batch that may exist) holds: never submitted again meanwhile."""
        held = {line for b in self.live() for line in b.intent.lines}
        return held.union(*(i.lines for i in self.unresolved()))

    def attempts(self) -> Counter[int]:
        """How many submitted batches each line was in."""
        return Counter(line for b in self.batches() for line in b.intent.lines)

    def rows(self) -> list[dict[str, Any]]:
        """Every batch and every uploaded file of the run, for the summary and the manifest."""
        rows = []
        for token, intent in self.intents.items():
            batch_id = self.submitted.get(token)
            files = self.files.get(token, []) + [f for f, t in self.deleted.items() if t == token and f not in self.files.get(token, [])]
            if batch_id is None and not files and token in self.abandoned:
                continue  # nothing was created
            rows.append({
                "batch": batch_id, "api": intent.api, "model": intent.model, "prompts": len(intent.lines),
                "state": self.state_of(token), "submitted": intent.at.isoformat(), "files": files,
                "deleted_files": [f for f in files if f in self.deleted],
            })  # fmt: skip
        return rows

    def state_of(self, token: str) -> str:
        batch_id = self.submitted.get(token)
        if batch_id is None:
            return "not created" if token in self.abandoned else "unknown (create unanswered)"
        if batch_id in self.ended:
            return self.ended[batch_id]
        note = self.reads.get(batch_id)
        if note is None:
            return "submitted"
        if note.error:
            return f"unreadable since {note.since:%Y-%m-%d %H:%M} UTC ({note.error})" if note.since else f"unreadable ({note.error})"
        return note.state + (f" {note.counts}" if note.counts else "") if note.state else "submitted"


class BatchJournal:
    """The append-only batch journal of one run (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> Ledger:
        ledger = Ledger()
        if not self.path.exists():
            return ledger
        with self.path.open(encoding="utf-8") as fh:
            for text in fh:
                try:
                    _apply(ledger, json.loads(text))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    ledger.torn += 1
        return ledger

    def intent(self, ledger: Ledger, intent: Intent) -> None:
        self._append(ledger, {
            "event": "intent", "token": intent.token, "run": intent.run, "api": intent.api, "model": intent.model,
            "lines": list(intent.lines), "keys": list(intent.keys), "at": intent.at.isoformat(), "before": list(intent.before),
            "worst_usd": round(intent.worst_usd, 6),
        })  # fmt: skip

    def uploaded(self, ledger: Ledger, token: str, file_id: str, tries: int) -> None:
        self._append(ledger, {"event": "uploaded", "token": token, "file": file_id, "tries": tries})

    def submitted(self, ledger: Ledger, token: str, batch_id: str) -> None:
        self._append(ledger, {"event": "submitted", "token": token, "batch": batch_id})

    def abandoned(self, ledger: Ledger, token: str, reason: str) -> None:
        self._append(ledger, {"event": "abandoned", "token": token, "reason": reason})

    def read(self, ledger: Ledger, batch_id: str, note: ReadNote) -> None:
        record = {"event": "read", "batch": batch_id, "at": note.at.isoformat(), "state": note.state, "counts": note.counts,
                  "error": note.error, "since": note.since.isoformat() if note.since else None}  # fmt: skip
        self._append(ledger, {k: v for k, v in record.items() if v is not None})

    def ended(self, ledger: Ledger, batch_id: str, state: BatchState, cost_usd: float) -> None:
        self._append(ledger, {"event": "ended", "batch": batch_id, "state": state.value, "cost_usd": round(cost_usd, 6)})

    def deleted(self, ledger: Ledger, token: str, file_id: str) -> None:
        self._append(ledger, {"event": "deleted", "token": token, "file": file_id})

    def swept(self, ledger: Ledger, token: str) -> None:
        self._append(ledger, {"event": "swept", "token": token})

    def _append(self, ledger: Ledger, record: dict[str, Any]) -> None:
        """Written first, then applied the way `load` applies it: the journal is the truth."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size and not _ends_in_newline(self.path):
                data = b"\n" + data  # after a torn record, begin on a fresh line
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)  # a handful of records per batch: each one is worth a sync
        finally:
            os.close(fd)
        _apply(ledger, record)


def _ends_in_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _when(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _apply(ledger: Ledger, record: dict[str, Any]) -> None:
    event = record["event"]
    if event == "intent":
        ledger.intents[record["token"]] = Intent(
            record["token"], record["api"], record["model"], tuple(record["lines"]), datetime.fromisoformat(record["at"]),
            tuple(record.get("keys", ())), record.get("run", ""), tuple(record.get("before", ())), record.get("worst_usd", 0.0),
        )  # fmt: skip
    elif event in ("uploaded", "submitted", "abandoned", "deleted", "swept") and record["token"] not in ledger.intents:
        raise KeyError(record["token"])
    elif event == "uploaded":
        ledger.files.setdefault(record["token"], []).append(record["file"])
        if record.get("tries", 1) > 1:
            ledger.retried_uploads.add(record["token"])
    elif event == "submitted":
        ledger.submitted[record["token"]] = record["batch"]
    elif event == "abandoned":
        ledger.abandoned.add(record["token"])
    elif event == "read":
        ledger.reads[record["batch"]] = ReadNote(datetime.fromisoformat(record["at"]), record.get("state"), record.get("counts"),
                                                 record.get("error"), _when(record.get("since")))  # fmt: skip
    elif event == "ended":
        ledger.ended[record["batch"]] = record["state"]
        ledger.costs[record["batch"]] = record.get("cost_usd", 0.0)
    elif event == "deleted":
        ledger.deleted[record["file"]] = record["token"]
    elif event == "swept":
        ledger.swept.add(record["token"])
    else:
        raise ValueError(event)
