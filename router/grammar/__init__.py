"""Grammars (llama.cpp GBNF) for constrained generation: JSON Schema and JSON-object output."""

from router.grammar.gbnf_builder import GrammarBuilder
from router.grammar.json_schema import (
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
