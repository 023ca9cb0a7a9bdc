"""Result tables: one row per prompt in Parquet (and CSV), streamed from the journal, in
the order of the input file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from promptfleet.core.quantiles import QuantileSample
from promptfleet.core.rundir import RunPaths, parse_line

if TYPE_CHECKING:
    import polars as pl


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
        "seed": record.get("seed") if isinstance(record.get("seed"), int) else None,
        "error_type": error.get("type"),
        "error_status": error.get("status"),
        "error_message": error.get("message"),
        "parameters": _as_text(record.get("parameters"), known),
        **{f"score_{k}": _score(record.get(k)) for k in score_keys},
        **_parsed_cells(record.get("response_parsed"), parsed_columns or {}),
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
        for seen, value in ((self.versions, row["model_version"]), (self.fingerprints, row["system_fingerprint"]), (self.seeds, row["seed"])):
            if value is not None:
                seen.add(value)
        for k in score_keys:
            if (value := row[f"score_{k}"]) is not None:
                total = self.scores.setdefault(k, [0.0, 0])
                total[0] += value
                total[1] += 1


BUCKET_LINES = 50_000  # input lines whose rows are put in order together


def write_tables(
    paths: RunPaths, csv: bool = False, score_keys: list[str] = (), batch: int = 20_000, parsed_columns: dict[str, str] | None = None,
    on_answer: Callable[[dict[str, Any]], None] | None = None,
) -> pl.DataFrame:  # fmt: skip
    """Parquet (and CSV) of every prompt in the run, one row each, in the order of the input
    (`input_line`; rows of one line as they landed); returns a per-model summary, with the
    distinct model versions, fingerprints and seeds the answers reported (`SEEN_COLUMNS`, for
    the manifest). Each answer is also handed to `on_answer`, as it passes.

    Memory stays that of one batch whatever the run's size: rows are set aside by input line
    into buckets of BUCKET_LINES lines, the fullest bucket goes to a Parquet part whenever
    `batch` rows are held, and polars sorts one bucket at a time while it streams the parts
    into one file (row groups of `batch` rows). The per-model summary is added up as the rows
    pass, its latency quantiles from a fixed-size sample.
    """
    import polars as pl

    parsed_columns = parsed_columns or {}
    score_keys = list(score_keys)
    columns = TABLE_COLUMNS | {f"score_{k}": "Float64" for k in score_keys}
    columns |= {f"parsed_{name}": PARSED_TYPES[kind] for name, kind in parsed_columns.items()}
    schema = {name: getattr(pl, dtype) for name, dtype in columns.items()}
    parts = paths.out_dir / f".{paths.stamp}-table-{paths.name}"
    parts.mkdir(exist_ok=True)
    tallies: dict[tuple[str, str], _ModelTally] = {}
    buckets: dict[int, list[dict[str, Any]]] = {}
    written: dict[int, int] = {}  # bucket -> parts written
    known: dict[Any, str] = {}

    def flush(bucket: int) -> None:
        pl.DataFrame(buckets.pop(bucket), schema=schema).write_parquet(parts / f"{bucket:08d}-{written.get(bucket, 0):06d}.parquet")
        written[bucket] = written.get(bucket, 0) + 1

    try:
        held = 0
        for path, status in ((paths.completed, "completed"), (paths.failed, "failed")):
            if not path.exists():
                continue
            answers = on_answer if status == "completed" else None
            with path.open("rb") as fh:
                for raw in fh:
                    record = parse_line(raw)
                    if answers is not None:
                        answers(record)
                    row = _row(record, status, score_keys, parsed_columns, known)
                    key = (row["api"], row["model_name"])
                    (tallies.get(key) or tallies.setdefault(key, _ModelTally())).add(row, score_keys)
                    buckets.setdefault((row["input_line"] or 0) // BUCKET_LINES, []).append(row)
                    held += 1
                    if held == batch:
                        fullest = max(buckets, key=lambda b: len(buckets[b]))
                        held -= len(buckets[fullest])
                        flush(fullest)
        for bucket in list(buckets):
            flush(bucket)
        ordered = [pl.scan_parquet(sorted(parts.glob(f"{bucket:08d}-*.parquet")), glob=False).sort("input_line", maintain_order=True)
                   for bucket in sorted(written)]  # fmt: skip
        (pl.concat(ordered) if ordered else pl.LazyFrame(schema=schema)).sink_parquet(paths.parquet, row_group_size=batch)
        if csv:
            pl.scan_parquet(paths.parquet, glob=False).sink_csv(paths.csv)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    return _summary(tallies, score_keys)


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
