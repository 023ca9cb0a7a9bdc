"""Structured responses: a record's `response_schema` (a JSON Schema object) asks the
provider for JSON of that shape, and the reply is parsed and validated here with the
`jsonschema` library. In Python, a Pydantic model class stands for its JSON Schema.

A reply that is not JSON or does not match is a retryable failure of kind `schema`: the
engine retries it up to `--max-attempts`, then fails the prompt with the validation
message. Top-level properties become `parsed_<name>` columns of the result table.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from typing import Any

SCHEMA_KEY = "response_schema"
PARSED_KEY = "response_parsed"
_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*)\n\s*```\s*$", re.DOTALL)


class SchemaMismatch(ValueError):
    """A reply that is not JSON, or not JSON of the asked shape."""


def to_json_schema(schema: Any) -> dict[str, Any]:
    """A JSON Schema dict from a dict or a Pydantic model class."""
    if isinstance(schema, dict):
        return schema
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    raise TypeError(f"response_schema must be a JSON Schema object or a Pydantic model class, not {type(schema).__name__}")


def with_schemas(record: dict[str, Any]) -> dict[str, Any]:
    """The record with a Pydantic class in `response_schema` replaced by its JSON Schema,
    ready to be written to an experiment file."""
    if SCHEMA_KEY in record:
        return {**record, SCHEMA_KEY: to_json_schema(record[SCHEMA_KEY])}
    return record


@lru_cache(maxsize=256)
def _validator(canonical: str) -> Any:
    from jsonschema import (
        validators,  # only files that ask for structured replies load it (~0.15 s)
    )

    schema = json.loads(canonical)
    return validators.validator_for(schema)(schema)


def _canonical(schema: dict[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True)


def schema_problem(schema: Any) -> str | None:
    """Why `schema` is not a usable JSON Schema object, if it is not."""
    if not isinstance(schema, dict):
        return f"must be a JSON Schema object, got {type(schema).__name__}"
    from jsonschema import exceptions, validators

    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as err:
        where = "/".join(str(p) for p in err.absolute_path)
        return f"not a valid JSON Schema: {err.message}" + (f" (at {where})" if where else "")
    return None


def schema_problem_for(schema: Any, provider: type) -> str | None:
    """Why a record's schema cannot be used with its provider, if it cannot."""
    if not getattr(provider, "structured_output", False):
        return f"the {provider.api} api cannot honour a response_schema"
    return schema_problem(schema)


def parse_reply(text: str, schema: dict[str, Any]) -> Any:
    """The reply as a JSON value that matches `schema`, or SchemaMismatch saying why not."""
    if match := _FENCE.match(text):  # some models fence JSON even in JSON mode
        text = match.group(1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SchemaMismatch(f"reply is not JSON ({err.msg} at line {err.lineno} column {err.colno}): {text[:200]!r}") from None
    from jsonschema import exceptions

    error = exceptions.best_match(_validator(_canonical(schema)).iter_errors(value))
    if error is not None:
        where = error.json_path
        raise SchemaMismatch(f"reply does not match response_schema: {error.message} (at {where})")
    return value


_COLUMN_TYPES = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}


def parsed_columns(schema: dict[str, Any]) -> dict[str, str]:
    """Top-level properties and their table type: string, integer, number, boolean, or
    json (objects, arrays and anything uncertain are kept as JSON text)."""
    if not isinstance(schema, dict):
        return {}
    columns = {}
    for name, spec in (schema.get("properties") or {}).items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if isinstance(spec, dict) and kind is None and "enum" in spec and all(isinstance(v, str) for v in spec["enum"]):
            kind = "string"
        columns[name] = _COLUMN_TYPES.get(kind, "json") if isinstance(kind, str) else "json"
    return columns


def merge_columns(into: dict[str, str], more: dict[str, str]) -> None:
    """Columns of several schemas in one table; a name typed differently becomes json."""
    for name, kind in more.items():
        into[name] = kind if into.get(name, kind) == kind else "json"


def strict_compatible(schema: dict[str, Any]) -> bool:
    """Whether OpenAI's strict mode can take the schema (every object closed, every
    property required); otherwise it is sent non-strict and only our validation holds."""
    if not isinstance(schema, dict):
        return False
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        if schema.get("additionalProperties") is not False or set(schema.get("required") or []) != set(props):
            return False
        if not all(strict_compatible(p) for p in props.values()):
            return False
    if isinstance(schema.get("items"), dict) and not strict_compatible(schema["items"]):
        return False
    return all(strict_compatible(d) for d in (schema.get("$defs") or {}).values())


def example_instance(schema: dict[str, Any], seed: str = "") -> Any:
    """A small value matching simple schemas, deterministic in `seed`: what the offline
    `test` provider and the local fakes answer when asked for JSON."""
    n = int(hashlib.sha1(seed.encode()).hexdigest()[:6], 16)
    if "enum" in schema:
        return schema["enum"][n % len(schema["enum"])]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object" or "properties" in schema:
        return {k: example_instance(v, f"{seed}/{k}") for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        item = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [example_instance(item, f"{seed}/{i}") for i in range(max(1, schema.get("minItems", 1)))]
    if kind == "integer":
        low, high = schema.get("minimum", 1), schema.get("maximum", 10)
        return low + n % (high - low + 1)
    if kind == "number":
        return float(schema.get("minimum", 0)) + (n % 100) / 100
    if kind == "boolean":
        return bool(n % 2)
    if kind == "null":
        return None
    return f"text {n % 1000}"
