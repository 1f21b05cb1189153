"""Refuses request text that is not valid Unicode: a lone UTF-16 surrogate such as JSON's "\\ud800".

JSON allows such escapes and Python's parser keeps them as surrogate code points (a proper high/low pair
becomes one character), but nothing can encode them as UTF-8: tokenizing, templating, logging or
writing the answer would fail deep inside a handler or halfway through a stream. Request models derive
from `UnicodeCheckedModel`, which walks the parsed body once, keys and values, before validation, and
answers a 400 naming the first field that holds one.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, model_validator

_SURROGATE = re.compile("[\ud800-\udfff]")
_TEXTLESS = frozenset({int, float, bool, type(None)})


class LoneSurrogateError(ValueError):
    """A string of the request holds a lone surrogate; `param` is where (`messages.0.content`)."""

    def __init__(self, param: str, char: str) -> None:
        self.param = param
        super().__init__(
            f"{param or 'the request'} contains a lone UTF-16 surrogate (U+{ord(char):04X}), "
            "which is not valid Unicode text"
        )


def find_lone_surrogate(value: Any, path: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """(dotted path, surrogate) of the first lone surrogate in a parsed JSON value, else None."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return ".".join(where), found.group()
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                if isinstance(key, str) and (found := _SURROGATE.search(key)):  # named escaped
                    return ".".join((*where, key.encode("utf-8", "backslashreplace").decode())), found.group()
                stack.append((child, (*where, str(key))))
        elif isinstance(item, list) and not _TEXTLESS.issuperset(map(type, item)):  # not only numbers
            for i in range(len(item) - 1, -1, -1):
                if isinstance(item[i], (str, dict, list)):  # token ids and numbers hold no text
                    stack.append((item[i], (*where, str(i))))
    return None


def lone_surrogate_param(error: dict[str, Any]) -> LoneSurrogateError | None:
    """The LoneSurrogateError behind one of pydantic's error dicts, if it is one."""
    cause = (error.get("ctx") or {}).get("error")
    return cause if isinstance(cause, LoneSurrogateError) else None


class UnicodeCheckedModel(BaseModel):
    """A request model whose raw input must hold no lone surrogate anywhere."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        found = find_lone_surrogate(data)
        if found is not None:
            raise LoneSurrogateError(*found)
        return data
