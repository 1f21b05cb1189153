"""GBNF building blocks shared by the JSON Schema converter.

Escaping, code-point sets, the canonical JSON encoding of a set of characters, and the fixed
`json-*` rules (any value, strings, numbers, formats) that every converted schema may reference.
Rules are one line each: llama.cpp only accepts line breaks inside parentheses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MAX_CODEPOINT = 0x10FFFF
MAX_INT_DIGITS = 20  # digits of an integer part: bounded so a small model cannot loop on digits
MAX_FRAC_DIGITS = 20
MAX_EXP_DIGITS = 3
REPEAT_LIMIT = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD for {m,n}

Ranges = tuple[tuple[int, int], ...]

ALL_CHARS: Ranges = ((0, 0xD7FF), (0xE000, MAX_CODEPOINT))  # surrogates never occur in text
_SPECIAL: Ranges = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C))  # must be escaped inside JSON strings
_SHORT_ESCAPES = {0x22: '"', 0x5C: "\\", 0x08: "b", 0x0C: "f", 0x0A: "n", 0x0D: "r", 0x09: "t"}
_CLASS_RAW = re.compile(r"[A-Za-z0-9 !#$%&'()*+,./:;<=>?@_`{|}~]")
_ATOMIC = re.compile(r'[A-Za-z0-9-]+|"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')
_ONE_CHAR_LITERAL = re.compile(r'"(?:[^"\\]|\\[^xuU])"')
NAME_RE = re.compile(r"[A-Za-z0-9-]+")


# --- code-point sets ------------------------------------------------------------------------


def normalize(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Sort and merge overlapping or adjacent inclusive ranges."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(r for r in ranges if r[0] <= r[1]):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def complement(ranges: Ranges) -> Ranges:
    """All code points (surrogates excluded) not in `ranges`."""
    return subtract(ALL_CHARS, ranges)


def intersect(a: Ranges, b: Ranges) -> Ranges:
    out = [(max(x0, y0), min(x1, y1)) for x0, x1 in a for y0, y1 in b]
    return normalize(r for r in out if r[0] <= r[1])


def subtract(a: Ranges, b: Ranges) -> Ranges:
    out: list[tuple[int, int]] = []
    for lo, hi in a:
        cur = lo
        for b0, b1 in normalize(b):
            if b1 < cur or b0 > hi:
                continue
            if b0 > cur:
                out.append((cur, b0 - 1))
            cur = max(cur, b1 + 1)
        if cur <= hi:
            out.append((cur, hi))
    return normalize(out)


def of_chars(chars: Iterable[str]) -> Ranges:
    return normalize((ord(c), ord(c)) for c in chars)


# --- escaping ---------------------------------------------------------------------------------


def _hex_escape(cp: int) -> str:
    if cp < 0x100:
        return f"\\x{cp:02X}"
    if cp < 0x10000:
        return f"\\u{cp:04X}"
    return f"\\U{cp:08X}"


def gbnf_literal(text: str) -> str:
    """A GBNF string literal matching exactly `text`."""
    parts = []
    for ch in text:
        cp = ord(ch)
        if ch in '"\\':
            parts.append("\\" + ch)
        elif 0x20 <= cp < 0x7F:
            parts.append(ch)
        else:
            parts.append(_hex_escape(cp))
    return '"' + "".join(parts) + '"'


def _class_char(cp: int) -> str:
    ch = chr(cp)
    return ch if _CLASS_RAW.fullmatch(ch) else _hex_escape(cp)


def gbnf_class(ranges: Ranges, *, negate: bool = False) -> str:
    """A GBNF character class; non-alphanumerics are hex-escaped to stay unambiguous."""
    items = []
    for lo, hi in ranges:
        items.append(_class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}")
    return "[" + ("^" if negate else "") + "".join(items) + "]"


def class_expr(ranges: Ranges) -> str:
    """The shorter of the positive and negated class for a non-empty set."""
    negated = subtract(((0, MAX_CODEPOINT),), ranges)
    negated = subtract(negated, ((0xD800, 0xDFFF),))
    if negated and len(negated) < len(ranges):
        return gbnf_class(negated, negate=True)
    if not negated:
        return "."
    return gbnf_class(ranges)


def is_atomic(expr: str) -> bool:
    """True when `expr` can take a quantifier or join a sequence without parentheses."""
    return bool(_ATOMIC.fullmatch(expr)) or expr == "."


def group(expr: str) -> str:
    """`expr` made atomic (for quantifiers)."""
    return expr if is_atomic(expr) else f"( {expr} )"


def _has_top_level_alt(expr: str) -> bool:
    depth, i = 0, 0
    while i < len(expr):
        ch = expr[i]
        if ch in '"[':
            close = '"' if ch == '"' else "]"
            i += 1
            while i < len(expr) and expr[i] != close:
                i += 2 if expr[i] == "\\" else 1
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            return True
        i += 1
    return False


def seq_item(expr: str) -> str:
    """`expr` made safe to place inside a sequence (alternations get parentheses)."""
    return f"( {expr} )" if _has_top_level_alt(expr) else expr


def sequence(*parts: str) -> str:
    """Parts joined as a GBNF sequence, empty parts dropped."""
    items = [seq_item(p) for p in parts if p and p != '""']
    return " ".join(items) if items else '""'


def alternation(alternatives: list[str]) -> str:
    """`a | b | c` without duplicates (not atomic unless there is one alternative)."""
    seen: list[str] = []
    for alt in alternatives:
        if alt not in seen:
            seen.append(alt)
    return " | ".join(seen)


def _repeat_atom(expr: str) -> str:
    single_literal = _ONE_CHAR_LITERAL.fullmatch(expr) is not None
    if single_literal or (is_atomic(expr) and not expr.startswith('"')):
        return expr
    return f"( {expr} )"  # llama.cpp repeats a whole literal, but keep it explicit


def _exactly(atom: str, n: int) -> str:
    if n <= REPEAT_LIMIT:
        return atom if n == 1 else f"{atom}{{{n}}}"
    chunks, rest = divmod(n, REPEAT_LIMIT)
    return sequence(_exactly(f"( {atom}{{{REPEAT_LIMIT}}} )", chunks), _exactly(atom, rest))


def _up_to(atom: str, n: int) -> str:
    """0..n repetitions; above the limit as `x{0,L-1} | x{L} (...)`, one derivation per count."""
    if n <= REPEAT_LIMIT:
        return {0: '""', 1: f"{atom}?"}.get(n, f"{atom}{{0,{n}}}")
    shorter = f"{atom}{{0,{REPEAT_LIMIT - 1}}}"
    return f"( {shorter} | {atom}{{{REPEAT_LIMIT}}} {seq_item(_up_to(atom, n - REPEAT_LIMIT))} )"


def quantified(expr: str, lo: int, hi: int | None) -> str:
    """`expr` repeated lo..hi times (hi None: unbounded); empty string literal when hi == 0.

    Counts above llama.cpp's MAX_REPETITION_THRESHOLD are split: it rejects a larger minimum
    and silently drops a larger maximum.
    """
    if hi == 0:
        return '""'
    atom = _repeat_atom(expr)
    if (lo, hi) == (1, 1):
        return atom
    if (lo, hi) == (0, None):
        return atom + "*"
    if (lo, hi) == (1, None):
        return atom + "+"
    if (lo, hi) == (0, 1):
        return atom + "?"
    if lo > REPEAT_LIMIT or (hi is not None and hi > REPEAT_LIMIT):
        rest = atom + "*" if hi is None else _up_to(atom, hi - lo)
        return sequence(_exactly(atom, lo) if lo else "", rest)
    if hi is None:
        return f"{atom}{{{lo},}}"
    if lo == hi:
        return f"{atom}{{{lo}}}"
    return f"{atom}{{{lo},{hi}}}"


# --- canonical JSON encoding of characters ----------------------------------------------------


def _hex_digit_class(nibbles: list[int]) -> str:
    chars = []
    for v in nibbles:
        digit = f"{v:x}"
        chars.append(digit)
        if digit.isalpha():
            chars.append(digit.upper())
    return gbnf_class(of_chars(chars))


def _escape_expr(special: Ranges) -> str:
    """Escape sequences for code points that JSON strings cannot hold raw."""
    if special == _SPECIAL:
        return "json-esc"
    cps = [cp for lo, hi in special for cp in range(lo, hi + 1)]
    letters = [_SHORT_ESCAPES[cp] for cp in cps if cp in _SHORT_ESCAPES]
    unicode = [cp for cp in cps if cp not in _SHORT_ESCAPES]
    parts = []
    if letters:
        parts.append(gbnf_class(of_chars(letters)))
    if unicode:
        by_high = []
        for high in (0, 1):
            lows = [cp & 0xF for cp in unicode if cp >> 4 == high]
            if lows:
                by_high.append(f'"{high}" {_hex_digit_class(lows)}')
        parts.append('"u00" ' + group(alternation(by_high)))
    return '"\\\\" ' + group(alternation(parts))


def encode_charset(ranges: Ranges) -> str:
    """An atomic GBNF expression matching the canonical JSON-string encoding of each code point.

    Canonical means: raw unless the character must be escaped, short escapes where JSON has one,
    `\\u00XX` otherwise.  One encoding per character keeps lengths and key comparisons exact.
    """
    ranges = intersect(ranges, ALL_CHARS)
    if not ranges:
        raise ValueError("empty character set")
    raw = subtract(ranges, _SPECIAL)
    special = intersect(ranges, _SPECIAL)
    alts = []
    if raw:
        alts.append(class_expr(raw))
    if special:
        alts.append(_escape_expr(special))
    return group(alternation(alts))


def encode_text(text: str) -> str:
    """The canonical JSON-string encoding (without quotes) of `text`."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp in _SHORT_ESCAPES:
            out.append("\\" + _SHORT_ESCAPES[cp])
        elif cp < 0x20:
            out.append(f"\\u{cp:04x}")
        else:
            out.append(ch)
    return "".join(out)


