"""Pull the literal strings (markers such as ``<think>`` or ``<|channel|>``) out of a regex.

The streaming parser must know which strings delimit regions so it can hold back text that may
still grow into one; reading them from the schema's regexes keeps configs the only source of truth.
"""

from __future__ import annotations

_CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}
_BREAKERS = frozenset(")|^$.")
_QUANTIFIERS = frozenset("*+?{")


def _skip_class(pattern: str, start: int) -> int:
    """Index just past the character class opening at ``start``."""
    index = start + 1
    if index < len(pattern) and pattern[index] == "^":
        index += 1
    if index < len(pattern) and pattern[index] == "]":
        index += 1
    while index < len(pattern) and pattern[index] != "]":
        index += 2 if pattern[index] == "\\" else 1
    return index + 1


def _skip_group_header(pattern: str, start: int) -> int:
    """Index just past ``(``, ``(?:``, ``(?P<name>``, ``(?=`` and the like."""
    index = start + 1
    if not pattern.startswith("?", index):
        return index
    for header in ("?:", "?=", "?!", "?<=", "?<!", "?>"):
        if pattern.startswith(header, index):
            return index + len(header)
    if pattern.startswith("?P<", index):
        return pattern.find(">", index) + 1 or len(pattern)
    # Inline flags "(?s)" / "(?i:...)", comments "(?#...)", "(?P=name)": skip to ':' or ')'.
    stops = [pos for pos in (pattern.find(":", index), pattern.find(")", index)) if pos >= 0]
    return (min(stops) + 1) if stops else len(pattern)


def literal_runs(pattern: str, min_length: int = 2) -> list[str]:
    """Maximal runs of literal text in ``pattern`` (quantified characters excluded), in order."""
    runs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if len(current) >= min_length:
            runs.append("".join(current))
        current.clear()

    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            if index + 1 >= len(pattern):
                break
            escaped = pattern[index + 1]
            index += 2
            if escaped in _CHAR_ESCAPES:
                current.append(_CHAR_ESCAPES[escaped])
            elif escaped.isalnum():
                flush()  # \d \w \s \b \A \Z, back references, \x.. escapes
            else:
                current.append(escaped)
        elif char == "[":
            flush()
            index = _skip_class(pattern, index)
        elif char == "(":
            flush()
            index = _skip_group_header(pattern, index)
        elif char in _BREAKERS:
            flush()
            index += 1
        elif char in _QUANTIFIERS:
            if current:
                current.pop()  # the quantified character is optional or repeated
            flush()
            if char == "{":
                close = pattern.find("}", index)
                index = close + 1 if close >= 0 else index + 1
            else:
                index += 1
        else:
            current.append(char)
            index += 1
    flush()
    return runs
