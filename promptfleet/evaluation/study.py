"""One table per study: each original prompt with its model, response, usage, scores and
every judge's parsed verdict, and a summary per model and judge."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from promptfleet.evaluation.judge import parse_verdict


def _verdict_rows(judge_files: list[Path], judges: list[str], templates: list[str]) -> list[dict[str, Any]]:
    prefixes = [(f"judge-{j}-{t}-", j, t) for j in judges for t in templates]
    rows = []
    for path in judge_files:
        status = "failed" if "-failed-" in path.name else "completed"
        if not path.exists():
            continue
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                record = json.loads(line)
                judge, template = next(((j, t) for p, j, t in prefixes if record["id"].startswith(p)), (None, None))
                if judge is None:
                    continue
                verdict = parse_verdict(record.get("response")) if status == "completed" else {"verdict_judge_failed": True}
                rows.append({"input_line": record["input-input_line"], "judge": judge, "template": template,
                             "verdict_text": record.get("response"), **verdict})  # fmt: skip
    return rows


@dataclass(frozen=True)
class StudyTable:
    """Answers joined with verdicts (Parquet and CSV), and verdicts summed up per model and judge."""

    parquet: Path
    csv: Path
    rows: int
    summary: list[dict[str, Any]]


def write_study(results: Path, judge_files: list[Path], judges: list[str], templates: list[str], out: Path) -> StudyTable:
    """Join the run's results table with the verdicts; Parquet and CSV at `out` (.parquet/.csv)."""
    base = pl.read_parquet(results, glob=False)
    verdicts = pl.DataFrame(_verdict_rows(judge_files, judges, templates), infer_schema_length=None)
    if verdicts.is_empty():
        table = base
        summary = pl.DataFrame()
    else:
        value_cols = [c for c in verdicts.columns if c.startswith("verdict_")]
        wide = verdicts.with_columns((pl.col("judge") + ":" + pl.col("template")).alias("by")).pivot(
            on="by", index="input_line", values=value_cols
        )
        table = base.join(wide, on="input_line", how="left")
        joined = verdicts.join(base.select("input_line", "api", "model_name"), on="input_line", how="left")
        aggs = [pl.len().alias("verdicts")]
        if "verdict_score" in verdicts.columns:
            aggs.append(pl.col("verdict_score").mean().alias("mean_score"))
        if "verdict_label" in verdicts.columns:
            aggs.append(pl.col("verdict_label").drop_nulls().value_counts(sort=True).alias("labels"))
        if "verdict_unparsable" in verdicts.columns:
            aggs.append(pl.col("verdict_unparsable").fill_null(False).sum().alias("unparsable"))
        if "verdict_judge_failed" in verdicts.columns:
            aggs.append(pl.col("verdict_judge_failed").fill_null(False).sum().alias("judge_failed"))
        summary = joined.group_by("model_name", "judge", "template").agg(aggs).sort("model_name", "judge", "template")
        if "labels" in summary.columns:
            summary = summary.with_columns(
                pl.col("labels").list.eval(pl.element().struct.field("verdict_label") + "=" + pl.element().struct.field("count").cast(pl.String)).list.join(", ")
            )
    flat = table.select([pl.col(c).cast(pl.String) if isinstance(table.schema[c], (pl.List, pl.Struct)) else pl.col(c) for c in table.columns])
    _replace(out.with_suffix(".parquet"), table.write_parquet)
    _replace(out.with_suffix(".csv"), flat.write_csv)
    return StudyTable(out.with_suffix(".parquet"), out.with_suffix(".csv"), table.height, summary.to_dicts())


def _replace(path: Path, write) -> None:
    """A study table is rewritten after every judging: a reader (or a crash) meets the old
    table or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
