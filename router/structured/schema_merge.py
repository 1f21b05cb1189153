"""Keyword tables, and the shallow merge turning `allOf` (or `$ref` with siblings) into one schema.

The merge is the intersection of the constraints: sub-schemas of a property present on both sides
become a nested `allOf` that the converter resolves lazily, which keeps recursive schemas finite.
"""

from __future__ import annotations

import json
from typing import Any

Schema = dict[str, Any]

ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "example",
        "$schema",
        "$id",
        "id",
        "$comment",
        "$anchor",
        "$dynamicAnchor",
        "$recursiveAnchor",
        "$vocabulary",
        "$defs",
        "definitions",
        "deprecated",
        "readOnly",
        "writeOnly",
        "contentMediaType",
        "contentEncoding",
        "contentSchema",
        "discriminator",
        "xml",
        "externalDocs",
    }
)
OBJECT_KEYWORDS = frozenset(
    {"properties", "required", "additionalProperties", "minProperties", "maxProperties"}
)
ARRAY_KEYWORDS = frozenset({"items", "prefixItems", "additionalItems", "minItems", "maxItems"})
STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern", "format"})
NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
TYPE_NAMES = ("object", "array", "string", "number", "integer", "boolean", "null")

# keyword -> value for which it is a no-op (None: never a no-op)
_UNSUPPORTED: dict[str, Any] = {
    "not": None,
    "patternProperties": {},
    "dependentRequired": {},
    "dependentSchemas": {},
    "dependencies": {},
    "uniqueItems": False,
    "multipleOf": None,
    "contains": None,
    "propertyNames": None,
    "unevaluatedProperties": None,
    "unevaluatedItems": None,
    "$dynamicRef": None,
    "$recursiveRef": None,
}
_EXCLUSIVE = ("exclusiveMinimum", "exclusiveMaximum")
_MIN_KEYWORDS = ("minLength", "minItems", "minProperties", "minimum")
_MAX_KEYWORDS = ("maxLength", "maxItems", "maxProperties", "maximum")


class MergeConflict(ValueError):
    """Two constraints cannot be intersected by this converter."""


class EmptyIntersection(MergeConflict):
    """The constraints contradict each other: no value satisfies both."""


def is_annotation(keyword: str) -> bool:
    return keyword in ANNOTATIONS or keyword.startswith("x-")


def unsupported_keyword(schema: Schema) -> str | None:
    """The first keyword of `schema` whose constraint no grammar here can express, if any."""
    for keyword, noop in _UNSUPPORTED.items():
        if keyword in schema and (noop is None or schema[keyword] != noop):
            return keyword
    if "if" in schema and ("then" in schema or "else" in schema):
        return "if"
    return None


def constraints(schema: Schema) -> Schema:
    """`schema` without annotations (what affects validity)."""
    return {k: v for k, v in schema.items() if not is_annotation(k)}


def fold_nullable(schema: Schema) -> Schema:
    """Replace OpenAPI `nullable` by a "null" entry in `type` (without `type` it has no effect)."""
    if "nullable" not in schema:
        return schema
    out = {k: v for k, v in schema.items() if k != "nullable"}
    if schema["nullable"] is True and "type" in out:
        types = _type_set(out["type"])
        out["type"] = [t for t in TYPE_NAMES if t in types or t == "null"]
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _type_set(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return set(value)
    raise MergeConflict(f"invalid type {value!r}")


def _merge_types(a: Any, b: Any) -> list[str]:
    left, right = _type_set(a), _type_set(b)
    both = left & right
    if ("integer" in left and "number" in right) or ("integer" in right and "number" in left):
        both.add("integer")
    if not both:
        raise EmptyIntersection("no type satisfies both sides")
    return [t for t in TYPE_NAMES if t in both]


def _merge_enums(a: list[Any], b: list[Any]) -> list[Any]:
    keys = {_canonical(v) for v in b}
    out = [v for v in a if _canonical(v) in keys]
    if not out:
        raise EmptyIntersection("no enum value satisfies both sides")
    return out


def _both(a: Any, b: Any) -> Any:
    """Sub-schema satisfied when both are; `True`/`False` shortcuts, otherwise a lazy allOf."""
    if a is False or b is False:
        return False
    if a is True or a == {}:
        return b
    if b is True or b == {}:
        return a
    if _canonical(a) == _canonical(b):
        return a
    return {"allOf": [a, b]}


def _merge_objects(a: Schema, b: Schema, out: Schema) -> None:
    props_a: Schema = a.get("properties", {})
    props_b: Schema = b.get("properties", {})
    extra_a = a.get("additionalProperties", True)
    extra_b = b.get("additionalProperties", True)
    if props_a or props_b:
        merged: Schema = {}
        for name in [*props_a, *(n for n in props_b if n not in props_a)]:
            merged[name] = _both(props_a.get(name, extra_a), props_b.get(name, extra_b))
        out["properties"] = merged
    if "additionalProperties" in a or "additionalProperties" in b:
        out["additionalProperties"] = _both(extra_a, extra_b)
    required = [*a.get("required", []), *b.get("required", [])]
    if required:
        out["required"] = list(dict.fromkeys(required))


def _merge_arrays(a: Schema, b: Schema, out: Schema) -> None:
    for key in ("prefixItems", "additionalItems"):
        if key in a and key in b and _canonical(a[key]) != _canonical(b[key]):
            raise MergeConflict(f"cannot intersect two different '{key}'")
        if key in a or key in b:
            out[key] = a.get(key, b.get(key))
    if "items" in a and "items" in b:
        if isinstance(a["items"], list) or isinstance(b["items"], list):
            if _canonical(a["items"]) != _canonical(b["items"]):
                raise MergeConflict("cannot intersect two different tuple 'items'")
            out["items"] = a["items"]
        else:
            out["items"] = _both(a["items"], b["items"])
    elif "items" in a or "items" in b:
        out["items"] = a.get("items", b.get("items"))


def merge_schemas(a: Schema, b: Schema) -> Schema:
    """The intersection of two schemas without `$ref`/`allOf` at their top level."""
    a, b = fold_nullable(constraints(a)), fold_nullable(constraints(b))
    out: Schema = {}
    _merge_objects(a, b, out)
    _merge_arrays(a, b, out)
    handled = OBJECT_KEYWORDS - {"minProperties", "maxProperties"} | ARRAY_KEYWORDS
    handled = handled - {"minItems", "maxItems"}
    for key in {*a, *b} - handled:
        if key not in a or key not in b:
            out[key] = a.get(key, b.get(key))
        elif key == "type":
            out[key] = _merge_types(a[key], b[key])
        elif key in ("enum", "const"):
            continue
        elif key in _EXCLUSIVE and _is_number(a[key]) and _is_number(b[key]):
            out[key] = max(a[key], b[key]) if key == "exclusiveMinimum" else min(a[key], b[key])
        elif key in _MIN_KEYWORDS:
            out[key] = max(a[key], b[key])
        elif key in _MAX_KEYWORDS:
            out[key] = min(a[key], b[key])
        elif _canonical(a[key]) == _canonical(b[key]):
            out[key] = a[key]
        else:
            raise MergeConflict(f"cannot intersect two different '{key}'")
    enums = [s["enum"] for s in (a, b) if "enum" in s] + [[s["const"]] for s in (a, b) if "const" in s]
    if enums:
        values = enums[0]
        for other in enums[1:]:
            values = _merge_enums(values, other)
        out.pop("const", None)
        out["enum"] = values
    return out
