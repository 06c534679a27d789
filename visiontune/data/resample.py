"""The normalize stage's resize: Pillow's own filters and pixels, faster where the C module is built.

:func:`resize` gives exactly ``im.resize(size, LANCZOS, reducing_gap=3.0)`` when shrinking and
``im.resize(size, BICUBIC)`` when enlarging (the rule of :func:`visiontune.data.normalize.normalize_image`).
For 8-bit grey and RGB images that Pillow would resize in one go (no ``reducing_gap`` pre-reduction, i.e.
shrinking by less than 6x) it runs :mod:`visiontune.data._pixels`, a C port of Pillow's fixed-point
resampler whose inner loops the compiler vectorises; its bytes equal Pillow's (tests/data/test_resample.py;
time saved: benchmarks/RESULTS_data.md). Anything else, or an installation where the C module could not be
compiled (it is an optional extension), goes to Pillow.
"""

from __future__ import annotations

from PIL import Image

try:
    from visiontune.data import _pixels
except ImportError:  # built as an optional extension: no compiler at install time leaves Pillow doing it all
    _pixels = None

REDUCING_GAP = 3.0  # shrinking by more than 2 x this, Pillow first box-reduces the image (Image.resize)
_BANDS = {"L": 1, "RGB": 3}


def pillow_resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The rule itself, as Pillow runs it: Lanczos (with ``reducing_gap``) to shrink, bicubic to enlarge."""
    down = size[0] * size[1] < im.width * im.height
    return im.resize(size, Image.LANCZOS if down else Image.BICUBIC, reducing_gap=REDUCING_GAP if down else None)


def raw_bytes(im: Image.Image) -> bytes:
    """The grey or RGB image's pixels as packed bytes, as ``im.tobytes()`` gives them, in one call of Pillow's
    raw encoder."""
    # tobytes gathers 64 KiB pieces and joins them: 2.96 against 0.21 ms for a 1000x667 RGB image, measured.
    im.load()  # (a file opened lazily has no pixels yet)
    encoder = Image._getencoder(im.mode, "raw", im.mode)
    try:
        encoder.setimage(im.im, (0, 0, *im.size))
        _, status, data = encoder.encode(im.width * im.height * len(im.getbands()))
    finally:
        encoder.cleanup()
    if status != 1:  # (1: done; 0 would mean the buffer was too small, < 0 an encoder error)
        raise RuntimeError(f"Pillow's raw encoder returned status {status} for a {im.size} {im.mode} image")
    return data


def vertical_pass_first(size: tuple[int, int], out: tuple[int, int]) -> bool:
    """Pillow 13's order of the two passes: vertical first when the height shrinks by more than twice as many
    pixels as the width (older Pillows always run the horizontal pass first)."""
    return size[1] - out[1] > 0 and size[1] - out[1] > (size[0] - out[0]) * 2


def _pillows_rule() -> str | None:
    """Which order the installed Pillow runs its passes in: "13" (:func:`vertical_pass_first`), "horizontal"
    (always horizontal first), or None when the C module matches neither (then Pillow does every resize).
    Found by resizing one small image whose two orders give different pixels, as Pillow and as the C module."""
    if _pixels is None:
        return None
    grey = Image.frombytes("L", (40, 40), bytes((x * 37 + y * 91 + x * y) % 251 for y in range(40) for x in range(40)))
    size = (60, 15)  # wider, and much less high: the orders differ here
    want = pillow_resize(grey, size).tobytes()
    for rule, vertical_first in (("13", True), ("horizontal", False)):
        if _pixels.resize(grey.tobytes(), 40, 40, 1, *size, False, vertical_first) == want:  # (Lanczos)
            return rule
    return None


def resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """:func:`pillow_resize`'s image, computed by the C module where it applies (see the module docstring)."""
    size = (int(size[0]), int(size[1]))
    if size == im.size:
        return im.copy()
    down = size[0] * size[1] < im.width * im.height
    pre_reduce = down and (int(im.width / size[0] / REDUCING_GAP) > 1 or int(im.height / size[1] / REDUCING_GAP) > 1)
    if _PILLOW_RULE is None or im.mode not in _BANDS or pre_reduce:
        return pillow_resize(im, size)
    vertical_first = _PILLOW_RULE == "13" and vertical_pass_first(im.size, size)
    out = _pixels.resize(raw_bytes(im), im.width, im.height, _BANDS[im.mode], size[0], size[1], not down,
                         vertical_first)
    resized = Image.frombytes(im.mode, size, out)
    resized.info = dict(im.info)
    return resized


_PILLOW_RULE = _pillows_rule()
