"""Scorers: small functions that add score keys to each answered record (prompto's
`match` and `includes`, plus the user's own).

A scorer takes the completed record and returns a dict of new keys (returning the whole
record, prompto's style, works too). Name one by its built-in name, a
`promptfleet.scorers` entry point of an installed package, or `module.path:function`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

Scorer = Callable[[dict[str, Any]], dict[str, Any]]
log = logging.getLogger("promptfleet.scorers")


def match(record: dict[str, Any]) -> dict[str, Any]:
    """True when the response equals `expected_response`."""
    return {"match": record.get("response") == record.get("expected_response")}


def includes(record: dict[str, Any]) -> dict[str, Any]:
    """True when `expected_response` occurs in the response."""
    expected, response = record.get("expected_response"), record.get("response")
    return {"includes": isinstance(expected, str) and isinstance(response, str) and expected in response}


BUILTIN: dict[str, Scorer] = {"match": match, "includes": includes}


def load_scorer(name: str) -> Scorer:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    found = {ep.name: ep for ep in entry_points(group="promptfleet.scorers")}
    if name in found:
        return found[name].load()
    raise ValueError(f"unknown scorer {name!r}: use {', '.join(BUILTIN)}, an entry point, or module:function")


def apply(scorers: list[Scorer], record: dict[str, Any]) -> dict[str, Any]:
    """New keys from every scorer; a scorer that raises is reported in `score_errors`, not fatal."""
    scores: dict[str, Any] = {}
    for scorer in scorers:
        try:
            result = scorer(dict(record))
        except Exception as err:  # noqa: BLE001 - a user's scorer must not lose the answer
            scores.setdefault("score_errors", {})[getattr(scorer, "__name__", str(scorer))] = f"{type(err).__name__}: {err}"
            continue
        scores.update({k: v for k, v in (result or {}).items() if k not in record or record[k] != v})
    return scores
