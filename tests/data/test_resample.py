"""visiontune.data.resample: the C resampler gives Pillow's bytes, for every size change the normalize stage
can ask for, in both modes it handles; what it does not handle goes to Pillow."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from visiontune.data import resample
from visiontune.data.resample import pillow_resize, raw_bytes, resize, vertical_pass_first


def _image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    """Noise plus a smooth ramp: both lobes of the Lanczos kernel get exercised, and clipping at 0 and 255."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.linspace(0, 255, h), np.linspace(0, 255, w))[..., None] / 2
    pixels = np.clip(ramp + rng.integers(-90, 90, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def test_the_c_module_is_built_and_matches_the_installed_pillow():
    """CI installs with a compiler: the fast path must be on there, not silently replaced by Pillow."""
    assert resample._pixels is not None, "visiontune.data._pixels was not compiled (pip install -e . with gcc)"
    assert resample._PILLOW_RULE in ("13", "horizontal")


# (width, height) -> (out width, out height): shrink, enlarge, one axis only, mixed, strips, one pixel, odd sizes.
_CASES = [
    ((1440, 960), (1000, 667)), ((640, 480), (300, 225)), ((300, 200), (800, 533)), ((97, 31), (300, 96)),
    ((500, 400), (500, 123)), ((500, 400), (77, 400)), ((400, 500), (600, 120)), ((120, 500), (250, 90)),
    ((2100, 300), (1000, 143)), ((300, 2100), (143, 1000)), ((7, 9), (1, 1)), ((1, 50), (3, 20)),
    ((50, 1), (20, 3)), ((333, 777), (332, 776)), ((1000, 1000), (999, 1001)), ((613, 419), (171, 117)),
]


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("size,out", _CASES, ids=[f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in _CASES])
def test_resize_gives_pillows_bytes(mode, size, out):
    im = _image(mode, *size, seed=size[0] * 7 + out[1])
    got, want = resize(im, out), pillow_resize(im, out)
    assert got.mode == want.mode == mode and got.size == want.size == out
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("seed", range(6))
def test_resize_gives_pillows_bytes_at_random_sizes(seed):
    """Fresh sizes each seed: 40 size changes anywhere between 1/5 and 3x on each axis, both modes."""
    rng = np.random.default_rng(1000 + seed)
    for i in range(40):
        w, h = (int(v) for v in rng.integers(1, 400, 2))
        out = (max(1, int(w * rng.uniform(0.2, 3))), max(1, int(h * rng.uniform(0.2, 3))))
        if out == (w, h):
            continue
        im = _image("L" if i % 2 else "RGB", w, h, seed=i)
        assert resize(im, out).tobytes() == pillow_resize(im, out).tobytes(), (im.mode, (w, h), out)


def test_what_the_c_module_does_not_take_goes_to_pillow(monkeypatch):
    """Shrinking 6x or more (Pillow box-reduces first), other modes, and no C module: Pillow's result."""
    big = _image("RGB", 1300, 700, seed=1)
    assert resize(big, (200, 107)).tobytes() == pillow_resize(big, (200, 107)).tobytes()
    rgba = _image("RGB", 90, 60, seed=2).convert("RGBA")
    assert resize(rgba, (45, 30)).tobytes() == pillow_resize(rgba, (45, 30)).tobytes()
    monkeypatch.setattr(resample, "_PILLOW_RULE", None)
    grey = _image("L", 90, 60, seed=3)
    assert resize(grey, (40, 30)).tobytes() == pillow_resize(grey, (40, 30)).tobytes()


def test_same_size_is_a_copy():
    im = _image("RGB", 30, 20, seed=4)
    out = resize(im, (30, 20))
    assert out is not im and out.tobytes() == im.tobytes()


@pytest.mark.parametrize("size,out,expected", [((100, 100), (150, 60), True), ((100, 100), (60, 50), False),
                                               ((100, 100), (100, 60), True), ((100, 100), (150, 150), False)])
def test_pillow_13_pass_order(size, out, expected):
    assert vertical_pass_first(size, out) is expected


def test_the_c_module_refuses_a_buffer_of_the_wrong_size():
    with pytest.raises(ValueError, match="expected width\\*height\\*channels bytes"):
        resample._pixels.resize(bytes(10), 4, 4, 1, 2, 2, False, False)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_raw_bytes_are_tobytes(mode):
    im = _image(mode, 301, 97, seed=5)
    assert raw_bytes(im) == im.tobytes()
