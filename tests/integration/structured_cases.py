"""Requests for the structured-output tests: tools with varied parameter schemas, and 20 response schemas.

Every string is bounded (maxLength, enum, pattern or format) and every array has maxItems, so each
grammar admits only finitely long answers: a base model that never stops on its own still ends within
max_tokens, with finish_reason "stop".
"""

from __future__ import annotations

from typing import Any

GEMMA = "gemma-3-270m"
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}
FLIGHT = {
    "name": "book_flight",
    "description": "Book a flight",
    "parameters": {
        "type": "object",
        "properties": {
            "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "date": {"type": "string", "format": "date"},
            "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
            "cabin": {"type": "string", "enum": ["economy", "business"]},
        },
        "required": ["origin", "destination", "date", "passengers"],
    },
}
SEARCH = {
    "name": "search_products",
    "description": "Search the catalogue",
    "parameters": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": 40},
            "filters": {
                "type": "object",
                "properties": {
                    "max_price": {"type": "number", "minimum": 0, "maximum": 10000},
                    "in_stock": {"type": "boolean"},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
                },
                "required": ["in_stock"],
            },
            "limit": {"type": "integer", "minimum": 1, "maximum": 50},
        },
        "required": ["query", "filters"],
    },
}
FUNCTIONS = {f["name"]: f for f in (WEATHER, FLIGHT, SEARCH)}
TOOLS: list[Any] = [{"type": "function", "function": f} for f in FUNCTIONS.values()]
ASK = {
    "get_weather": "What is the weather like in Paris right now?",
    "book_flight": "Book me a flight from Boston to Denver on 2025-03-14 for two people.",
    "search_products": "Find me cheap running shoes that are in stock.",
}


def point(name: str) -> dict[str, Any]:
    return {"type": "integer", "minimum": -100, "maximum": 100, "description": name}


