"""Result tables: one row per prompt in Parquet (and CSV), streamed from the journal, in
the order of the input file."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from promptfleet.core.quantiles import QuantileSample
from promptfleet.core.rundir import RunPaths, parse_line

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger("promptfleet")


# polars dtypes by name: polars loads when a table is written, not with the CLI (~0.2 s)
TABLE_COLUMNS = {
    "input_line": "Int64",
    "id": "String",
    "api": "String",
    "model_name": "String",
    "group": "String",
    "status": "String",
    "prompt": "String",
    "response": "String",
    "thinking_text": "String",
    "timestamp_sent": "String",
    "latency_s": "Float64",
    "attempts": "Int64",
    "input_tokens": "Int64",
    "output_tokens": "Int64",
    "reasoning_tokens": "Int64",
    "cost_usd": "Float64",
    "finish_reason": "String",
    "model_version": "String",
    "system_fingerprint": "String",
    "request_id": "String",
    "seed": "Int64",
    "error_type": "String",
    "error_status": "Int64",
    "error_message": "String",
    "parameters": "String",
}


def _as_text(value: Any, known: dict[Any, str] | None = None) -> str | None:
    """A cell's text: a string as it is, anything else as JSON. `known` keeps the text of
    flat dicts seen before (every prompt of a file often has the same parameters)."""
    if value is None or type(value) is str:
        return value
    if type(value) is int:
        return str(value)
    if known is not None and type(value) is dict and len(known) < 4096:
        try:
            key = tuple(value.items())
            if (text := known.get(key)) is None:
                text = known[key] = json.dumps(value, ensure_ascii=False)
            return text
        except TypeError:  # a value that is itself a dict or a list
            pass
    return json.dumps(value, ensure_ascii=False)


def _thinking(value: Any) -> str | None:
    """A reply's thoughts as one text (blank-line separated); a multi-turn prompt's as JSON, a list a turn."""
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return "\n\n".join(value)
    return _as_text(value)


PARSED_TYPES = {"string": "String", "integer": "Int64", "number": "Float64", "boolean": "Boolean", "json": "String"}


def _parsed(value: Any, kind: str) -> Any:
    """One `parsed_<name>` cell: the value if it has the column's type, JSON text for json."""
    if value is None:
        return None
    if kind == "json":
        return json.dumps(value, ensure_ascii=False)
    if kind == "boolean" or isinstance(value, bool):
        return value if kind == "boolean" and isinstance(value, bool) else None
    if kind == "number":
        return float(value) if isinstance(value, (int, float)) else None
    return value if isinstance(value, {"integer": int, "string": str}[kind]) else None


def _row(record: dict[str, Any], status: str, score_keys: list[str], parsed_columns: dict[str, str] | None = None,
         known: dict[Any, str] | None = None) -> dict[str, Any]:  # fmt: skip
    usage = record.get("usage") or {}
    error = record.get("error") or {}
    return {
        "input_line": record.get("input_line"),
        "id": _as_text(record.get("id")),
        "api": record.get("api"),
        "model_name": record.get("model_name"),
        "group": record.get("group"),
        "status": status,
        "prompt": _as_text(record.get("prompt")),
        "response": _as_text(record.get("response")),
        "thinking_text": _thinking(record.get("thinking_text")),
        "timestamp_sent": record.get("timestamp_sent"),
        "latency_s": record.get("latency_s"),
        "attempts": record.get("attempts", error.get("attempts")),
        "input_tokens": usage.get("input_tokens"),
        "output_tokens": usage.get("output_tokens"),
        "reasoning_tokens": usage.get("reasoning_tokens"),
        "cost_usd": usage.get("cost_usd"),
        "finish_reason": record.get("finish_reason"),
        "model_version": record.get("model_version"),
        "system_fingerprint": record.get("system_fingerprint"),
        "request_id": record.get("request_id"),
        "seed": _int64(record.get("seed")),
        "error_type": error.get("type"),
        "error_status": error.get("status"),
        "error_message": error.get("message"),
        "parameters": _as_text(record.get("parameters"), known),
        **({f"score_{k}": _score(record.get(k)) for k in score_keys} if score_keys else {}),
        **(_parsed_cells(record.get("response_parsed"), parsed_columns) if parsed_columns else {}),
    }


