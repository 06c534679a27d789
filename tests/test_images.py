"""Images: loading from every kind of value, RGB conversion, the two size rules and the ImageRule."""

from __future__ import annotations

import base64
import dataclasses
import inspect
import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from visiontune.images import (
    FALLBACK_BOUNDS,
    ImageRule,
    Resizer,
    bounded_size,
    decode_image_value,
    ink_box,
    load_image,
    target_size,
    to_rgb,
    trim_to_ink,
)
from visiontune.inference import model_resizer


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ ImageRule
def test_image_rule_defaults_are_unsloths_and_documented():
    from visiontune import VisionDataCollator

    assert ImageRule() == ImageRule(resize="min", resize_dimension=0, snap_to_patch_size=False)
    params = inspect.signature(VisionDataCollator).parameters
    for f in dataclasses.fields(ImageRule):
        assert params[f.name].default == f.default  # the collator's keyword defaults come from the rule
        assert f.metadata["help"].strip().endswith(".")


def test_image_rule_validates_and_reads_a_mapping():
    with pytest.raises(ValueError, match="resize_dimension=2"):
        ImageRule(resize_dimension=2)
    with pytest.raises(ValueError, match="resize='medium'"):
        ImageRule(resize="medium")
    with pytest.raises(ValueError, match="two positive integers"):
        ImageRule(resize=[10])
    config = {"resize": 64, "resize_dimension": 1, "snap_to_patch_size": True, "dtype": "float32"}
    assert ImageRule.from_mapping(config) == ImageRule(64, 1, True)
    assert ImageRule.from_mapping({"resize": None}) == ImageRule(resize=None)  # missing keys: the defaults
    assert ImageRule.from_mapping({**config, "trim": True}).trim is True
    with pytest.raises(ValueError, match="trim='yes'"):
        ImageRule(trim="yes")


# ----------------------------------------------------------------------------------------------- loading
def test_load_image_from_every_kind_of_value(tmp_path):
    img = Image.new("RGB", (7, 5), (10, 20, 30))
    (tmp_path / "sub").mkdir()
    img.save(tmp_path / "sub" / "a.png")
    data = _png(img)
    for value in (img, str(tmp_path / "sub" / "a.png"), data, {"bytes": data, "path": None},
                  {"bytes": None, "path": str(tmp_path / "sub" / "a.png")}):
        out = load_image(value)
        assert out.mode == "RGB" and out.size == (7, 5) and out.getpixel((0, 0)) == (10, 20, 30)
    assert load_image("sub/a.png", base_dir=tmp_path).size == (7, 5)  # relative paths under base_dir
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(str(tmp_path / "nope.png"))
    with pytest.raises(TypeError, match="unsupported image value of type int"):
        load_image(3)


def test_decode_image_value(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)
    assert decode_image_value(str(path)) == str(path)
    assert decode_image_value(base64.b64encode(path.read_bytes()).decode()) == path.read_bytes()
    with pytest.raises(FileNotFoundError, match="neither an existing file nor base64"):
        decode_image_value("no/such/file.png")


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "RGBA", "L", "1"])
def test_every_mode_becomes_rgb(mode):
    assert to_rgb(Image.linear_gradient("L").resize((40, 30)).convert(mode)).mode == "RGB"


def test_transparency_composited_on_white_and_16_bit_scaled():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(_png(rgba)).getpixel((0, 0)) == (255, 255, 255)  # training and serving convert the same way
    i16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert i16.mode.startswith("I")
    assert to_rgb(i16).getpixel((0, 0)) == (255, 255, 255)  # not clipped garbage
    half = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert to_rgb(half).getpixel((0, 0))[0] == 128


# -------------------------------------------------------------------------------------------- size rules
@pytest.mark.parametrize("resize,dim,expected", [
    (None, 0, (400, 100)), ((64, 32), 0, (64, 32)), ("min", 0, (224, 56)), ("min", 1, (896, 224)),
    ("max", "max", (448, 112)), ("max", "min", (1792, 448)), (56, 1, (224, 56)), (200, 0, (200, 50)),
    (50, "max", (50, 12)),
])
def test_target_size(resize, dim, expected):
    assert target_size(400, 100, resize, dim, (224, 448), None) == expected


def test_target_size_snaps_and_validates():
    assert target_size(400, 100, "min", 0, (224, 448), 28) == (224, 56)
    assert target_size(401, 99, None, 0, (224, 448), 28) == (392, 112)
    assert target_size(10, 10, None, 0, (224, 448), 28) == (28, 28)  # never below one patch
    with pytest.raises(ValueError, match="resize="):
        target_size(1, 1, "medium", 0, (1, 1), None)
    with pytest.raises(ValueError, match="resize_dimension"):
        target_size(1, 1, "min", 2, (1, 1), None)
    with pytest.raises(ValueError, match="positive"):
        target_size(1, 1, 0, 0, (1, 1), None)


@pytest.mark.parametrize(
    "size, expected",
    [
        ((400, 300), (400, 300)),  # in range: untouched
        ((100, 50), (600, 300)),  # too small: short side up to 300
        ((3000, 2000), (1000, 667)),  # too large: long side down to 1000
        ((1400, 200), (1000, 143)),  # strip: the long side bound wins, aspect kept
        ((250, 1200), (208, 1000)),
    ],
)
def test_bounded_size(size, expected):
    assert bounded_size(*size, min_px=300, max_px=1000) == expected


