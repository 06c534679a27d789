"""Real decompression bombs: PNG files of a few hundred KB to a few MB that decode to gigabytes.

A plain module (not conftest) so the reliability tests can import it by a unique name. The IDAT stream
is written by hand: one deflate block of 1 MiB of zeros, flushed so it stands alone, repeated to the
image's size (a zlib stream of zeros has a known Adler-32), so a 30000 x 30000 RGBA bomb takes
milliseconds to make and is never held decoded anywhere, not even while it is made.
"""

from __future__ import annotations

import struct
import zlib

MODES = {"L": (0, 1), "RGB": (2, 3), "RGBA": (6, 4)}  # PNG colour type, bytes per pixel (8-bit samples)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def zeros_zlib(n: int, piece: int = 1 << 20) -> bytes:
    """A zlib stream that inflates to ``n`` zero bytes, built without ever holding ``n`` bytes."""

    def deflate(k: int, flush: int) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: blocks can be concatenated
        return c.compress(bytes(k)) + c.flush(flush)

    full, rest = divmod(n, piece)
    body = deflate(piece, zlib.Z_FULL_FLUSH) * full + deflate(rest, zlib.Z_FINISH)
    adler = ((n % 65521) << 16) | 1  # Adler-32 of n zeros: A = 1, B = n
    return b"\x78\xda" + body + struct.pack(">I", adler)


def png_bomb(width: int, height: int, mode: str = "L") -> bytes:
    """A valid PNG of ``width`` x ``height`` black pixels in ``mode`` (L, RGB or RGBA); every row filter 0."""
    color_type, bands = MODES[mode]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    idat = zeros_zlib(height * (1 + width * bands))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """What decoding the bomb allocates (PIL holds L as 1 byte per pixel and RGB/RGBA as 4)."""
    return width * height * (1 if mode == "L" else 4)