def _parsed_cells(parsed: Any, columns: dict[str, str]) -> dict[str, Any]:
    values = parsed if isinstance(parsed, dict) else {}
    return {f"parsed_{name}": _parsed(values.get(name), kind) for name, kind in columns.items()}


def _score(value: Any) -> float | None:
    """Scores in the table are numbers (True is 1) so they average; others stay in the JSONL."""
    return float(value) if isinstance(value, (bool, int, float)) else None


@dataclass
class _ModelTally:
    """One model's line of the summary, added up row by row as the table is written."""

    prompts: int = 0
    answered: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    latency: QuantileSample = field(default_factory=QuantileSample)
    scores: dict[str, list[float]] = field(default_factory=dict)  # key -> [sum, count]
    versions: set[str] = field(default_factory=set)  # for the manifest: what the answers reported
    fingerprints: set[str] = field(default_factory=set)
    seeds: set[int] = field(default_factory=set)

    def add(self, row: dict[str, Any], score_keys: list[str]) -> None:
        self.prompts += 1
        if row["status"] == "completed":
            self.answered += 1
        else:
            self.failed += 1
        self.input_tokens += row["input_tokens"] or 0
        self.output_tokens += row["output_tokens"] or 0
        if row["latency_s"] is not None:
            self.latency.add(row["latency_s"])
        if (version := row["model_version"]) is not None:
            self.versions.add(version)
        if (fingerprint := row["system_fingerprint"]) is not None:
            self.fingerprints.add(fingerprint)
        if (seed := row["seed"]) is not None:
            self.seeds.add(seed)
        for k in score_keys:
            if (value := row[f"score_{k}"]) is not None:
                total = self.scores.setdefault(k, [0.0, 0])
                total[0] += value
                total[1] += 1


