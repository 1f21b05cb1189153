"""A model-free GBNF automaton: where a grammar stands after some text, and its shortest way to finish.

llama.cpp's grammar sampler keeps its parse state (a set of stacks) opaque, so a sequence that must end on
a complete document within a token budget tracks the same state here, in Python, from the same GBNF
text: the grammar is compiled the way llama.cpp compiles it (each alternative a sequence of code-point
classes and rule references; `*`, `+`, `?` and `{m,n}` expanded into helper rules), a state is the set
of stacks llama.cpp would hold, and `advance` feeds UTF-8 bytes. From any state, `completion` gives the
shortest text (in bytes) that completes the grammar: every rule's shortest derivation is precomputed, so
a stack's completion is the concatenation of its frames' shortest remainders. Both the router (is the
shortest document within the budget at all?) and the worker (steer onto it as the budget runs out) use it.

Everything is immutable: a state is a frozenset of stacks (tuples of positions), so candidate tokens can
be tried without copying. Grammars outside what this compiles (token references `<...>`, left recursion)
raise `GrammarUnsupported`; callers then simply do not track the budget.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

_END, _CHAR, _RULE = 0, 1, 2
_INF = 1 << 60
MAX_STACKS = 512  # beyond this many live stacks the grammar is too ambiguous to track cheaply
FREE_STRING_RULE = "json-string"  # the converter's string without length bounds (gbnf_primitives)
_PREFERRED = "a0 "  # representative characters for a class, in order, before scanning


class GrammarUnsupported(ValueError):
    """The grammar uses something this automaton does not model (tracking is then skipped)."""


Stack = tuple[int, ...]
CharClass = tuple[tuple[tuple[int, int], ...], bool]  # code-point ranges, negated
Element = tuple[int, "int | CharClass"]  # (_CHAR, class) or (_RULE, rule id)
_NO_CLASS: CharClass = ((), False)


@dataclass(frozen=True)
class State:
    """The stacks llama.cpp would hold, plus an unfinished UTF-8 character's bytes."""

    stacks: frozenset[Stack]
    pending: bytes = b""

    @property
    def dead(self) -> bool:
        return not self.stacks

    @property
    def complete(self) -> bool:
        """The text so far is a whole document (end-of-generation is allowed)."""
        return () in self.stacks and not self.pending


# --- parsing ----------------------------------------------------------------------------------------


