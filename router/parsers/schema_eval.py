"""Compile and evaluate a ``response_schema``: JSON Schema plus Hugging Face's ``x-regex`` keywords.

Compiling up front validates the config once (bad regexes and unknown ``x-`` keywords fail at
startup, named by JSON pointer) and keeps per-request parsing to plain regex calls.

Semantics, per node: ``const`` wins; ``x-regex`` searches the input (DOTALL) and keeps the named
groups as a dict, else group 1, else the whole match; ``x-regex-iterator`` turns every match into an
array item; ``x-regex-key-value`` builds an object from ``key``/``value`` named groups;
``x-parser`` (``json`` or ``gemma4-tool-call``) decodes text; then ``type`` shapes the result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from router.parsers.gemma_args import GemmaArgumentsError, parse_gemma_arguments

X_KEYWORDS = frozenset({"x-regex", "x-regex-iterator", "x-regex-key-value", "x-parser"})
PARSERS = frozenset({"json", "gemma4-tool-call"})
TYPES = frozenset({"string", "integer", "number", "boolean", "object", "array", "null", "any"})
_MISSING: Any = object()


class KeyValueObject(dict[str, Any]):
    """Object built by ``x-regex-key-value``: its values are raw text, typed later from tools."""


class RawText(str):
    """Text that should have decoded as JSON but did not; kept so nothing is lost."""

    __slots__ = ()


@dataclass(frozen=True)
class SchemaNode:
    """One validated schema node with its regexes compiled."""

    pointer: str
    types: tuple[str, ...] = ()
    const: Any = _MISSING
    regex: re.Pattern[str] | None = None
    iterator: re.Pattern[str] | None = None
    key_value: re.Pattern[str] | None = None
    parser: str | None = None
    properties: Mapping[str, SchemaNode] = field(default_factory=dict)
    items: SchemaNode | None = None
    additional: bool | SchemaNode = False
    alternatives: tuple[SchemaNode, ...] = ()

    @property
    def has_const(self) -> bool:
        return self.const is not _MISSING

    @property
    def is_simple_capture(self) -> bool:
        """True when the value is a plain substring of the input (so its span can be tracked)."""
        return (
            self.types == ("string",)
            and self.regex is not None
            and not self.regex.groupindex
            and self.iterator is None
            and self.key_value is None
            and self.parser is None
            and not self.has_const
        )


def _pointer(base: str, *tokens: str) -> str:
    escaped = (token.replace("~", "~0").replace("/", "~1") for token in tokens)
    return base + "".join("/" + token for token in escaped)


def _fail(pointer: str, message: str) -> ValueError:
    return ValueError(f"invalid response_schema at {pointer or '/'}: {message}")


def _compile_regex(schema: Mapping[str, Any], key: str, pointer: str) -> re.Pattern[str] | None:
    pattern = schema.get(key)
    if pattern is None:
        return None
    where = _pointer(pointer, key)
    if not isinstance(pattern, str):
        raise _fail(where, "must be a string")
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise _fail(where, f"bad regex: {exc}") from exc


def _types(schema: Mapping[str, Any], pointer: str) -> tuple[str, ...]:
    raw = schema.get("type")
    if raw is None:
        return ()
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise _fail(_pointer(pointer, "type"), "must be a string or a list of strings")
    unknown = [name for name in names if name not in TYPES]
    if unknown:
        raise _fail(_pointer(pointer, "type"), f"unknown type {unknown[0]!r}")
    return tuple(names)


def compile_schema(schema: Any, pointer: str = "") -> SchemaNode:
    """Validate ``schema`` and compile it; raises ValueError naming the JSON pointer at fault."""
    if not isinstance(schema, Mapping):
        raise _fail(pointer, "a schema must be an object")
    for key in schema:
        if isinstance(key, str) and key.startswith("x-") and key not in X_KEYWORDS:
            # x-parser-args (JMESPath transforms) included: silently ignoring it would mis-parse.
            raise _fail(_pointer(pointer, key), f"unsupported keyword {key!r}")
    types = _types(schema, pointer)
    iterator = _compile_regex(schema, "x-regex-iterator", pointer)
    if iterator is not None and types and "array" not in types:
        raise _fail(_pointer(pointer, "x-regex-iterator"), "needs type 'array'")
    key_value = _compile_regex(schema, "x-regex-key-value", pointer)
    if key_value is not None:
        if types and "object" not in types:
            raise _fail(_pointer(pointer, "x-regex-key-value"), "needs type 'object'")
        if not {"key", "value"} <= set(key_value.groupindex):
            raise _fail(_pointer(pointer, "x-regex-key-value"), "needs named groups 'key' and 'value'")
    parser = schema.get("x-parser")
    if parser is not None and parser not in PARSERS:
        raise _fail(_pointer(pointer, "x-parser"), f"unknown parser {parser!r}")
    raw_properties = schema.get("properties", {})
    if not isinstance(raw_properties, Mapping):
        raise _fail(_pointer(pointer, "properties"), "must be an object")
    properties = {
        str(name): compile_schema(sub, _pointer(pointer, "properties", str(name)))
        for name, sub in raw_properties.items()
    }
    items = schema.get("items")
    additional = schema.get("additionalProperties", False)
    alternatives: list[SchemaNode] = []
    for key in ("oneOf", "anyOf"):
        options = schema.get(key, [])
        if not isinstance(options, list):
            raise _fail(_pointer(pointer, key), "must be a list")
        alternatives.extend(
            compile_schema(option, _pointer(pointer, key, str(index))) for index, option in enumerate(options)
        )
    return SchemaNode(
        pointer=pointer,
        types=types,
        const=schema.get("const", _MISSING),
        regex=_compile_regex(schema, "x-regex", pointer),
        iterator=iterator,
        key_value=key_value,
        parser=parser,
        properties=properties,
        items=None if items is None else compile_schema(items, _pointer(pointer, "items")),
        additional=(
            additional
            if isinstance(additional, bool)
            else compile_schema(additional, _pointer(pointer, "additionalProperties"))
        ),
        alternatives=tuple(alternatives),
    )


def capture(match: re.Match[str]) -> Any:
    """A match's value: its named groups, else group 1, else the whole match."""
    if match.re.groupindex:
        return {name: value for name, value in match.groupdict().items() if value is not None}
    return match.group(1) if match.re.groups else match.group(0)