class TableWriter:
    """A run's result table: Parquet (and CSV) of every prompt, one row each, in the order of
    the input (`input_line`; rows of one line as they landed), and a per-model summary with
    the distinct model versions, fingerprints and seeds the answers reported (`SEEN_COLUMNS`,
    for the manifest). Each answer in the first `answers_before` bytes of the completed file
    (a resumed run's earlier sessions) is also handed to `on_answer` as it passes.

    `follow` builds it while the run goes: a thread reads the journal as it grows, from its
    first byte (a resumed run's earlier answers first), so `finish` is left with the last
    lines and the ordering. Memory stays that of two batches whatever the run's size: rows
    are held as tuples, set aside by input line into buckets of `batch` lines, and once two
    batches are held the fullest buckets go, each sorted, to Parquet parts until less than
    one is. Answers landing about in input order fill one bucket after another, so most
    buckets end as one part, already in order; answers that land late (retries) or queues
    at different rates leave a bucket in several parts, and holding two batches keeps those
    parts few. At the end only the buckets of several parts are sorted again, one at a time,
    and polars streams the parts into one file. Parts stay small because what polars holds
    while it sorts or streams grows with what it reads at once (~1 MB a thousand rows). The
    summary is added up as the rows pass, its latency quantiles from a fixed-size sample.
    """

    def __init__(self, paths: RunPaths, parsed_columns: dict[str, str] | None = None, batch: int = 5_000,
                 on_answer: Callable[[dict[str, Any]], None] | None = None, answers_before: int = 0) -> None:  # fmt: skip
        self.paths, self.batch, self.on_answer, self.answers_before = paths, batch, on_answer, answers_before
        self.parsed_columns = parsed_columns or {}
        self.parts = paths.out_dir / f".{paths.stamp}-table-{paths.name}"
        self.score_keys: list[str] = []
        self._read_to = {"completed": 0, "failed": 0}
        self._tallies: dict[tuple[str, str], _ModelTally] = {}
        self._buckets: dict[int, list[tuple[Any, ...]]] = {}
        self._written: dict[int, int] = {}  # bucket -> parts written
        self._known: dict[Any, str] = {}
        self._held = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        shutil.rmtree(self.parts, ignore_errors=True)  # left by a killed run: this one reads the journal again
        self.parts.mkdir(parents=True)

    def follow(self, after: float = 1.0, every: float = 0.5) -> None:
        """Follow the journal in a thread, starting `after` seconds from now (not in the way
        of the run's first requests). Without score columns: scorers name theirs as they go."""
        self._thread = threading.Thread(target=self._follow, args=(after, every), name=f"table {self.paths.name}", daemon=True)
        self._thread.start()

    def _follow(self, after: float, every: float) -> None:
        if self._stop.wait(after):
            return
        try:
            while True:
                self._read()
                if self._stop.wait(every):
                    return
        except Exception as failure:  # noqa: BLE001 - finish reads on from the last whole line, and says so if it fails again
            log.warning("the table of %s is now written at the end: %s", self.paths.name, failure)

    def stop(self) -> None:
        """No table after all (the disk refused the journal): the thread ends, the parts go."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        shutil.rmtree(self.parts, ignore_errors=True)

    def finish(self, csv: bool = False, score_keys: list[str] = ()) -> pl.DataFrame:
        """Read what is left, write the table, and return the per-model summary."""
        import polars as pl

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if list(score_keys) != self.score_keys and any(self._read_to.values()):
                raise RuntimeError("score columns appeared after the table began: scorers' runs are written at the end")
            self.score_keys = list(score_keys)
            self._read()
            for bucket in list(self._buckets):
                self._flush(bucket)
            ordered = [self._in_order(bucket) for bucket in sorted(self._written)]
            table = pl.scan_parquet(ordered, glob=False) if ordered else pl.LazyFrame(schema=self._schema())
            table.sink_parquet(self.paths.parquet, row_group_size=self.batch)
            if csv:
                pl.scan_parquet(self.paths.parquet, glob=False).sink_csv(self.paths.csv)
        finally:
            shutil.rmtree(self.parts, ignore_errors=True)
        return _summary(self._tallies, self.score_keys)

    def _read(self) -> None:
        """Every whole line written since the last read."""
        for status, path in (("completed", self.paths.completed), ("failed", self.paths.failed)):
            try:
                fh = path.open("rb")
            except FileNotFoundError:
                continue
            with fh:
                size = 1 << 20
                while True:
                    fh.seek(self._read_to[status])
                    chunk = fh.read(size)
                    end = chunk.rfind(b"\n") + 1
                    if not end:
                        if len(chunk) < size:  # nothing more, or a line still being written
                            break
                        size *= 2  # a line longer than the chunk
                        continue
                    for raw in chunk[:end].split(b"\n")[:-1]:
                        at = self._read_to[status]
                        self._add(raw, status, at < self.answers_before)
                        self._read_to[status] = at + len(raw) + 1  # line by line: a failure never reads one twice
                    size = 1 << 20

    def _add(self, raw: bytes, status: str, earlier: bool) -> None:
        try:
            record = parse_line(raw)
        except ValueError:  # a torn line: resuming sets it aside
            return
        if not isinstance(record, dict):
            return
        if earlier and status == "completed" and self.on_answer is not None:
            self.on_answer(record)
        row = _row(record, status, self.score_keys, self.parsed_columns, self._known)
        key = (row["api"], row["model_name"])
        (self._tallies.get(key) or self._tallies.setdefault(key, _ModelTally())).add(row, self.score_keys)
        self._buckets.setdefault((row["input_line"] or 0) // self.batch, []).append(tuple(row.values()))
        self._held += 1
        if self._held >= 2 * self.batch:  # then down to under one batch, fullest buckets first
            while self._held >= self.batch:
                self._flush(max(self._buckets, key=lambda b: len(self._buckets[b])))

    def _flush(self, bucket: int) -> None:
        """The bucket's held rows, sorted, to a part of their own."""
        import polars as pl

        part = self.parts / f"{bucket:08d}-{self._written.get(bucket, 0):06d}.parquet"
        schema = self._schema()
        rows = pl.DataFrame(dict(zip(schema, zip(*self._buckets[bucket]))), schema=schema)  # by column: 3x faster than by row
        rows.sort("input_line", maintain_order=True).write_parquet(part, compression="lz4")
        self._held -= len(self._buckets.pop(bucket))  # once written: a full disk loses no row
        self._written[bucket] = self._written.get(bucket, 0) + 1

    def _in_order(self, bucket: int) -> Path:
        """The bucket's rows in one sorted part: its only one, or its parts sorted together
        (stable: rows of one line stay in the order they landed)."""
        import polars as pl

        parts = [self.parts / f"{bucket:08d}-{n:06d}.parquet" for n in range(self._written[bucket])]
        if len(parts) == 1:
            return parts[0]
        merged = self.parts / f"{bucket:08d}.parquet"
        pl.read_parquet(parts, glob=False).sort("input_line", maintain_order=True).write_parquet(merged, compression="lz4", row_group_size=self.batch)
        return merged

    def _schema(self) -> dict[str, Any]:
        import polars as pl

        columns = TABLE_COLUMNS | {f"score_{k}": "Float64" for k in self.score_keys}
        columns |= {f"parsed_{name}": PARSED_TYPES[kind] for name, kind in self.parsed_columns.items()}
        return {name: getattr(pl, dtype) for name, dtype in columns.items()}


