"""JSON null for an optional request field means "not given", as OpenAI's API and vLLM read it.

OpenAI documents most optional fields as "<type> or null" (`"n": null` is n = 1, `"stream": null` no
streaming, `"logprobs": null` none), and clients that serialize every field send such nulls. A pydantic
field typed `bool = False` would refuse them with a 400. `NullMeansDefault` drops a null before validation
where the field has a default and its type does not admit None, so the default applies. Fields whose type
admits None keep null as given (completions' `max_tokens: null` is no limit), and a required field stays
required. The request bodies derive from it, as do the parts with defaults of their own
(`stream_options`, `response_format.json_schema`, an assistant message's `tool_calls`).
"""

from __future__ import annotations

import types
import typing
from functools import cache
from typing import Any

from pydantic import BaseModel, model_validator


def _admits_none(annotation: Any) -> bool:
    if annotation is Any or annotation is None or annotation is type(None):
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(_admits_none(arg) for arg in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _admits_none(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return None in typing.get_args(annotation)
    return False


@cache
def _defaulted_not_nullable(model: type[BaseModel]) -> frozenset[str]:
    """The names (and aliases) under which a null is dropped for `model`."""
    names: set[str] = set()
    for name, info in model.model_fields.items():
        if not info.is_required() and not _admits_none(info.annotation):
            names.add(name)
            if info.alias:
                names.add(info.alias)
    return frozenset(names)


class NullMeansDefault(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        dropped = _defaulted_not_nullable(cls)
        if not any(data.get(name, 0) is None for name in dropped):
            return data
        return {key: value for key, value in data.items() if value is not None or key not in dropped}
