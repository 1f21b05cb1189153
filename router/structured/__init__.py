"""Grammars (llama.cpp GBNF) for constrained generation: JSON Schema -> GBNF, `response_format` and the raw
`grammar` field (response_format.py), and grammars that make tool calls valid (tool_grammar.py)."""

from router.structured.gbnf_builder import GrammarBuilder
from router.structured.json_schema import (
    UnsupportedSchemaError,
    add_schema,
    json_object_gbnf,
    schema_rules,
    schema_to_gbnf,
)

__all__ = [
    "GrammarBuilder",
    "UnsupportedSchemaError",
    "add_schema",
    "json_object_gbnf",
    "schema_rules",
    "schema_to_gbnf",
]
