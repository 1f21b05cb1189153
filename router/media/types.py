"""The values media loading hands back: a checked blob, or a refusal whose message names the reason.

Kept apart from the fetching code so that callers (the chat and Responses endpoints, the worker link) can
import the types without pulling in httpx.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

MediaKind = Literal["image", "audio"]


class MediaRefused(ValueError):
    """A media URL or payload that will not be used. The message names the reason; the caller adds which
    content part it was (e.g. `messages[0].content[1]: ...`) and answers 400."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class MediaFormat:
    """What the header check found: the container format and, for images, the pixel size."""

    name: str
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class MediaBlob:
    """Bytes that passed every check, ready for the worker's decoder."""

    kind: MediaKind
    data: bytes = field(repr=False)
    format: str
    sha256: str
    width: int | None = None
    height: int | None = None

    @classmethod
    def of(cls, kind: MediaKind, data: bytes, found: MediaFormat) -> MediaBlob:
        return cls(kind, data, found.name, hashlib.sha256(data).hexdigest(), found.width, found.height)
