"""One chat choice's generated text turned into OpenAI message fields, streamed and final.

Two parsers sit behind the same interface: the Hermes/`<think>` parser (router/parsers/hermes.py) for
configs without a `response_schema`, and the config's `response_schema` (router/parsers/). Both yield
OpenAI `delta` objects while streaming and the final `message` at the end; reasoning goes out under
both names clients read (`reasoning_content`, as llama-server, and `reasoning`, as vLLM), or not at
all when the request drops it. A choice that made tool calls finishes with `tool_calls`; one cut inside
a call (max_tokens) finishes with `length` and the call's raw text as content.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from router.parsers import ParsedDelta, ResponseSchemaParser, StreamingResponseParser, new_tool_call_id
from router.parsers.hermes import Piece, ToolCallParser
from shared.protocol import FINISH_STOP

FINISH_TOOL_CALLS = "tool_calls"


def reasoning_fields(text: str) -> dict[str, str]:
    return {"reasoning_content": text, "reasoning": text}


class ChoiceOutput(ABC):
    """Parses one choice; `feed` per text delta, `finish` once, then `message`."""

    def __init__(self, include_reasoning: bool) -> None:
        self.include_reasoning = include_reasoning

    @abstractmethod
    def feed(self, text: str) -> list[dict[str, Any]]:
        """The OpenAI deltas that `text` makes certain."""

    @abstractmethod
    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The last deltas, and the finish reason to report."""

    @abstractmethod
    def message(self) -> dict[str, Any]:
        """The complete assistant message (after `finish`)."""


class HermesOutput(ChoiceOutput):
    def __init__(self, parse_tools: bool, reasoning_open: bool, include_reasoning: bool = True) -> None:
        super().__init__(include_reasoning)
        self.parser = ToolCallParser(parse_tools, reasoning_open, new_id=new_tool_call_id)

    def _deltas(self, pieces: list[Piece]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for piece in pieces:
            if piece.content is not None:
                out.append({"content": piece.content})
            elif piece.reasoning is not None:
                if self.include_reasoning:
                    out.append(reasoning_fields(piece.reasoning))
            elif piece.call is not None and piece.opens_call:
                call = piece.call
                function = {"name": call.name, "arguments": ""}
                entry = {"index": call.index, "id": call.id, "type": "function", "function": function}
                out.append({"tool_calls": [entry]})
            elif piece.call is not None and piece.arguments:
                entry = {"index": piece.call.index, "function": {"arguments": piece.arguments}}
                out.append({"tool_calls": [entry]})
        return out

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(self.parser.feed(text)) if text else []

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        deltas = self._deltas(self.parser.finish())
        if self.parser.cut_call:
            deltas.append({"content": self.parser.cut_call})
        if finish_reason == FINISH_STOP and self.parser.complete_calls:
            finish_reason = FINISH_TOOL_CALLS
        return deltas, finish_reason

    def message(self) -> dict[str, Any]:
        parser = self.parser
        content = parser.content + (parser.cut_call or "")
        message: dict[str, Any] = {"role": "assistant", "content": content}
        calls = parser.complete_calls
        if calls:
            message["content"] = content if content.strip() else None
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in calls
            ]
        if parser.reasoning and self.include_reasoning:
            message.update(reasoning_fields(parser.reasoning))
        return message


def _valid_arguments(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments), dict)
    except ValueError:
        return False


class SchemaOutput(ChoiceOutput):
    """Parsing with the config's response_schema (tool calls are emitted whole)."""

    def __init__(
        self,
        parser: ResponseSchemaParser,
        prefix: str,
        tools: Sequence[Mapping[str, Any]] | None,
        include_reasoning: bool = True,
    ) -> None:
        super().__init__(include_reasoning)
        self._stream = StreamingResponseParser(parser, prefix=prefix, tools=tools)
        self._raw = ""
        self._cut = False

    def _deltas(self, parsed: list[ParsedDelta]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for delta in parsed:
            if delta.reasoning_content is not None:
                if self.include_reasoning:
                    out.append(reasoning_fields(delta.reasoning_content))
            elif delta.tool_call is not None or delta.content is not None:
                out.append(delta.to_openai())
        return out

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._raw += text
        return self._deltas(self._stream.feed(text)) if text else []

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        deltas = self._deltas(self._stream.finish())
        message = self._stream.message
        invalid = message.tool_call_parse_error or not all(
            _valid_arguments(call["function"]["arguments"]) for call in message.tool_calls
        )
        if finish_reason != FINISH_STOP and invalid:
            self._cut = True
            deltas = [d for d in deltas if "tool_calls" not in d]
        elif finish_reason == FINISH_STOP and message.tool_calls:
            finish_reason = FINISH_TOOL_CALLS
        return deltas, finish_reason

    def message(self) -> dict[str, Any]:
        parsed = self._stream.message
        if self._cut:
            return {"role": "assistant", "content": self._raw}
        message = parsed.to_openai()
        reasoning = message.pop("reasoning_content", None)
        if reasoning is not None and self.include_reasoning:
            message.update(reasoning_fields(reasoning))
        return message
