"""Parse model output into OpenAI message fields with a model config's ``response_schema``."""

from router.parsing.response_schema import (
    FunctionCallDict,
    ParsedMessage,
    ResponseSchemaParser,
    ToolCallDict,
    new_tool_call_id,
)
from router.parsing.streaming import ParsedDelta, StreamingResponseParser, ToolCallDelta

__all__ = [
    "FunctionCallDict",
    "ParsedDelta",
    "ParsedMessage",
    "ResponseSchemaParser",
    "StreamingResponseParser",
    "ToolCallDelta",
    "ToolCallDict",
    "new_tool_call_id",
]
