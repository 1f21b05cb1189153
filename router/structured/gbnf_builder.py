"""Collects GBNF rules from one or more converted schemas into a single grammar.

Names are unique across everything added (a later schema never clobbers an earlier one) and the
fixed `json-*` rules are shared, so several tool schemas can be combined under one `root`.
"""

from __future__ import annotations

import re

from router.structured.gbnf_primitives import NAME_RE, primitive_rules

_NAME_CHARS = re.compile(r"[^A-Za-z0-9]+")


def referenced_names(body: str) -> list[str]:
    """Rule names used in a rule body (literals, classes and `{m,n}` counts skipped)."""
    names: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch in '"[':
            close = '"' if ch == '"' else "]"
            i += 1
            while i < len(body) and body[i] != close:
                i += 2 if body[i] == "\\" else 1
            i += 1
        elif ch == "{":
            i = body.index("}", i) + 1
        elif NAME_RE.match(ch):
            match = NAME_RE.match(body, i)
            assert match is not None
            names.append(match.group())
            i = match.end()
        else:
            i += 1
    return names


class GrammarBuilder:
    """An ordered set of named rules plus the shared primitives they reference."""

    def __init__(self, *, max_ws: int = 2) -> None:
        self._primitives = primitive_rules(max_ws)
        self._rules: dict[str, str | None] = {}  # None: reserved, body not written yet
        self._by_body: dict[str, str] = {}

    def reserve(self, hint: str) -> str:
        """A fresh rule name derived from `hint`, unused by any rule or primitive."""
        base = _NAME_CHARS.sub("-", hint).strip("-") or "rule"
        name, n = base, 1
        while name in self._rules or name in self._primitives:
            n += 1
            name = f"{base}-{n}"
        self._rules[name] = None
        return name

    def define(self, name: str, body: str) -> None:
        if self._rules.get(name, "") is not None:
            raise ValueError(f"rule {name!r} was not reserved or is already defined")
        self._rules[name] = body
        self._by_body.setdefault(body, name)

    def add(self, hint: str, body: str) -> str:
        """A rule for `body`, reusing an existing rule with the same body."""
        if body in self._by_body:
            return self._by_body[body]
        name = self.reserve(hint)
        self.define(name, body)
        return name

    def rules(self, roots: list[str] | None = None) -> dict[str, str]:
        """Rules reachable from `roots` (default: every defined rule), primitives included."""
        pending = [n for n in self._rules if roots is None or n in roots]
        if roots is not None:
            pending += [n for n in roots if n in self._primitives]
        out: dict[str, str] = {}
        while pending:
            name = pending.pop(0)
            if name in out:
                continue
            body = self._rules.get(name)
            if body is None:
                body = self._primitives.get(name)
            if body is None:
                raise ValueError(f"rule {name!r} is referenced but never defined")
            out[name] = body
            pending.extend(n for n in referenced_names(body) if n not in out)
        user = [n for n in self._rules if n in out]
        shared = [n for n in self._primitives if n in out]
        return {n: out[n] for n in user + shared}

    def render(self, root: str = "root") -> str:
        """The grammar text: `root` first, then every rule it reaches."""
        rules = self.rules([root])
        lines = [f"{root} ::= {rules[root]}"]
        lines += [f"{name} ::= {body}" for name, body in rules.items() if name != root]
        return "\n".join(lines) + "\n"
