"""Loading image and audio inputs for content parts: fetch safely, check the bytes, hand back a MediaBlob.

The chat and Responses endpoints call `fetch_media` (URLs) or `media_from_base64` (`input_audio.data`) with
a `MediaPolicy.from_options(config.model.mtmd)` and turn `MediaRefused` into a 400 naming the part. See the
README's "Media input safety" for what is refused and why.
"""

from router.media.audio_formats import AUDIO_FORMATS, check_audio_bytes
from router.media.fetch import check_media, fetch_media, media_from_base64
from router.media.image_formats import check_image_bytes
from router.media.policy import MediaPolicy, Resolver, system_resolver
from router.media.types import MediaBlob, MediaFormat, MediaKind, MediaRefused

__all__ = [
    "AUDIO_FORMATS",
    "MediaBlob",
    "MediaFormat",
    "MediaKind",
    "MediaPolicy",
    "MediaRefused",
    "Resolver",
    "check_audio_bytes",
    "check_image_bytes",
    "check_media",
    "fetch_media",
    "media_from_base64",
    "system_resolver",
]