# --- fixed rules ------------------------------------------------------------------------------

_HEX = "[0-9a-fA-F]"
_D2 = "[0-9] [0-9]"
_HOUR = '( [01] [0-9] | "2" [0-3] )'
_MIN = "[0-5] [0-9]"
_LEAP_END = '( "0" [48] | [2468] [048] | [13579] [26] )'
_EMAIL_LOCAL = gbnf_class(of_chars("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_%+-"))
_LABEL = '[A-Za-z0-9] ( "-"? [A-Za-z0-9] ){0,62}'


def primitive_rules(max_ws: int) -> dict[str, str]:
    """Every fixed rule by name; a grammar includes only those it references."""
    if max_ws < 0:
        raise ValueError("max_ws must be >= 0")
    ws = quantified(r"[ \t\n]", 0, max_ws) if max_ws else '""'
    return {
        "ws": ws,
        "json-value": ("json-object | json-array | json-string | json-number | json-bool | json-null"),
        "json-object": '"{" ws ( json-member ( ws "," ws json-member )* ws )? "}"',
        "json-member": 'json-string ws ":" ws json-value',
        "json-array": '"[" ws ( json-value ( ws "," ws json-value )* ws )? "]"',
        "json-string": '"\\"" json-char* "\\""',
        # \u escapes exclude surrogates so one json-char is always one code point (exact lengths)
        "json-char": '[^"\\\\\\x00-\\x1F] | "\\\\" ( ["\\\\/bfnrt] | "u" json-hex4 )',
        "json-hex4": f"[0-9a-cA-Ce-fE-F] {_HEX}{{3}} | [dD] [0-7] {_HEX}{{2}}",
        "json-esc": '"\\\\" ( ["\\\\bfnrt] | "u00" ( "0" [0-7bBeEfF] | "1" [0-9a-fA-F] ) )',
        "json-kchar": '[^"\\\\\\x00-\\x1F] | json-esc',
        "json-number": "json-int json-frac? json-exp?",
        "json-int": '"-"? json-uint',
        "json-uint": f'"0" | [1-9] [0-9]{{0,{MAX_INT_DIGITS - 1}}}',
        "json-frac": f'"." [0-9]{{1,{MAX_FRAC_DIGITS}}}',
        "json-exp": f"[eE] [+-]? [0-9]{{1,{MAX_EXP_DIGITS}}}",
        "json-bool": '"true" | "false"',
        "json-null": '"null"',
        # formats (RFC 3339 dates with real month lengths and leap years; year 0000 excluded)
        "json-year": '[1-9] [0-9]{3} | "0" [1-9] [0-9]{2} | "00" [1-9] [0-9] | "000" [1-9]',
        "json-leap-year": f'{_D2} {_LEAP_END} | {_LEAP_END} "00"',
        "json-month-day": (
            '( "0" [13578] | "1" [02] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] )'
            ' | ( "0" [469] | "11" ) "-" ( "0" [1-9] | [12] [0-9] | "30" )'
            ' | "02-" ( "0" [1-9] | "1" [0-9] | "2" [0-8] )'
        ),
        "json-date": 'json-year "-" json-month-day | json-leap-year "-02-29"',
        "json-time": (
            f'{_HOUR} ":" {_MIN} ":" {_MIN} ( "." [0-9]{{1,9}} )? ( "Z" | [+-] {_HOUR} ":" {_MIN} )'
        ),
        "json-fmt-date": '"\\"" json-date "\\""',
        "json-fmt-time": '"\\"" json-time "\\""',
        "json-fmt-date-time": '"\\"" json-date "T" json-time "\\""',
        "json-fmt-uuid": (
            f'"\\"" {_HEX}{{8}} "-" {_HEX}{{4}} "-" {_HEX}{{4}} "-" {_HEX}{{4}} "-" {_HEX}{{12}} "\\""'
        ),
        "json-fmt-email": (
            f'"\\"" {_EMAIL_LOCAL}{{1,64}} ( "." {_EMAIL_LOCAL}{{1,64}} ){{0,4}}'
            f' "@" {_LABEL} ( "." {_LABEL} ){{1,8}} "\\""'
        ),
    }


FORMAT_RULES = {
    "date": "json-fmt-date",
    "time": "json-fmt-time",
    "date-time": "json-fmt-date-time",
    "uuid": "json-fmt-uuid",
    "email": "json-fmt-email",
}
