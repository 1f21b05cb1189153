"""Header checks for image bytes before they reach llama.cpp's decoder (stb_image, in C).

Each format's magic number is matched, its header walked far enough to read the pixel size (no Pillow: the
headers are small and fixed), and the size bounded, so a truncated file, a header claiming a 60000 x 60000
canvas or a file that is not an image is a refusal here rather than a crash or a huge allocation in the
worker. WebP is recognised (so the refusal names it) but refused: stb_image cannot decode it.
"""

from __future__ import annotations

import struct
import zlib

from router.media.types import MediaFormat, MediaRefused

# Frame types stb_image decodes: baseline, extended sequential, progressive (Huffman coding only).
_JPEG_DECODABLE_SOF = {0xC0, 0xC1, 0xC2}
_JPEG_OTHER_SOF = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_MAX_SIDE = 1 << 16


def check_image_bytes(data: bytes, max_pixels: int) -> MediaFormat:
    """The image's format and size; MediaRefused when the bytes are not a decodable image within bounds."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        found = _png(data)
    elif data.startswith(b"\xff\xd8\xff"):
        found = _jpeg(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        found = _gif(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        _webp(data)
        raise MediaRefused(
            "webp images are not supported (llama.cpp's image decoder reads png, jpeg, gif, bmp)"
        )
    elif data.startswith(b"BM"):
        found = _bmp(data)
    else:
        raise MediaRefused("not a supported image (expected png, jpeg, gif or bmp)")
    width, height = found.width or 0, found.height or 0
    if width <= 0 or height <= 0 or width > _MAX_SIDE or height > _MAX_SIDE:
        raise MediaRefused(f"{found.name} image has invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise MediaRefused(f"{found.name} image is {width}x{height} pixels, over the limit of {max_pixels}")
    return found


def _truncated(name: str) -> MediaRefused:
    return MediaRefused(f"{name} image is truncated or malformed")


def _png(data: bytes) -> MediaFormat:
    """Walk the chunks to IEND: IHDR first with a good CRC, at least one IDAT, nothing cut short."""
    offset, width, height, seen_data = 8, 0, 0, False
    while True:
        if offset + 12 > len(data):
            raise _truncated("png")
        length, kind = struct.unpack_from(">I4s", data, offset)
        end = offset + 12 + length
        if length > 0x7FFFFFFF or end > len(data):
            raise _truncated("png")
        body = data[offset + 8 : offset + 8 + length]
        if offset == 8:
            if kind != b"IHDR" or length != 13:
                raise MediaRefused("png image does not start with its IHDR header")
            (crc,) = struct.unpack_from(">I", data, offset + 8 + length)
            if zlib.crc32(kind + body) != crc:
                raise MediaRefused("png image header fails its checksum")
            width, height, depth, colour = struct.unpack_from(">IIBB", body)
            if depth not in (1, 2, 4, 8, 16) or colour not in (0, 2, 3, 4, 6):
                raise MediaRefused(f"png image has invalid bit depth {depth} or colour type {colour}")
        elif kind == b"IDAT":
            seen_data = True
        elif kind == b"IEND":
            break
        offset = end
    if not seen_data:
        raise MediaRefused("png image has no pixel data")
    return MediaFormat("png", width, height)


def _jpeg(data: bytes) -> MediaFormat:
    """Walk the marker segments to the frame header (SOFn) that carries the size."""
    offset = 2
    while offset < len(data):
        if data[offset] != 0xFF:
            raise _truncated("jpeg")
        while offset < len(data) and data[offset] == 0xFF:
            offset += 1  # fill bytes
        if offset >= len(data):
            break
        marker = data[offset]
        offset += 1
        if marker in (0x01, *range(0xD0, 0xD8)):
            continue  # standalone markers carry no length
        if marker in (0xD9, 0xDA):
            break  # end of image or start of scan before any frame header
        if offset + 2 > len(data):
            break
        (length,) = struct.unpack_from(">H", data, offset)
        if length < 2 or offset + length > len(data):
            break
        if marker in _JPEG_DECODABLE_SOF or marker in _JPEG_OTHER_SOF:
            if length < 8:
                break
            _precision, height, width, components = struct.unpack_from(">BHHB", data, offset + 2)
            if marker not in _JPEG_DECODABLE_SOF:
                raise MediaRefused(
                    f"jpeg coding SOF{marker - 0xC0} is not supported (lossless or arithmetic)"
                )
            if components not in (1, 3, 4):
                raise MediaRefused(f"jpeg image has {components} colour components")
            return MediaFormat("jpeg", width, height)
        offset += length
    raise _truncated("jpeg")


def _gif(data: bytes) -> MediaFormat:
    """The logical screen, then the first image descriptor (the frame the decoder reads) inside it."""
    if len(data) < 13:
        raise _truncated("gif")
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    offset = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while offset < len(data):
        block = data[offset]
        if block == 0x21:  # extension: label, then data sub-blocks up to a zero length
            offset = _skip_sub_blocks(data, offset + 2)
        elif block == 0x2C:  # image descriptor
            if offset + 10 > len(data):
                break
            left, top, frame_w, frame_h = struct.unpack_from("<HHHH", data, offset + 1)
            if frame_w == 0 or frame_h == 0:
                raise MediaRefused("gif image has an empty frame")
            width, height = max(width, left + frame_w), max(height, top + frame_h)
            return MediaFormat("gif", width, height)
        else:
            break
    raise _truncated("gif")


def _skip_sub_blocks(data: bytes, offset: int) -> int:
    while offset < len(data):
        size = data[offset]
        offset += 1 + size
        if size == 0:
            return offset
    return len(data) + 1


def _webp(data: bytes) -> MediaFormat:
    if len(data) < 30:
        raise _truncated("webp")
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return MediaFormat("webp", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and data[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, 21)
        return MediaFormat("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return MediaFormat("webp", width, height)
    raise _truncated("webp")


def _bmp(data: bytes) -> MediaFormat:
    """BITMAPFILEHEADER, then the DIB header (OS/2 core or Windows info); the pixel array must be there."""
    if len(data) < 26:
        raise _truncated("bmp")
    pixels_at, header_size = struct.unpack_from("<II", data, 10)
    if header_size == 12:
        width, height, planes, bpp = struct.unpack_from("<HHHH", data, 18)
        compression = 0
    elif header_size in (40, 52, 56, 108, 124) and len(data) >= 14 + header_size:
        width, height, planes, bpp, compression = struct.unpack_from("<iiHHI", data, 18)
        height = abs(height)  # negative: rows stored top-down
    else:
        raise MediaRefused(f"bmp image has an unknown header of {header_size} bytes")
    if planes != 1 or bpp not in (1, 4, 8, 16, 24, 32) or compression not in (0, 3):
        raise MediaRefused(f"bmp image has unsupported layout ({bpp} bits, compression {compression})")
    # Uncompressed (or bit-field) rows, padded to 4 bytes: the whole pixel array must be present.
    row = ((max(width, 0) * bpp + 31) // 32) * 4
    if pixels_at + row * height > len(data) or pixels_at >= len(data):
        raise _truncated("bmp")
    return MediaFormat("bmp", width, height)
