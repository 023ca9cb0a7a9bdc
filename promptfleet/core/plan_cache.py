"""A big experiment's plan, kept next to its outputs until its run finishes, so that resuming
it does not validate a million lines again (~15 s) before its first request.

The plan is reused only for the very same bytes (its sha256, ~0.15 s for 100 MB) planned
with the very same settings (and -mqj and prices files) by the same promptfleet; anything
else plans again. What depends on the environment — which API keys are missing — is worked
out again each time. The file holds a JSON header line and the queues' arrays as raw bytes:
nothing in it is executed, whoever wrote it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from array import array
from importlib import metadata
from pathlib import Path
from typing import Any

from promptfleet.core.config import Settings
from promptfleet.core.plan import Plan, QueuePlan, env_missing, inspect

CACHE_FROM_PROMPTS = 20_000  # below this, planning takes well under a second
FORMAT = 1
_KEY_BYTES = 12
_NOT_KEPT = {"file", "size", "mtime_ns", "queues", "batch", "missing_env", "models"}  # what is taken from the file or the environment


def plan_for(file: Path | str, settings: Settings) -> Plan:
    """The plan kept for this file, or a new one (`inspect`)."""
    return _load(Path(file), settings) or inspect(Path(file), settings)


def keep(plan: Plan, settings: Settings) -> None:
    """Keep a big, valid plan in its experiment's output folder (which must exist)."""
    if plan.prompts < CACHE_FROM_PROMPTS or plan.issue_count:
        return
    path = _path(plan.file, settings)
    if (header := _header(path)) and header.get("digest") == plan.digest and header.get("fingerprint") == _fingerprint(settings):
        return
    queues = [*plan.queues.values(), *([plan.batch] if plan.batch else [])]
    header = {
        "format": FORMAT, "fingerprint": _fingerprint(settings), "digest": plan.digest, "size": plan.size,
        "plan": {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name not in _NOT_KEPT},
        "models": plan.models,
        "queues": [{"name": q.name, "rate_per_minute": q.rate_per_minute, "tokens_per_minute": q.tokens_per_minute,
                    "target": q.target, "prompts": q.prompts} for q in queues],
        "batch": plan.batch is not None,
    }  # fmt: skip
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(json.dumps(header).encode() + b"\n")
        for q in queues:
            for values in (q.lines, q.offsets, q.lengths):
                fh.write(values.tobytes())
            fh.write(bytes(q.keys))
    os.replace(tmp, path)


def forget(file: Path, settings: Settings) -> None:
    """The run finished: nothing will resume it."""
    _path(file, settings).unlink(missing_ok=True)


def _path(file: Path, settings: Settings) -> Path:
    return settings.output_folder / Path(file).stem / ".plan"


def _header(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as fh:
            header = json.loads(fh.readline())
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) and header.get("format") == FORMAT else None


def _load(file: Path, settings: Settings) -> Plan | None:
    path = _path(file, settings)
    header = _header(path)
    try:
        stat = os.stat(file)
    except OSError:
        return None
    if header is None or header.get("fingerprint") != _fingerprint(settings) or header.get("size") != stat.st_size:
        return None
    if _sha256(file) != header.get("digest"):
        return None
    try:
        with path.open("rb") as fh:
            fh.readline()
            queues = [_read_queue(fh, meta) for meta in header["queues"]]
        plan = Plan(file=file, size=stat.st_size, mtime_ns=stat.st_mtime_ns, **header["plan"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    plan.models = [(api, model) for api, model in header["models"]]
    plan.missing_env = env_missing(plan.models)
    if header["batch"]:
        plan.batch = queues.pop()
    plan.queues = {q.name: q for q in queues}
    return plan


def _read_queue(fh: Any, meta: dict[str, Any]) -> QueuePlan:
    n = int(meta["prompts"])
    queue = QueuePlan(meta["name"], meta["rate_per_minute"], meta["tokens_per_minute"], meta["target"])
    for values in (queue.lines, queue.offsets, queue.lengths):
        data = fh.read(n * values.itemsize)
        if len(data) != n * values.itemsize:
            raise ValueError("a torn plan file")
        values.frombytes(data)
    queue.keys = bytearray(fh.read(n * _KEY_BYTES))
    if len(queue.keys) != n * _KEY_BYTES:
        raise ValueError("a torn plan file")
    return queue


def _fingerprint(settings: Settings) -> str:
    """What planning depends on besides the file's bytes."""
    versions = " ".join(metadata.version(package) for package in ("promptfleet", "genai-prices"))  # validation, prices
    digest = hashlib.sha256(f"{FORMAT} {sys.byteorder} {array('q').itemsize} {versions}\n".encode())
    digest.update(settings.model_dump_json().encode())
    for extra in (settings.max_queries_json, settings.prices):
        if extra is not None:
            digest.update(Path(extra).read_bytes() if Path(extra).is_file() else b"-")
    return digest.hexdigest()


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
