"""The bundled demo: real handwritten digits composed into small "handwriting to text" images, offline.

scikit-learn ships the UCI optical-recognition digits (1,797 real 8x8 handwritten digits) inside the
wheel, so nothing is downloaded. Each demo image holds 2-5 digits drawn side by side in even cells,
with a little jitter, ink contrast and paper noise; its text is the plain digit string (``"307"``),
which makes exact match and character error rate meaningful.

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
from pathlib import Path
from typing import Any

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


def _render(digits_img: np.ndarray, idx: list[int], size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Draw the digits ``idx`` (rows of the 8x8 digit array) left to right onto a ``size`` canvas.

    One glyph per cell, the cells splitting the width evenly, each glyph 65-80% of its cell's shorter
    side with a small jitter. The layout is kept this regular on purpose: with glyph sizes varying 4x
    within an image and larger jitter (this generator's first version), the demo's tiny model stayed at
    the bag-of-digits plateau for the whole 10-minute CPU budget (at most 15% of digits in place after
    1,500-2,500 steps); with regular cells it reads strings (README, "What the demo model learns").
    """
    w, h = size
    paper = rng.uniform(225, 250)
    canvas = np.full((h, w), paper, dtype=np.float32)
    n = len(idx)
    cell_w = w / (n + 0.6)
    x = cell_w * 0.3
    for i in idx:
        s = max(4, int(min(h, cell_w) * rng.uniform(0.65, 0.8)))
        glyph = Image.fromarray((digits_img[i] * (255.0 / 16.0)).astype(np.uint8)).resize((s, s), Image.BICUBIC)
        g = np.asarray(glyph, dtype=np.float32) / 255.0
        ink = rng.uniform(10, 60)
        gx0 = int(np.clip(x + (cell_w - s) / 2 + rng.uniform(-0.05, 0.05) * cell_w, 0, max(0, w - s)))
        gy0 = int(np.clip((h - s) / 2 + rng.uniform(-0.05, 0.05) * h, 0, max(0, h - s)))
        region = canvas[gy0:gy0 + s, gx0:gx0 + s]
        gg = g[: region.shape[0], : region.shape[1]]
        region[:] = region * (1 - gg) + ink * gg
        x += cell_w
    # Paper texture: low-frequency noise (smooth, so the PNGs stay small), then a few ink specks.
    tex = rng.normal(0, 5, size=(max(2, h // 32), max(2, w // 32))).astype(np.float32)
    canvas += np.asarray(Image.fromarray(tex, "F").resize((w, h), Image.BILINEAR))
    n_specks = int(w * h / 4000)
    canvas[rng.integers(0, h, n_specks), rng.integers(0, w, n_specks)] -= rng.uniform(40, 120, n_specks).astype(np.float32)
    gray = (np.clip(canvas, 0, 255) / 4).round().astype(np.uint8) * 4  # 64 grey levels, like a cheap scanner
    if rng.random() < 0.5:  # a blue-ish pen on some pages: keep RGB in the mix
        tint = np.stack([gray, gray, np.clip(gray.astype(np.int16) + 25, 0, 255).astype(np.uint8)], axis=-1)
        return Image.fromarray(tint, "RGB")
    return Image.fromarray(gray, "L")


def _size(kind: str, n_digits: int, rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of one page: roughly square cells, one per digit, so the aspect ratio follows the
    digit count (2 digits ~2.6:1, 5 digits ~5.6:1); ``kind`` sets the scale."""
    if kind == "strip":  # wide spacing: aspect 4-7 whatever the digit count
        h = int(rng.integers(140, 260))
        return int(h * rng.uniform(4.0, 7.0)), h
    aspect = (n_digits + 0.6) * rng.uniform(0.9, 1.1)
    if kind == "small":  # long side under 300 px: normalization scales it up
        h = int(rng.integers(28, 90))
        h = min(h, int(290 / aspect))
    elif kind == "large":  # long side over 1000 px: normalization scales it down
        h = int(rng.integers(440, 760))
    else:  # typical scan: long side within 300-1000 px
        h = int(rng.integers(120, 400))
        h = min(h, int(1000 / aspect))
        h = max(h, int(np.ceil(300 / aspect)))
    return max(8, int(round(h * aspect))), max(8, h)


_KINDS = ("in_range", "small", "large", "strip")
_KIND_P = (0.76, 0.08, 0.08, 0.08)


def _page(job: tuple[int, int]) -> tuple[str, bytes, str]:
    """Render record ``k``: (kind, PNG bytes, digit string). Its own RNG stream (seed, k): the bytes do not
    depend on how the records are split across worker processes."""
    k, seed = job
    images, targets = _DIGITS
    rng = np.random.default_rng([seed, k])
    kind = str(rng.choice(_KINDS, p=_KIND_P))
    n_digits = int(rng.integers(2, 6))
    idx = [int(i) for i in rng.integers(0, len(images), size=n_digits)]
    im = _render(images, idx, _size(kind, n_digits, rng), rng)
    return kind, _png_bytes(im), "".join(str(int(targets[i])) for i in idx)


_DIGITS: tuple[np.ndarray, np.ndarray] = (np.empty(0), np.empty(0))  # set before rendering (inherited by fork)


def generate_demo(out_dir: str | Path, n: int = 600, seed: int = 3407) -> dict[str, Any]:
    """Write ``n`` demo records (images + ``annotations.jsonl`` + ``DEMO.md``) under ``out_dir``.

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
    (out / "images").mkdir(parents=True, exist_ok=True)
    # Deliberately bad records, at fixed positions so the same rows are bad every time.
    bad = {
        "empty_caption": n // 7,
        "missing_file": n // 3,
        "duplicate_image": n // 2,
        "truncated_png": (2 * n) // 3,
    }
    rows, kinds, written = _write_pages(out, n, seed, bad["truncated_png"])
    rows[bad["empty_caption"]]["text"] = ""
    rows[bad["missing_file"]]["image"] = "images/missing_00000.png"
    dup_src = rows[bad["duplicate_image"] - 1]
    rows[bad["duplicate_image"]] = {"image": dup_src["image"], "text": dup_src["text"]}
    stale = {p.name for p in (out / "images").glob("*.png")} - {f"{k:05d}.png" for k in range(n)}
    for name in stale:  # a previous demo with more samples
        (out / "images" / name).unlink()
    written += write_if_changed(out / ANNOTATIONS, "".join(json.dumps(r) + "\n" for r in rows))
    written += write_if_changed(
        out / MARKER,
        "# visiontune demo data\n\nGenerated by `visiontune demo-data` from scikit-learn's bundled handwritten digits "
        f"(seed {seed}, {n} records). Rows planted as bad on purpose: {json.dumps(bad)}.\n"
        "Regenerate instead of editing; `dvc add`/`data.dvc` tracks this folder.\n",
    )
    sizes = _counts(np.array(kinds))
    return {"raw_dir": str(out), "records": n, "files_written": written, "size_mix": sizes, "planted_bad_rows": bad}


def _write_pages(out: Path, n: int, seed: int, truncated_row: int) -> tuple[list[dict], list[str], int]:
    """Render the ``n`` pages into ``out/images`` (page ``truncated_row`` cut in half), one process per core;
    returns (annotation rows, each page's size kind, files written)."""
    import contextlib
    import multiprocessing as mp

    from tqdm.auto import tqdm

    from visiontune.data.probe import worker_count

    rows: list[dict] = []
    kinds: list[str] = []
    written = 0
    jobs = [(k, seed) for k in range(n)]
    workers = worker_count(n)
    bar = tqdm(total=n, desc="demo pages", unit="img", disable=n < 200)
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
    return generate_demo(raw, n=cfg.demo.samples, seed=cfg.demo.seed)
