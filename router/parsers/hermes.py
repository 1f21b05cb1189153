"""Incremental parser for `<think>` reasoning and Hermes-style `<tool_call>` JSON blocks.

Used for every chat completion of a config without a `response_schema`. Text is fed as it is generated;
the parser emits pieces that a later token can no longer change: reasoning, content, and tool calls
(first their index, id and name, then their arguments as they are generated). A tail that may still
become a marker (`</thi`) or whitespace that may still precede one is held back. Decisions depend only
on the text, never on how it was split, so the streamed pieces always reassemble to what parsing the
whole text at once gives (the non-streamed response runs the same parser).

Arguments are streamed as the model writes them when the call has the canonical shape
`{"name": "...", "arguments": VALUE}` (what the grammar produces); any other JSON shape is emitted whole
(re-serialised) once its closing tag arrives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_WS = " \t\r\n"


@dataclass
class ParsedCall:
    """A tool call as parsed so far."""

    index: int
    id: str
    name: str
    arguments: str = ""
    complete: bool = False


@dataclass(frozen=True)
class Piece:
    """One emitted piece; exactly one of the fields is set (`call` with `arguments` as the new part)."""

    content: str | None = None
    reasoning: str | None = None
    call: ParsedCall | None = None
    arguments: str | None = None  # new argument text of `call`
    opens_call: bool = False  # first piece of `call` (carries id and name)


def _suffix_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class _Header:
    """Scans `{"name": "<string>", "arguments": ` at the start of a call body."""

    MORE, NO = -1, -2

    @staticmethod
    def scan(body: str) -> tuple[int, str]:
        """(end of the header, name), or (MORE, "") / (NO, "")."""
        i = 0

        def ws(at: int) -> int:
            while at < len(body) and body[at] in _WS:
                at += 1
            return at

        steps: list[str | None] = ["{", '"name"', ":", None, ",", '"arguments"', ":"]
        name = ""
        for step in steps:
            i = ws(i)
            if step is None:
                end = _string_end(body, i)
                if end < 0:
                    return (_Header.MORE if end == -1 else _Header.NO), ""
                try:
                    name = json.loads(body[i:end])
                except ValueError:
                    return _Header.NO, ""
                i = end
                continue
            chunk = body[i : i + len(step)]
            if chunk != step[: len(chunk)]:
                return _Header.NO, ""
            if len(chunk) < len(step):
                return _Header.MORE, ""
            i += len(step)
        i = ws(i)
        if i >= len(body):
            return _Header.MORE, ""
        return i, name


def _string_end(text: str, start: int) -> int:
    """End index (exclusive) of the JSON string at `start`; -1 if unfinished, -2 if not a string."""
    if start >= len(text):
        return -1
    if text[start] != '"':
        return -2
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return i + 1
        if ch == "\n":
            return -2
        i += 1
    return -1


class _ValueScanner:
    """Follows one JSON value character by character: where it ends (strings, nesting, scalars)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.started = False
        self.scalar = False
        self.done = False

    def feed(self, text: str) -> int:
        """Consumes `text`; returns how many characters belong to the value (all, unless it ended)."""
        for i, ch in enumerate(text):
            if not self.started:
                self.started = True
                if ch in "{[":
                    self.depth = 1
                elif ch == '"':
                    self.in_string = True
                else:
                    self.scalar = True
                continue
            if self.scalar:
                if ch in _WS + ",}]":
                    self.done = True
                    return i
                continue
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.done = True
                        return i + 1
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


