"""Model output split into reasoning, content and tool calls: the Hermes/``<think>`` parser (hermes.py), the
config's ``response_schema`` (response_schema.py, incremental.py), and one interface over both (output.py)."""

from router.parsers.incremental import IncrementalSchemaParser, ParsedDelta, ToolCallDelta
from router.parsers.response_schema import (
    FunctionCallDict,
    ParsedMessage,
    ResponseSchemaParser,
    ToolCallDict,
    new_tool_call_id,
)

__all__ = [
    "FunctionCallDict",
    "IncrementalSchemaParser",
    "ParsedDelta",
    "ParsedMessage",
    "ResponseSchemaParser",
    "ToolCallDelta",
    "ToolCallDict",
    "new_tool_call_id",
]
