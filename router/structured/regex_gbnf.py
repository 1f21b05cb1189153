"""Translate the regular-expression subset used by JSON Schema `pattern` into GBNF.

The pattern constrains the decoded string, while the grammar produces its JSON encoding, so every
character set is emitted in canonical JSON encoding.  Patterns are treated as anchored at both
ends (a subset of JSON Schema's search semantics, which is what constrained output wants).
Anything outside the subset (lookaround, backreferences, word boundaries, Unicode properties)
raises RegexUnsupported.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.structured.gbnf_primitives import (
    ALL_CHARS,
    Ranges,
    alternation,
    complement,
    encode_charset,
    encode_text,
    gbnf_literal,
    normalize,
    of_chars,
    quantified,
    sequence,
)


class RegexUnsupported(ValueError):
    """The pattern uses a feature outside the supported subset (or is malformed)."""


@dataclass(frozen=True)
class _Set:
    ranges: Ranges


@dataclass(frozen=True)
class _Seq:
    items: tuple[_Node, ...]


@dataclass(frozen=True)
class _Alt:
    branches: tuple[_Node, ...]


@dataclass(frozen=True)
class _Rep:
    node: _Node
    lo: int
    hi: int | None


_Node = _Set | _Seq | _Alt | _Rep

_DIGIT = of_chars("0123456789")
_WORD = normalize([(0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A), (0x5F, 0x5F)])
_SPACE = normalize(
    [
        (0x09, 0x0D),
        (0x20, 0x20),
        (0xA0, 0xA0),
        (0x1680, 0x1680),
        (0x2000, 0x200A),
        (0x2028, 0x2029),
        (0x202F, 0x202F),
        (0x205F, 0x205F),
        (0x3000, 0x3000),
        (0xFEFF, 0xFEFF),
    ]
)
_DOT = complement(of_chars("\n\r\u2028\u2029"))
_CLASS_ESCAPES = {
    "d": _DIGIT,
    "D": complement(_DIGIT),
    "w": _WORD,
    "W": complement(_WORD),
    "s": _SPACE,
    "S": complement(_SPACE),
}
_CONTROL_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}
_SYNTAX = set("^$\\.*+?()[]{}|/-")


class _Parser:
    def __init__(self, source: str) -> None:
        self.src = source
        self.pos = 0

    def fail(self, why: str) -> RegexUnsupported:
        return RegexUnsupported(f"{why} at offset {self.pos} of pattern {self.src!r}")

    def peek(self, offset: int = 0) -> str:
        i = self.pos + offset
        return self.src[i] if i < len(self.src) else ""

    def parse(self) -> _Node:
        node = self.alternation(top=True)
        if self.pos != len(self.src):
            raise self.fail("unbalanced ')'")
        return node

    def alternation(self, *, top: bool) -> _Node:
        branches = [self.sequence(top=top)]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.sequence(top=top))
        return branches[0] if len(branches) == 1 else _Alt(tuple(branches))

    def sequence(self, *, top: bool) -> _Node:
        items: list[_Node] = []
        start = self.pos
        while self.peek() not in ("", "|", ")"):
            ch = self.peek()
            if ch == "^":
                if not top or self.pos != start:
                    raise self.fail("'^' is only supported at the start of the pattern")
                self.pos += 1
                continue
            if ch == "$":
                self.pos += 1
                if not top or self.peek() not in ("", "|"):
                    raise self.fail("'$' is only supported at the end of the pattern")
                continue
            items.append(self.quantifier(self.atom()))
        return items[0] if len(items) == 1 else _Seq(tuple(items))

    def read_braces(self) -> tuple[int, int | None] | None:
        """Parse `{n}`, `{n,}` or `{n,m}` at pos; None (pos unchanged) if it is a literal brace."""
        end = self.src.find("}", self.pos)
        if end < 0:
            return None
        body = self.src[self.pos + 1 : end]
        lo_text, comma, hi_text = body.partition(",")
        if not lo_text.isdigit() or (hi_text and not hi_text.isdigit()):
            return None
        lo = int(lo_text)
        hi = lo if not comma else (int(hi_text) if hi_text else None)
        if hi is not None and hi < lo:
            raise self.fail("quantifier range out of order")
        self.pos = end + 1
        return lo, hi

    def quantifier(self, node: _Node) -> _Node:
        ch = self.peek()
        bounds: tuple[int, int | None] | None = None
        if ch in ("*", "+", "?"):
            self.pos += 1
            bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
        elif ch == "{":
            bounds = self.read_braces()
        if bounds is None:
            return node
        if self.peek() == "?":  # lazy: same language under a full match
            self.pos += 1
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self.read_braces()):
            raise self.fail("nothing to repeat")
        return _Rep(node, bounds[0], bounds[1])

    def atom(self) -> _Node:
        ch = self.peek()
        if ch == "(":
            return self.group()
        if ch == "[":
            return self.char_class()
        if ch == ".":
            self.pos += 1
            return _Set(_DOT)
        if ch == "\\":
            return _Set(self.escape(in_class=False))
        if ch in ("*", "+", "?"):
            raise self.fail("nothing to repeat")
        if ch == "{" and self.read_braces() is not None:
            raise self.fail("nothing to repeat")
        self.pos += 1
        return _Set(of_chars(ch))

    def group(self) -> _Node:
        self.pos += 1
        if self.peek() == "?":
            if self.peek(1) == ":":
                self.pos += 2
            elif self.peek(1) == "<" and self.peek(2) not in ("=", "!"):
                end = self.src.find(">", self.pos)
                if end < 0:
                    raise self.fail("unterminated group name")
                self.pos = end + 1
            else:
                raise self.fail("lookaround and inline flags are not supported")
        node = self.alternation(top=False)
        if self.peek() != ")":
            raise self.fail("missing ')'")
        self.pos += 1
        return node

    def escape(self, *, in_class: bool) -> Ranges:
        """Parse an escape at pos (which holds the backslash) and return its character set."""
        self.pos += 1
        ch = self.peek()
        if not ch:
            raise self.fail("pattern ends with '\\'")
        self.pos += 1
        if ch in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[ch]
        if ch == "b" and in_class:
            return of_chars("\b")
        if ch == "0" and self.peek().isdigit():
            raise self.fail("octal escapes are not supported")
        if ch in _CONTROL_ESCAPES:
            return of_chars(_CONTROL_ESCAPES[ch])
        if ch in ("x", "u"):
            width = 2 if ch == "x" else 4
            digits = self.src[self.pos : self.pos + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"malformed \\{ch} escape")
            self.pos += width
            cp = int(digits, 16)
            if 0xD800 <= cp <= 0xDFFF:
                raise self.fail("surrogate escapes are not supported")
            return ((cp, cp),)
        if ch in _SYNTAX or not (ch.isalnum() or ch == "_"):
            return of_chars(ch)
        raise self.fail(f"escape '\\{ch}' is not supported")

    def class_atom(self) -> Ranges:
        if self.peek() == "\\":
            return self.escape(in_class=True)
        ch = self.peek()
        self.pos += 1
        return of_chars(ch)

    def char_class(self) -> _Node:
        self.pos += 1
        negate = self.peek() == "^"
        if negate:
            self.pos += 1
        if self.peek() == "]":
            self.pos += 1
            if negate:
                return _Set(ALL_CHARS)
            raise self.fail("empty character class")
        ranges: list[tuple[int, int]] = []
        while self.peek() != "]":
            if not self.peek():
                raise self.fail("missing ']'")
            first = self.class_atom()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.pos += 1
                last = self.class_atom()
                if len(first) != 1 or len(last) != 1 or first[0][0] != first[0][1]:
                    raise self.fail("class escapes cannot bound a range")
                if last[0][0] != last[0][1] or last[0][0] < first[0][0]:
                    raise self.fail("character range out of order")
                ranges.append((first[0][0], last[0][0]))
            else:
                ranges.extend(first)
        self.pos += 1
        result = normalize(ranges)
        return _Set(complement(result) if negate else result)


def _single(node: _Node) -> str | None:
    if isinstance(node, _Set) and len(node.ranges) == 1:
        lo, hi = node.ranges[0]
        if lo == hi:
            return chr(lo)
    return None


def _emit(node: _Node) -> str:
    if isinstance(node, _Set):
        text = _single(node)
        return gbnf_literal(encode_text(text)) if text is not None else encode_charset(node.ranges)
    if isinstance(node, _Alt):
        return alternation([_emit(b) for b in node.branches])
    if isinstance(node, _Rep):
        return quantified(_emit(node.node), node.lo, node.hi)
    parts: list[str] = []
    literal = ""
    for item in node.items:
        text = _single(item)
        if text is not None:
            literal += text
            continue
        if literal:
            parts.append(gbnf_literal(encode_text(literal)))
            literal = ""
        parts.append(_emit(item))
    if literal:
        parts.append(gbnf_literal(encode_text(literal)))
    return sequence(*parts)


def regex_to_gbnf(pattern: str) -> str:
    """A GBNF expression for the JSON-string contents (no quotes) that fully match `pattern`."""
    return _emit(_Parser(pattern).parse())
