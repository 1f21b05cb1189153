"""Errors raised while converting a JSON Schema into a grammar."""

from __future__ import annotations


class UnsupportedSchemaError(ValueError):
    """The schema (at JSON pointer `pointer`) uses something no grammar here can express."""

    def __init__(self, pointer: str, reason: str) -> None:
        super().__init__(f"{pointer}: {reason}")
        self.pointer = pointer
        self.reason = reason


class Unsatisfiable(UnsupportedSchemaError):
    """No JSON value satisfies this part; an anyOf branch like this is simply dropped."""
