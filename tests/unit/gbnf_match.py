"""A small, independent GBNF recogniser for tests: does a string match a grammar's `root`?

It parses the llama.cpp grammar syntax (literals, classes, `.`, groups, alternation, `* + ?
{m} {m,} {m,n}`, comments) and computes, for each rule and start position, the set of end
positions (memoised), which is exact for grammars without left recursion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]"}
_HEX_WIDTH = {"x": 2, "u": 4, "U": 8}


@dataclass(frozen=True)
class Lit:
    text: str


@dataclass(frozen=True)
class Cls:
    ranges: tuple[tuple[int, int], ...]
    negated: bool


@dataclass(frozen=True)
class Any_:
    pass


@dataclass(frozen=True)
class Ref:
    name: str


@dataclass(frozen=True)
class Alt:
    options: tuple[tuple[Node, ...], ...]  # each option is a sequence


@dataclass(frozen=True)
class Rep:
    node: Node
    lo: int
    hi: int | None


Node = Lit | Cls | Any_ | Ref | Alt | Rep


class GrammarSyntaxError(ValueError):
    pass


@dataclass
class _Reader:
    src: str
    pos: int = 0

    def peek(self) -> str:
        return self.src[self.pos] if self.pos < len(self.src) else ""

    def error(self, why: str) -> GrammarSyntaxError:
        return GrammarSyntaxError(f"{why} at {self.src[self.pos : self.pos + 30]!r}")

    def skip_space(self, *, newlines: bool) -> None:
        while self.pos < len(self.src):
            ch = self.src[self.pos]
            if ch == "#":
                while self.pos < len(self.src) and self.src[self.pos] != "\n":
                    self.pos += 1
            elif ch in " \t" or (newlines and ch in "\r\n"):
                self.pos += 1
            else:
                return

    def name(self) -> str:
        start = self.pos
        while self.peek().isascii() and (self.peek().isalnum() or self.peek() == "-"):
            self.pos += 1
        if start == self.pos:
            raise self.error("expected a rule name")
        return self.src[start : self.pos]

    def char(self) -> str:
        ch = self.peek()
        if not ch:
            raise self.error("unexpected end")
        self.pos += 1
        if ch != "\\":
            return ch
        esc = self.peek()
        self.pos += 1
        if esc in _HEX_WIDTH:
            digits = self.src[self.pos : self.pos + _HEX_WIDTH[esc]]
            self.pos += len(digits)
            return chr(int(digits, 16))
        if esc in _ESCAPES:
            return _ESCAPES[esc]
        raise self.error(f"unknown escape \\{esc}")

    def int_(self) -> int:
        start = self.pos
        while self.peek().isdigit():
            self.pos += 1
        return int(self.src[start : self.pos])


def _parse_alt(r: _Reader, nested: bool) -> Alt:
    options = [_parse_seq(r, nested)]
    while r.peek() == "|":
        r.pos += 1
        r.skip_space(newlines=True)
        options.append(_parse_seq(r, nested))
    return Alt(tuple(options))


def _parse_seq(r: _Reader, nested: bool) -> tuple[Node, ...]:
    items: list[Node] = []
    while True:
        r.skip_space(newlines=nested)
        ch = r.peek()
        if ch == '"':
            r.pos += 1
            text = ""
            while r.peek() != '"':
                text += r.char()
            r.pos += 1
            items.append(Lit(text))
        elif ch == "[":
            r.pos += 1
            negated = r.peek() == "^"
            r.pos += negated
            ranges = []
            while r.peek() != "]":
                first = r.char()
                last = first
                if r.peek() == "-" and r.src[r.pos + 1 : r.pos + 2] != "]":
                    r.pos += 1
                    last = r.char()
                ranges.append((ord(first), ord(last)))
            r.pos += 1
            items.append(Cls(tuple(ranges), negated))
        elif ch == ".":
            r.pos += 1
            items.append(Any_())
        elif ch == "(":
            r.pos += 1
            r.skip_space(newlines=True)
            inner = _parse_alt(r, True)
            r.skip_space(newlines=True)
            if r.peek() != ")":
                raise r.error("expected ')'")
            r.pos += 1
            items.append(inner)
        elif ch.isascii() and (ch.isalnum() or ch == "-"):
            save = r.pos
            name = r.name()
            r.skip_space(newlines=False)
            if r.src.startswith("::=", r.pos):  # start of the next rule
                r.pos = save
                return tuple(items)
            r.pos = save + len(name)
            items.append(Ref(name))
        elif ch and ch in "*+?{":
            if not items:
                raise r.error("quantifier without an item")
            r.pos += 1
            if ch == "{":
                lo = r.int_()
                hi: int | None = lo
                if r.peek() == ",":
                    r.pos += 1
                    hi = r.int_() if r.peek().isdigit() else None
                if r.peek() != "}":
                    raise r.error("expected '}'")
                r.pos += 1
            else:
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
            items[-1] = Rep(items[-1], lo, hi)
        else:
            return tuple(items)


def parse_gbnf(text: str) -> dict[str, Alt]:
    """Rules by name; raises GrammarSyntaxError for malformed or undefined references."""
    r = _Reader(text)
    rules: dict[str, Alt] = {}
    while True:
        r.skip_space(newlines=True)
        if not r.peek():
            break
        name = r.name()
        r.skip_space(newlines=False)
        if not r.src.startswith("::=", r.pos):
            raise r.error("expected '::='")
        r.pos += 3
        r.skip_space(newlines=False)
        if name in rules:
            raise r.error(f"rule {name} defined twice")
        rules[name] = _parse_alt(r, False)
        r.skip_space(newlines=False)
        if r.peek() not in ("\n", "\r", ""):
            raise r.error("expected end of rule")
    for alt in rules.values():
        _check_refs(alt, rules)
    return rules


def _check_refs(node: Node, rules: dict[str, Alt]) -> None:
    if isinstance(node, Ref) and node.name not in rules:
        raise GrammarSyntaxError(f"undefined rule {node.name}")
    if isinstance(node, Alt):
        for option in node.options:
            for item in option:
                _check_refs(item, rules)
    if isinstance(node, Rep):
        _check_refs(node.node, rules)


@dataclass
class Matcher:
    rules: dict[str, Alt]
    text: str = ""
    memo: dict[tuple[str, int], frozenset[int]] = field(default_factory=dict)
    active: set[tuple[str, int]] = field(default_factory=set)

    def ends(self, node: Node, pos: int) -> frozenset[int]:
        s = self.text
        if isinstance(node, Lit):
            return frozenset({pos + len(node.text)}) if s.startswith(node.text, pos) else frozenset()
        if isinstance(node, Cls):
            if pos >= len(s):
                return frozenset()
            cp = ord(s[pos])
            inside = any(lo <= cp <= hi for lo, hi in node.ranges)
            return frozenset({pos + 1}) if inside != node.negated else frozenset()
        if isinstance(node, Any_):
            return frozenset({pos + 1}) if pos < len(s) else frozenset()
        if isinstance(node, Ref):
            return self.rule(node.name, pos)
        if isinstance(node, Alt):
            out: set[int] = set()
            for option in node.options:
                out |= self.seq(option, frozenset({pos}))
            return frozenset(out)
        return self.rep(node, pos)

    def seq(self, items: tuple[Node, ...], starts: frozenset[int]) -> frozenset[int]:
        current = starts
        for item in items:
            nxt: set[int] = set()
            for p in current:
                nxt |= self.ends(item, p)
            current = frozenset(nxt)
            if not current:
                break
        return current

    def rep(self, node: Rep, pos: int) -> frozenset[int]:
        current = frozenset({pos})
        for _ in range(node.lo):
            current = self.seq((node.node,), current)
        result = set(current)
        count = node.lo
        while current and (node.hi is None or count < node.hi):
            nxt = self.seq((node.node,), current)
            if node.hi is None:
                nxt = frozenset(nxt - result)
            elif nxt == current:
                break
            result |= nxt
            current = nxt
            count += 1
        return frozenset(result)

    def rule(self, name: str, pos: int) -> frozenset[int]:
        key = (name, pos)
        if key in self.memo:
            return self.memo[key]
        if key in self.active:
            raise GrammarSyntaxError(f"left recursion through {name}")
        self.active.add(key)
        try:
            result = self.ends(self.rules[name], pos)
        finally:
            self.active.discard(key)
        self.memo[key] = result
        return result


class Grammar:
    """A parsed grammar that can test many strings."""

    def __init__(self, text: str, root: str = "root") -> None:
        self.rules = parse_gbnf(text)
        if root not in self.rules:
            raise GrammarSyntaxError(f"no rule {root}")
        self.root = root

    def matches(self, text: str) -> bool:
        matcher = Matcher(self.rules, text)
        return len(text) in matcher.rule(self.root, 0)


def matches(grammar: str, text: str, root: str = "root") -> bool:
    return Grammar(grammar, root).matches(text)
