"""Incremental ``response_schema`` parsing into deltas (content, reasoning, whole tool calls).

Correctness rule: concatenating every delta gives exactly what ``ResponseSchemaParser.parse``
returns for the whole text, however the text was split. Nothing is emitted that a later token
could still change, so:

* a tail of the text that may be the start of a marker (``</thi``) is held back;
* the text is re-parsed as it is and with a letter, each marker and each marker followed by a
  letter appended ("probes"); only the common prefix of a field across all probes is emitted
  (``Hello`` of ``Hello <tool_call>`` stays content whatever comes next, a trailing space may
  not);
* a tool call is emitted whole (id, name and arguments) once every probe agrees on it.

Re-parsing on every token would cost O(n) per token. After each full parse the parser notes
which single field (if any) the end of the text is growing; until a marker (or the start of one)
shows up in the new text, that text is appended to the field directly, trailing whitespace held
back, or changes nothing at all when no field is growing (inside a tool call). Plain prose,
reasoning and tool-call bodies thus cost O(1) per token.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.parsers.response_schema import (
    CONTENT,
    REASONING,
    TEXT_FIELDS,
    Analysis,
    IdFactory,
    ParsedMessage,
    ResponseSchemaParser,
    ToolCallFields,
    build_message,
    index_tools,
    new_tool_call_id,
)


@dataclass(frozen=True)
class ToolCallDelta:
    """One tool call's first (and, here, only) chunk: id, name and complete arguments."""

    index: int
    id: str
    name: str
    arguments: str
    type: str = "function"


@dataclass(frozen=True)
class ParsedDelta:
    """One piece of a streamed message; exactly one attribute is set."""

    content: str | None = None
    reasoning_content: str | None = None
    tool_call: ToolCallDelta | None = None


def _text_delta(name: str, piece: str) -> ParsedDelta:
    return ParsedDelta(reasoning_content=piece) if name == REASONING else ParsedDelta(content=piece)


def _common_prefix(values: Sequence[str]) -> str:
    first, last = min(values), max(values)  # the lexicographic extremes bound every prefix
    for index, char in enumerate(first):
        if char != last[index]:
            return first[:index]
    return first


@dataclass
class _FastState:
    """What may be appended without a full re-parse (see module docstring)."""

    field: str | None  # the field the text end grows, None when new text changes nothing
    position: int  # text index where the field's unemitted part starts
    scanned: int  # text index up to which the text is known to hold no marker


_log = logging.getLogger(__name__)
_FILLER = "x"


