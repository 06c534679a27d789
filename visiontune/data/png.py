"""Fast paths for PNG files in the normalize stage: a writer, a decoder, and a shortcut that does neither.

Pillow's PNG encoder tries all five PNG row filters on every row and keeps the best (libpng's heuristic),
then deflates with zlib: on the data benchmark's images that took about 21 ms per image at
``compress_level=1``, more than decoding and resizing together (benchmarks/RESULTS_data.md). Here every row
gets the "Up" filter (one vectorised numpy subtraction) and the stream is deflated by ISA-L's igzip at
level 1 (``isal``): about 7x less time for files of the same size (430 KB against Pillow's 438 KB on the
benchmark's images).

The file decodes to exactly the pixels given (PNG is lossless whatever the filter or the compressor), and
it carries what Pillow's own writer takes from the image's ``info``: the ICC profile (``iCCP``) and an RGB
colour key (``tRNS``). No other chunk is written, so no metadata of a source (EXIF, text) is carried over.

:func:`rewrap_png` is the shortcut for a source that needs no change at all (8-bit RGB, no orientation,
already the right size): its compressed pixel data is copied into a new file with the same chunks, never
decoded nor compressed again.

:func:`decode_plain_png` decodes a plain 8-bit grey or RGB source without Pillow: ISA-L inflates the pixel
data, :mod:`visiontune.data._pixels` undoes the row filters. The same pixels (PNG is lossless; Pillow applies
no gamma or significant-bit chunks either), in less time (benchmarks/RESULTS_data.md).
"""

from __future__ import annotations

import struct
import zlib
from typing import Optional

import numpy as np
from isal import isal_zlib
from PIL import Image

from visiontune.data.resample import _pixels, raw_bytes

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_UP = 2  # PNG filter type 2: each byte minus the byte above it (row 0: minus zero)


def _chunk_parts(kind: bytes, *pieces: bytes | memoryview) -> list[bytes | memoryview]:
    """A PNG chunk whose data is ``pieces`` one after the other, as a list of parts to join once into the file:
    a chunk of pixel data is joined with the rest of the file once, not copied into a chunk and then a file."""
    crc = isal_zlib.crc32(kind)  # ISA-L's CRC-32: zlib's values in about 1/3 of its time
    for piece in pieces:
        crc = isal_zlib.crc32(piece, crc)
    return [struct.pack(">I", sum(len(piece) for piece in pieces)) + kind, *pieces, struct.pack(">I", crc)]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return b"".join(_chunk_parts(kind, data))


def _head(info: dict) -> list[bytes]:
    """The chunks Pillow's PNG writer takes from an RGB image's ``info``: ICC profile, colour key."""
    parts = []
    if icc := info.get("icc_profile"):
        parts.append(_chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc)))
    key = info.get("transparency")
    if isinstance(key, (tuple, list)) and len(key) == 3:
        parts.append(_chunk(b"tRNS", struct.pack(">HHH", *(int(v) for v in key))))
    return parts


