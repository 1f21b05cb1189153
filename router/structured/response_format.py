"""Grammars for structured output: `response_format` (json_schema, json_object) and the raw `grammar` field.

Everything is converted to GBNF here, in the router, so a schema the converter cannot express is a 400
naming its JSON pointer before anything is queued. Schemas are converted strictly (properties a schema
does not list are not generated unless it allows them explicitly): every document the grammar accepts
is still valid, and a small model gets fewer ways to wander. When the prompt leaves a reasoning block
open (`<think>`), the grammar is lazy: it starts at the end-of-reasoning marker, so the model reasons
freely and then answers in the format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from router.api.errors import APIError
from router.openai.requests import ResponseFormat
from router.structured import GrammarBuilder, UnsupportedSchemaError, add_schema

# Bounds on the work one request can ask of the (pure-Python, GIL-holding) grammar builder, and on what
# goes to the worker and into llama.cpp's parser: a 5.6 MB schema took 18 s and made 24 MB of grammar.
MAX_SCHEMA_BYTES = 256 << 10
MAX_GRAMMAR_BYTES = 384 << 10  # llama.cpp parses many alternatives of one rule in quadratic time

# Blanks allowed between the end of reasoning and the structured answer.
_MAX_GAP = 4
_REGEX_SPECIAL = frozenset(".^$|()*+?[]{}\\/")


@dataclass(frozen=True)
class GrammarPlan:
    """A grammar for the worker, and the trigger regexes that make it lazy (none: active at once)."""

    grammar: str
    triggers: list[str] = field(default_factory=list)


def check_schema_size(schema: Any, param: str) -> None:
    """400 naming `param` when a schema (or tool list) is too large to convert to a grammar."""
    size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False, default=str))
    if size > MAX_SCHEMA_BYTES:
        raise APIError(
            400,
            f"{param} is {size} bytes of JSON; schemas of at most {MAX_SCHEMA_BYTES} bytes are accepted",
            param=param,
            code="schema_too_large",
        )


def check_grammar_size(grammar: str, param: str) -> None:
    size = len(grammar.encode("utf-8", "surrogatepass"))
    if size > MAX_GRAMMAR_BYTES:
        raise APIError(
            400,
            f"the grammar for {param} is {size} bytes; at most {MAX_GRAMMAR_BYTES} are accepted",
            param=param,
            code="grammar_too_large",
        )


def escape_trigger(literal: str) -> str:
    """A literal as a regex meaning the same to Python `re` and C++ std::regex (ECMAScript)."""
    return "".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in literal)


def gbnf_string(text: str) -> str:
    """A GBNF string literal for `text`."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def after_reasoning(builder: GrammarBuilder, body: str, reasoning_end: str | None) -> GrammarPlan:
    """Renders `root ::= body`, or, when reasoning is open, a lazy grammar starting at its end marker."""
    if reasoning_end is None:
        builder.define(builder.reserve("root"), body)
        return GrammarPlan(builder.render("root"))
    gap = f"[ \\t\\n]{{0,{_MAX_GAP}}}"
    builder.define(builder.reserve("root"), f"{gbnf_string(reasoning_end)} {gap} {body}")
    return GrammarPlan(builder.render("root"), [escape_trigger(reasoning_end)])


def schema_grammar(
    schema: Any, param: str, *, reasoning_end: str | None = None, max_ws: int = 2
) -> GrammarPlan:
    """A grammar for JSON documents valid under `schema`; 400 naming the pointer it cannot express."""
    check_schema_size(schema, param)
    builder = GrammarBuilder(max_ws=max_ws)
    name = schema_rule(builder, schema, "json", param)
    return after_reasoning(builder, name, reasoning_end)


def schema_rule(builder: GrammarBuilder, schema: Any, prefix: str, param: str) -> str:
    """`add_schema` (strict), with what it cannot convert answered as a 400 naming `param`."""
    try:
        return add_schema(builder, schema, prefix, strict=True)
    except UnsupportedSchemaError as error:
        raise APIError(
            400, f"{param} is not supported: {error.pointer}: {error.reason}", param=param
        ) from error
    except (ValueError, RecursionError) as error:
        raise APIError(400, f"{param} cannot be converted to a grammar: {error}", param=param) from error


def json_object_grammar(*, reasoning_end: str | None = None, max_ws: int = 2) -> GrammarPlan:
    builder = GrammarBuilder(max_ws=max_ws)
    return after_reasoning(builder, "json-object", reasoning_end)


def structured_grammar(
    response_format: ResponseFormat | None,
    raw_grammar: str | None,
    *,
    reasoning_end: str | None = None,
    format_param: str = "response_format",
    schema_param: str = "response_format.json_schema.schema",
) -> GrammarPlan | None:
    """The grammar a request asks for through `response_format` or `grammar`, if any.

    Errors name the request's fields `format_param` and `schema_param` (the Responses API calls them
    `text.format` and `text.format.schema`)."""
    wants_format = response_format is not None and response_format.type != "text"
    if raw_grammar and wants_format:
        raise APIError(400, f"grammar and {format_param} cannot be combined", param="grammar")
    if raw_grammar:
        return GrammarPlan(raw_grammar)
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_object_grammar(reasoning_end=reasoning_end)
    spec = response_format.json_schema
    schema = spec.schema_ if spec is not None else None
    if schema is None:
        return json_object_grammar(reasoning_end=reasoning_end)
    return schema_grammar(schema, schema_param, reasoning_end=reasoning_end)
