"""Schemas with instances for the JSON Schema -> GBNF tests: (id, schema, strict, valid, invalid).

Valid instances list object keys in declared order (the grammar fixes key order); every valid
and invalid instance is also checked with the jsonschema package.
"""

from __future__ import annotations

import uuid
from typing import Any

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "format": "email"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["value"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}
LINKED = {
    "type": "object",
    "properties": {"v": {"type": "boolean"}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
    "required": ["v", "next"],
    "additionalProperties": False,
}
EVENT = {
    "title": "Event",
    "description": "annotations are ignored",
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$comment": "x",
    "type": "object",
    "properties": {
        "day": {"type": "string", "format": "date", "examples": ["2024-01-01"]},
        "at": {"type": "string", "format": "time", "deprecated": True},
        "ts": {"type": "string", "format": "date-time", "readOnly": True},
        "id": {"type": "string", "format": "uuid", "default": "x"},
    },
    "required": ["day", "at", "ts", "id"],
}

U = str(uuid.UUID(int=0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0))

# (id, schema, strict, valid instances, invalid instances)
CASES: list[tuple[str, dict[str, Any], bool, list[Any], list[Any]]] = [
    (
        "person",
        PERSON,
        False,
        [{"name": "Ann", "age": 0}, {"name": "Bob", "age": 130, "email": "b.c@ex-a.org"}],
        [
            {"name": "Ann"},
            {"name": "", "age": 3},
            {"name": "Ann", "age": 131},
            {"name": "Ann", "age": 3, "x": 1},
            {"name": "Annabelle9", "age": 3},
        ],
    ),
    (
        "nested",
        {
            "type": "object",
            "properties": {
                "user": PERSON,
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            },
            "required": ["user"],
        },
        True,
        [
            {"user": {"name": "A", "age": 1}, "tags": []},
            {"user": {"name": "A", "age": 1}, "tags": ["x", "y"]},
        ],
        [
            {"user": {"name": "A", "age": 1}, "tags": ["a", "b", "c"]},
            {"tags": []},
            {"user": {"name": "A", "age": 1}, "more": 1},
        ],
    ),
    (
        "open-object",
        {"type": "object", "properties": {"a": {"type": "string"}, "ab": {"type": "integer"}}},
        False,
        [{}, {"a": "x"}, {"a": "x", "ab": 1, "b": [1, {"c": None}]}, {"abc": True, "": 1}],
        [{"a": 1}, {"ab": "s"}, {"b": 1, "a": 2}],
    ),
    (
        "map",
        {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
        False,
        [{}, {"x": 1, "y": 2}, {'\u00e9"\\': 3}],
        [{"x": -1}, {"x": "1"}, []],
    ),
    (
        "required-undeclared",
        {"type": "object", "required": ["k"], "additionalProperties": {"type": "boolean"}},
        False,
        [{"k": True}, {"k": False, "z": True}],
        [{}, {"k": 1}, {"z": True}],
    ),
    (
        "tuple-2020",
        {
            "type": "array",
            "prefixItems": [{"type": "string"}, {"type": "number"}],
            "items": False,
            "minItems": 1,
        },
        False,
        [["a"], ["a", 1.5], ["a", -2e3]],
        [[], [1], ["a", 1, 2], ["a", "b"]],
    ),
    (
        "tuple-draft7",
        {"type": "array", "items": [{"const": 1}], "additionalItems": {"type": "string"}},
        False,
        [[], [1], [1, "a", "b"]],
        [[2], [1, 2], ["a"]],
    ),
    (
        "array-bounds",
        {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
        False,
        [[True, False], [True, True, False]],
        [[], [True], [True] * 4, [1, 2]],
    ),
    (
        "pattern",
        {"type": "string", "pattern": "^[A-Z]{2}-\\d{3,4}(x|yz)?$"},
        False,
        ["AB-123", "QQ-9999x", "ZZ-000yz"],
        ["ab-123", "AB-12", "AB-12345", "AB-123y", ""],
    ),
    (
        "formats",
        EVENT,
        False,
        [{"day": "2024-02-29", "at": "23:59:59Z", "ts": "1999-12-31T00:00:00.5+01:30", "id": U}],
        [
            {"day": "2023-02-29", "at": "23:59:59Z", "ts": "1999-12-31T00:00:00Z", "id": U},
            {"day": "2024-13-01", "at": "23:59:59Z", "ts": "1999-12-31T00:00:00Z", "id": U},
            {"day": "2024-01-01", "at": "24:00:00Z", "ts": "1999-12-31T00:00:00Z", "id": U},
            {"day": "2024-01-01", "at": "12:00:00", "ts": "1999-12-31T00:00:00Z", "id": U},
            {"day": "2024-01-01", "at": "12:00:00Z", "ts": "1999-12-31T00:00:00Z", "id": U[:-1]},
        ],
    ),
    (
        "enum",
        {"enum": ["red", 'gr"een', 3, 2.5, None, True, {"a": [1]}]},
        False,
        ["red", 'gr"een', 3, 2.5, None, True, {"a": [1]}],
        ["blue", 4, False, {"a": [2]}],
    ),
    (
        "enum-typed",
        {"type": "string", "enum": ["a", "bb", 1], "maxLength": 1},
        False,
        ["a"],
        ["bb", 1],
    ),
    (
        "anyof",
        {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "integer", "minimum": 10}]},
        False,
        ["", "ab", 10, 999],
        ["abc", 9, 1.5, None],
    ),
    (
        "oneof-tagged",
        {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"kind": {"const": "a"}, "x": {"type": "integer"}},
                    "required": ["kind", "x"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {"kind": {"const": "b"}, "y": {"type": "string"}},
                    "required": ["kind", "y"],
                    "additionalProperties": False,
                },
            ]
        },
        False,
        [{"kind": "a", "x": 1}, {"kind": "b", "y": "s"}],
        [{"kind": "a", "y": "s"}, {"kind": "c", "x": 1}],
    ),
    (
        "anyof-siblings",
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "additionalProperties": False,
            "anyOf": [{"required": ["a"]}, {"required": ["b"]}],
        },
        False,
        [{"a": 1}, {"b": 2}, {"a": 1, "b": 2}],
        [{}],
    ),
    (
        "allof",
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"properties": {"b": {"type": "integer", "maximum": 5}}, "required": ["b"]},
                {"properties": {"a": {"maxLength": 3}}},
            ],
        },
        False,
        [{"a": "abc", "b": 5}, {"a": "", "b": 0, "c": [None]}],
        [{"a": "abcd", "b": 5}, {"a": "abc"}, {"a": "x", "b": 6}, {"b": 1}],
    ),
    (
        "tree",
        TREE,
        False,
        [{"value": 1}, {"value": 1, "children": [{"value": 2, "children": []}, {"value": 3}]}],
        [{"value": 1, "children": [{}]}, {"children": []}],
    ),
    (
        "linked",
        LINKED,
        False,
        [{"v": True, "next": {"v": False, "next": None}}],
        [{"v": True, "next": {"v": False}}],
    ),
    (
        "definitions",
        {
            "definitions": {"month": {"type": "integer", "minimum": 1, "maximum": 12}},
            "type": "array",
            "items": {"$ref": "#/definitions/month"},
        },
        False,
        [[1, 9, 10, 12]],
        [[0], [13], [1.5], [-1], ["1"]],
    ),
    (
        "int-ranges",
        {
            "type": "array",
            "prefixItems": [
                {"type": "integer", "minimum": -20, "maximum": -3},
                {"type": "integer", "exclusiveMinimum": -1, "exclusiveMaximum": 101},
                {"type": "integer", "minimum": 5},
                {"type": "integer", "maximum": -7},
            ],
            "items": False,
            "minItems": 4,
        },
        False,
        [[-20, 0, 5, -7], [-3, 100, 123456, -100]],
        [[-21, 0, 5, -7], [-2, 0, 5, -7], [-3, -1, 5, -7], [-3, 101, 5, -7], [-3, 0, 4, -7], [-3, 0, 5, -6]],
    ),
    (
        "number-ranges",
        {
            "type": "array",
            "prefixItems": [
                {"type": "number", "minimum": 0, "maximum": 1},
                {"type": "number", "minimum": 0},
                {"type": "number", "minimum": -2, "maximum": 3},
            ],
            "items": False,
        },
        False,
        [[0, 1e-5, -2], [1, 7.25, 3.0], [0.5, 0, -0.75], [1.0, 2, 2.999]],
        [[1.5], [-0.1], [0, -1], [0, 0, 3.5], [0, 0, -2.5]],
    ),
    (
        "nullable",
        {
            "type": "object",
            "properties": {
                "a": {"type": ["string", "null"], "maxLength": 1},
                "b": {"type": "integer", "nullable": True},
            },
            "required": ["a", "b"],
        },
        True,
        [{"a": None, "b": None}, {"a": "x", "b": 3}],
        [{"a": "xy", "b": None}, {"a": None, "b": "3"}],
    ),
    ("scalars", {"type": ["boolean", "null"]}, False, [True, False, None], [0, "true", []]),
    ("anything", {"description": "no constraints"}, False, [1, "x", None, [{}], {"a": [1.5e3]}], []),
    (
        "unicode-keys",
        {
            "type": "object",
            "properties": {'cl\u00e9 "q"': {"const": "\u65e5\u672c\n\t"}},
            "additionalProperties": False,
        },
        False,
        [{}, {'cl\u00e9 "q"': "\u65e5\u672c\n\t"}],
        [{'cl\u00e9 "q"': "\u65e5\u672c"}, {"cle": 1}],
    ),
    (
        "strings",
        {
            "type": "array",
            "prefixItems": [
                {"type": "string", "minLength": 2},
                {"type": "string", "pattern": "^[^@\\s]+@[a-z]+\\.(com|org)$"},
            ],
        },
        False,
        [["ab", 'x"y@q.com'], ["\U0001f600\\", "a@b.org"]],
        [["a"], ["ab", "x y@q.com"], ["ab", "x@q.net"]],
    ),
    (
        "ref-with-siblings",
        {"$defs": {"s": {"type": "string", "minLength": 1}}, "$ref": "#/$defs/s", "maxLength": 2},
        False,
        ["a", "ab"],
        ["", "abc", 1],
    ),
]
