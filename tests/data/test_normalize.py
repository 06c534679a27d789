"""Normalization: RGB, EXIF applied, sides in range, aspect kept, content-addressed and idempotent."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from datafixtures import gradient, make_cfg, snapshot
from visiontune.data.normalize import normalize_image, normalize_stage, output_name, target_size, to_rgb
from visiontune.data.validate import validate_stage


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
def test_target_size(size, expected):
    assert target_size(*size, min_px=300, max_px=1000) == expected


def test_target_size_snaps_to_patch_multiple_within_bounds():
    w, h = target_size(1234, 567, 300, 1000, snap=28)
    assert w % 28 == 0 and h % 28 == 0 and w <= 1000 and h >= 300


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "RGBA", "L", "1"])
def test_every_mode_becomes_rgb(mode):
    assert to_rgb(gradient(40, 30, mode)).mode == "RGB"


def test_transparency_composited_on_white_and_16_bit_scaled():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    i16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert i16.mode.startswith("I")
    assert to_rgb(i16).getpixel((0, 0)) == (255, 255, 255)  # not clipped garbage
    half = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert to_rgb(half).getpixel((0, 0))[0] == 128


def test_exif_orientation_applied():
    from datafixtures import exif_rotated_jpeg
    import io

    im = Image.open(io.BytesIO(exif_rotated_jpeg()))
    assert im.size == (400, 300)
    assert normalize_image(im, 300, 1000).size == (300, 400)  # rotated upright


def test_uniform_size_letterboxes():
    out = normalize_image(gradient(800, 200), 300, 1000, uniform_size=[448, 448])
    assert out.size == (448, 448) and out.getpixel((0, 0)) == (255, 255, 255)


def test_stage_outputs_in_range_and_rerun_writes_nothing(bad_raw, tmp_path):
    raw, _ = bad_raw
    work = tmp_path / "w"
    cfg = make_cfg(raw, work, max_failure_ratio=0.9)
    validate_stage(cfg)
    before = snapshot(raw)
    first = normalize_stage(cfg)
    assert snapshot(raw) == before
    manifest = json.loads((work / "normalized" / "manifest.json").read_text())
    assert first["written"] == len(manifest["images"]) == first["images"] > 0
    for sha, e in manifest["images"].items():
        with Image.open(e["path"]) as im:
            assert im.mode == "RGB" and im.size == (e["width"], e["height"])
            assert max(im.size) <= 1000 and min(im.size) >= 300
        assert e["path"].endswith(output_name(sha, manifest["settings"]))  # addressed by source content + settings
    mtimes = {p: os.stat(p).st_mtime_ns for p in (work / "normalized").rglob("*") if p.is_file()}
    second = normalize_stage(cfg)
    assert second["written"] == 0 and second["skipped"] == first["images"]
    assert {p: os.stat(p).st_mtime_ns for p in (work / "normalized").rglob("*") if p.is_file()} == mtimes

    # Changing a setting writes new files and removes the stale ones.
    cfg2 = make_cfg(raw, work, max_failure_ratio=0.9, max_px=500, min_px=200)
    third = normalize_stage(cfg2)
    assert third["written"] == first["images"] and third["removed"] == first["images"]
    m2 = json.loads((work / "normalized" / "manifest.json").read_text())
    assert all(max(e["width"], e["height"]) <= 500 for e in m2["images"].values())


def test_normalize_without_validate_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `visiontune validate` first"):
        normalize_stage(make_cfg(tmp_path, tmp_path / "w"))
