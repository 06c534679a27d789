"""Printed text rendered offline from the TrueType fonts installed packages ship: the pretraining data of
the demo's base model (``visiontune pretrain``).

The demo fine-tunes a base that already reads *print* on *handwriting*, as real users fine-tune a pretrained
VLM on their own narrow skill. This module makes the print: digit strings (with the separators people
write between them), words and mixed codes, drawn one character at a time from matplotlib's bundled faces
(DejaVu Sans/Serif/Mono and their bold/oblique cuts, STIX, Computer Modern) in varied sizes, tracking,
baselines, rotation, ink, paper, noise and blur. Handwriting never appears here.

One page is a pure function of ``(seed, index)`` (:func:`printed_sample`), so a pretraining run is
reproducible whatever the number of data-loader workers, and a validation set is just another index range.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from visiontune.data.demo import Layout, render_line

# Text faces only: matplotlib also ships symbol and size-variant faces (cmex10, cmsy10, STIXSize*, STIXNonUni*)
# whose code points do not map to ordinary letters and digits.
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf",
)
DIGITS = string.digits
LETTERS = string.ascii_letters
PUNCT = ".,-:/()#%+"
# What a page holds; the digit-heavy mix matches the skill the demo fine-tunes next (reading digit strings).
# "scan": printed digits stored the way digit datasets store their scans (below).
KINDS = ("digits", "grouped", "word", "code", "scan")
KIND_P = (0.35, 0.1, 0.1, 0.1, 0.35)
# Scan lines: anything from one to ten glyphs, from a third of the page height to nearly all of it, touching or
# far apart, on any light paper in any dark ink. The base is a general reader: its pages cover every layout the
# demo's pages could use, so that fine-tuning has only the writing itself left to teach.
SCAN_LAYOUT = Layout(n_digits=(1, 10), glyph=(0.3, 0.95), gap=(-0.05, 1.2), jitter=(0.0, 0.12), tilt=(0.0, 15.0),
                     centre=(0.3, 0.7), paper=((170, 255), (170, 255), (150, 255)), pen=((0, 130), (0, 130), (0, 130)),
                     blur=(0.0, 1.5), rgb=0.6)


@dataclass(frozen=True)
class Font:
    """One face: its file and the characters its character map covers (never drawn as a missing-glyph box)."""

    path: Path
    charset: frozenset


@functools.lru_cache(maxsize=1)
def available_fonts() -> tuple[Font, ...]:
    """The bundled faces of :data:`FONT_FILES` found in this matplotlib install, each with its covered characters.

    Raises a clear error if none are found (matplotlib missing or unpacked without its fonts)."""
    from fontTools.ttLib import TTFont

    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        raise RuntimeError("printed-text pretraining data needs matplotlib's bundled fonts: pip install matplotlib") from exc
    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    wanted = set(DIGITS + LETTERS + PUNCT)
    fonts = []
    for name in FONT_FILES:
        path = root / name
        if not path.exists():
            continue
        cmap = TTFont(str(path), lazy=True).getBestCmap() or {}
        covered = frozenset(c for c in wanted if ord(c) in cmap)
        if set(DIGITS) <= covered:
            fonts.append(Font(path, covered))
    if not fonts:
        raise RuntimeError(f"no usable fonts under {root}: expected matplotlib's bundled TrueType faces "
                           f"({', '.join(FONT_FILES[:3])}, ...); reinstall matplotlib")
    return tuple(fonts)


@functools.lru_cache(maxsize=512)
def _face(path: Path, size: int) -> Any:
    return ImageFont.truetype(str(path), size)


def _text(kind: str, rng: np.random.Generator, charset: frozenset) -> str:
    """The string a page shows: never empty, never with leading/trailing spaces."""
    digits = [c for c in DIGITS if c in charset]
    if kind == "digits":
        return "".join(rng.choice(digits, int(rng.integers(1, 11))))
    if kind == "grouped":  # numbers as people write them: 12-345, 3.14, 07/12, 1,024
        sep = str(rng.choice([c for c in "-./:," if c in charset] or ["-"]))
        groups = ["".join(rng.choice(digits, int(rng.integers(1, 5)))) for _ in range(int(rng.integers(2, 4)))]
        return sep.join(groups)
    letters = [c for c in LETTERS if c in charset]
    if kind == "word":
        word = "".join(rng.choice(letters, int(rng.integers(2, 9))))
        return word.capitalize() if rng.random() < 0.3 else word
    pool = letters + digits + [c for c in PUNCT if c in charset]
    return "".join(rng.choice(pool, int(rng.integers(2, 10))))


def _draw_line(text: str, font: Font, size: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Ink coverage (float32, 0..1) of ``text`` drawn glyph by glyph with random tracking and baseline jitter."""
    face = _face(font.path, size)
    cells = "cells" if rng.random() < 0.25 else "flow"  # even cells, like a form's boxes, or natural spacing
    tracking = rng.uniform(-0.05, 0.6) * size
    jitter = rng.uniform(0.0, 0.12) * size
    widths = [max(1.0, face.getlength(c)) for c in text]
    cell = max(widths) * rng.uniform(1.05, 1.6)
    total = (cell * len(text) if cells == "cells" else sum(widths) + tracking * (len(text) - 1)) + size
    w, h = int(total + 2), int(size * 1.8)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    x = size * 0.5
    for c, cw in zip(text, widths):
        dy = rng.uniform(-jitter, jitter)
        gx = x + (cell - cw) / 2 if cells == "cells" else x
        draw.text((gx, size * 0.3 + dy), c, fill=255, font=face)
        x += cell if cells == "cells" else cw + tracking
    return np.asarray(canvas, dtype=np.float32) / 255.0, float(size)


