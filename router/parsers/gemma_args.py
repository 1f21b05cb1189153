"""Read Gemma 4 tool-call arguments (``{city:<|"|>Paris<|"|>,days:3}``) as JSON values.

Gemma 4 writes object keys bare and quotes strings with ``<|"|>``; OpenAI clients need plain
JSON, so the ``gemma4-tool-call`` x-parser turns that notation into Python values first.
"""

from __future__ import annotations

import json
from typing import Any

QUOTE = '<|"|>'
_BARE_STOP = frozenset(",}]")
_DECODER = json.JSONDecoder()


class GemmaArgumentsError(ValueError):
    """The text is not in Gemma 4's argument notation."""


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise GemmaArgumentsError(f"expected {char!r} at offset {self.pos}")
        self.pos += 1

    def value(self) -> Any:
        char = self.peek()
        if self.text.startswith(QUOTE, self.pos):
            return self.quoted()
        if char == '"':
            return self.json_string()
        if char == "{":
            return self.mapping("{", "}")
        if char == "[":
            return self.sequence()
        return self.bare()

    def quoted(self) -> str:
        start = self.pos + len(QUOTE)
        end = self.text.find(QUOTE, start)
        if end < 0:
            raise GemmaArgumentsError('unterminated <|"|> string')
        self.pos = end + len(QUOTE)
        return self.text[start:end]

    def json_string(self) -> str:
        try:
            value, self.pos = _DECODER.raw_decode(self.text, self.pos)
        except ValueError as exc:
            raise GemmaArgumentsError(str(exc)) from exc
        return str(value)

    def bare(self) -> Any:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _BARE_STOP:
            self.pos += 1
        token = self.text[start : self.pos].strip()
        if not token:
            raise GemmaArgumentsError(f"missing value at offset {start}")
        try:
            return json.loads(token)
        except ValueError:
            return token  # an unquoted word: keep it as text

    def key(self) -> str:
        if self.text.startswith(QUOTE, self.pos):
            return self.quoted()
        if self.peek() == '"':
            return self.json_string()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] != ":":
            if self.text[self.pos] in "{}[],":
                raise GemmaArgumentsError(f"bad key at offset {start}")
            self.pos += 1
        name = self.text[start : self.pos].strip()
        if not name:
            raise GemmaArgumentsError(f"empty key at offset {start}")
        return name

    def mapping(self, open_char: str, close_char: str) -> dict[str, Any]:
        self.expect(open_char)
        result: dict[str, Any] = {}
        if self.peek() == close_char:
            self.pos += 1
            return result
        while True:
            self.skip_space()
            name = self.key()
            self.expect(":")
            result[name] = self.value()
            separator = self.peek()
            self.pos += 1
            if separator == close_char:
                return result
            if separator != ",":
                raise GemmaArgumentsError(f"expected ',' or {close_char!r} at offset {self.pos - 1}")

    def sequence(self) -> list[Any]:
        self.expect("[")
        result: list[Any] = []
        if self.peek() == "]":
            self.pos += 1
            return result
        while True:
            result.append(self.value())
            separator = self.peek()
            self.pos += 1
            if separator == "]":
                return result
            if separator != ",":
                raise GemmaArgumentsError(f"expected ',' or ']' at offset {self.pos - 1}")


def _read_all(text: str, as_mapping: bool) -> Any:
    reader = _Reader(text)
    value = reader.mapping("[", "]") if as_mapping else reader.value()
    if reader.peek():
        raise GemmaArgumentsError(f"trailing text at offset {reader.pos}")
    return value


def parse_gemma_arguments(text: str) -> Any:
    """Parse Gemma 4 argument notation; ``[k:v,...]`` at the top level is read as an object."""
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            return _read_all(stripped, as_mapping=True)
        except GemmaArgumentsError:
            pass
    return _read_all(stripped, as_mapping=False)