def _decode(text: str, parser: str) -> Any:
    try:
        if parser == "gemma4-tool-call":
            return parse_gemma_arguments(text)
        return json.loads(text)
    except (ValueError, GemmaArgumentsError):
        return RawText(text)


def _scalar(value: Any, kind: str) -> Any:
    if kind == "string":
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        return True if lowered in {"true", "1"} else False if lowered in {"false", "0"} else None
    if isinstance(value, bool):
        return None
    if kind == "integer" and isinstance(value, int):
        return value
    if kind == "number" and isinstance(value, int | float):
        return value
    try:
        return int(value) if kind == "integer" else float(value)
    except (TypeError, ValueError):
        return None


def _object(value: Any, node: SchemaNode) -> Any:
    if isinstance(value, str) and not node.properties:
        if isinstance(value, RawText):
            return value
        try:
            decoded = json.loads(value)
        except ValueError:
            return RawText(value)
        return decoded if isinstance(decoded, dict) else RawText(value)
    if isinstance(value, dict) and not node.properties:
        return value
    if isinstance(value, list) and not node.properties:
        return RawText(json.dumps(value, ensure_ascii=False))  # JSON, but not an object
    source: Mapping[str, Any] | None = value if isinstance(value, dict) else None
    if source is None and not isinstance(value, str):
        return None
    result: dict[str, Any] = KeyValueObject() if isinstance(value, KeyValueObject) else {}
    for name, sub in node.properties.items():
        item = evaluate(source.get(name) if source is not None else value, sub)
        if item is not None and item != []:
            result[name] = item
    if source is not None and node.additional is not False:
        for name, item in source.items():
            if name in node.properties or name in result:
                continue
            extra = item if node.additional is True else evaluate(item, node.additional)
            if extra is not None:
                result[name] = extra
    return result


def _typed(value: Any, node: SchemaNode) -> Any:
    for kind in node.types or ("any",):
        if kind == "any":
            result = value
        elif kind == "null":
            result = None
        elif kind == "array":
            if not isinstance(value, list):
                continue
            item_node = node.items
            items = (evaluate(item, item_node) if item_node else item for item in value)
            result = [item for item in items if item is not None]
        elif kind == "object":
            result = _object(value, node)
        else:
            result = _scalar(value, kind)
        if result is not None:
            return result
    return None


def evaluate(value: Any, node: SchemaNode) -> Any:
    """Apply ``node`` to ``value`` (the text or an already decoded value); None when absent."""
    if node.has_const:
        return node.const
    if value is None:
        return None
    if node.regex is not None:
        if not isinstance(value, str):
            return None
        match = node.regex.search(value)
        if match is None:
            return None
        value = capture(match)
        if value is None:
            return None
    if node.iterator is not None:
        if not isinstance(value, str):
            return None
        value = [capture(match) for match in node.iterator.finditer(value)]
        value = [item for item in value if item is not None]
        if not value:
            return None
    if node.key_value is not None:
        if not isinstance(value, str):
            return None
        pairs = (match.groupdict() for match in node.key_value.finditer(value))
        value = KeyValueObject(
            (pair["key"], pair["value"])
            for pair in pairs
            if pair["key"] is not None and pair["value"] is not None
        )
    if node.parser is not None and isinstance(value, str):
        value = _decode(value, node.parser)
        if isinstance(value, RawText):
            return value
    if node.alternatives and not node.types:
        for option in node.alternatives:
            result = evaluate(value, option)
            if result is not None:
                return result
        return None
    return _typed(value, node)
