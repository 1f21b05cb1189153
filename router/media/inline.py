"""Media carried inside the request: `data:` URLs and bare base64 (`input_audio.data`).

The decoded size is worked out from the base64 length and checked against the kind's byte limit before
anything is decoded, so an oversized payload costs no allocation beyond the request body itself.
"""

from __future__ import annotations

import base64
import binascii

from router.media.policy import MediaPolicy
from router.media.types import MediaKind, MediaRefused


def decode_data_url(url: str, kind: MediaKind, policy: MediaPolicy) -> bytes:
    """The bytes of `data:[<type>][;params];base64,<payload>`; only base64 payloads are accepted."""
    comma = url.find(",")
    if not url[:5].lower() == "data:" or comma < 0:
        raise MediaRefused("malformed data: URL (expected data:<type>;base64,<payload>)")
    params = [p.strip().lower() for p in url[5:comma].split(";")]
    if params[-1] != "base64":
        raise MediaRefused("data: URL must be base64-encoded")
    media_type = params[0] if len(params) > 1 else ""
    if media_type and not media_type.startswith(f"{kind}/"):
        raise MediaRefused(f"data: URL declares {media_type}, not an {kind} type")
    return decode_base64(url[comma + 1 :], kind, policy)


def decode_base64(payload: str, kind: MediaKind, policy: MediaPolicy) -> bytes:
    limit = policy.max_bytes(kind)
    padding = len(payload) - len(payload.rstrip("="))
    estimate = len(payload) * 3 // 4 - min(padding, 2)
    if estimate > limit:
        raise MediaRefused(f"{kind} data is {estimate} bytes, over the limit of {limit} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaRefused(f"{kind} data is not valid base64") from None
    if not data:
        raise MediaRefused(f"{kind} data is empty")
    return data
