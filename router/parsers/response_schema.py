"""Turn generated text into an OpenAI assistant message with a model config's ``response_schema``.

The schema (see ``schema_eval``) says where reasoning, content and tool calls sit in the model's
raw output. This module normalises what it extracts into OpenAI's shapes: text fields that are
only whitespace are dropped, and tool-call arguments always become a JSON string (typed from the
request's tool schemas when the model wrote them as raw key/value text).

Pass the generation prompt (what the chat template appended after the last message, e.g.
``<|im_start|>assistant\\n<think>\\n``) as ``prefix``: the schemas' regexes expect to see it.
When the text ends inside a region whose opening marker leaked into a field (output cut off in
the middle of ``<think>...``), the region is closed as if its end marker had been generated, so
a truncated reasoning block stays reasoning instead of turning into content with tags in it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from router.parsers.regex_literals import literal_runs
from router.parsers.schema_eval import (
    KeyValueObject,
    RawText,
    capture,
    compile_schema,
    evaluate,
)

CONTENT = "content"
REASONING = "reasoning_content"
TEXT_FIELDS = (REASONING, CONTENT)
_REASONING_KEYS = (REASONING, "thinking")
_TAG_CHARS = frozenset("<>|[]{}")

ToolIndex = Mapping[str, Mapping[str, Any]]
IdFactory = Callable[[int], str]


class FunctionCallDict(TypedDict):
    name: str
    arguments: str


class ToolCallDict(TypedDict):
    id: str
    type: str
    function: FunctionCallDict


def new_tool_call_id(index: int) -> str:
    """Default tool-call id: random, in OpenAI's ``call_...`` style."""
    del index
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ParsedMessage:
    """An assistant message parsed from generated text."""

    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDict] = field(default_factory=list)
    tool_call_parse_error: bool = False


@dataclass(frozen=True)
class ToolCallFields:
    """A tool call before an id is assigned (compared across re-parses while streaming)."""

    name: str
    arguments: str
    id: str | None = None
    type: str = "function"
    parse_error: bool = False


@dataclass(frozen=True)
class Analysis:
    """Everything one parse of a text yields, including where the text fields came from."""

    role: str
    fields: Mapping[str, str | None]
    raw: Mapping[str, str]
    spans: Mapping[str, tuple[int, int]]
    calls: tuple[ToolCallFields, ...]
    parse_error: bool


def index_tools(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]]:
    """Map function name to its parameter ``properties`` (OpenAI or flat tool definitions)."""
    index: dict[str, Mapping[str, Any]] = {}
    for tool in tools or ():
        function = tool.get("function", tool)
        if not isinstance(function, Mapping):
            continue
        name = function.get("name")
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        if isinstance(name, str) and isinstance(properties, Mapping):
            index[name] = properties
    return index


def _coerce(value: Any, schema: Any) -> Any:
    """Type one raw key/value argument from its JSON Schema; keep the text when unsure."""
    if not isinstance(value, str) or not isinstance(schema, Mapping):
        return value
    declared = schema.get("type")
    types = [declared] if isinstance(declared, str) else declared
    if not isinstance(types, list) or not types or "string" in types:
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _arguments(raw: Any, name: str, tools: ToolIndex) -> tuple[str, bool]:
    """Serialise extracted arguments to a JSON string; the flag is True when they were invalid."""
    if raw is None:
        return "{}", False
    if isinstance(raw, RawText):
        return str(raw), True
    if isinstance(raw, KeyValueObject):
        properties = tools.get(name, {})
        raw = {key: _coerce(value, properties.get(key)) for key, value in raw.items()}
    elif isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return raw, True
    return json.dumps(raw, ensure_ascii=False, separators=(",", ":")), False