def test_bounded_size_snaps_to_patch_multiple_within_bounds():
    w, h = bounded_size(1234, 567, 300, 1000, snap=28)
    assert w % 28 == 0 and h % 28 == 0 and w <= 1000 and h >= 300


# ---------------------------------------------------------------------------------------------- resizing
def test_resizer_for_a_model_and_for_an_unknown_architecture(tiny_model_dir):
    from visiontune.models.fast_vision import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing=False,
                                                       use_fused_kernels=False)
    snapped = model_resizer(ImageRule(resize=(100, 50), snap_to_patch_size=True), model.config, processor)
    assert snapped.multiple == 28 and snapped(Image.new("RGB", (7, 5))).size == (112, 56)
    unknown = model_resizer(ImageRule(resize="max", snap_to_patch_size=True), SimpleNamespace(model_type="x"), None)
    assert unknown.bounds == FALLBACK_BOUNDS and unknown.multiple is None
    img = Image.new("RGB", (2048, 1024))
    assert unknown(img).size == (1024, 512)
    assert Resizer(ImageRule(resize=None))(img) is img  # nothing to do: the same object


# ----------------------------------------------------------------------------------------------- trimming
def _page(w: int, h: int, box: tuple[int, int, int, int], paper: tuple, pen: tuple, seed: int = 0,
          mode: str = "RGB") -> Image.Image:
    """A noisy page (smooth paper texture, lone dark specks) with strokes of ink filling ``box``'s corners and
    middle, blurred a little: what the demo's pages and scans look like."""
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = box
    ink = np.zeros((h, w), dtype=np.float32)
    ink[y0:y0 + 6, x0:x0 + 20] = 1  # top-left stroke
    ink[y1 - 6:y1, x1 - 20:x1] = 1  # bottom-right stroke
    ink[(y0 + y1) // 2 - 3:(y0 + y1) // 2 + 3, x0:x1] = 1  # a line through the middle
    page = np.array(paper, np.float32) * (1 - ink[..., None]) + np.array(pen, np.float32) * ink[..., None]
    tex = rng.normal(0, 5, size=(max(2, h // 32), max(2, w // 32))).astype(np.float32)
    page += np.asarray(Image.fromarray(tex, "F").resize((w, h), Image.BILINEAR))[..., None]
    n = w * h // 4000
    page[rng.integers(0, h, n), rng.integers(0, w, n)] -= 100  # specks
    im = Image.fromarray(np.clip(page, 0, 255).astype(np.uint8), "RGB").filter(ImageFilter.GaussianBlur(0.8))
    return im.convert(mode)


@pytest.mark.parametrize("w,h,box,paper,pen,mode", [
    (900, 240, (300, 90, 520, 150), (230, 220, 200), (20, 20, 60), "RGB"),  # dark ink, light paper
    (1100, 300, (37, 41, 1001, 260), (40, 40, 40), (240, 240, 240), "RGB"),  # light ink on dark paper
    (301, 97, (120, 30, 200, 70), (250, 250, 250), (90, 10, 10), "L"),  # grey, odd sides
    (64, 48, (10, 8, 50, 40), (200, 200, 200), (0, 0, 0), "RGB"),  # smaller than the search height
])
def test_ink_box_finds_the_ink_and_not_the_specks(w, h, box, paper, pen, mode):
    found = ink_box(_page(w, h, box, paper, pen, mode=mode))
    assert found is not None
    k = -(-h // 96)  # the search's reduction factor: the box is found to within it (and the blur's spread)
    for got, want in zip(found, box):
        assert abs(got - want) <= k + 2, (found, box)


def test_trim_to_ink_crops_with_a_margin_and_keeps_inkless_images():
    page = _page(900, 240, (300, 90, 520, 150), (230, 220, 200), (20, 20, 60))
    x0, y0, x1, y1 = ink_box(page)
    trimmed = trim_to_ink(page, margin=0.25)
    pad = round(0.25 * (y1 - y0)) + 2
    assert trimmed.size == (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad)
    assert np.array_equal(np.asarray(trimmed), np.asarray(page)[y0 - pad:y1 + pad, x0 - pad:x1 + pad])
    edge = _page(200, 60, (0, 0, 200, 60), (230, 230, 230), (0, 0, 0))  # ink to every edge: nothing to cut
    assert trim_to_ink(edge) is edge
    blank = Image.new("RGB", (300, 100), (240, 240, 240))
    assert ink_box(blank) is None and trim_to_ink(blank) is blank


def test_resizer_trims_before_sizing_only_when_the_rule_says_so():
    page = _page(900, 240, (300, 90, 520, 150), (230, 220, 200), (20, 20, 60))
    trimmed = trim_to_ink(page)
    on = Resizer(ImageRule(resize=64, resize_dimension=1, trim=True))(page)
    assert on.height == 64 and on.width == round(64 * trimmed.width / trimmed.height)
    off = Resizer(ImageRule(resize=64, resize_dimension=1))(page)
    assert off.size == (240, 64)  # the whole page, its aspect kept
