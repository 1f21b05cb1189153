"""GBNF for integers and decimals between inclusive integer bounds.

Ranges are written digit by digit (e.g. 1..12 becomes `[1-9] | "1" [0-2]`), so the grammar accepts
exactly the canonical numerals in range: no leading zeros, no `-0`.  Bounded decimals drop the
exponent, which keeps them a subset of the valid numbers with a grammar a CFG can express.
"""

from __future__ import annotations

from router.structured.gbnf_primitives import MAX_FRAC_DIGITS, MAX_INT_DIGITS, alternation, sequence

_ZERO_FRAC = f'( "." "0"{{1,{MAX_FRAC_DIGITS}}} )?'
_NONZERO_FRAC = f'"." "0"{{0,{MAX_FRAC_DIGITS - 1}}} [1-9] [0-9]{{0,{MAX_FRAC_DIGITS - 1}}}'


def _digits(n: int) -> str:
    return "[0-9]" if n == 1 else f"[0-9]{{{n}}}"


def _digit_class(lo: int, hi: int) -> str:
    return f'"{lo}"' if lo == hi else f"[{lo}-{hi}]"


def _same_length(lo: str, hi: str) -> list[str]:
    """Alternatives for the digit strings of one length between lo and hi (leading zeros kept)."""
    n = len(lo)
    if lo == hi:
        return [f'"{lo}"']
    if lo == "0" * n and hi == "9" * n:
        return [_digits(n)]
    a, b = int(lo[0]), int(hi[0])
    if n == 1:
        return [_digit_class(a, b)]
    if a == b:
        return [sequence(f'"{a}"', alternation(_same_length(lo[1:], hi[1:])))]
    rest = n - 1
    low_full = lo[1:] == "0" * rest
    high_full = hi[1:] == "9" * rest
    out = []
    if not low_full:
        out.append(sequence(f'"{a}"', alternation(_same_length(lo[1:], "9" * rest))))
    mid_lo = a if low_full else a + 1
    mid_hi = b if high_full else b - 1
    if mid_lo <= mid_hi:
        out.append(sequence(_digit_class(mid_lo, mid_hi), _digits(rest)))
    if not high_full:
        out.append(sequence(f'"{b}"', alternation(_same_length("0" * rest, hi[1:]))))
    return out


def uint_alternatives(lo: int, hi: int | None) -> list[str]:
    """Canonical non-negative integer numerals in lo..hi (hi None: up to MAX_INT_DIGITS digits)."""
    if lo < 0 or (hi is not None and hi < lo):
        raise ValueError(f"bad unsigned range {lo}..{hi}")
    low_len = len(str(lo))
    top_len = len(str(hi)) if hi is not None else low_len
    out: list[str] = []
    for n in range(low_len, top_len + 1):
        a = max(lo, 10 ** (n - 1) if n > 1 else 0)
        b = 10**n - 1 if hi is None else min(hi, 10**n - 1)
        if a <= b:
            out.extend(_same_length(str(a), str(b)))
    if hi is None:
        longest = max(MAX_INT_DIGITS, low_len + 1)
        out.append(f"[1-9] [0-9]{{{low_len},{longest - 1}}}")
    return out


def integer_range(lo: int | None, hi: int | None) -> str:
    """Integers n with lo <= n <= hi; None means unbounded on that side."""
    if lo is None and hi is None:
        return "json-int"
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"empty integer range {lo}..{hi}")
    alts: list[str] = []
    if hi is not None and hi < 0:
        alts.append(sequence('"-"', alternation(uint_alternatives(-hi, None if lo is None else -lo))))
    elif lo is None or lo < 0:
        alts.append(sequence('"-"', alternation(uint_alternatives(1, None if lo is None else -lo))))
        alts.extend(uint_alternatives(0, hi))
    else:
        alts.extend(uint_alternatives(lo, hi))
    return alternation(alts)


def _magnitude(m_lo: int, m_hi: int | None, *, positive: bool) -> list[str]:
    """Unsigned decimals m with m_lo <= m <= m_hi (and m > 0 when `positive`)."""
    exp = "json-exp?" if m_lo == 0 and m_hi is None else ""
    out = []
    start = m_lo
    if positive and m_lo == 0:
        if m_hi is None or m_hi >= 1:
            out.append(sequence('"0"', _NONZERO_FRAC, exp))
        start = 1
    if m_hi is None:
        out.append(sequence(alternation(uint_alternatives(start, None)), "json-frac?", exp))
        return out
    if start <= m_hi - 1:
        out.append(sequence(alternation(uint_alternatives(start, m_hi - 1)), "json-frac?"))
    if start <= m_hi:
        out.append(sequence(f'"{m_hi}"', _ZERO_FRAC))
    return out


def number_range(lo: int | None, hi: int | None) -> str:
    """Decimals x with lo <= x <= hi for integer bounds; None means unbounded on that side."""
    if lo is None and hi is None:
        return "json-number"
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"empty number range {lo}..{hi}")
    alts: list[str] = []
    if hi is None or hi >= 0:
        alts.extend(_magnitude(0 if lo is None else max(lo, 0), hi, positive=False))
    if lo is None or lo < 0:
        m_lo = -hi if hi is not None and hi < 0 else 0
        negative = _magnitude(m_lo, None if lo is None else -lo, positive=True)
        if negative:
            alts.append(sequence('"-"', alternation(negative)))
    return alternation(alts)
