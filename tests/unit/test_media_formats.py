"""Header checks for image and audio bytes (router/media/image_formats.py, audio_formats.py).

Valid samples must pass and, for images, decode in the very decoder the worker uses (stb_image inside
libmtmd, called here through ctypes) with the size the check reported; broken, truncated or oversized ones
must be refused with MediaRefused (never another exception, which would be a 500).
"""

from __future__ import annotations

import contextlib
import ctypes
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from router.media import MediaRefused, check_audio_bytes, check_image_bytes
from tests.support import media_samples as samples

MAX_PIXELS = 1 << 20

VALID_IMAGES = {
    "png": samples.png(),
    "jpeg": samples.jpeg(20, 13),
    "gif": samples.gif(),
    "bmp": samples.bmp(),
}
VALID_AUDIO = {
    "wav": samples.wav(),
    "mp3": samples.mp3(),
    "mp3 after ID3": samples.mp3(id3=True),
    "flac": samples.flac(),
}


class _Stb:
    """stb_image's loader from libmtmd (the worker's image decoder)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libmtmd.so"))
        self._load = lib.stbi_load_from_memory
        self._load.restype = ctypes.c_void_p
        int_p = ctypes.POINTER(ctypes.c_int)
        self._load.argtypes = [ctypes.c_char_p, ctypes.c_int, int_p, int_p, int_p, ctypes.c_int]
        self._free = lib.stbi_image_free
        self._free.argtypes = [ctypes.c_void_p]

    def size(self, data: bytes) -> tuple[int, int] | None:
        width, height, channels = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        pixels = self._load(
            data, len(data), ctypes.byref(width), ctypes.byref(height), ctypes.byref(channels), 3
        )
        if not pixels:
            return None
        self._free(pixels)
        return width.value, height.value


@pytest.fixture(scope="module")
def stb() -> _Stb:
    return _Stb()


@pytest.mark.parametrize("name", sorted(VALID_IMAGES))
def test_valid_images_pass_and_decode_in_stb_at_the_checked_size(name: str, stb: _Stb) -> None:
    found = check_image_bytes(VALID_IMAGES[name], MAX_PIXELS)
    assert found.name == name
    assert stb.size(VALID_IMAGES[name]) == (found.width, found.height)


@pytest.mark.parametrize("name", sorted(VALID_AUDIO))
def test_valid_audio_passes(name: str) -> None:
    assert check_audio_bytes(VALID_AUDIO[name]).name == name.split()[0]


def test_webp_is_named_and_refused_because_stb_cannot_decode_it(stb: _Stb) -> None:
    data = samples.webp_lossless()
    with pytest.raises(MediaRefused, match="webp images are not supported"):
        check_image_bytes(data, MAX_PIXELS)
    assert stb.size(data) is None


def _bad_png_crc() -> bytes:
    data = bytearray(samples.png())
    data[16] ^= 0x01  # a width byte inside IHDR
    return bytes(data)


def _bmp_compression(kind: int) -> bytes:
    data = bytearray(samples.bmp())
    struct.pack_into("<I", data, 30, kind)
    return bytes(data)


def _jpeg_with_frame(marker: int) -> bytes:
    data = bytearray(samples.jpeg())
    data[data.index(b"\xff\xc0") + 1] = marker
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not a supported image"),
        (b"<html>not an image</html>", "not a supported image"),
        (samples.wav(), "not a supported image"),
        (samples.png()[:40], "png image is truncated"),
        (_bad_png_crc(), "png image header fails its checksum"),
        (samples.png().replace(b"IDAT", b"tEXt"), "png image has no pixel data"),
        (samples.png_claiming(60000, 60000), "over the limit"),
        (samples.png_claiming(0, 5), "invalid dimensions 0x5"),
        (samples.png_claiming(1 << 20, 1), "invalid dimensions"),
        (samples.jpeg()[:12], "jpeg image is truncated"),
        (_jpeg_with_frame(0xC3), "jpeg coding SOF3 is not supported"),
        (_jpeg_with_frame(0xC9), "jpeg coding SOF9 is not supported"),
        (samples.gif()[:20], "gif image is truncated"),
        (samples.gif(screen=(40000, 40000)), "over the limit"),
        (samples.bmp()[:-4], "bmp image is truncated"),
        (
            _bmp_compression(1),
            r"bmp image has unsupported layout \(24 bits, compression 1\)",
        ),  # RLE: stb refuses
        (samples.bmp(5000, 5000)[:2000], "bmp image is truncated"),
    ],
)
def test_broken_images_are_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(MediaRefused, match=reason):
        check_image_bytes(data, MAX_PIXELS)


def test_pixel_bound_is_the_policy_figure() -> None:
    data = samples.png(40, 30)
    assert check_image_bytes(data, 1200).width == 40
    with pytest.raises(MediaRefused, match="40x30 pixels, over the limit of 1199"):
        check_image_bytes(data, 1199)


def _wav_codec(codec: int) -> bytes:
    data = bytearray(samples.wav())
    struct.pack_into("<H", data, 20, codec)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"RIFF\x00\x00\x00\x00WAVE", "wav audio is truncated"),
        (samples.mp3()[:11], "audio is truncated"),
        (samples.wav()[:40], "wav audio has no samples|truncated"),
        (_wav_codec(0x55), "unsupported codec 0x55"),
        (b"ID3\x03\x00\x00\x00\x00\x00\x0a" + b"\x00" * 10 + b"\x00" * 8, "valid MPEG audio frame"),
        (b"\xff\xfb\xf0\x00" + b"\x00" * 100, "valid MPEG audio frame"),  # bitrate index 15
        (samples.flac()[:20], "flac audio is truncated"),
        (samples.flac(rate=0), "sample rate 0"),
        (samples.png(), "not a supported audio format"),
    ],
)
def test_broken_audio_is_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(MediaRefused, match=reason):
        check_audio_bytes(data)


def _mutations(data: bytes, rng: random.Random) -> Iterator[bytes]:
    for cut in range(len(data)):
        yield data[:cut]
    for _ in range(300):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        yield bytes(mutated)


@pytest.mark.parametrize("name", sorted(VALID_IMAGES))
def test_truncated_and_mutated_images_never_raise_anything_but_a_refusal(name: str, stb: _Stb) -> None:
    """Whatever the check lets through, stb decodes at the reported size or rejects cleanly."""
    rng = random.Random(14)
    for data in _mutations(VALID_IMAGES[name], rng):
        try:
            found = check_image_bytes(data, MAX_PIXELS)
        except MediaRefused:
            continue
        size = stb.size(data)
        assert size is None or size == (found.width, found.height)


@pytest.mark.parametrize("name", sorted(VALID_AUDIO))
def test_truncated_and_mutated_audio_never_raise_anything_but_a_refusal(name: str) -> None:
    rng = random.Random(14)
    for data in _mutations(VALID_AUDIO[name], rng):
        with contextlib.suppress(MediaRefused):
            check_audio_bytes(data)
