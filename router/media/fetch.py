"""The one entry point for content parts: any media URL (or bare base64) in, checked bytes out.

Dispatches on the URL scheme (`data:`, `http:`/`https:`, `file:`), then checks the bytes' format and size
for the kind before returning them, so whatever reaches the worker's C decoders has passed
check_image_bytes or check_audio_bytes.
"""

from __future__ import annotations

from router.media.audio_formats import check_audio_bytes
from router.media.image_formats import check_image_bytes
from router.media.inline import decode_base64, decode_data_url
from router.media.local_files import read_file_url
from router.media.policy import MediaPolicy
from router.media.remote import fetch_remote
from router.media.types import MediaBlob, MediaFormat, MediaKind, MediaRefused


async def fetch_media(url: str, kind: MediaKind, policy: MediaPolicy) -> MediaBlob:
    """Load and check one image or audio URL; MediaRefused(reason) for anything not to be used."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = decode_data_url(url, kind, policy)
    elif scheme in ("http", "https"):
        data = await fetch_remote(url, kind, policy)
    elif scheme == "file":
        data = await read_file_url(url, kind, policy)
    else:
        raise MediaRefused(f"URL scheme {scheme or '(none)'!r} is not allowed (use http, https or data)")
    return check_media(data, kind, policy)


def media_from_base64(
    payload: str, kind: MediaKind, policy: MediaPolicy, declared: str | None = None
) -> MediaBlob:
    """Bare base64 (`input_audio.data`); `declared` is the part's `format`, which must match the bytes."""
    blob = check_media(decode_base64(payload, kind, policy), kind, policy)
    if declared is not None and declared.lower() != blob.format:
        raise MediaRefused(f"{kind} data is {blob.format}, not the declared format {declared}")
    return blob


def check_media(data: bytes, kind: MediaKind, policy: MediaPolicy) -> MediaBlob:
    limit = policy.max_bytes(kind)
    if len(data) > limit:
        raise MediaRefused(f"{kind} is {len(data)} bytes, over the limit of {limit} bytes")
    if not data:
        raise MediaRefused(f"{kind} is empty")
    found: MediaFormat = (
        check_image_bytes(data, policy.image_max_pixels) if kind == "image" else check_audio_bytes(data)
    )
    return MediaBlob.of(kind, data, found)