class IncrementalSchemaParser:
    """Feeds generated text in pieces and yields OpenAI-style deltas; one per choice."""

    def __init__(
        self,
        parser: ResponseSchemaParser,
        *,
        prefix: str = "",
        tools: Sequence[Mapping[str, Any]] | None = None,
        id_factory: IdFactory | None = None,
        fast_path: bool = True,
    ) -> None:
        self._parser = parser
        self._tools = index_tools(tools)
        self._make_id = id_factory or new_tool_call_id
        self._fast_path = fast_path and parser.spans_tracked
        self._text = prefix
        self._emitted = {REASONING: "", CONTENT: ""}
        self._calls: list[ToolCallFields] = []
        self._ids: list[str] = []
        self._fast: _FastState | None = None
        self._message: ParsedMessage | None = None
        self._diverged = False
        markers = parser.markers
        self._triggers: dict[str, tuple[str, ...]] = {}
        for marker in markers:
            self._triggers[marker[0]] = (*self._triggers.get(marker[0], ()), marker)
        self._specials = (
            re.compile("[" + re.escape("".join(self._triggers)) + "]") if self._triggers else None
        )
        self._marker_prefixes = frozenset(m[:k] for m in markers for k in range(1, len(m)))
        self._longest_prefix = max((len(m) - 1 for m in markers), default=0)

    @property
    def diverged(self) -> bool:
        """True if the final parse contradicted something already emitted (should not happen)."""
        return self._diverged

    @property
    def message(self) -> ParsedMessage:
        """The complete message, with the tool-call ids that were streamed; after ``finish``."""
        if self._message is None:
            raise RuntimeError("message is only available after finish()")
        return self._message

    def feed(self, delta_text: str) -> list[ParsedDelta]:
        """Add generated text; returns the deltas that became certain."""
        if self._message is not None:
            raise RuntimeError("feed() after finish()")
        if not delta_text:
            return []
        self._text += delta_text
        fast = self._fast
        if fast is not None:
            limit = self._plain_until(fast)
            if limit is not None:
                return self._fast_emit(fast, limit)
        return self._full_parse()

    def finish(self) -> list[ParsedDelta]:
        """Flush everything the final parse has that was not emitted yet."""
        if self._message is not None:
            return []
        final = self._parser.analyse(self._text, self._tools)
        deltas: list[ParsedDelta] = []
        for name in TEXT_FIELDS:
            value = final.fields[name] or ""
            emitted = self._emitted[name]
            if not value.startswith(emitted):
                self._diverged = True
            elif len(value) > len(emitted):
                deltas.append(_text_delta(name, value[len(emitted) :]))
                self._emitted[name] = value
        if final.calls[: len(self._calls)] != tuple(self._calls):
            self._diverged = True
        deltas.extend(self._emit_calls(final.calls[len(self._calls) :]))
        if self._diverged:
            _log.warning("streamed deltas disagree with the final parse of %r", self._text[-200:])
        ids = list(self._ids[: len(final.calls)])
        ids.extend(self._make_id(index) for index in range(len(ids), len(final.calls)))
        self._message = build_message(final, ids)
        return deltas

    def _hold_back(self, text: str) -> int:
        for length in range(min(self._longest_prefix, len(text)), 0, -1):
            if text[-length:] in self._marker_prefixes:
                return length
        return 0

    def _emit_calls(self, calls: Sequence[ToolCallFields]) -> list[ParsedDelta]:
        deltas = []
        for call in calls:
            index = len(self._calls)
            call_id = call.id or self._make_id(index)
            self._calls.append(call)
            self._ids.append(call_id)
            deltas.append(
                ParsedDelta(tool_call=ToolCallDelta(index, call_id, call.name, call.arguments, call.type))
            )
        return deltas

    def _plain_until(self, fast: _FastState) -> int | None:
        """How far the new text is plain (holds no marker); None when it needs a re-parse."""
        text = self._text
        index = fast.scanned
        while self._specials is not None:
            match = self._specials.search(text, index)
            if match is None:
                break
            start = match.start()
            markers = self._triggers[match.group()]
            if any(text.startswith(marker, start) for marker in markers):
                return None
            rest = text[start : start + self._longest_prefix + 1]
            if len(rest) == len(text) - start and any(m.startswith(rest) for m in markers):
                fast.scanned = start  # may still become a marker: look again next time
                return start
            index = start + 1
        fast.scanned = len(text)
        return len(text)

    def _fast_emit(self, fast: _FastState, limit: int) -> list[ParsedDelta]:
        if fast.field is None:
            return []
        piece = self._text[fast.position : limit].rstrip()
        if not piece:
            return []
        fast.position += len(piece)
        self._emitted[fast.field] += piece
        return [_text_delta(fast.field, piece)]

    def _full_parse(self) -> list[ParsedDelta]:
        text = self._text
        held = self._hold_back(text)
        base_text = text[: len(text) - held]
        # The filler stands for ordinary text, after the end or after a marker (which matters
        # to regexes such as "</r>(.+)").
        probe_texts = [base_text, base_text + _FILLER]
        for marker in self._parser.markers:
            probe_texts.extend((base_text + marker, base_text + marker + _FILLER))
        if held:
            probe_texts.append(text)
        analyses: dict[str, Analysis] = {}
        for probe in probe_texts:
            if probe not in analyses:
                analyses[probe] = self._parser.analyse(probe, self._tools)
        results = list(analyses.values())
        deltas: list[ParsedDelta] = []
        for name in TEXT_FIELDS:
            stable = _common_prefix([result.fields[name] or "" for result in results])
            emitted = self._emitted[name]
            if stable.strip() and stable.startswith(emitted) and len(stable) > len(emitted):
                deltas.append(_text_delta(name, stable[len(emitted) :]))
                self._emitted[name] = stable
        agreed: list[ToolCallFields] = []
        base = analyses[base_text]
        for index in range(len(self._calls), len(base.calls)):
            call = base.calls[index]
            if not all(len(r.calls) > index and r.calls[index] == call for r in results):
                break
            agreed.append(call)
        deltas.extend(self._emit_calls(agreed))
        self._fast = self._plan_fast(base_text, base) if self._fast_path else None
        return deltas

    def _plan_fast(self, base_text: str, base: Analysis) -> _FastState | None:
        end = len(base_text)
        # Fields whose capture reaches the end of the text (or its trailing whitespace); spans
        # past the end come from closing an open region and do not count.
        settled_end = len(base_text.rstrip())
        touching = [n for n, (_, stop) in base.spans.items() if settled_end <= stop <= end]
        if len(touching) > 1 or any(base.spans[n][1] != end for n in touching):
            return None
        name = touching[0] if touching else None
        position = end
        if name is not None:
            raw = base.raw[name]
            emitted = self._emitted[name]
            # Only once the field has settled content: regexes such as "</think>\s*(.*?)" make
            # a field's first characters depend on what follows them.
            if not emitted or not raw.startswith(emitted) or raw[len(emitted) :].strip():
                return None
            position = end - (len(raw) - len(emitted))
        return _FastState(name, position, end)