def write_tables(
    paths: RunPaths, csv: bool = False, score_keys: list[str] = (), batch: int = 5_000, parsed_columns: dict[str, str] | None = None
) -> pl.DataFrame:
    """The table of a journal as it is, written now (see TableWriter)."""
    return TableWriter(paths, parsed_columns, batch).finish(csv, score_keys)


SEEN_COLUMNS = ("model_versions", "system_fingerprints", "seeds")


def load_library() -> None:
    """Import polars now (~0.2 s of CPU): a caller whose queues are waiting on answers loads
    it meanwhile instead of after the last one."""
    import polars  # noqa: F401


def _summary(tallies: dict[tuple[str, str], _ModelTally], score_keys: list[str]) -> pl.DataFrame:
    import polars as pl

    schema = {"api": pl.String, "model_name": pl.String, "prompts": pl.Int64, "answered": pl.Int64, "failed": pl.Int64,
              "latency_p50_s": pl.Float64, "latency_p95_s": pl.Float64, "input_tokens": pl.Int64, "output_tokens": pl.Int64,
              **{f"mean_{k}": pl.Float64 for k in score_keys},
              "model_versions": pl.List(pl.String), "system_fingerprints": pl.List(pl.String), "seeds": pl.List(pl.Int64)}  # fmt: skip
    rows = []
    for (api, model), t in sorted(tallies.items(), key=lambda item: (item[0][0] or "", item[0][1] or "")):
        means = {f"mean_{k}": (t.scores[k][0] / t.scores[k][1] if k in t.scores else None) for k in score_keys}
        rows.append({"api": api, "model_name": model, "prompts": t.prompts, "answered": t.answered, "failed": t.failed,
                     "latency_p50_s": t.latency.quantile(0.5), "latency_p95_s": t.latency.quantile(0.95),
                     "input_tokens": t.input_tokens, "output_tokens": t.output_tokens, **means,
                     "model_versions": sorted(t.versions), "system_fingerprints": sorted(t.fingerprints), "seeds": sorted(t.seeds)})  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


def _int64(value: Any) -> int | None:
    """A seed as the table's Int64 column holds it; one no provider would take is left out."""
    return value if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63 else None