STR = {"type": "string", "maxLength": 20}
SCHEMAS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "person",
        "a person",
        {
            "type": "object",
            "properties": {"name": STR, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"],
        },
    ),
    (
        "address",
        "a person with a postal address",
        {
            "type": "object",
            "properties": {
                "name": STR,
                "address": {
                    "type": "object",
                    "properties": {
                        "street": STR,
                        "city": STR,
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["street", "city", "zip"],
                },
            },
            "required": ["name", "address"],
        },
    ),
    (
        "enums",
        "a paint colour",
        {
            "type": "object",
            "properties": {
                "color": {"enum": ["red", "green", "blue", "yellow"]},
                "finish": {"type": "string", "enum": ["matte", "gloss"]},
            },
            "required": ["color", "finish"],
        },
    ),
    (
        "tags",
        "a blog post's tags",
        {
            "type": "object",
            "properties": {
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1, "maxLength": 10},
                    "minItems": 1,
                    "maxItems": 4,
                }
            },
            "required": ["tags"],
        },
    ),
    (
        "order",
        "an order with line items",
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                            "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                        },
                        "required": ["sku", "qty"],
                    },
                    "minItems": 1,
                    "maxItems": 3,
                }
            },
            "required": ["items"],
        },
    ),
    (
        "flags",
        "a user account's flags",
        {
            "type": "object",
            "properties": {
                "active": {"type": "boolean"},
                "admin": {"type": "boolean"},
                "note": {"type": ["string", "null"], "maxLength": 20},
            },
            "required": ["active", "admin", "note"],
        },
    ),
    (
        "prices",
        "a product's price and discount",
        {
            "type": "object",
            "properties": {
                "price": {"type": "number", "minimum": 0, "maximum": 1000},
                "discount": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["price", "discount"],
        },
    ),
    (
        "meeting",
        "a meeting's date and start time",
        {
            "type": "object",
            "properties": {
                "date": {"type": "string", "format": "date"},
                "time": {"type": "string", "format": "time"},
            },
            "required": ["date", "time"],
        },
    ),
    (
        "record",
        "a database record id and its creation timestamp",
        {
            "type": "object",
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "created": {"type": "string", "format": "date-time"},
            },
            "required": ["id", "created"],
        },
    ),
    (
        "const",
        "an event header",
        {
            "type": "object",
            "properties": {
                "version": {"const": "1.0"},
                "kind": {"const": "event"},
                "count": {"type": "integer", "minimum": 0, "maximum": 9},
            },
            "required": ["version", "kind", "count"],
        },
    ),
    (
        "any-of",
        "a measurement that is a number or a short label",
        {
            "type": "object",
            "properties": {
                "value": {
                    "anyOf": [
                        {"type": "integer", "minimum": 0, "maximum": 100},
                        {"type": "string", "maxLength": 10},
                    ]
                }
            },
            "required": ["value"],
        },
    ),
    (
        "one-of",
        "a circle or a square",
        {
            "type": "object",
            "properties": {
                "shape": {
                    "oneOf": [
                        {
                            "type": "object",
                            "properties": {
                                "kind": {"const": "circle"},
                                "radius": {"type": "integer", "minimum": 1, "maximum": 50},
                            },
                            "required": ["kind", "radius"],
                        },
                        {
                            "type": "object",
                            "properties": {
                                "kind": {"const": "square"},
                                "side": {"type": "integer", "minimum": 1, "maximum": 50},
                            },
                            "required": ["kind", "side"],
                        },
                    ]
                }
            },
            "required": ["shape"],
        },
    ),
    (
        "refs",
        "a line segment between two points",
        {
            "$defs": {
                "point": {
                    "type": "object",
                    "properties": {"x": point("x"), "y": point("y")},
                    "required": ["x", "y"],
                }
            },
            "type": "object",
            "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
            "required": ["start", "end"],
        },
    ),
    (
        "lengths",
        "a four-letter code and a short word",
        {
            "type": "object",
            "properties": {
                "code": {"type": "string", "minLength": 4, "maxLength": 4},
                "word": {"type": "string", "minLength": 2, "maxLength": 8},
            },
            "required": ["code", "word"],
        },
    ),
    (
        "tuple",
        "a 2D point as a pair",
        {
            "type": "object",
            "properties": {
                "point": {
                    "type": "array",
                    "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 99}] * 2,
                    "items": False,
                    "minItems": 2,
                }
            },
            "required": ["point"],
        },
    ),
    (
        "optional",
        "a book with an optional subtitle and page count",
        {
            "type": "object",
            "properties": {
                "title": STR,
                "subtitle": STR,
                "pages": {"type": "integer", "minimum": 1, "maximum": 999},
            },
            "required": ["title"],
        },
    ),
    (
        "top-array",
        "three to five lottery digits",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 3,
            "maxItems": 5,
        },
    ),
    (
        "mixed-enum",
        "a ticket's priority and status",
        {
            "type": "object",
            "properties": {"priority": {"enum": [1, 2, 3]}, "status": {"enum": ["open", "closed", None]}},
            "required": ["priority", "status"],
        },
    ),
    (
        "deep",
        "a deeply nested setting",
        {
            "type": "object",
            "properties": {
                "a": {
                    "type": "object",
                    "properties": {
                        "b": {
                            "type": "object",
                            "properties": {
                                "c": {"type": "object", "properties": {"d": STR}, "required": ["d"]}
                            },
                            "required": ["c"],
                        }
                    },
                    "required": ["b"],
                }
            },
            "required": ["a"],
        },
    ),
    (
        "matrix",
        "a 2x2 matrix of small integers",
        {
            "type": "object",
            "properties": {
                "rows": {
                    "type": "array",
                    "items": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": -9, "maximum": 9},
                        "minItems": 2,
                        "maxItems": 2,
                    },
                    "minItems": 2,
                    "maxItems": 2,
                }
            },
            "required": ["rows"],
        },
    ),
]