def uci_scan(char: str, font: Font, rng: np.random.Generator) -> np.ndarray:
    """``char`` printed in ``font`` and stored as the UCI optical-recognition digits store handwriting: a
    binary bitmap scaled to fill a 32x32 box, then the count of set pixels in each 4x4 block (8x8, values
    0-16). A slant and a rotation vary the print; thin faces get a thicker pen."""
    size = 48
    canvas = Image.new("L", (2 * size, 2 * size), 0)
    ImageDraw.Draw(canvas).text((size // 2, size // 4), char, fill=255, font=_face(font.path, size))
    shear = rng.uniform(-0.3, 0.3)
    canvas = canvas.transform(canvas.size, Image.AFFINE, (1, shear, -shear * size, 0, 1, 0), resample=Image.BILINEAR)
    canvas = canvas.rotate(rng.uniform(-8, 8), resample=Image.BILINEAR)
    ink = np.asarray(canvas) > 127
    ys, xs = np.nonzero(ink)
    if not len(xs):
        return np.zeros((8, 8), dtype=np.float32)
    crop = Image.fromarray(ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8) * 255)
    scale = 32 / max(crop.width, crop.height)
    w, h = max(1, round(crop.width * scale)), max(1, round(crop.height * scale))
    box = Image.new("L", (32, 32), 0)
    box.paste(crop.resize((w, h), Image.BILINEAR), ((32 - w) // 2, (32 - h) // 2))
    # A pen, not a font's hairlines: thicken until the ink covers a share of the box like the digit scans'
    # (about 30% of the 32x32 pixels on average), at most twice; thin faces otherwise fade to a few grey blocks.
    target = rng.uniform(0.12, 0.35)
    for _ in range(2):
        if (np.asarray(box) > 127).mean() >= target:
            break
        box = box.filter(ImageFilter.MaxFilter(3))
    bits = (np.asarray(box) > 127).astype(np.float32)
    return bits.reshape(8, 4, 8, 4).sum(axis=(1, 3))


def _scan_page(font: Font, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A line of printed digits as 8x8 scans (:func:`uci_scan`), composed like the demo's handwriting pages
    (:func:`visiontune.data.demo.render_line`) with :data:`SCAN_LAYOUT`, on a page 40-120 px tall."""
    n = int(rng.integers(SCAN_LAYOUT.n_digits[0], SCAN_LAYOUT.n_digits[1] + 1))
    text = "".join(rng.choice(list(DIGITS), n))
    scans = np.stack([uci_scan(c, font, rng) for c in text])
    h = int(rng.integers(40, 121))
    w = int(h * min(10.0, (n + 1.2) * rng.uniform(0.8, 1.3)))
    return render_line(scans, list(range(n)), (w, h), SCAN_LAYOUT, rng), text


def printed_sample(seed: int, index: int) -> tuple[Image.Image, str]:
    """Page ``index`` of the printed-text stream ``seed``: (image, its exact text). Pure and deterministic."""
    rng = np.random.default_rng([seed, index])
    fonts = available_fonts()
    font = fonts[int(rng.integers(0, len(fonts)))]
    kind = str(rng.choice(KINDS, p=KIND_P))
    if kind == "scan":
        return _scan_page(font, rng)
    text = _text(kind, rng, font.charset)
    size = int(rng.integers(18, 44))  # the model sees pages ~64 px tall: larger faces only cost rendering time
    ink, glyph_px = _draw_line(text, font, size, rng)
    img = Image.fromarray((ink * 255).astype(np.uint8), "L")
    if rng.random() < 0.35:  # a thicker or thinner pen than the face's own stroke
        img = img.filter(ImageFilter.MaxFilter(3) if rng.random() < 0.6 or size < 30 else ImageFilter.MinFilter(3))
    angle = rng.uniform(-6, 6) if rng.random() < 0.6 else 0.0
    if angle:
        img = img.rotate(angle, resample=Image.BILINEAR, expand=True, fillcolor=0)
    # Low-resolution scans: squeeze the line so a glyph is 7-14 px tall, then blow it back up smoothly. Print
    # seen this way looks like the blocky 8x8 scans many digit datasets hold, without being handwriting.
    if rng.random() < 0.45:
        scale = rng.uniform(7, 14) / glyph_px
        small = img.resize((max(2, int(img.width * scale)), max(2, int(img.height * scale))), Image.BOX)
        img = small.resize(img.size, Image.BICUBIC)
    ink = np.asarray(img, dtype=np.float32) / 255.0
    # Crop to the ink with a random margin, so the text fills anything from most of the page to a small part.
    ys, xs = np.nonzero(ink > 0.1)
    if len(xs):
        pad_x, pad_y = int(rng.uniform(0.1, 1.5) * glyph_px), int(rng.uniform(0.05, 0.4) * glyph_px)
        x0, x1 = max(0, xs.min() - pad_x), min(ink.shape[1], xs.max() + 1 + pad_x)
        y0, y1 = max(0, ys.min() - pad_y), min(ink.shape[0], ys.max() + 1 + pad_y)
        ink = np.pad(ink, ((pad_y, pad_y), (pad_x, pad_x)))[y0:y1 + 2 * pad_y, x0:x1 + 2 * pad_x]
    # Condensed or expanded type: each character spans 0.5-1.1 page heights, so a character always covers at
    # least one of the language model's image tokens (32 px at the demo's 64 px pages); squeezed tighter, the
    # first pretraining run stalled at a bag-of-characters loss (~2.3 nats) for 2,800 steps.
    h0, w0 = ink.shape
    width = int(np.clip(len(text) * rng.uniform(0.5, 1.1) * h0 + h0 * rng.uniform(0.2, 1.0), 8, 12 * h0))
    ink = np.asarray(Image.fromarray(ink, "F").resize((width, h0), Image.BILINEAR))
    paper = rng.uniform(170, 255, size=3)
    pen = rng.uniform(0, 90, size=3)
    if rng.random() < 0.15:  # light text on a dark ground
        paper, pen = pen, paper
    h, w = ink.shape
    tex = rng.normal(0, rng.uniform(0, 12), size=(max(2, h // 16), max(2, w // 16))).astype(np.float32)
    tex = np.asarray(Image.fromarray(tex, "F").resize((w, h), Image.BILINEAR))
    rgb = paper[None, None, :] * (1 - ink[..., None]) + pen[None, None, :] * ink[..., None] + tex[..., None]
    rgb += rng.normal(0, rng.uniform(0, 8), size=rgb.shape)
    out = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    # Pages 40-120 px tall: around the 64 px the collator's image rule gives the model, from both sides.
    target_h = int(rng.integers(40, 121))
    out = out.resize((max(8, int(round(out.width * target_h / out.height))), target_h), Image.BILINEAR)
    if rng.random() < 0.4:
        out = out.convert("L")
    return out, text
