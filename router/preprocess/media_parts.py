"""Image and audio content parts: fetched and checked before planning, marked in the prompt, sent as bytes.

A chat (or Responses) request's media parts are loaded first, concurrently, through router/media's
`fetch_media` / `media_from_base64` (safe fetching, format checks); a refusal is a 400 naming the part.
Templating then writes a numbered placeholder where each part was, and tokenizing splits the rendered
prompt at the placeholders: the text pieces become tokens, each placeholder becomes a `MediaInput` at
its token position, which the worker expands with its projector (worker/media.py). Numbered placeholders
keep the pairing right whatever order the template renders the messages in; a template that drops a
message drops its media with it.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

from router.api.errors import APIError
from router.media import MediaBlob, MediaPolicy, MediaRefused, fetch_media, media_from_base64
from router.state import ServerState
from shared.protocol import MediaInput

MEDIA_PART_TYPES = frozenset({"image_url", "input_image", "input_audio", "audio_url"})
# A part converted from another API (Responses input items) carries the name its errors should use.
PART_PARAM = "_llamafleet_param"
_PLACEHOLDER = "<__llamafleet_media_{}__>"
_FIND = re.compile(r"<__llamafleet_media_(\d+)__>")


@dataclass
class PromptMedia:
    """The loaded media of one request, by (message index, part index)."""

    blobs: dict[tuple[int, int], tuple[MediaBlob, str]] = field(default_factory=dict)
    _order: list[tuple[MediaBlob, str]] = field(default_factory=list)

    def marker(self, message: int, part: int) -> str:
        """The placeholder for a part (written by the template where the part was)."""
        self._order.append(self.blobs[(message, part)])
        return _PLACEHOLDER.format(len(self._order) - 1)

    def tokenize(self, state: ServerState, prompt: str) -> tuple[list[int], list[MediaInput]]:
        """The rendered prompt's tokens and its media at their token positions."""
        pieces = _FIND.split(prompt)
        tokens = state.tokenize_prompt(pieces[0])
        media: list[MediaInput] = []
        seen: set[int] = set()
        for index in range(1, len(pieces), 2):
            number = int(pieces[index])
            if number >= len(self._order) or number in seen:
                raise APIError(400, "the messages contain a media placeholder as text", param="messages")
            seen.add(number)
            blob, param = self._order[number]
            media.append(MediaInput(blob.kind, blob.data, blob.sha256, len(tokens), param))
            text = pieces[index + 1]
            if text:
                tokens += state.vocab.tokenize(text, add_special=False, parse_special=True)
        return tokens, media


async def _load(part: dict[str, Any], kind: str, policy: MediaPolicy) -> MediaBlob:
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise MediaRefused("input_audio needs {data: base64, format: wav|mp3|flac}")
        declared = audio.get("format")
        return media_from_base64(
            audio["data"], "audio", policy, declared if isinstance(declared, str) else None
        )
    value = part.get(kind)
    if kind == "input_image" and value is None:
        value = part.get("image_url")  # the Responses API's input_image carries image_url directly
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise MediaRefused(f"{kind} needs a url")
    return await fetch_media(url, "audio" if kind == "audio_url" else "image", policy)


async def load_media(state: ServerState, messages: list[Any]) -> PromptMedia | None:
    """Fetches and checks every media part of `messages` (ChatMessage objects); None when the model has
    no projector (planning then answers 400 naming the first media part) or there is no media."""
    options = state.config.model.mtmd
    if options is None:
        return None
    policy = MediaPolicy.from_options(options)
    parts: dict[tuple[int, int], tuple[str, dict[str, Any], str]] = {}
    for i, message in enumerate(messages):
        content = message.content
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in MEDIA_PART_TYPES:
                param = str(part.get(PART_PARAM) or f"messages[{i}].content[{j}]")
                parts[(i, j)] = (param, part, str(kind))
    if not parts:
        return None
    if len(parts) > options.max_media_parts:
        raise APIError(
            400,
            f"{len(parts)} image/audio parts in one request; this server takes at most "
            f"{options.max_media_parts} (model.mtmd.max_media_parts)",
            param="messages",
            code="invalid_media",
        )
    tasks = {key: asyncio.ensure_future(_load(part, kind, policy)) for key, (_, part, kind) in parts.items()}
    try:
        # The first refusal answers the request: the other fetches are cancelled, not waited for.
        await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_EXCEPTION)
        media = PromptMedia()
        for key, task in tasks.items():
            param = parts[key][0]
            error = task.exception() if task.done() and not task.cancelled() else None
            if isinstance(error, MediaRefused):
                raise APIError(400, f"{param}: {error.reason}", param=param, code="invalid_media")
        for key, task in tasks.items():
            media.blobs[key] = (task.result(), parts[key][0])
        return media
    finally:
        for task in tasks.values():
            task.cancel()
