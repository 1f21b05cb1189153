"""Small, valid image and audio files built in code, for the media loading tests (no binary fixtures).

Each builder writes the format's real structure (PNG chunks with CRCs, a baseline JPEG with its own tiny
Huffman tables, GIF, BMP, WAV, MP3 frames, FLAC STREAMINFO), so the same bytes also decode in llama.cpp's
stb_image (tests/unit/test_media_formats.py checks that against libmtmd).
"""

from __future__ import annotations

import struct
import zlib


def png(width: int = 4, height: int = 3, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    row = b"\x00" + bytes(rgb) * width
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(row * height))
        + png_chunk(b"IEND", b"")
    )


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims a canvas far larger than its (tiny) pixel data."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def jpeg(width: int = 8, height: int = 8) -> bytes:
    """A baseline grayscale JPEG of one flat block per 8x8: DC and AC tables of one 1-bit code each."""
    blocks = ((width + 7) // 8) * ((height + 7) // 8)

    def segment(marker: int, body: bytes) -> bytes:
        return bytes((0xFF, marker)) + struct.pack(">H", len(body) + 2) + body

    quant = segment(0xDB, b"\x00" + b"\x01" * 64)
    frame = segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
    one_code = b"\x01" + b"\x00" * 15  # one code of length 1
    tables = segment(0xC4, b"\x00" + one_code + b"\x00") + segment(0xC4, b"\x10" + one_code + b"\x00")
    scan = segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
    # Per block: DC category 0 ("0"), then end-of-block ("0"); padded with 1 bits.
    bits = "00" * blocks
    bits += "1" * (-len(bits) % 8)
    data = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
    data = data.replace(b"\xff", b"\xff\x00")
    return b"\xff\xd8" + quant + frame + tables + scan + data + b"\xff\xd9"


def gif(screen: tuple[int, int] = (1, 1)) -> bytes:
    """A 1x1 two-colour GIF; `screen` sets the logical screen size its header claims."""
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", screen[0], screen[1], 0x80, 0, 0)
        + b"\xff\x00\x00\x00\x00\x00"
        + b"\x21\xf9\x04\x00\x00\x00\x00\x00"
        + b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00"
        + b"\x02\x02\x44\x01\x00"
        + b"\x3b"
    )


def bmp(width: int = 3, height: int = 2) -> bytes:
    row = (b"\x10\x20\xf0" * width).ljust(((width * 24 + 31) // 32) * 4, b"\x00")
    pixels = row * height
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    header = b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info))
    return header + info + pixels


def webp_lossless(width: int = 2, height: int = 2) -> bytes:
    bits = (width - 1) | (height - 1) << 14
    body = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 8
    chunk = b"VP8L" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def wav(samples: int = 1600, rate: int = 16000) -> bytes:
    data = struct.pack(f"<{samples}h", *((i * 37) % 2000 - 1000 for i in range(samples)))
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def mp3(frames: int = 4, id3: bool = False) -> bytes:
    """MPEG-1 Layer III frames, 128 kbit/s at 44.1 kHz (417 bytes each), of silence."""
    frame = b"\xff\xfb\x90\x00" + b"\x00" * 413
    tag = b"ID3\x03\x00\x00\x00\x00\x00\x0a" + b"\x00" * 10 if id3 else b""
    return tag + frame * frames


def flac(rate: int = 16000) -> bytes:
    """`fLaC` and a STREAMINFO block (mono, 16 bit) with no audio frames."""
    info = (rate << 44) | (0 << 41) | (15 << 36) | 0
    streaminfo = struct.pack(">HH", 4096, 4096) + b"\x00" * 6 + info.to_bytes(8, "big") + b"\x00" * 16
    return b"fLaC" + bytes((0x80, 0, 0, len(streaminfo))) + streaminfo