def _tool_call(item: Any, tools: ToolIndex) -> ToolCallFields | None:
    if not isinstance(item, Mapping):
        return None
    function = item.get("function")
    source = function if isinstance(function, Mapping) else item
    name = source.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    name = name.strip()
    arguments, failed = _arguments(source.get("arguments"), name, tools)
    call_id = item.get("id")
    call_type = item.get("type")
    return ToolCallFields(
        name=name,
        arguments=arguments,
        id=call_id if isinstance(call_id, str) and call_id else None,
        type=call_type if isinstance(call_type, str) and call_type else "function",
        parse_error=failed,
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


class ResponseSchemaParser:
    """Parses one model's output with its ``response_schema``; build once per model config."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        root = compile_schema(schema)
        if "object" not in root.types or not root.properties:
            raise ValueError("invalid response_schema at /: needs type 'object' and properties")
        self._root = root
        self._reasoning_key = next((k for k in _REASONING_KEYS if k in root.properties), None)
        patterns = [root.regex, root.iterator]
        for node in root.properties.values():
            patterns.extend((node.regex, node.iterator))
        markers: list[str] = []
        for pattern in patterns:
            for run in literal_runs(pattern.pattern) if pattern is not None else ():
                if run not in markers:
                    markers.append(run)
        self._markers = tuple(markers)
        self._tag_markers = tuple(m for m in markers if _TAG_CHARS & set(m))
        text_nodes = [root.properties.get(CONTENT)]
        if self._reasoning_key is not None:
            text_nodes.append(root.properties[self._reasoning_key])
        self._spans_tracked = (
            root.regex is None
            and root.parser is None
            and all(node is None or node.is_simple_capture for node in text_nodes)
        )

    @property
    def markers(self) -> tuple[str, ...]:
        """Literal strings from the top-level regexes: where regions open and close."""
        return self._markers

    @property
    def spans_tracked(self) -> bool:
        """True when content and reasoning are plain substrings whose positions are known."""
        return self._spans_tracked

    def parse(
        self,
        text: str,
        *,
        prefix: str = "",
        tools: Sequence[Mapping[str, Any]] | None = None,
        id_factory: IdFactory | None = None,
    ) -> ParsedMessage:
        """Parse ``prefix + text`` into a message; tool calls without an id get a new one."""
        analysis = self.analyse(prefix + text, index_tools(tools))
        make_id = id_factory or new_tool_call_id
        ids = [call.id or make_id(index) for index, call in enumerate(analysis.calls)]
        return build_message(analysis, ids)

    def analyse(self, text: str, tools: ToolIndex) -> Analysis:
        """Parse ``text`` (prefix included), closing a region left open at the end if needed.

        A region counts as open when a marker leaked into ``content`` and appending one of the
        schema's markers yields a field that runs exactly to the end of ``text``, clean content
        and the same tool calls.
        """
        first = self._analyse_once(text, tools)
        if not self._leaks(first, text):
            return first
        end = len(text)
        for closer in self._markers:
            candidate = self._analyse_once(text + closer, tools)
            spans = candidate.spans.values()
            if (
                any(stop == end for _, stop in spans)
                and all(stop <= end for start, stop in spans if start != stop)
                and candidate.calls == first.calls
                and not self._leaks(candidate, text + closer)
            ):
                return candidate
        return first

    def _leaks(self, analysis: Analysis, text: str) -> bool:
        """True when a tag-like marker sits in the content, its trailing whitespace included.

        ("$" also matches before a final newline, so a marker's newline can fall outside.)
        """
        content = analysis.fields.get(CONTENT) or ""
        span = analysis.spans.get(CONTENT)
        if span is not None:
            tail = text[span[1] :]
            content = text[span[0] :] if tail.isspace() else text[span[0] : span[1]]
        return any(marker in content for marker in self._tag_markers)

    def _analyse_once(self, text: str, tools: ToolIndex) -> Analysis:
        root = self._root
        raw: dict[str, str] = {}
        spans: dict[str, tuple[int, int]] = {}
        values: dict[str, Any] = {}
        if self._spans_tracked:
            for name, node in root.properties.items():
                output = REASONING if name == self._reasoning_key else name
                if output in TEXT_FIELDS and node.regex is not None:
                    match = node.regex.search(text)
                    if match is None:
                        continue
                    group = 1 if node.regex.groups else 0
                    value = capture(match)
                    if isinstance(value, str):
                        raw[output] = value
                        spans[output] = match.span(group)
                        values[name] = value
                else:
                    values[name] = evaluate(text, node)
        else:
            parsed = evaluate(text, root)
            values = parsed if isinstance(parsed, dict) else {}
        calls: list[ToolCallFields] = []
        dropped = False
        items = values.get("tool_calls")
        for item in items if isinstance(items, list) else [items] if items else []:
            call = _tool_call(item, tools)
            if call is None:
                dropped = True
            else:
                calls.append(call)
        role = values.get("role")
        reasoning = values.get(self._reasoning_key) if self._reasoning_key else None
        return Analysis(
            role=role if isinstance(role, str) and role else "assistant",
            fields={REASONING: _text(reasoning), CONTENT: _text(values.get(CONTENT))},
            raw=raw,
            spans=spans,
            calls=tuple(calls),
            parse_error=dropped or any(call.parse_error for call in calls),
        )


def build_message(analysis: Analysis, ids: Sequence[str]) -> ParsedMessage:
    """A ParsedMessage from an analysis, with ``ids[i]`` for tool call ``i``."""
    return ParsedMessage(
        role=analysis.role,
        content=analysis.fields[CONTENT],
        reasoning_content=analysis.fields[REASONING],
        tool_calls=[
            {
                "id": call_id,
                "type": call.type,
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call, call_id in zip(analysis.calls, ids, strict=True)
        ],
        tool_call_parse_error=analysis.parse_error,
    )
