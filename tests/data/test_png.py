"""The normalize stage's PNG fast paths: the writer (the pixels and info of Pillow's own writer), the decoder
(ISA-L + the C unfilter: the pixels Pillow decodes), and the no-decode shortcut."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from datafixtures import gradient
from visiontune.data._pixels import unfilter
from visiontune.data.png import decode_plain_png, png_bytes, rewrap_png

ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _noisy(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(w * h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _pillow(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _decoded(data: bytes) -> tuple:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.mode, im.size, np.asarray(im).tobytes(), im.info.get("icc_profile"), im.info.get("transparency")


@pytest.mark.parametrize("im", [gradient(300, 200), _noisy(97, 1), _noisy(1, 53), _noisy(301, 257)],
                         ids=["gradient", "one-row", "one-column", "noise"])
@pytest.mark.parametrize("info", [{}, {"icc_profile": ICC}, {"transparency": (1, 2, 3)}], ids=["plain", "icc", "trns"])
def test_png_bytes_decodes_to_what_pillows_writer_gives(im, info):
    im = im.copy()
    im.info.update(info)
    ours = png_bytes(im)
    assert _decoded(ours) == _decoded(_pillow(im))  # pixels, mode, ICC profile, colour key
    assert _decoded(ours)[3:] == (info.get("icc_profile"), info.get("transparency"))


def test_png_bytes_takes_rgb_only():
    with pytest.raises(ValueError, match="got mode 'L'"):
        png_bytes(gradient(10, 10).convert("L"))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_rewrap_copies_the_pixel_data_of_an_8bit_rgb_png():
    im = _noisy(120, 80)
    src = _pillow(im, icc_profile=ICC, dpi=(300, 300))
    with Image.open(io.BytesIO(src)) as opened:
        out = rewrap_png(src, opened.info)
    assert out is not None and _decoded(out) == _decoded(png_bytes(Image.open(io.BytesIO(src)).convert("RGB")))
    assert b"pHYs" not in out and b"iCCP" in out  # dpi dropped as Pillow's writer drops it; the profile kept


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _with_text() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "may hold an orientation")
    return _pillow(_noisy(40, 30), pnginfo=info)


def _rgb16() -> bytes:
    rows = b"".join(b"\0" + bytes(40 * 6) for _ in range(30))  # 16 bits per channel: Pillow reads it as "RGB"
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 40, 30, 16, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))


# Files that neither shortcut may take: what Pillow would read differently from a plain copy of the pixel data.
_NEITHER = {
    "exif": lambda: _pillow(_noisy(40, 30), exif=_exif(6)),  # eXIf: an orientation to apply
    "text": _with_text,
    "16-bit": _rgb16,
    "palette": lambda: _pillow(_noisy(40, 30).convert("P")),
}


@pytest.mark.parametrize("make", [*_NEITHER.values(), lambda: _pillow(_noisy(40, 30).convert("L"))],
                         ids=[*_NEITHER, "grey"])
def test_rewrap_refuses_what_needs_decoding(make):
    data = make()
    with Image.open(io.BytesIO(data)) as im:
        assert rewrap_png(data, im.info) is None


def _with_chunks(data: bytes, *chunks: bytes) -> bytes:
    """``data`` (a PNG file) with ``chunks`` inserted right after its IHDR."""
    return data[:33] + b"".join(chunks) + data[33:]


_GAMMA_CHRM = (_chunk(b"gAMA", struct.pack(">I", 30000)), _chunk(b"cHRM", bytes(32)))


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("im", [_noisy(97, 1), _noisy(1, 53), _noisy(301, 257)], ids=["one-row", "one-column", "noise"])
@pytest.mark.parametrize("extra", ["none", "icc", "gamma-chrm-sbit"])
def test_decode_plain_png_gives_pillows_pixels_and_info(mode, im, extra):
    im = im.convert(mode)
    data = _pillow(im, **({"icc_profile": ICC} if extra == "icc" else {}))
    if extra == "gamma-chrm-sbit":  # chunks Pillow ignores when decoding; the fast decoder must not apply them either
        data = _with_chunks(data, *_GAMMA_CHRM, _chunk(b"sBIT", bytes([3] * len(mode))))
    with Image.open(io.BytesIO(data)) as opened:
        got = decode_plain_png(data, opened.info)
        opened.load()
        assert got is not None and got.mode == opened.mode == mode and got.size == opened.size
        assert np.array_equal(np.asarray(got), np.asarray(opened))
        assert got.info.get("icc_profile") == opened.info.get("icc_profile") == (ICC if extra == "icc" else None)


def _filtered(rows: np.ndarray, bpp: int, kinds: list[int]) -> bytes:
    """``rows`` (height x width*bpp bytes) with PNG filter ``kinds[y]`` applied to row y, as a writer does."""
    out, above = [], np.zeros(rows.shape[1], dtype=np.int32)
    for y, kind in enumerate(kinds):
        x = rows[y].astype(np.int32)
        left = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), above[:-bpp]])
        if kind == 4:
            p = left + above - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - above), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, above, upleft))
        else:
            pred = [np.zeros_like(x), left, above, (left + above) // 2][kind]
        out.append(bytes([kind]) + ((x - pred) % 256).astype(np.uint8).tobytes())
        above = x
    return b"".join(out)


@pytest.mark.parametrize("bpp", [1, 3])
@pytest.mark.parametrize("width", [1, 2, 7, 64])
def test_unfilter_undoes_every_filter_type(bpp, width):
    """Each of the five filters on the first row (no row above) and on later rows, in every order."""
    rng = np.random.default_rng(width * bpp)
    kinds = [0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 2, 4, 1, 3, 0] + [int(k) for k in rng.integers(0, 5, 20)]
    rows = rng.integers(0, 256, (len(kinds), width * bpp), dtype=np.uint8)
    for first in range(5):  # every filter type as row 0's, whose "above" is zeros
        order = [first] + kinds[1:]
        assert unfilter(_filtered(rows, bpp, order), width, len(order), bpp) == rows.tobytes(), order


def test_unfilter_refuses_an_unknown_filter_type_and_the_wrong_length():
    with pytest.raises(ValueError, match="filter type other than 0-4"):
        unfilter(bytes([5]) + bytes(3), 1, 1, 3)
    with pytest.raises(ValueError, match="expected height"):
        unfilter(bytes(9), 3, 1, 3)  # one row of 3 RGB pixels needs 1 + 9 bytes


def _with_pixel_data(raw: bytes) -> bytes:
    """A 40x30 8-bit RGB PNG file whose IDAT is ``raw`` deflated, whatever its length."""
    return b"".join([b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", 40, 30, 8, 2, 0, 0, 0)),
                     _chunk(b"IDAT", zlib.compress(raw)), _chunk(b"IEND", b"")])


_ROWS = bytes(30 * (1 + 40 * 3))  # 30 rows of filter byte 0 and 40 black pixels


def test_decode_plain_png_reads_pixel_data_of_the_right_length():
    """The control for the short/long/corrupt pixel data cases below: the same hand-made file, intact, decodes."""
    data = _with_pixel_data(_ROWS)
    with Image.open(io.BytesIO(data)) as opened:
        got = decode_plain_png(data, opened.info)
    assert got is not None and got.size == (40, 30) and not np.asarray(got).any()


def _interlaced() -> bytes:
    data = _pillow(_noisy(40, 30))
    ihdr = struct.pack(">IIBBBBB", 40, 30, 8, 2, 0, 0, 1)  # interlace method 1 (Adam7)
    return data[:8] + _chunk(b"IHDR", ihdr) + data[33:]


@pytest.mark.parametrize("make", [
    *_NEITHER.values(),
    lambda: _pillow(_noisy(40, 30).convert("LA")),
    lambda: _pillow(_noisy(40, 30).convert("RGBA")),
    lambda: _pillow(_noisy(40, 30), transparency=(1, 2, 3)),
    lambda: _pillow(_noisy(40, 30).convert("L"), transparency=7),
    _interlaced,
    lambda: _pillow(_noisy(40, 30))[:-30],  # cut off inside its IDAT
    lambda: _with_pixel_data(_ROWS[:-7]),  # a whole zlib stream, too short for its rows
    lambda: _with_pixel_data(_ROWS + bytes(5)),  # ... and too long
    lambda: _with_pixel_data(_ROWS)[:41] + b"\xff" * 8 + _with_pixel_data(_ROWS)[49:],  # not a zlib stream
    lambda: _with_pixel_data(bytes([7]) + _ROWS[1:]),  # a row filter type that does not exist
], ids=[*_NEITHER, "grey-alpha", "rgba", "rgb-colour-key", "grey-colour-key", "interlaced", "truncated",
        "short-pixel-data", "long-pixel-data", "corrupt-pixel-data", "filter-type-7"])
def test_decode_plain_png_leaves_everything_else_to_pillow(make):
    data = make()
    with Image.open(io.BytesIO(data)) as im:
        assert decode_plain_png(data, im.info) is None
