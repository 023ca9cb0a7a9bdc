"""Scorers: small functions that add score keys to each answered record (prompto's
`match` and `includes`, plus the user's own).

A scorer takes the completed record and returns a dict of new keys (returning the whole
record, prompto's style, works too). Name one by its built-in name, a
`promptfleet.core.scorers` entry point of an installed package, or `module.path:function`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

Scorer = Callable[[dict[str, Any]], dict[str, Any]]
log = logging.getLogger("promptfleet.core.scorers")


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


def scorer_problem(name: str) -> str | None:
    """Why `name` cannot be loaded as a scorer, in one line for people; None when it can."""
    module = name.partition(":")[0]
    try:
        scorer = load_scorer(name)
    except ModuleNotFoundError as error:
        if error.name and module.split(".")[0] == error.name.split(".")[0]:
            return (
                f"cannot import module {module!r}: a module in the current folder needs PYTHONPATH=. "
                "(e.g. `PYTHONPATH=. promptfleet run ...`), otherwise install the package that has it"
            )
        return f"importing {module!r} failed: {error}"
    except AttributeError:
        return f"module {module!r} has no function {name.partition(':')[2]!r}"
    except ValueError as error:  # not built in, not an entry point, not module:function
        return str(error)
    except Exception as error:  # noqa: BLE001 - the user's module may raise anything at import
        return f"{type(error).__name__}: {error}"
    return None if callable(scorer) else f"{name} is not a function"


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