class _Parser:
    """GBNF text -> rules of element lists, as llama.cpp's grammar parser builds them."""

    def __init__(self, text: str) -> None:
        self.src = text
        self.names: dict[str, int] = {}
        self.rules: list[list[list[Element]] | None] = []
        self.owner: dict[int, str] = {}  # rule id -> the named rule whose definition it is part of
        self.current = ""

    def rule_id(self, name: str) -> int:
        if name not in self.names:
            self.names[name] = len(self.rules)
            self.rules.append(None)
        return self.names[name]

    def fresh(self, alts: list[list[Element]]) -> int:
        rid = len(self.rules)
        self.names[f"\0{rid}"] = rid
        self.rules.append(alts)
        self.owner[rid] = self.current
        return rid

    def skip(self, i: int, newline: bool) -> int:
        src = self.src
        while i < len(src):
            ch = src[i]
            if ch == "#":
                while i < len(src) and src[i] not in "\r\n":
                    i += 1
            elif ch in " \t" or (newline and ch in "\r\n"):
                i += 1
            else:
                break
        return i

    def name_at(self, i: int) -> int:
        j = i
        while j < len(self.src) and (self.src[j].isalnum() or self.src[j] in "-_"):
            j += 1
        return j

    def parse(self) -> None:
        i = self.skip(0, True)
        while i < len(self.src):
            j = self.name_at(i)
            if j == i:
                raise GrammarUnsupported(f"expected a rule name at offset {i}")
            name = self.src[i:j]
            k = self.skip(j, False)
            if not self.src.startswith("::=", k):
                raise GrammarUnsupported(f"expected '::=' after {name!r}")
            self.current = name
            alts, i = self.alternates(self.skip(k + 3, True), nested=False)
            rid = self.rule_id(name)
            self.owner[rid] = name
            if self.rules[rid] is not None:
                raise GrammarUnsupported(f"rule {name!r} defined twice")
            self.rules[rid] = alts
            i = self.skip(i, True)
        for name, rid in self.names.items():
            if self.rules[rid] is None:
                raise GrammarUnsupported(f"rule {name!r} is used but not defined")

    def alternates(self, i: int, nested: bool) -> tuple[list[list[Element]], int]:
        alts: list[list[Element]] = []
        seq, i = self.sequence(i, nested)
        alts.append(seq)
        while i < len(self.src) and self.src[i] == "|":
            seq, i = self.sequence(self.skip(i + 1, True), nested)
            alts.append(seq)
        return alts, i

    def sequence(self, i: int, nested: bool) -> tuple[list[Element], int]:
        src = self.src
        seq: list[Element] = []
        last_start = 0  # where the last element (for a repetition) starts in `seq`
        while i < len(src):
            ch = src[i]
            if ch == '"':
                i += 1
                last_start = len(seq)
                while i < len(src) and src[i] != '"':
                    cp, i = self.char(i)
                    seq.append((_CHAR, (((cp, cp),), False)))
                i += 1
            elif ch == "[":
                i += 1
                negated = i < len(src) and src[i] == "^"
                i += 1 if negated else 0
                ranges: list[tuple[int, int]] = []
                while i < len(src) and src[i] != "]":
                    lo, i = self.char(i)
                    hi = lo
                    if src[i] == "-" and i + 1 < len(src) and src[i + 1] != "]":
                        hi, i = self.char(i + 1)
                    ranges.append((lo, hi))
                i += 1
                last_start = len(seq)
                seq.append((_CHAR, (tuple(ranges), negated)))
            elif ch == ".":
                i += 1
                last_start = len(seq)
                seq.append((_CHAR, ((), True)))
            elif ch == "(":
                alts, i = self.alternates(self.skip(i + 1, True), nested=True)
                if i >= len(src) or src[i] != ")":
                    raise GrammarUnsupported("unbalanced parenthesis")
                i += 1
                last_start = len(seq)
                seq.append((_RULE, self.fresh(alts)))
            elif ch in "*+?{":
                if not seq:
                    raise GrammarUnsupported("repetition without an element")
                low, high, i = self.counts(i)
                seq[last_start:] = self.repeat(seq[last_start:], low, high)
            elif ch.isalnum() or ch in "-_":
                j = self.name_at(i)
                k = self.skip(j, True)
                if src.startswith("::=", k):
                    break  # the next rule's definition
                last_start = len(seq)
                seq.append((_RULE, self.rule_id(src[i:j])))
                i = j
            elif ch == "<":
                raise GrammarUnsupported("token references are not tracked")
            else:
                break
            i = self.skip(i, nested)
        return seq, i

    def counts(self, i: int) -> tuple[int, int | None, int]:
        ch = self.src[i]
        if ch == "*":
            return 0, None, i + 1
        if ch == "+":
            return 1, None, i + 1
        if ch == "?":
            return 0, 1, i + 1
        close = self.src.index("}", i)
        body = self.src[i + 1 : close].replace(" ", "")
        if "," not in body:
            return int(body), int(body), close + 1
        lo, hi = body.split(",", 1)
        return int(lo or 0), int(hi) if hi else None, close + 1

    def repeat(self, item: list[Element], lo: int, hi: int | None) -> list[Element]:
        out: list[Element] = []
        for _ in range(lo):
            out += item
        if hi is None:
            star = len(self.rules)
            self.fresh([])
            self.rules[star] = [[*item, (_RULE, star)], []]
            out.append((_RULE, star))
        elif hi > lo:
            tail: int | None = None
            for _ in range(hi - lo):
                body = [*item, (_RULE, tail)] if tail is not None else list(item)
                tail = self.fresh([body, []])
            assert tail is not None
            out.append((_RULE, tail))
        return out

    def char(self, i: int) -> tuple[int, int]:
        src = self.src
        if src[i] != "\\":
            return ord(src[i]), i + 1
        esc = src[i + 1]
        size = {"x": 2, "u": 4, "U": 8}.get(esc)
        if size is not None:
            return int(src[i + 2 : i + 2 + size], 16), i + 2 + size
        simple = {"n": 10, "r": 13, "t": 9}
        return simple.get(esc, ord(esc)), i + 2


