"""The bundled demo: real handwritten digits composed into small "handwriting to text" images, offline.

scikit-learn ships the UCI optical-recognition digits (1,797 real 8x8 handwritten digits) inside the
wheel, so nothing is downloaded. Each demo image holds 1-8 digits from the first half of that set, each
scan blown up to its own size and tilt, with varied gaps, baseline, pen, paper, blur and noise
(:data:`TRAIN_LAYOUT`); its text is the plain digit string (``"307"``), which makes exact match and
character error rate meaningful. A held-out set (``heldout/``) is drawn from the second half of the digits
with layouts outside the training ranges (:data:`HELDOUT_LAYOUT`): it measures whether the fine-tuned
model learned to read handwriting rather than the training pages' look.

Sizes are mixed on purpose so the later stages have work: most images have their long side within the
300-1000 px range (their short side is often under 300: a 5-digit line is about 5.6:1), some are too
small (long side < 300), some too large (> 1000) and some are long strips with wide spacing (aspect 4-7,
still under ``validate.max_aspect_ratio``). A few deliberately bad records (an empty caption, a missing
file, a duplicated image, a truncated PNG) give validation something to quarantine while staying far
below ``validate.max_failure_ratio``.

Deterministic: one seeded generator, PNGs written without timestamps or metadata, so the bytes (and the
hash in ``data.dvc``) are identical run to run on the same Pillow/zlib.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

from dataclasses import dataclass

import numpy as np
from PIL import Image

from visiontune.config import PipelineConfig
from visiontune.data.io import write_if_changed

MARKER = "DEMO.md"
ANNOTATIONS = "annotations.jsonl"


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


@dataclass(frozen=True)
class Layout:
    """The distributions one set of pages draws its layout from (each a (low, high) range)."""

    n_digits: tuple[int, int]           # digits per page (inclusive)
    glyph: tuple[float, float]          # glyph height / line height
    gap: tuple[float, float]            # space between glyphs / glyph size (negative: touching)
    jitter: tuple[float, float]         # baseline jitter / line height, per glyph
    tilt: tuple[float, float]           # per-glyph rotation, degrees (+-)
    centre: tuple[float, float]         # where the line sits vertically (0 top .. 1 bottom)
    paper: tuple[tuple[float, float], ...]   # RGB paper colour ranges
    pen: tuple[tuple[float, float], ...]     # RGB ink colour ranges
    blur: tuple[float, float]           # Gaussian blur radius, px of the page (applied half the time)
    rgb: float                          # share of pages stored as RGB (else L)


# The training pages: 1-8 digits; glyph size, gaps, baseline, tilt, slant and stroke varied widely; grey or
# blue-black pens on grey or cream paper. The held-out pages (test half of the digits) are drawn from other
# distributions: pens and paper in colours the training pages never use (red-brown on yellow), blur beyond the
# training range, and geometry concentrated at the edges of the training ranges (small glyphs, wide gaps,
# strong tilt and jitter together). A first held-out set with geometry *outside* the training ranges (glyphs
# 0.42-0.55 of the line when training stopped at 0.55; gaps, tilt beyond) measured exact match 0.06 after
# 1,000 steps, against 0.50 for the same glyphs in the training geometry and 0.47 with only the colours
# changed: the model reads what its training pages' geometry covers, so training covers it widely.
TRAIN_LAYOUT = Layout(n_digits=(1, 8), glyph=(0.35, 0.95), gap=(-0.05, 1.0), jitter=(0.0, 0.12), tilt=(0.0, 15.0),
                      centre=(0.3, 0.7), paper=((205, 250), (205, 250), (200, 250)), pen=((0, 70), (0, 70), (0, 120)),
                      blur=(0.0, 1.0), rgb=0.5)
HELDOUT_LAYOUT = Layout(n_digits=(3, 7), glyph=(0.38, 0.5), gap=(0.6, 1.0), jitter=(0.08, 0.12), tilt=(10.0, 15.0),
                        centre=(0.3, 0.7), paper=((225, 255), (215, 250), (150, 200)), pen=((90, 160), (0, 40), (0, 40)),
                        blur=(1.0, 1.4), rgb=0.7)


def render_line(digits_img: np.ndarray, idx: list[int], size: tuple[int, int], layout: Layout,
                rng: np.random.Generator) -> Image.Image:
    """Draw the digits ``idx`` (rows of the 8x8 digit array) left to right onto a ``size`` canvas.

    Each glyph is the 8x8 scan blown up (bicubic) to its own size, tilted, and inked onto the paper; glyph
    size, gaps, baseline, tilt, pen, paper and blur come from ``layout``. The line is scaled down if it would
    not fit the page's width."""
    from PIL import ImageFilter

    w, h = size
    u = lambda r: float(rng.uniform(*r))  # noqa: E731
    glyph_h = u(layout.glyph) * h
    gaps = [u(layout.gap) * glyph_h for _ in idx]
    widths = [glyph_h * rng.uniform(0.75, 1.0) for _ in idx]
    line_w = sum(widths) + sum(gaps[:-1])
    fit = min(1.0, 0.94 * w / max(line_w, 1.0))  # too long for the page: shrink everything
    glyph_h, widths, gaps, line_w = glyph_h * fit, [x * fit for x in widths], [g * fit for g in gaps], line_w * fit
    paper = np.array([u(r) for r in layout.paper], dtype=np.float32)
    pen = np.array([u(r) for r in layout.pen], dtype=np.float32)
    ink = np.zeros((h, w), dtype=np.float32)
    x = (w - line_w) / 2 + rng.uniform(-0.5, 0.5) * (w - line_w) * 0.8
    cy = u(layout.centre) * h
    for i, gw, gap in zip(idx, widths, gaps):
        gh = max(4, int(glyph_h * rng.uniform(0.9, 1.05)))
        gw = max(3, int(gw))
        g = Image.fromarray((digits_img[i] * (255.0 / 16.0)).astype(np.uint8)).resize((gw, gh), Image.BICUBIC)
        # Each writer slants and presses differently: a random shear and, on larger glyphs, a thicker or
        # thinner stroke, so ~900 training glyphs do not become ~900 memorized pictures.
        shear = rng.uniform(-0.3, 0.3)
        g = g.transform((gw + int(abs(shear) * gh), gh), Image.AFFINE,
                        (1, shear, -shear * gh if shear > 0 else 0, 0, 1, 0), resample=Image.BILINEAR, fillcolor=0)
        if gh >= 24 and rng.random() < 0.4:
            g = g.filter(ImageFilter.MaxFilter(3) if rng.random() < 0.6 else ImageFilter.MinFilter(3))
        angle = rng.uniform(-1, 1) * rng.uniform(*layout.tilt) if layout.tilt[1] > 0 else 0.0
        g = g.rotate(angle, resample=Image.BILINEAR, expand=True, fillcolor=0)
        a = np.asarray(g, dtype=np.float32) / 255.0
        y0 = int(np.clip(cy - a.shape[0] / 2 + rng.uniform(-1, 1) * u(layout.jitter) * h, 0, max(0, h - a.shape[0])))
        x0 = int(np.clip(x + (gw - a.shape[1]) / 2, 0, max(0, w - a.shape[1])))
        region = ink[y0:y0 + a.shape[0], x0:x0 + a.shape[1]]
        np.maximum(region, a[: region.shape[0], : region.shape[1]], out=region)
        x += gw + gap
    page = paper[None, None, :] * (1 - ink[..., None]) + pen[None, None, :] * ink[..., None]
    # Paper texture: low-frequency noise (smooth, so the PNGs stay small), then a few ink specks.
    tex = rng.normal(0, 5, size=(max(2, h // 32), max(2, w // 32))).astype(np.float32)
    page += np.asarray(Image.fromarray(tex, "F").resize((w, h), Image.BILINEAR))[..., None]
    n_specks = int(w * h / 4000)
    page[rng.integers(0, h, n_specks), rng.integers(0, w, n_specks)] -= rng.uniform(40, 120, (n_specks, 1)).astype(np.float32)
    rgb = np.minimum((np.clip(page, 0, 255) / 4).round(), 63).astype(np.uint8) * 4  # 64 levels, like a cheap scanner
    im = Image.fromarray(rgb, "RGB")
    if rng.random() < 0.5 and layout.blur[1] > 0:
        im = im.filter(ImageFilter.GaussianBlur(u(layout.blur) * max(1.0, h / 150)))
    return im if rng.random() < layout.rgb else im.convert("L")


def _size(kind: str, n_digits: int, rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of one page: roughly square cells, one per digit plus margins, so the aspect ratio
    follows the digit count; ``kind`` sets the scale."""
    aspect = min(7.5, (n_digits + 1.2) * rng.uniform(0.8, 1.2))
    if kind == "strip":  # wide margins: aspect 4-7 whatever the digit count
        aspect = rng.uniform(4.0, 7.0)
        h = int(rng.integers(120, 200))
        return int(h * aspect), h
    if kind == "small":  # long side under 300 px: normalization scales it up
        h = int(rng.integers(28, 90))
        h = min(h, int(290 / aspect))
    elif kind == "large":  # long side over 1000 px: normalization scales it down
        h = int(rng.integers(300, 700))
        h = max(h, int(np.ceil(1010 / aspect)))
    else:  # typical scan: long side within 300-1000 px
        h = int(rng.integers(100, 400))
        h = min(h, int(1000 / aspect))
        h = max(h, int(np.ceil(300 / aspect)))
    return max(8, int(round(h * aspect))), max(8, h)


_KINDS = ("in_range", "small", "large", "strip")
_KIND_P = (0.76, 0.08, 0.08, 0.08)


def digit_halves(n: int) -> tuple[range, range]:
    """(training half, test half) of scikit-learn's ``n`` digits: the first and second half in file order, as
    scikit-learn's own digits example splits them (no shuffling: the halves share few writers)."""
    return range(0, n // 2), range(n // 2, n)


def _page(job: tuple[int, int, str]) -> tuple[str, bytes, str]:
    """Render record ``k`` of set ``which``: (kind, PNG bytes, digit string). Its own RNG stream (seed, k, set):
    the bytes do not depend on how the records are split across worker processes."""
    k, seed, which = job
    images, targets = _DIGITS
    train, test = digit_halves(len(images))
    pool, layout, stream = (test, HELDOUT_LAYOUT, 1) if which == "heldout" else (train, TRAIN_LAYOUT, 0)
    rng = np.random.default_rng([seed, k, stream])
    kind = str(rng.choice(_KINDS, p=_KIND_P)) if which != "heldout" else "in_range"
    n_digits = int(rng.integers(layout.n_digits[0], layout.n_digits[1] + 1))
    idx = [int(pool[int(i)]) for i in rng.integers(0, len(pool), size=n_digits)]
    im = render_line(images, idx, _size(kind, n_digits, rng), layout, rng)
    return kind, _png_bytes(im), "".join(str(int(targets[i])) for i in idx)


_DIGITS: tuple[np.ndarray, np.ndarray] = (np.empty(0), np.empty(0))  # set before rendering (inherited by fork)


HELDOUT = "heldout"


def generate_demo(out_dir: str | Path, n: int = 600, seed: int = 3407, heldout: int = 0) -> dict[str, Any]:
    """Write ``n`` demo records (images + ``annotations.jsonl`` + ``DEMO.md``) under ``out_dir``, and ``heldout``
    held-out pages under ``out_dir/heldout`` (the test half of the digits, layouts the training pages never use;
    the pipeline's own data stages read only the top-level annotations).

    Rendering runs in one process per core (PNG encoding is most of the time: 3,000 pages took 62 s of
    CPU time, 34 s on 2 cores). Files whose bytes are already there are left untouched (a re-run changes no mtime).
    """
    global _DIGITS
    from sklearn.datasets import load_digits

    if n < 10:
        raise ValueError(f"demo.samples = {n}: the demo needs at least 10 samples (it plants 4 bad ones)")
    digits = load_digits()
    _DIGITS = (digits.images, digits.target)
    out = Path(out_dir)
    # Deliberately bad records, at fixed positions so the same rows are bad every time.
    bad = {
        "empty_caption": n // 7,
        "missing_file": n // 3,
        "duplicate_image": n // 2,
        "truncated_png": (2 * n) // 3,
    }
    rows, kinds, written = _write_pages(out, n, seed, bad["truncated_png"], "train")
    rows[bad["empty_caption"]]["text"] = ""
    rows[bad["missing_file"]]["image"] = "images/missing_00000.png"
    dup_src = rows[bad["duplicate_image"] - 1]
    rows[bad["duplicate_image"]] = {"image": dup_src["image"], "text": dup_src["text"]}
    written += write_if_changed(out / ANNOTATIONS, "".join(json.dumps(r) + "\n" for r in rows))
    if heldout:
        held_rows, _, n_written = _write_pages(out / HELDOUT, heldout, seed, -1, "heldout")
        written += n_written + write_if_changed(out / HELDOUT / ANNOTATIONS, "".join(json.dumps(r) + "\n" for r in held_rows))
    elif (out / HELDOUT).exists():
        shutil.rmtree(out / HELDOUT)
    written += write_if_changed(
        out / MARKER,
        "# visiontune demo data\n\nGenerated by `visiontune demo-data` from scikit-learn's bundled handwritten digits "
        f"(seed {seed}, {n} records from the first half of the digits). Rows planted as bad on purpose: {json.dumps(bad)}.\n"
        f"`{HELDOUT}/`: {heldout} clean held-out pages from the second half of the digits, laid out differently "
        "(visiontune.data.demo.HELDOUT_LAYOUT); the evaluate stage scores them (eval.extra_sets).\n"
        "Regenerate instead of editing; `dvc add`/`data.dvc` tracks this folder.\n",
    )
    sizes = _counts(np.array(kinds))
    return {"raw_dir": str(out), "records": n, "heldout": heldout, "files_written": written, "size_mix": sizes,
            "planted_bad_rows": bad}


def _write_pages(out: Path, n: int, seed: int, truncated_row: int, which: str) -> tuple[list[dict], list[str], int]:
    """Render the ``n`` pages of set ``which`` into ``out/images`` (page ``truncated_row`` cut in half), one
    process per core; removes stale pages of a larger earlier run; returns (annotation rows, each page's size
    kind, files written)."""
    import contextlib
    import multiprocessing as mp

    from tqdm.auto import tqdm

    from visiontune.data.probe import worker_count

    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    kinds: list[str] = []
    written = 0
    jobs = [(k, seed, which) for k in range(n)]
    workers = worker_count(n)
    bar = tqdm(total=n, desc=f"demo pages ({which})", unit="img", disable=n < 200)
    from visiontune._quiet import pool_worker_init

    with (mp.get_context("fork").Pool(workers, initializer=pool_worker_init) if workers > 1
          else contextlib.nullcontext()) as pool:
        pages = pool.imap(_page, jobs, chunksize=16) if pool is not None else map(_page, jobs)
        for k, (kind, data, text) in enumerate(pages):
            rel = f"images/{k:05d}.png"
            if k == truncated_row:
                data = data[: len(data) // 2]
            written += write_if_changed(out / rel, data)
            rows.append({"image": rel, "text": text})
            kinds.append(kind)
            bar.update()
    bar.close()
    stale = {p.name for p in (out / "images").glob("*.png")} - {f"{k:05d}.png" for k in range(n)}
    for name in stale:  # a previous demo with more samples
        (out / "images" / name).unlink()
    return rows, kinds, written


def _counts(kinds: np.ndarray) -> dict[str, int]:
    vals, counts = np.unique(kinds, return_counts=True)
    return {str(v): int(c) for v, c in zip(vals, counts)}


def demo_stage(cfg: PipelineConfig) -> dict[str, Any]:
    """``visiontune demo-data``: write the demo under ``data.raw_dir`` (refuses to overwrite user data)."""
    raw = Path(cfg.data.raw_dir)
    if raw.is_dir() and any(raw.iterdir()) and not (raw / MARKER).exists():
        raise ValueError(
            f"{raw} already holds data that is not the visiontune demo (no {MARKER}); refusing to overwrite it. "
            f"Set data.raw_dir to an empty folder for the demo, e.g. --set data.raw_dir=data/demo_raw"
        )
    return generate_demo(raw, n=cfg.demo.samples, seed=cfg.demo.seed, heldout=cfg.demo.heldout)
