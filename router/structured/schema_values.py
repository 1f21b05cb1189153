"""Reading single keyword values: counts, numeric bounds, enum values, literal JSON values.

Kept apart from the converter's traversal so each piece stays small and testable.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from router.structured.errors import Unsatisfiable, UnsupportedSchemaError
from router.structured.gbnf_primitives import (
    ALL_CHARS,
    alternation,
    encode_charset,
    encode_text,
    gbnf_literal,
    of_chars,
    sequence,
    subtract,
)
from router.structured.regex_gbnf import RegexUnsupported, regex_to_gbnf
from router.structured.schema_merge import ARRAY_KEYWORDS, NUMBER_KEYWORDS, OBJECT_KEYWORDS, Schema


def escape_pointer(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def is_type(value: Any, type_name: str) -> bool:
    """JSON Schema's type test for a decoded JSON value (1.0 is an integer, True is not)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    checks = {
        "null": value is None,
        "boolean": isinstance(value, bool),
        "string": isinstance(value, str),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "number": number,
        "integer": number and float(value).is_integer(),
    }
    return checks[type_name]


def count_keyword(schema: Schema, key: str, ptr: str) -> int | None:
    """A non-negative integer keyword such as minLength, or None when absent."""
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UnsupportedSchemaError(f"{ptr}/{key}", "must be a non-negative integer")
    return value


def numeric_bound(schema: Schema, ptr: str, *, integer: bool, lower: bool) -> int | None:
    """The tightest integer bound implied by minimum/exclusiveMinimum (or the maximum pair).

    Integers round any bound inward; other numbers only take integral inclusive bounds.
    """
    inclusive, exclusive = ("minimum", "exclusiveMinimum") if lower else ("maximum", "exclusiveMaximum")
    flag = schema.get(exclusive)
    candidates: list[tuple[Any, bool, str]] = []
    if inclusive in schema:
        candidates.append((schema[inclusive], flag is True, inclusive))  # draft-4 boolean flag
    if flag is not None and not isinstance(flag, bool):
        candidates.append((flag, True, exclusive))
    best: int | None = None
    for value, is_exclusive, key in candidates:
        where = f"{ptr}/{key}"
        if not is_type(value, "number") or not math.isfinite(value):
            raise UnsupportedSchemaError(where, "bound must be a finite number")
        if integer:
            if lower:
                bound = math.floor(value) + 1 if is_exclusive else math.ceil(value)
            else:
                bound = math.ceil(value) - 1 if is_exclusive else math.floor(value)
        elif is_exclusive:
            raise UnsupportedSchemaError(where, "exclusive bounds need type integer")
        elif not float(value).is_integer():
            raise UnsupportedSchemaError(where, "non-integer bounds need type integer")
        else:
            bound = int(value)
        best = bound if best is None else (max(best, bound) if lower else min(best, bound))
    return best


def enum_values(schema: Schema, ptr: str) -> list[Any]:
    """The values allowed by enum and/or const (their intersection when both are present)."""
    values: list[Any] | None = None
    if "enum" in schema:
        if not isinstance(schema["enum"], list) or not schema["enum"]:
            raise UnsupportedSchemaError(f"{ptr}/enum", "enum must be a non-empty list")
        values = schema["enum"]
    if "const" in schema:
        canon = json.dumps(schema["const"], sort_keys=True)
        pool = values if values is not None else [schema["const"]]
        values = [v for v in pool if json.dumps(v, sort_keys=True) == canon]
    if not values:
        raise Unsatisfiable(ptr, "enum and const have no value in common")
    return values


def literal_allowed(value: Any, schema: Schema, types: list[str] | None, ptr: str) -> bool:
    """Whether an enum/const value also meets its sibling keywords."""
    if types is not None and not any(is_type(value, t) for t in types):
        return False
    for kind, keywords in (("object", OBJECT_KEYWORDS), ("array", ARRAY_KEYWORDS)):
        if is_type(value, kind) and set(schema) & keywords:
            raise UnsupportedSchemaError(ptr, f"enum/const {kind}s with {kind} keywords")
    if isinstance(value, str):
        return _string_allowed(value, schema, ptr)
    if is_type(value, "number"):
        return _number_allowed(value, schema, ptr)
    return True


def _string_allowed(value: str, schema: Schema, ptr: str) -> bool:
    lo = count_keyword(schema, "minLength", ptr) or 0
    hi = count_keyword(schema, "maxLength", ptr)
    if len(value) < lo or (hi is not None and len(value) > hi):
        return False
    if "pattern" in schema:
        try:
            regex_to_gbnf(schema["pattern"])  # only the subset where Python's re agrees
            return re.search(schema["pattern"], value, re.ASCII) is not None
        except (RegexUnsupported, re.error, TypeError) as exc:
            raise UnsupportedSchemaError(f"{ptr}/pattern", str(exc)) from exc
    return True


def _number_allowed(value: float, schema: Schema, ptr: str) -> bool:
    for key in sorted(NUMBER_KEYWORDS & set(schema)):
        bound = schema[key]
        if isinstance(bound, bool) and key.startswith("exclusive"):
            continue
        if not is_type(bound, "number"):
            raise UnsupportedSchemaError(f"{ptr}/{key}", "bound must be a number")
        strict = schema.get("exclusive" + key[0].upper() + key[1:]) is True
        if key == "minimum" and (value < bound or (strict and value == bound)):
            return False
        if key == "maximum" and (value > bound or (strict and value == bound)):
            return False
        if (key == "exclusiveMinimum" and value <= bound) or (key == "exclusiveMaximum" and value >= bound):
            return False
    return True


def json_literal(value: Any, ptr: str) -> str:
    """GBNF for one JSON value, with the usual bounded whitespace inside objects and arrays."""
    if isinstance(value, dict):
        members = [
            sequence(json_literal(k, ptr), "ws", '":"', "ws", json_literal(v, ptr)) for k, v in value.items()
        ]
        return _container('"{"', members, '"}"')
    if isinstance(value, list):
        return _container('"["', [json_literal(v, ptr) for v in value], '"]"')
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UnsupportedSchemaError(ptr, f"value is not JSON: {exc}") from exc
    return gbnf_literal(text)


def _container(open_: str, items: list[str], close: str) -> str:
    body: list[str] = []
    for i, item in enumerate(items):
        body += [item] if i == 0 else ["ws", '","', "ws", item]
    return sequence(open_, "ws", *body, *(["ws"] if body else []), close)


def key_contents_excluding(names: list[str]) -> str:
    """Canonical JSON-string contents whose decoded value is none of `names` (a trie complement).

    Extra properties use this for their keys so they can never repeat a declared property.
    """
    trie: dict[str, Any] = {}
    for name in names:
        node = trie
        for ch in name:
            node = node.setdefault(ch, {})
        node[""] = {}  # end marker: a character is never empty

    def expr(node: dict[str, Any]) -> str:
        alts = [] if "" in node else ['""']
        children = sorted(c for c in node if c)
        for ch in children:
            alts.append(sequence(gbnf_literal(encode_text(ch)), expr(node[ch])))
        others = encode_charset(subtract(ALL_CHARS, of_chars(children)))
        alts.append(sequence(others, "json-kchar*"))
        return alternation(alts)

    return expr(trie)
