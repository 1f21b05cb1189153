"""Header checks for audio bytes before they reach llama.cpp's decoder (miniaudio, in C).

WAV, MP3 and FLAC are what the projector's audio path decodes. Each is recognised by its magic number and its
header read far enough to know it describes a real stream (a PCM format, a valid first MPEG frame, a
STREAMINFO block), so garbage with the right first bytes is refused here.
"""

from __future__ import annotations

import struct

from router.media.types import MediaFormat, MediaRefused

AUDIO_FORMATS = ("wav", "mp3", "flac")
_WAV_CODECS = {1: "pcm", 3: "float", 6: "a-law", 7: "mu-law", 0xFFFE: "extensible"}
_MAX_CHANNELS = 32
_MAX_SAMPLE_RATE = 768_000


def check_audio_bytes(data: bytes) -> MediaFormat:
    """The audio's format; MediaRefused when the bytes are not decodable WAV, MP3 or FLAC."""
    if len(data) < 12:  # libmtmd takes anything shorter for an image
        raise MediaRefused("audio is truncated")
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return _wav(data)
    if data[:4] == b"fLaC":
        return _flac(data)
    if data[:3] == b"ID3" or (len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return _mp3(data)
    raise MediaRefused("not a supported audio format (expected wav, mp3 or flac)")


def _wav(data: bytes) -> MediaFormat:
    offset, fmt_ok = 12, False
    while offset + 8 <= len(data):
        kind, size = struct.unpack_from("<4sI", data, offset)
        body = offset + 8
        if kind == b"fmt ":
            if size < 16 or body + 16 > len(data):
                break
            codec, channels, rate, _byte_rate, _align, bits = struct.unpack_from("<HHIIHH", data, body)
            if codec not in _WAV_CODECS:
                raise MediaRefused(f"wav audio uses unsupported codec {codec:#x}")
            if not 1 <= channels <= _MAX_CHANNELS or not 1 <= rate <= _MAX_SAMPLE_RATE:
                raise MediaRefused(f"wav audio has {channels} channels at {rate} Hz")
            if bits not in (8, 16, 24, 32, 64):
                raise MediaRefused(f"wav audio has {bits} bits per sample")
            fmt_ok = True
        elif kind == b"data":
            if not fmt_ok:
                break
            if body >= len(data):
                raise MediaRefused("wav audio has no samples")
            return MediaFormat("wav")
        offset = body + size + (size & 1)
    raise MediaRefused("wav audio is truncated or malformed")


def _flac(data: bytes) -> MediaFormat:
    # First metadata block must be STREAMINFO (type 0, 34 bytes).
    if len(data) < 8 + 34 or data[4] & 0x7F != 0 or int.from_bytes(data[5:8], "big") != 34:
        raise MediaRefused("flac audio is truncated or malformed")
    info = int.from_bytes(data[18:26], "big")  # sample rate (20), channels-1 (3), bits-1 (5), samples (36)
    rate = info >> 44
    if not 1 <= rate <= 655_350:
        raise MediaRefused(f"flac audio has sample rate {rate}")
    return MediaFormat("flac")


# Bitrate index 0 ("free format") and 15 are refused; sample-rate index 3 is reserved.
def _mp3(data: bytes) -> MediaFormat:
    offset = 0
    if data[:3] == b"ID3":
        if len(data) < 10:
            raise MediaRefused("mp3 audio is truncated or malformed")
        size = 0
        for byte in data[6:10]:
            if byte & 0x80:
                raise MediaRefused("mp3 audio has a malformed ID3 tag")
            size = size << 7 | byte
        offset = 10 + size + (10 if data[5] & 0x10 else 0)
    if offset + 4 > len(data):
        raise MediaRefused("mp3 audio is truncated or malformed")
    (header,) = struct.unpack_from(">I", data, offset)
    version, layer = (header >> 19) & 3, (header >> 17) & 3
    bitrate, rate = (header >> 12) & 15, (header >> 10) & 3
    if header >> 21 != 0x7FF or version == 1 or layer == 0 or bitrate in (0, 15) or rate == 3:
        raise MediaRefused("mp3 audio does not start with a valid MPEG audio frame")
    return MediaFormat("mp3")
