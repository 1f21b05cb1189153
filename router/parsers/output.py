"""One chat choice's generated text turned into typed output: deltas while streaming, a message at the end.

Two parsers sit behind the same interface: the Hermes/`<think>` parser (router/parsers/hermes.py) for
configs without a `response_schema`, and the config's `response_schema` (router/parsers/response_schema.py).
Both yield `OutputDelta`s (content, reasoning, a tool call's opening or argument text, or the raw text of a
call the output ended inside) and a final `OutputMessage`; chat completions (router/endpoints/chat_format.py)
and the Responses API (router/endpoints/responses_events.py) each format those in their own shapes. A
choice that made tool calls finishes with `tool_calls`; one cut inside a call (max_tokens) finishes with
`length` and keeps the call's raw text.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.parsers import IncrementalSchemaParser, ParsedDelta, ResponseSchemaParser, new_tool_call_id
from router.parsers.hermes import Piece, ToolCallParser
from shared.protocol import FINISH_STOP

FINISH_TOOL_CALLS = "tool_calls"


@dataclass(frozen=True)
class CallDelta:
    """Part of tool call `index`: its first delta carries `id` and `name`, later ones more `arguments`."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None
    type: str = "function"

    @property
    def opens(self) -> bool:
        return self.id is not None


@dataclass(frozen=True)
class OutputDelta:
    """One piece of a choice's output; exactly one field is set."""

    content: str | None = None
    reasoning: str | None = None
    call: CallDelta | None = None
    cut_call: str | None = None  # the raw text of a tool call the output ended inside (max_tokens)


@dataclass(frozen=True)
class OutputCall:
    id: str
    name: str
    arguments: str  # a JSON string
    type: str = "function"


@dataclass(frozen=True)
class OutputMessage:
    """The complete output of a choice. `content` is None only beside tool calls."""

    content: str | None
    reasoning: str | None = None
    tool_calls: tuple[OutputCall, ...] = ()
    role: str = "assistant"


class ChoiceOutput(ABC):
    """Parses one choice; `feed` per text delta, `finish` once, then `message`."""

    @abstractmethod
    def feed(self, text: str) -> list[OutputDelta]:
        """The deltas that `text` makes certain."""

    @abstractmethod
    def finish(self, finish_reason: str | None) -> tuple[list[OutputDelta], str | None]:
        """The last deltas, and the finish reason to report."""

    @abstractmethod
    def message(self) -> OutputMessage:
        """The complete output (after `finish`)."""


class HermesOutput(ChoiceOutput):
    def __init__(self, parse_tools: bool, reasoning_open: bool) -> None:
        self.parser = ToolCallParser(parse_tools, reasoning_open, new_id=new_tool_call_id)

    @staticmethod
    def _deltas(pieces: list[Piece]) -> list[OutputDelta]:
        out: list[OutputDelta] = []
        for piece in pieces:
            if piece.content is not None:
                out.append(OutputDelta(content=piece.content))
            elif piece.reasoning is not None:
                out.append(OutputDelta(reasoning=piece.reasoning))
            elif piece.call is not None and piece.opens_call:
                call = piece.call
                out.append(OutputDelta(call=CallDelta(call.index, "", call.id, call.name)))
            elif piece.call is not None and piece.arguments:
                out.append(OutputDelta(call=CallDelta(piece.call.index, piece.arguments)))
        return out

    def feed(self, text: str) -> list[OutputDelta]:
        return self._deltas(self.parser.feed(text)) if text else []

    def finish(self, finish_reason: str | None) -> tuple[list[OutputDelta], str | None]:
        deltas = self._deltas(self.parser.finish())
        if self.parser.cut_call:
            deltas.append(OutputDelta(cut_call=self.parser.cut_call))
        if finish_reason == FINISH_STOP and self.parser.complete_calls:
            finish_reason = FINISH_TOOL_CALLS
        return deltas, finish_reason

    def message(self) -> OutputMessage:
        parser = self.parser
        content: str | None = parser.content + (parser.cut_call or "")
        calls = tuple(OutputCall(c.id, c.name, c.arguments) for c in parser.complete_calls)
        if calls and not (content or "").strip():
            content = None
        return OutputMessage(content, parser.reasoning or None, calls)


def _valid_arguments(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments), dict)
    except ValueError:
        return False


class SchemaOutput(ChoiceOutput):
    """Parsing with the config's response_schema (tool calls are emitted whole)."""

    def __init__(
        self, parser: ResponseSchemaParser, prefix: str, tools: Sequence[Mapping[str, Any]] | None
    ) -> None:
        self._incremental = IncrementalSchemaParser(parser, prefix=prefix, tools=tools)
        self._raw = ""
        self._cut = False

    @staticmethod
    def _deltas(parsed: list[ParsedDelta]) -> list[OutputDelta]:
        out: list[OutputDelta] = []
        for delta in parsed:
            if delta.reasoning_content is not None:
                out.append(OutputDelta(reasoning=delta.reasoning_content))
            elif delta.tool_call is not None:
                call = delta.tool_call
                out.append(
                    OutputDelta(call=CallDelta(call.index, call.arguments, call.id, call.name, call.type))
                )
            elif delta.content is not None:
                out.append(OutputDelta(content=delta.content))
        return out

    def feed(self, text: str) -> list[OutputDelta]:
        self._raw += text
        return self._deltas(self._incremental.feed(text)) if text else []

    def finish(self, finish_reason: str | None) -> tuple[list[OutputDelta], str | None]:
        deltas = self._deltas(self._incremental.finish())
        message = self._incremental.message
        invalid = message.tool_call_parse_error or not all(
            _valid_arguments(call["function"]["arguments"]) for call in message.tool_calls
        )
        if finish_reason != FINISH_STOP and invalid:
            self._cut = True
            deltas = [d for d in deltas if d.call is None]
        elif finish_reason == FINISH_STOP and message.tool_calls:
            finish_reason = FINISH_TOOL_CALLS
        return deltas, finish_reason

    def message(self) -> OutputMessage:
        parsed = self._incremental.message
        if self._cut:
            return OutputMessage(self._raw)
        calls = tuple(
            OutputCall(c["id"], c["function"]["name"], c["function"]["arguments"], c["type"])
            for c in parsed.tool_calls
        )
        content = parsed.content if calls else parsed.content or ""
        return OutputMessage(content, parsed.reasoning_content, calls, parsed.role)