def png_bytes(im: Image.Image, level: int = 1) -> bytes:
    """The PNG file of the RGB image ``im`` (8 bits per channel, not interlaced), compressed at ISA-L
    ``level`` (0-3; 1 is the speed/size sweet spot measured on the benchmark's images)."""
    if im.mode != "RGB":
        raise ValueError(f"png_bytes writes RGB images; got mode {im.mode!r} (convert it with visiontune.images.to_rgb)")
    w, h = im.size
    rows = np.frombuffer(raw_bytes(im), dtype=np.uint8).reshape(h, w * 3)
    filtered = np.empty((h, w * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = _UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG's does
    head = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    return b"".join([_SIGNATURE, head, *_head(im.info), *_chunk_parts(b"IDAT", isal_zlib.compress(filtered, level)),
                     _chunk(b"IEND", b"")])


# Chunks that change nothing Pillow decodes from an 8-bit grey or RGB PNG (colour management and physical size
# hints, which Pillow's writer does not carry either; iCCP and tRNS are re-written from ``info``). Any other chunk
# (eXIf or text that may hold an orientation, animation, private chunks) sends the image the long way.
_INERT = {b"IHDR", b"IDAT", b"IEND", b"iCCP", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"pHYs", b"tIME", b"bKGD"}


def _plain_chunks(data: bytes) -> Optional[tuple[bytes, list[bytes], set[bytes]]]:
    """(IHDR body, IDAT bodies, chunk types) of the PNG file ``data`` if it holds nothing but :data:`_INERT`
    chunks, each whole; None for anything else (not a PNG, another chunk, a cut-off chunk)."""
    if not data.startswith(_SIGNATURE):
        return None
    pos, idat, ihdr, kinds = len(_SIGNATURE), [], b"", set()
    while pos + 8 <= len(data):
        (size,), kind = struct.unpack_from(">I", data, pos), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + size]
        if kind not in _INERT or len(body) != size:
            return None
        kinds.add(kind)
        if kind == b"IHDR":
            ihdr = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + size
    return (ihdr, idat, kinds) if len(ihdr) == 13 and idat else None


def rewrap_png(data: bytes, info: dict) -> Optional[bytes]:
    """A PNG file with the pixels and ``info`` of :func:`png_bytes`'s file for ``data`` decoded (``data``: a
    PNG file whose header Pillow read as ``info``), made without decoding it: if it is 8-bit RGB and holds
    nothing but :data:`_INERT` chunks, its IHDR and compressed pixel data as they are, plus the ICC profile
    and colour key as Pillow's writer puts them. None for any other file.

    The pixel data is copied, not checked: call it for a file validation has decoded (same sha256)."""
    plain = _plain_chunks(data)
    # 8 bits per channel, colour type 2 (RGB): Pillow also reads 16-bit RGB as mode "RGB", by dropping bits.
    if plain is None or plain[0][8:10] != b"\x08\x02":
        return None
    ihdr, idat, _ = plain
    return b"".join([_SIGNATURE, _chunk(b"IHDR", ihdr), *_head(info), *_chunk_parts(b"IDAT", *idat),
                     _chunk(b"IEND", b"")])


_PLAIN_MODES = {b"\x08\x00": ("L", 1), b"\x08\x02": ("RGB", 3)}  # IHDR (bit depth, colour type) -> mode, bytes/pixel


def decode_plain_png(data: bytes, info: dict) -> Optional[Image.Image]:
    """The image Pillow decodes from the PNG file ``data`` (whose header Pillow read as ``info``), decoded
    here, for a plain file: 8-bit grey or RGB, not interlaced, no colour key, nothing but :data:`_INERT` chunks
    (so no EXIF orientation either). ISA-L inflates the pixel data and :mod:`visiontune.data._pixels` undoes
    the row filters. None for any other file, for pixel data that is not exactly the image's rows, or where
    the C module was not built: decode that one with Pillow. The image's ``info`` is ``info`` (the ICC profile
    travels on to :func:`png_bytes`)."""
    plain = _plain_chunks(data)
    if plain is None or _pixels is None:
        return None
    ihdr, idat, kinds = plain
    mode, channels = _PLAIN_MODES.get(ihdr[8:10], (None, 0))
    if mode is None or b"tRNS" in kinds or ihdr[12] != 0:  # IHDR byte 12: the interlace method
        return None
    width, height = struct.unpack(">II", ihdr[:8])
    try:
        raw = isal_zlib.decompress(b"".join(idat))
        if len(raw) != height * (1 + width * channels):  # (a filter-type byte, then the pixels, per row)
            return None  # short or overlong pixel data: Pillow's decoder decides what it makes of it
        pixels = _pixels.unfilter(raw, width, height, channels)
    except (isal_zlib.error, ValueError):  # not a zlib stream; a row filter type other than 0-4
        return None
    im = Image.frombytes(mode, (width, height), pixels)
    im.info = dict(info)
    return im