@dataclass
class ToolCallParser:
    """Parses one choice's output; `feed` then `finish`, each returning the new pieces."""

    parse_tools: bool
    reasoning_open: bool = False
    new_id: Callable[[int], str] = lambda index: f"call_{index}"
    calls: list[ParsedCall] = field(default_factory=list)
    content: str = ""
    reasoning: str = ""
    cut_call: str | None = None  # raw text of a call the output ended inside
    _buffer: str = ""
    _mode: str = "start"
    _strip_leading: bool = False
    _call_body: str = ""
    _scanner: _ValueScanner | None = None
    _call: ParsedCall | None = None
    _header_failed: bool = False
    _args_from: int = 0

    def __post_init__(self) -> None:
        if self.reasoning_open:
            self._mode, self._strip_leading = "reasoning", True

    # -- public -------------------------------------------------------------------------------

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        out: list[Piece] = []
        while self._buffer and self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[Piece]:
        out: list[Piece] = []
        while self._step(out, final=True):
            pass
        if self._mode == "call":
            self.cut_call = CALL_OPEN + self._call_body
            self._mode = "content"
        return out

    @property
    def complete_calls(self) -> list[ParsedCall]:
        return [c for c in self.calls if c.complete]

    # -- the state machine ----------------------------------------------------------------------

    def _step(self, out: list[Piece], final: bool) -> bool:
        """Advances once; False when it needs more text (or, when final, when nothing is left)."""
        mode = self._mode
        if mode == "start":
            return self._start(final)
        if mode == "reasoning":
            return self._text_until(out, THINK_CLOSE, "reasoning", final)
        if mode == "call":
            return self._in_call(out, final)
        if not self.parse_tools:
            return self._emit_text(out, "content", self._take(len(self._buffer)), final)
        return self._text_until(out, CALL_OPEN, "content", final)

    def _start(self, final: bool) -> bool:
        stripped = self._buffer.lstrip(_WS)
        if stripped.startswith(THINK_OPEN):
            self._buffer = stripped[len(THINK_OPEN) :]
            self._mode, self._strip_leading = "reasoning", True
            return True
        if not final and THINK_OPEN.startswith(stripped):
            return False  # may still become <think>
        self._mode = "content"
        return True

    def _take(self, size: int) -> str:
        taken, self._buffer = self._buffer[:size], self._buffer[size:]
        return taken

    def _text_until(self, out: list[Piece], marker: str, kind: str, final: bool) -> bool:
        at = self._buffer.find(marker)
        if at >= 0:
            text = self._take(at).rstrip(_WS)
            self._take(len(marker))
            self._emit_text(out, kind, text, final=True, keep_trailing=False)
            if marker == CALL_OPEN:
                self._open_call()
            else:  # end of reasoning
                self._mode, self._strip_leading = "content", True
            return True
        if final:
            self._emit_text(out, kind, self._take(len(self._buffer)), True, keep_trailing=kind == "content")
            return False
        hold = _suffix_prefix(self._buffer, marker)
        safe = self._buffer[: len(self._buffer) - hold]
        visible = safe.rstrip(_WS)  # blanks may precede a marker: decided later
        if visible:
            self._emit_text(out, kind, self._take(len(visible)), final=False)
        return False

    def _emit_text(
        self, out: list[Piece], kind: str, text: str, final: bool, keep_trailing: bool = True
    ) -> bool:
        if self._strip_leading:
            text = text.lstrip(_WS)
            if text:
                self._strip_leading = False
        if not keep_trailing:
            text = text.rstrip(_WS)
        if not text:
            return False
        if kind == "reasoning":
            self.reasoning += text
            out.append(Piece(reasoning=text))
        else:
            self.content += text
            out.append(Piece(content=text))
        return False

    # -- calls ----------------------------------------------------------------------------------

    def _open_call(self) -> None:
        self._mode = "call"
        self._call_body = ""
        self._args_from = 0
        self._scanner = None
        self._call = None
        self._header_failed = False

    def _in_call(self, out: list[Piece], final: bool) -> bool:
        self._call_body += self._take(len(self._buffer))
        body = self._call_body
        if self._call is None and not self._header_failed:
            end, name = _Header.scan(body)
            if end == _Header.NO:
                self._header_failed = True
            elif end >= 0:
                opened = ParsedCall(len(self.calls), self.new_id(len(self.calls)), name)
                self.calls.append(opened)
                self._call = opened
                self._scanner = _ValueScanner()
                self._args_from = end
                out.append(Piece(call=opened, opens_call=True))
        call, scanner = self._call, self._scanner
        if call is not None and scanner is not None:
            if not scanner.done:
                new = body[self._args_from :]
                taken = scanner.feed(new)
                self._args_from += taken
                if new[:taken]:
                    call.arguments += new[:taken]
                    out.append(Piece(call=call, arguments=new[:taken]))
                if scanner.scalar and final:
                    scanner.done = True  # a bare scalar ends with the text
            if not scanner.done:
                return False
        elif not self._header_failed:
            return False  # the header is still incomplete
        close = body.find(CALL_CLOSE, self._args_from if call is not None else 0)
        if close < 0:
            return False
        if call is not None:
            call.complete = True
        else:
            self._whole_call(out, body[:close])
        self._buffer = body[close + len(CALL_CLOSE) :] + self._buffer
        self._mode, self._strip_leading = "content", True
        return True

    def _whole_call(self, out: list[Piece], body: str) -> None:
        """A call in another JSON shape: emitted whole, or kept as content when it is not a call."""
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        name = value.get("name") if isinstance(value, dict) else None
        if not isinstance(name, str) or not name:
            self._emit_text(out, "content", CALL_OPEN + body + CALL_CLOSE, final=True)
            return
        assert isinstance(value, dict)
        args = value.get("arguments", value.get("parameters", {}))
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        call = ParsedCall(len(self.calls), self.new_id(len(self.calls)), name, text, complete=True)
        self.calls.append(call)
        out.append(Piece(call=call, opens_call=True))
        out.append(Piece(call=call, arguments=text))
