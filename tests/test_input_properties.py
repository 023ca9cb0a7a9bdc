"""Property tests: whatever an experiment file holds, reading it either gives records that
run or issues that name file and line, never a traceback; a schema is either usable or
refused with a reason; a media reference never leaves media/."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from promptfleet.core.config import Settings
from promptfleet.core.experiment import ExperimentError, Issue, validated
from promptfleet.core.media import MediaError, MediaFolder
from promptfleet.core.messages import LocalMedia, PromptError, parse_conversation
from promptfleet.core.plan import inspect
from promptfleet.core.schemas import SchemaMismatch, example_instance, parse_reply, schema_problem

EXAMPLES = int(os.environ.get("PROMPTFLEET_PROPERTY_EXAMPLES", "60"))  # more for a long local hunt
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
parameter_names = st.sampled_from(["max_tokens", "max_output_tokens", "num_predict", "temperature", "n", "stop"]) | st.text(max_size=6)
keys = st.sampled_from(["prompt", "api", "model_name", "id", "parameters", "group", "multimedia", "response_schema", "role", "content", "x"])
apis = st.sampled_from(["test", "openai", "nope", ""])
media_refs = st.sampled_from(["a.png", "../a.png", "/etc/passwd", "sub/../a.png", "missing.png", "fifo", "dir", "", "a\x00b", "é ü.png"]) | st.text(max_size=20)
prompts = (
    st.text(max_size=20)
    | st.lists(st.text(max_size=10), max_size=3)
    | st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "model", "x"]), "content": json_values}), max_size=3)
    | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "file"]), "media": media_refs, "text": st.text(max_size=5)}), max_size=2)
    | json_values
)
schemas = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["object", "string", "array", "integer", "nope"])},
        optional={
            "properties": st.dictionaries(st.text(max_size=5), st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "boolean"])}) | st.booleans(), max_size=3),
            "$ref": st.sampled_from(["#", "#/$defs/a", "#/$defs/none", "http://127.0.0.1:9/x.json", "file:///etc/passwd", "other.json", "#anchor"]),
            "$defs": st.dictionaries(st.sampled_from(["a", "b"]), st.fixed_dictionaries({}, optional={"type": st.just("string"), "$ref": st.sampled_from(["#/$defs/a", "#/$defs/b", "#"])}), max_size=2),
            "$schema": st.sampled_from(["https://json-schema.org/draft/2020-12/schema", "http://json-schema.org/draft-07/schema#", "http://127.0.0.1:9/meta"]),
            "$id": st.sampled_from(["http://127.0.0.1:9/root.json", "urn:x", "rel.json"]),
            "enum": st.lists(scalars, max_size=3),
            "minItems": st.integers(0, 10**9),
            "items": json_values,
        },
    ),
)
records = st.dictionaries(keys, json_values, max_size=6) | st.fixed_dictionaries(
    {"prompt": prompts, "api": apis, "model_name": st.text(max_size=6)},
    optional={"parameters": st.dictionaries(parameter_names, json_values, max_size=3), "group": st.text(max_size=4) | scalars, "multimedia": json_values, "response_schema": schemas, "id": scalars},
)
good_schemas = st.sampled_from([
    {"type": "object", "properties": {"answer": {"type": "string"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["answer"]},
    {"$defs": {"city": {"type": "string"}}, "type": "object", "properties": {"city": {"$ref": "#/$defs/city"}}, "required": ["city"]},
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2},
    {"$id": "http://127.0.0.1:9/never-fetched.json", "type": "object", "properties": {"ok": {"type": "boolean"}}},
])
runnable = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=30) | st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3)
        | st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=10)}), min_size=1, max_size=2)
        | st.just([{"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image", "media": "é ü.png"}]}]),
     "api": st.just("test"), "model_name": st.text(min_size=1, max_size=6).filter(str.strip)},
    optional={"id": scalars, "group": st.text(max_size=4), "response_schema": good_schemas, "extra é": json_values,
              "parameters": st.dictionaries(st.sampled_from(["max_tokens", "temperature", "stop", "seed", "note"]), scalars, max_size=3)},
)  # fmt: skip
jsonl_lines = records.map(lambda r: json.dumps(r)) | json_values.map(json.dumps) | st.text(max_size=30) | st.binary(max_size=30).map(lambda b: b.decode("latin-1"))


def _data(root: Path) -> Path:
    media = root / "data" / "media"
    if not media.exists():
        (media / "dir").mkdir(parents=True)
        (media / "a.png").write_bytes(b"\x89PNG")
        (media / "é ü.png").write_bytes(b"\x89PNG")
        os.mkfifo(media / "fifo")
    return root / "data"


def _assert_read_or_refused(path: Path, data: Path) -> list[dict[str, Any]]:
    """Every item is a record or an Issue of this file and a line of it; inspect agrees."""
    records = []
    for item in validated(path, data / "media", {"test", "openai"}):
        if isinstance(item.value, Issue):
            assert item.value.file == str(path) and item.value.line == item.line >= 1
            assert str(item.value).startswith(f"{path}:{item.line}: "), item.value
            assert "\n" not in str(item.value)
        else:
            records.append(item.value)
    try:
        plan = inspect(path, Settings(data_folder=data))
    except ExperimentError as error:  # the file as a whole (empty, bad name): one line naming it
        assert all(str(issue).startswith(str(path)) for issue in error.issues)
        return []
    assert all(line.startswith(f"{path}") for line in plan.issues)
    return records if not plan.issue_count else []


@FAST
@given(lines=st.lists(jsonl_lines, min_size=1, max_size=5))
def test_any_jsonl_is_read_or_refused_with_file_and_line(tmp_path_factory, lines: list[str]):
    root = tmp_path_factory.getbasetemp()
    path = root / "prop.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", errors="surrogatepass") + b"\n")
    _assert_read_or_refused(path, _data(root))


@FAST
@given(rows=st.lists(records, min_size=1, max_size=4))
def test_any_csv_is_read_or_refused_with_file_and_line(tmp_path_factory, rows: list[dict[str, Any]]):
    root = tmp_path_factory.getbasetemp()
    path = root / "prop.csv"
    columns = sorted({key for row in rows for key in row} | {"prompt"})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([v if isinstance(v, str) else json.dumps(v) for v in (row.get(c, "") for c in columns)])
    path.write_text(out.getvalue())
    _assert_read_or_refused(path, _data(root))


@FAST
@given(prompt=prompts, multimedia=json_values)
def test_the_message_and_media_parser_refuse_with_a_reason_and_stay_in_media(tmp_path_factory, prompt: Any, multimedia: Any):
    data = _data(tmp_path_factory.getbasetemp())
    try:
        conversation = parse_conversation(prompt, multimedia)
    except PromptError as error:
        assert str(error)
        return
    folder = MediaFolder(data / "media")
    for part in conversation.media:
        if isinstance(part, LocalMedia):
            try:
                resolved = folder.resolve(part.ref)
            except MediaError as error:
                assert part.ref[:10] in str(error) or "NUL" in str(error)
                continue
            assert resolved.is_relative_to((data / "media").resolve()) and resolved.is_file()


@FAST
@given(schema=schemas)
def test_a_schema_is_usable_or_refused_and_a_usable_one_checks_replies(schema: Any):
    problem = schema_problem(schema)
    if problem is not None:
        assert isinstance(problem, str) and "\n" not in problem
        return
    reply = json.dumps(example_instance(schema, "seed"))
    try:
        parse_reply(reply, schema)
    except SchemaMismatch as mismatch:  # a usable schema may still not be met by the sample
        assert str(mismatch)


@settings(max_examples=max(12, EXAMPLES // 5), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rows=st.lists(runnable, min_size=1, max_size=3) | st.lists(records, min_size=1, max_size=2))
@example(rows=[{"api": "test", "model_name": "m", "prompt": "hi", "parameters": {"seed": 2**63}}])  # past the table's Int64
def test_what_is_read_runs_offline(tmp_path_factory, rows: list[dict[str, Any]]):
    """Records that pass validation with the offline `test` api run to an answer or a failure."""
    from promptfleet.api import Experiment

    rows = [{**row, "api": "test"} if "api" in row else row for row in rows]
    root = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    data = _data(root)
    path = root / "run.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    if not _assert_read_or_refused(path, data):
        event("refused")
        return
    event("ran")
    summary = asyncio.run(Experiment(path, Settings(data_folder=data, max_queries=60_000, max_attempts=1)).process())
    assert summary.complete and summary.answered + summary.failed == summary.prompts == len(rows)


@pytest.mark.slow
def test_a_long_file_check_stays_within_bounded_memory(tmp_path: Path):
    """`check` streams: 150,000 long lines cost the peak memory of 1,500 lines plus the plan's
    arrays (the place and key of each record, ~40 bytes), never the records (~140 MB of text)."""
    line = json.dumps({"api": "test", "model_name": "m", "prompt": "What is the capital of France? " * 30}) + "\n"

    def peak_kib(lines: int) -> int:
        path = tmp_path / f"big{lines}.jsonl"
        with path.open("w") as fh:
            for start in range(0, lines, 10_000):
                fh.write(line * min(10_000, lines - start))
        script = (
            "import resource, sys\nfrom promptfleet.cli import main\nsys.argv = ['promptfleet', 'check', '-f', sys.argv[1], '-d', sys.argv[2]]\n"
            "try:\n    main()\nexcept SystemExit as done:\n    print('exit', done.code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "data")], capture_output=True, text=True, timeout=900)
        assert f"{lines} valid prompt(s), 0 bad line(s)" in done.stdout, done.stderr[-2000:]
        path.unlink()
        return int(done.stdout.split()[-1])

    small, big = peak_kib(1_500), peak_kib(150_000)
    text_kib = len(line) * 150_000 // 1024
    assert big - small < 64 * 1024 < text_kib, (small, big, text_kib)  # the records' text would not fit
