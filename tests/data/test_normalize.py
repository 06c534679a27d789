"""Normalization: EXIF applied, sides in range, aspect kept, content-addressed and idempotent (the RGB
conversion and the size rule themselves: tests/test_images.py)."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image, ImageCms

from datafixtures import gradient, make_cfg, png, snapshot
from visiontune.data.normalize import normalize_image, normalize_stage, output_name
from visiontune.data.validate import validate_stage


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


@pytest.mark.parametrize("swap, says", [("symlink_out", "outside the data root"), ("content", "sha256")])
def test_a_source_changed_after_validation_is_refused_and_nothing_is_written(tmp_path, swap, says):
    """Normalize re-checks what validation recorded (issue 14, hole 4): a symlink re-pointed outside the
    data root, or other bytes under the same name, is an error naming the file and the fix."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "real.png").write_bytes(png(gradient(400, 300)))
    (tmp_path / "outside.png").write_bytes(png(gradient(500, 300)))
    (raw / "a.png").symlink_to(raw / "real.png")
    (raw / "annotations.jsonl").write_text(json.dumps({"image": "a.png", "text": "1"}) + "\n")
    work = tmp_path / "w"
    cfg = make_cfg(raw, work)
    validate_stage(cfg)
    (raw / "a.png").unlink()
    if swap == "symlink_out":
        (raw / "a.png").symlink_to(tmp_path / "outside.png")
    else:
        (raw / "a.png").write_bytes(png(gradient(500, 300)))
    with pytest.raises(ValueError, match=rf"a\.png .*{says}.*Re-run `visiontune validate`"):
        normalize_stage(cfg)
    assert not [p for p in (work / "normalized").rglob("*") if p.is_file()]


def _exif_jpeg(im: Image.Image, orientation: int) -> bytes:
    import io

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, exif=exif)
    return buf.getvalue()


def _sources() -> dict[str, bytes]:
    import io

    import numpy as np

    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).resize((1300, 900))
    i16 = io.BytesIO()
    Image.fromarray((np.arange(500 * 320).reshape(320, 500) % 65536).astype(np.uint16)).save(i16, format="PNG")
    with_key = io.BytesIO()
    noise.resize((640, 480)).save(with_key, format="PNG", transparency=(1, 2, 3))
    grey_key, icc, rotated = io.BytesIO(), io.BytesIO(), io.BytesIO()
    noise.convert("L").save(grey_key, format="PNG", transparency=7)
    noise.save(icc, format="PNG", icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    exif = Image.Exif()
    exif[0x0112] = 6
    noise.convert("L").save(rotated, format="PNG", exif=exif)
    return {
        "rgb-down-icc": icc.getvalue(), "grey-colour-key": grey_key.getvalue(), "grey-png-rotated": rotated.getvalue(),
        "rgb-down": png(noise), "rgb-in-range": png(noise.resize((640, 480))), "rgb-up": png(noise.resize((200, 90))),
        "rgb-colour-key": with_key.getvalue(), "grey-down": png(noise.convert("L")),
        "grey-up": png(noise.convert("L").resize((120, 250))), "grey-in-range": png(noise.convert("L").resize((500, 400))),
        "palette": png(noise.convert("P")), "rgba": png(noise.convert("RGBA")), "i16": i16.getvalue(),
        "jpeg-rotated": _exif_jpeg(noise, 6), "jpeg-grey-rotated": _exif_jpeg(noise.convert("L"), 8),
        "jpeg-up": _exif_jpeg(noise.resize((160, 120)), 1),
    }


@pytest.mark.parametrize("snap", [0, 28])
def test_fast_paths_write_the_pixels_of_convert_resize_and_pillows_png_writer(tmp_path, snap):
    """Grey images resized before the RGB conversion, the fast PNG writer, plain PNGs decoded without Pillow,
    in-range RGB PNGs copied without decoding: each output decodes to exactly the pixels of the straightforward
    path (to_rgb, resize, Pillow's writer), with the same size facts in the manifest entry."""
    import hashlib
    import io

    import numpy as np

    from visiontune.data.normalize import _work, settings_signature
    from visiontune.data.png import decode_plain_png, rewrap_png
    from visiontune.images import bounded_size, to_rgb

    plain = {"rgb-down", "rgb-in-range", "rgb-up", "rgb-down-icc", "grey-down", "grey-up", "grey-in-range"}

    sig = settings_signature(300, 1000, snap, None, "png")
    for name, data in _sources().items():
        src = tmp_path / f"{name}.img"
        src.write_bytes(data)
        entry = _work((str(src), str(tmp_path / f"{name}.png"), sig, hashlib.sha256(data).hexdigest(), (str(tmp_path),)))
        with Image.open(io.BytesIO(data)) as im:
            assert (decode_plain_png(data, im.info) is not None) == (name in plain), name  # the fast decoder's sources
            ref = to_rgb(im)
            size = bounded_size(ref.width, ref.height, 300, 1000, snap)
            if size != ref.size:
                down = size[0] * size[1] < ref.width * ref.height
                ref = ref.resize(size, Image.LANCZOS if down else Image.BICUBIC, reducing_gap=3.0 if down else None)
            buf = io.BytesIO()
            ref.save(buf, format="PNG", compress_level=1)
            source_size = to_rgb(im).size
        with Image.open(io.BytesIO(buf.getvalue())) as want, Image.open(tmp_path / f"{name}.png") as got:
            assert got.mode == want.mode == "RGB", name
            assert np.array_equal(np.asarray(got), np.asarray(want)), name
            assert got.info.get("transparency") == want.info.get("transparency"), name
            assert got.info.get("icc_profile") == want.info.get("icc_profile"), name
        assert (entry["width"], entry["height"], entry["source_width"], entry["source_height"]) == (*size, *source_size)
        if name in ("rgb-in-range", "rgb-colour-key") and not snap:  # copied, not decoded: the rewrapped source
            with Image.open(io.BytesIO(data)) as im:
                assert (tmp_path / f"{name}.png").read_bytes() == rewrap_png(data, im.info)
