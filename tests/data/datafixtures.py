"""Helpers for the data-stage tests: the bad inputs users really have, configs, snapshots.

A plain module (not conftest) so other test folders can import it by a unique name."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from visiontune.config import PipelineConfig, from_dict


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def gradient(w: int, h: int, mode: str = "RGB") -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    rgb = np.stack([x, y, (x + y) / 2], -1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(rgb, "RGB")


def bomb_png(width: int = 15000, height: int = 15000) -> bytes:
    """A PNG whose header claims width x height pixels (what makes a decompression bomb dangerous)."""
    data = bytearray(png(Image.new("L", (4, 4), 0)))
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    data[ihdr + 8: ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4: ihdr + 8 + 13])) & 0xFFFFFFFF
    data[ihdr + 21: ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    """A 400x300 JPEG (landscape as stored) whose EXIF orientation 6 says: display rotated 90 degrees."""
    im = gradient(400, 300)
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(im, exif=exif.tobytes())


# name -> (file bytes or None for "no file", annotation row, expected reasons or [] if valid)
def bad_input_cases() -> dict[str, tuple]:
    good = gradient(400, 300)
    full_png = png(gradient(500, 400))
    full_jpg = jpeg(gradient(500, 400))
    i16 = Image.fromarray((np.linspace(0, 65535, 400 * 300).reshape(300, 400)).astype(np.uint16))
    p_img = gradient(400, 300).convert("P", palette=Image.ADAPTIVE)
    p_img.info["transparency"] = 0
    return {
        "good_png": (png(good), {"text": "12"}, []),
        "good_jpg": (jpeg(gradient(640, 480)), {"text": "345"}, []),
        "truncated_png": (full_png[: len(full_png) // 2], {"text": "1"}, ["undecodable"]),
        "truncated_jpg": (full_jpg[: len(full_jpg) // 3], {"text": "1"}, ["undecodable"]),
        "zero_byte": (b"", {"text": "1"}, ["undecodable"]),
        "text_as_png": (b"this is not an image, just text\n" * 10, {"text": "1"}, ["undecodable"]),
        "cmyk": (jpeg(gradient(400, 300, "CMYK")), {"text": "2"}, []),
        "palette": (png(p_img), {"text": "3"}, []),
        "la": (png(gradient(400, 300, "LA")), {"text": "4"}, []),
        "rgba": (png(gradient(400, 300, "RGBA")), {"text": "5"}, []),
        "sixteen_bit": (png(i16), {"text": "6"}, []),
        "exif_rotated": (exif_rotated_jpeg(), {"text": "7"}, []),
        "bomb": (bomb_png(), {"text": "8"}, ["too_many_pixels"]),
        "one_pixel": (png(Image.new("RGB", (1, 1), "white")), {"text": "9"}, ["too_small"]),
        "very_wide": (png(Image.new("L", (20000, 100), 255)), {"text": "10"}, ["extreme_aspect_ratio"]),
        "missing": (None, {"text": "11"}, ["missing_file"]),
        "duplicate": (None, {"image": "good_png.png", "text": "12"}, ["duplicate"]),
        "escape": (None, {"image": "../outside.png", "text": "13"}, ["path_escapes_root"]),
        "empty_caption": (png(gradient(420, 300)), {"text": "   "}, ["text_too_short"]),
        "null_caption": (png(gradient(430, 300)), {"text": None}, ["missing_text"]),
    }


def ext_of(name: str) -> str:
    return ".jpg" if name in ("good_jpg", "truncated_jpg", "cmyk", "exif_rotated") else ".png"


def make_cfg(raw: Path, work: Path, **settings) -> PipelineConfig:
    """A config for the data stages; each keyword goes to the data-stage section that has that setting
    (``samples`` is the demo section's)."""
    import dataclasses

    sections: dict[str, dict] = {"data": {"raw_dir": str(raw), "work_dir": str(work)}}
    fields = {name: {f.name for f in dataclasses.fields(getattr(PipelineConfig(), name))}
              for name in ("data", "validate", "normalize", "convert", "demo")}
    for key, value in settings.items():
        section = next((s for s, names in fields.items() if key in names), None)
        assert section is not None, f"make_cfg: no data-stage section has a setting {key!r}"
        sections.setdefault(section, {})[key] = value
    return from_dict(sections)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime (ns) of every file under root: the raw folder must never change."""
    return {str(p): (p.read_bytes(), os.stat(p).st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def numbered_raw(tmp_path: Path, n: int, size: tuple[int, int] = (300, 310)) -> Path:
    """tmp_path/raw holding ``n`` valid records: ``{i}.png`` (a gradient ``size[0] + i`` wide and ``size[1]``
    high, so no two are alike) with the text ``"{i}"``. Called again with a larger ``n``, it adds rows."""
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        (raw / f"{i}.png").write_bytes(png(gradient(size[0] + i, size[1])))
        lines.append(json.dumps({"image": f"{i}.png", "text": str(i)}))
    (raw / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return raw


def sh(cwd: Path, *cmd: str) -> str:
    """Run ``cmd`` in ``cwd`` with this venv's tools first on PATH, one worker process and a git identity;
    returns stdout + stderr, and fails the test (with that output) on a non-zero exit."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               VISIONTUNE_WORKERS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{out}"
    return out
