"""How deep a record may nest: JSON from shared files must not reach Python's recursion
limit (json, pydantic, jsonschema and the SDKs all recurse), so a record nested deeper
than MAX_DEPTH is refused at validation with the field that holds the nesting.

The walks here are iterative and stop at the limit, so a hostile record costs at most
MAX_DEPTH steps down before it is refused.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 100  # JSON levels in one record; real prompts, parameters and schemas use < 20


def deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests more than `limit` levels of objects and arrays."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def too_deep_field(record: dict[str, Any], text: str | bytes | None = None) -> str | None:
    """The first key of `record` whose value nests beyond MAX_DEPTH, if any. `text`, the
    line it was read from, lets the common case skip the walk: a line with at most
    MAX_DEPTH brackets cannot nest deeper."""
    if text is not None and _brackets(text) <= MAX_DEPTH:
        return None
    return next((key for key, value in record.items() if deeper_than(value, MAX_DEPTH - 1)), None)


def _brackets(text: str | bytes) -> int:
    if isinstance(text, bytes):
        return text.count(b"[") + text.count(b"{")
    return text.count("[") + text.count("{")


def field_too_deep_in_text(text: str) -> str | None:
    """The top-level key under which JSON `text` nests beyond MAX_DEPTH, found without
    parsing it (for a line the json module itself gave up on); None when not an object."""
    depth, key, last_string, in_string, escaped, start = 0, None, None, False, False, 0
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
                last_string = text[start : i + 1]
            continue
        if char == '"':
            in_string, start = True, i
        elif char == ":" and depth == 1:
            key = last_string
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return _decoded(key)
        elif char in "]}":
            depth -= 1
    return None


def _decoded(key: str | None) -> str | None:
    import json

    try:
        return json.loads(key) if key else None
    except ValueError:
        return None
