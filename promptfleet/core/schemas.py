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

from promptfleet.core.nesting import MAX_DEPTH

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


# A schema is hostile until checked: it comes from shared experiment files, and the
# validator would fetch any `$ref` it cannot resolve inside the schema (http, file://).
REFERENCE_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")
MAX_SCHEMA_PARTS = 10_000  # JSON values in one schema; providers refuse far smaller ones
LOCAL_ONLY = "only references inside the schema are allowed: put it under $defs and refer to it as '#/$defs/NAME'"


def _refuse_retrieval(uri: str) -> Any:
    """The registry's retrieve function: whatever a schema manages to point at outside
    itself is never fetched nor read, even by a path the checks below did not think of."""
    from referencing.exceptions import NoSuchResource

    raise NoSuchResource(ref=uri)


@lru_cache(maxsize=1)
def _registry() -> Any:
    from referencing import Registry

    return Registry(retrieve=_refuse_retrieval)  # type: ignore[call-arg]


@lru_cache(maxsize=256)
def _validator(canonical: str) -> Any:
    from jsonschema import (
        validators,  # only files that ask for structured replies load it (~0.15 s)
    )

    schema = json.loads(canonical)
    return validators.validator_for(schema)(schema, registry=_registry())


def _canonical(schema: dict[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True)


def _walk_problem(schema: dict[str, Any]) -> str | None:
    """Size, depth, and every reference or dialect that could make a validator reach out,
    found without recursion (a schema may be nested thousands of levels)."""
    from jsonschema import validators

    stack: list[tuple[Any, int, str]] = [(schema, 1, "")]
    parts = 0
    while stack:
        value, depth, where = stack.pop()
        parts += 1
        if parts > MAX_SCHEMA_PARTS:
            return f"has more than {MAX_SCHEMA_PARTS} parts; split it or use $defs for repeated shapes"
        if depth > MAX_DEPTH:
            return f"nests more than {MAX_DEPTH} levels deep (at {where[:60]}...); flatten it or use $defs"
        if isinstance(value, list):
            stack.extend((item, depth + 1, f"{where}/{i}") for i, item in enumerate(value))
            continue
        if not isinstance(value, dict):
            continue
        at = f" (at {where})" if where else ""
        for keyword in REFERENCE_KEYWORDS:
            ref = value.get(keyword)
            if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
                return f"{keyword} {str(ref)[:200]!r}{at} points outside the schema; {LOCAL_ONLY} (nothing is fetched or read)"
        if "$schema" in value:
            dialect = value["$schema"]
            if not isinstance(dialect, str) or validators.validator_for({"$schema": dialect}, default=None) is None:
                return f"$schema {str(dialect)[:200]!r}{at} is not a JSON Schema draft this tool knows; remove it or name a published draft"
        stack.extend((item, depth + 1, f"{where}/{key}") for key, item in value.items())
    return None


@lru_cache(maxsize=256)
def _canonical_problem(canonical: str) -> str | None:
    """The checks that need a validator, once per distinct schema of a file."""
    from jsonschema import exceptions, validators
    from referencing.exceptions import Unresolvable

    schema = json.loads(canonical)
    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as err:
        where = "/".join(str(p) for p in err.absolute_path)
        return f"not a valid JSON Schema: {err.message}" + (f" (at {where})" if where else "")
    if problem := _dangling_reference(schema):
        return problem
    validator = _validator(canonical)
    try:  # a $ref loop that consumes nothing recurses forever on any reply
        for probe in (None, example_instance(schema)):
            validator.is_valid(probe)
    except RecursionError:
        return "its $ref chain loops back on itself without ever matching a value; break the loop"
    except Unresolvable as err:
        return f"a $ref cannot be resolved inside the schema ({err}); {LOCAL_ONLY}"
    return None


def _dangling_reference(schema: dict[str, Any]) -> str | None:
    """A local reference that points nowhere, found by walking the schema's resources the
    way the validator will (a nested `$id` changes what `#` means)."""
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import DRAFT202012, specification_with

    dialect = schema.get("$schema")
    specification = specification_with(dialect, default=DRAFT202012) if isinstance(dialect, str) else DRAFT202012
    root = specification.create_resource(schema)
    stack = [(_registry().resolver_with_root(root), root)]
    while stack:
        resolver, resource = stack.pop()
        if isinstance(resource.contents, dict):
            for keyword in REFERENCE_KEYWORDS:
                if isinstance(ref := resource.contents.get(keyword), str):
                    try:
                        resolver.lookup(ref)
                    except Unresolvable:
                        return f"{keyword} {ref[:200]!r} points to nothing inside the schema"
        stack.extend((resolver.in_subresource(sub), sub) for sub in resource.subresources())
    return None


def schema_problem(schema: Any) -> str | None:
    """Why `schema` is not a usable JSON Schema object, if it is not: invalid, too big or
    too deep, or reaching outside itself (any `$ref` but `#...`, an unknown `$schema`)."""
    if not isinstance(schema, dict):
        return f"must be a JSON Schema object, got {type(schema).__name__}"
    if problem := _walk_problem(schema):
        return problem
    return _canonical_problem(_canonical(schema))


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
    except RecursionError:
        raise SchemaMismatch(f"reply is JSON nested too deeply to check: {text[:200]!r}") from None
    from jsonschema import exceptions
    from referencing.exceptions import Unresolvable

    try:
        error = exceptions.best_match(_validator(_canonical(schema)).iter_errors(value))
    except RecursionError:
        raise SchemaMismatch("reply nests too deeply to be checked against response_schema") from None
    except Unresolvable:  # refused by `check`; a schema given through the Python API may still get here
        raise SchemaMismatch(f"response_schema cannot be checked: {schema_problem(schema)}") from None
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


def example_instance(schema: dict[str, Any], seed: str = "", root: Any = None, depth: int = 0) -> Any:
    """A small value matching simple schemas, deterministic in `seed`: what the offline
    `test` provider and the local fakes answer when asked for JSON. Local `#/...`
    references are followed; past a few levels only what is required is made, so a
recursive schema ends."""
    n = int(hashlib.sha1(seed.encode()).hexdigest()[:6], 16)
    root = schema if root is None else root
    if not isinstance(schema, dict):  # `true`, `false`: any value will do
        return f"text {n % 1000}"
    if isinstance(ref := schema.get("$ref"), str) and ref.startswith("#") and depth < 12:
        return example_instance(_pointer(root, ref), seed, root, depth + 1)
    if schema.get("enum") and isinstance(schema["enum"], list):
        return schema["enum"][n % len(schema["enum"])]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object" or "properties" in schema:
        required = schema.get("required") or []
        properties = {k: v for k, v in (schema.get("properties") or {}).items() if depth < 4 or k in required}
        return {k: example_instance(v, f"{seed}/{k}", root, depth + 1) for k, v in properties.items()}
    if kind == "array":
        item = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        count = max(1, schema.get("minItems", 1)) if depth < 4 else schema.get("minItems", 0)  # recursive schemas end
        return [example_instance(item, f"{seed}/{i}", root, depth + 1) for i in range(min(count, 64))]
    if kind == "integer":
        low, high = schema.get("minimum", 1), schema.get("maximum", 10)
        return low + n % max(high - low + 1, 1)
    if kind == "number":
        return float(schema.get("minimum", 0)) + (n % 100) / 100
    if kind == "boolean":
        return bool(n % 2)
    if kind == "null":
        return None
    return f"text {n % 1000}"


def _pointer(root: Any, ref: str) -> Any:
    """The part of `root` a `#/a/b` reference names; {} when it names none (an `#anchor`)."""
    node = root
    for token in ref.removeprefix("#").split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return {}
    return node