# --- the automaton ------------------------------------------------------------------------------------


class Automaton:
    """A compiled grammar: advance states over bytes, and the shortest completion of a state."""

    def __init__(self, grammar: str, root: str = "root") -> None:
        parser = _Parser(grammar)
        parser.parse()
        if root not in parser.names:
            raise GrammarUnsupported(f"the grammar has no {root!r} rule")
        self._kind: list[int] = []
        self._rule: list[int] = []  # rule id of a _RULE element, else -1
        self._cls: list[CharClass] = []  # class of a _CHAR element
        self._alts: list[list[int]] = []
        self._free_string: set[int] = set()  # frames inside an open json-string (free text)
        for rule_id, alts in enumerate(parser.rules):
            assert alts is not None
            starts = []
            free = parser.owner.get(rule_id) == FREE_STRING_RULE
            for seq in alts:
                starts.append(len(self._kind))
                if free:
                    first = len(self._kind) if rule_id == parser.names[FREE_STRING_RULE] else -1
                    span = range(len(self._kind), len(self._kind) + len(seq) + 1)
                    self._free_string.update(p for p in span if p != first)
                for kind, arg in seq:
                    self._kind.append(kind)
                    self._rule.append(arg if isinstance(arg, int) else -1)
                    self._cls.append(arg if not isinstance(arg, int) else _NO_CLASS)
                self._kind.append(_END)
                self._rule.append(-1)
                self._cls.append(_NO_CLASS)
            self._alts.append(starts)
        self._closure: dict[int, tuple[list[Stack], bool]] = {}
        self._busy: set[int] = set()
        self._min_rule = self._shortest_rules()
        self._min_at: dict[int, int] = {}
        self._text_at: dict[int, bytes] = {}
        self._root_pos = len(self._kind)
        self._kind += [_RULE, _END]
        self._rule += [parser.names[root], -1]
        self._cls += [_NO_CLASS, _NO_CLASS]
        if self._min_rule[parser.names[root]] >= _INF:
            raise GrammarUnsupported("the grammar derives no finite text")
        self.initial = State(frozenset(self._expand((), self._root_pos)))

    # -- stacks --

    def _frames(self, pos: int) -> tuple[list[Stack], bool]:
        """What a frame at `pos` expands to: stacks of frames (top last) that start with a character
        element, and whether the rest of its sequence can derive nothing at all."""
        found = self._closure.get(pos)
        if found is not None:
            return found
        if pos in self._busy:
            raise GrammarUnsupported("left-recursive grammar")
        kind = self._kind[pos]
        if kind == _END:
            return [], True
        if kind == _CHAR:
            result: tuple[list[Stack], bool] = ([(pos,)], False)
            self._closure[pos] = result
            return result
        self._busy.add(pos)
        try:
            nxt = pos + 1
            out: list[Stack] = []
            nullable = False
            rule = self._rule[pos]
            for start in self._alts[rule]:
                stacks, empty = self._frames(start)
                base: Stack = (nxt,) if self._kind[nxt] != _END else ()
                out += [base + s for s in stacks]
                if empty:
                    if self._kind[nxt] == _END:
                        nullable = True
                    else:
                        rest, rest_empty = self._frames(nxt)
                        out += rest
                        nullable = nullable or rest_empty
        finally:
            self._busy.discard(pos)
        result = (list(dict.fromkeys(out)), nullable)
        self._closure[pos] = result
        return result

    def _expand(self, base: Stack, pos: int) -> set[Stack]:
        """Stacks for `base` with a frame at `pos` on top, expanded until each top is a character."""
        out: set[Stack] = set()
        while True:
            if self._kind[pos] == _END:
                if not base:
                    out.add(())
                    return out
                pos, base = base[-1], base[:-1]
                continue
            stacks, empty = self._frames(pos)
            out.update(base + s for s in stacks)
            if not empty:
                return out
            if not base:
                out.add(())
                return out
            pos, base = base[-1], base[:-1]

    def _matches(self, pos: int, cp: int) -> bool:
        ranges, negated = self._cls[pos]
        inside = any(lo <= cp <= hi for lo, hi in ranges)
        return inside != negated

    def advance_char(self, stacks: frozenset[Stack], cp: int) -> frozenset[Stack]:
        out: set[Stack] = set()
        for stack in stacks:
            if stack and self._matches(stack[-1], cp):
                out |= self._expand(stack[:-1], stack[-1] + 1)
        if len(out) > MAX_STACKS:
            raise GrammarUnsupported("too many parse stacks to track")
        return frozenset(out)

    def advance(self, state: State, data: bytes) -> State:
        """The state after `data` (a dead state when the grammar refuses it)."""
        stacks = state.stacks
        buf = state.pending + data
        at = 0
        while at < len(buf) and stacks:
            lead = buf[at]
            size = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            if at + size > len(buf):
                break
            try:
                cp = ord(buf[at : at + size].decode("utf-8"))
            except UnicodeDecodeError:
                return State(frozenset())
            stacks = self.advance_char(stacks, cp)
            at += size
        return State(stacks, buf[at:] if stacks else b"")

    # -- shortest completions --

    def _char_min(self, pos: int) -> int:
        return len(self._char_text(pos))

    def _char_text(self, pos: int) -> bytes:
        ranges, negated = self._cls[pos]
        for ch in _PREFERRED:
            if self._matches(pos, ord(ch)):
                return ch.encode()
        if not negated:
            for lo, _ in sorted(ranges):
                if not 0xD800 <= lo <= 0xDFFF:
                    return chr(lo).encode("utf-8")
            return b"\xff" * 8  # nothing encodable: priced out
        for cp in range(0x21, 0x110000):
            if not 0xD800 <= cp <= 0xDFFF and self._matches(pos, cp):
                return chr(cp).encode("utf-8")
        return b"\xff" * 8

    def _shortest_rules(self) -> list[int]:
        best = [_INF] * len(self._alts)
        changed = True
        while changed:
            changed = False
            for rule, starts in enumerate(self._alts):
                for start in starts:
                    total, pos = 0, start
                    while self._kind[pos] != _END and total < _INF:
                        if self._kind[pos] == _CHAR:
                            total += self._char_min(pos)
                        else:
                            total += best[self._rule[pos]]
                        pos += 1
                    if total < best[rule]:
                        best[rule] = total
                        changed = True
        return best

    def _min_from(self, pos: int) -> int:
        """Bytes of the shortest text the sequence from `pos` to its end derives."""
        found = self._min_at.get(pos)
        if found is None:
            total, at = 0, pos
            while self._kind[at] != _END:
                if self._kind[at] == _CHAR:
                    total += self._char_min(at)
                else:
                    total += self._min_rule[self._rule[at]]
                at += 1
            found = self._min_at[pos] = min(total, _INF)
        return found

    def _rule_text(self, rule: int, depth: int) -> bytes:
        if depth > 4096:
            raise GrammarUnsupported("shortest derivation too deep")
        target = self._min_rule[rule]
        for start in self._alts[rule]:
            if self._min_from(start) == target:
                return self._text_from(start, depth + 1)
        raise GrammarUnsupported("no finite derivation")

    def _text_from(self, pos: int, depth: int = 0) -> bytes:
        found = self._text_at.get(pos)
        if found is not None:
            return found
        parts: list[bytes] = []
        at = pos
        while self._kind[at] != _END:
            if self._kind[at] == _CHAR:
                parts.append(self._char_text(at))
            else:
                parts.append(self._rule_text(self._rule[at], depth))
            at += 1
        text = self._text_at[pos] = b"".join(parts)
        return text

    def _continuations(self, state: State) -> list[bytes]:
        """Bytes finishing the unfinished UTF-8 character of `state` with a character some stack's
        top accepts (the lowest such code point per stack)."""
        pending = state.pending
        size = 2 if pending[0] < 0xE0 else 3 if pending[0] < 0xF0 else 4
        missing = size - len(pending)
        low = max(_decode_lenient(pending + b"\x80" * missing), {2: 0x80, 3: 0x800, 4: 0x10000}[size])
        high = _decode_lenient(pending + b"\xbf" * missing)
        out: list[bytes] = []
        for stack in sorted(state.stacks):
            if not stack:
                continue
            ranges, negated = self._cls[stack[-1]]
            spans = [(max(a, low), min(b, high)) for a, b in ranges] if not negated else [(low, high)]
            for a, b in spans:
                cp = next((c for c in range(a, min(b, a + 4096) + 1) if self._char_ok(stack[-1], c)), None)
                if cp is not None:
                    encoded = chr(cp).encode("utf-8")
                    if encoded.startswith(pending):
                        out.append(encoded[len(pending) :])
                        break
        return list(dict.fromkeys(out))

    def _char_ok(self, pos: int, cp: int) -> bool:
        return not 0xD800 <= cp <= 0xDFFF and self._matches(pos, cp)

    def in_free_string(self, state: State) -> bool:
        """Whether every parse of the text so far stands inside an open `json-string` (a string with no
        length bound: where a looping model runs away)."""
        if not self._free_string or not state.stacks:
            return False
        return all(any(p in self._free_string for p in stack) for stack in state.stacks)

    def completion_cost(self, state: State) -> int:
        """Bytes of the shortest completion (pending UTF-8 bytes included); huge when dead."""
        best = _INF
        for stack in state.stacks:
            best = min(best, sum(self._min_from(p) for p in stack))
        return best

    def completion(self, state: State) -> bytes | None:
        """The shortest text that completes `state` into a whole document; None when dead.

        An unfinished UTF-8 character is completed first (with the smallest continuation the grammar
        accepts)."""
        if state.pending:
            for tail in self._continuations(state):
                after = self.advance(state, tail)
                if not after.dead:
                    rest = self.completion(after)
                    return None if rest is None else tail + rest
            return None
        best: Stack | None = None
        cost = _INF
        for stack in sorted(state.stacks):
            total = sum(self._min_from(p) for p in stack)
            if total < cost:
                best, cost = stack, total
        if best is None:
            return None
        return b"".join(self._text_from(p) for p in reversed(best))


def _decode_lenient(data: bytes) -> int:
    """The code point UTF-8 bytes spell, range checks aside (bounds of a lead byte's interval)."""
    lead = data[0]
    size = len(data)
    value = lead & (0x1F if size == 2 else 0x0F if size == 3 else 0x07)
    for byte in data[1:]:
        value = (value << 6) | (byte & 0x3F)
    return value


_automata: dict[str, Automaton | None] = {}
_MAX_CACHED = 64
_lock = threading.Lock()  # the router builds grammars on a thread pool


def automaton_for(grammar: str) -> Automaton | None:
    """The compiled automaton of a grammar (cached by text); None when it cannot be tracked."""
    with _lock:
        if grammar in _automata:
            return _automata[grammar]
        try:
            found: Automaton | None = Automaton(grammar)
            if found is not None:
                found.completion(found.initial)  # fills the shortest-text tables before sharing
        except (GrammarUnsupported, RecursionError, ValueError, IndexError):
            found = None
        if len(_automata) >= _MAX_CACHED:
            _automata.pop(next(iter(_automata)))
        _automata[grammar] = found
        return found
