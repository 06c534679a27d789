"""Per-image metadata probing: the facts the validation suite judges.

:func:`probe_image` never raises: a missing file, a path that escapes the data root, a zero-byte or
truncated file, a text file named ``.png`` or a decompression bomb each come back as a row with the
fact that makes it bad (``exists=False``, ``within_root=False``, ``decodable=False``, ``pixels`` above the
limit ...). The Great Expectations suite in :mod:`visiontune.data.validate` then decides; no verdict is
taken here. Files are opened read-only.

Facts that cannot be known (the size of a missing file) are ``None``: GX skips nulls in value checks, so
each bad image fails the one expectation that names its real problem, not five follow-on ones.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Optional

from PIL import Image, ImageFile

from visiontune.data.io import sha256_bytes

COLUMNS = [
    "ref", "within_root", "exists", "bytes", "sha256", "decodable", "error", "format", "mode",
    "width", "height", "min_side", "max_side", "aspect_ratio", "pixels", "exif_orientation",
]


def resolve_ref(ref: str, root: Path) -> tuple[Optional[Path], bool]:
    """Resolve an annotation path against the data root; returns (resolved path, stays inside root).

    Absolute paths are allowed when they point inside the root. ``..`` segments and symlinks are resolved
    first, so ``../secret.png`` and a link pointing out of the folder both count as escaping.
    """
    if "\x00" in ref:
        return None, False
    p = Path(ref)
    full = p if p.is_absolute() else root / p
    try:
        resolved = full.resolve()
        return resolved, resolved.is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # symlink loops, over-long names
        return None, False


def probe_image(ref: str, root: str, data: Optional[bytes], max_pixels: int) -> dict[str, Any]:
    """Metadata of one image (from ``data`` if given, else from the file ``ref`` under ``root``)."""
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row["ref"] = ref
    if data is None:
        path, inside = resolve_ref(ref, Path(root))
        row["within_root"] = inside
        if not inside:
            row["error"] = f"path {ref!r} resolves outside the data root {root}"
            return row
        assert path is not None
        row["exists"] = os.path.isfile(path)  # os.path: False, not an OSError, for a name too long to exist
        if not row["exists"]:
            row["error"] = f"{path} does not exist" if not os.path.exists(path) else f"{path} is not a regular file"
            return row
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as e:
            row["exists"] = False
            row["error"] = f"cannot read {path}: {e.strerror}"
            return row
    else:
        row["within_root"] = True
        row["exists"] = True
    row["bytes"] = len(data)
    row["sha256"] = sha256_bytes(data)
    if not data:
        row["decodable"] = False
        row["error"] = "zero-byte file"
        return row
    _probe_pixels(data, max_pixels, row)
    return row


def _probe_pixels(data: bytes, max_pixels: int, row: dict[str, Any]) -> None:
    old_limit, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    # Read the header with PIL's bomb guard off so the dimensions of a bomb are known. Nothing that decodes
    # pixels (load(), and getexif(), which loads a PNG) runs before the check against our own max_pixels,
    # so a bomb is never decoded (tests/reliability/test_decompression_bombs.py measures the peak memory).
    Image.MAX_IMAGE_PIXELS = None
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
        with im:
            w, h = im.size
            row.update(format=im.format, mode=im.mode, width=w, height=h, pixels=w * h)
            row["min_side"], row["max_side"] = min(w, h), max(w, h)
            row["aspect_ratio"] = round(max(w, h) / min(w, h), 4) if min(w, h) > 0 else None
            if w * h > max_pixels or w * h == 0:
                row["error"] = f"{w}x{h} = {w * h} pixels; not decoded (limit validate.max_pixels = {max_pixels})"
                return  # decodable stays None: this is a size problem, judged by the pixels expectation
            with warnings.catch_warnings():  # decode first: getexif() decodes a PNG too, and its errors are
                warnings.simplefilter("ignore")  # swallowed below; a second load() after a failed one passes
                im.load()
            try:  # after the size check: PIL decodes a PNG to find an EXIF chunk stored after its pixels
                row["exif_orientation"] = int(im.getexif().get(0x0112, 1))
            except Exception:  # a broken EXIF block is not a broken image
                row["exif_orientation"] = None
            row["decodable"] = True
    except Image.DecompressionBombError as e:  # pragma: no cover - guard is off above; kept for safety
        row["decodable"] = False
        row["error"] = f"decompression bomb: {e}"
    except Image.UnidentifiedImageError:
        row["decodable"] = False
        row["error"] = "not an image (unidentified format)"
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError, TypeError, ZeroDivisionError) as e:
        row["decodable"] = False
        row["error"] = f"cannot decode: {type(e).__name__}: {e}"
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_limit, old_truncated


def probe_job(args: tuple) -> dict[str, Any]:
    """:func:`probe_image` of one job ``(ref, root, data, max_pixels)`` (the unit of work of the pools)."""
    return probe_image(*args)


def worker_count(n_items: int) -> int:
    """Processes to use: $VISIONTUNE_WORKERS, else one per CPU core; 1 for small jobs (pool start-up costs)."""
    env = os.environ.get("VISIONTUNE_WORKERS")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = int(env) if env else cores
    return max(1, min(n, n_items // 64 or 1))


def probe_images(jobs: list[tuple[str, str, Optional[bytes], int]], desc: str = "probing images") -> list[dict[str, Any]]:
    """:func:`probe_image` over many images, in parallel where it pays, with a progress bar; order kept."""
    from tqdm.auto import tqdm

    workers = worker_count(len(jobs))
    if workers == 1:
        return [probe_image(*j) for j in tqdm(jobs, desc=desc, unit="img", disable=len(jobs) < 200)]
    import multiprocessing as mp

    from visiontune._quiet import pool_worker_init

    with mp.get_context("spawn" if os.name == "nt" else "fork").Pool(workers, initializer=pool_worker_init) as pool:
        return list(tqdm(pool.imap(probe_job, jobs, chunksize=16), total=len(jobs), desc=desc, unit="img"))
