"""Normalization: every valid image -> RGB, EXIF orientation applied, sides within [min_px, max_px].

Aspect ratio is kept. An image whose long side exceeds ``max_px`` is scaled down to it; one whose short
side is below ``min_px`` is scaled up, but never so far that its long side passes ``max_px`` (a 6:1
strip therefore ends with its long side at ``max_px`` and its short side under ``min_px``: the pixel
budget wins over the lower bound, and the manifest counts such images). Optional: ``normalize.multiple_of``
rounds each side to a multiple of the model's patch size; ``uniform_size`` letterboxes every image onto
one ``[width, height]`` white canvas.

Outputs are content-addressed: the file name is a hash of the source image's sha256 plus the settings,
so an image is written once, and a re-run with unchanged inputs and params writes nothing. Each source
is read once, and only if it still lies inside the data root and still has the sha256 validation recorded
(a file swapped after validation is an error, never written under the validated hash).
``<work_dir>/normalized/manifest.json`` maps source sha256 -> output path and size. The size rule
(:func:`visiontune.images.bounded_size`) and the RGB conversion (:func:`visiontune.images.to_rgb`) live in
:mod:`visiontune.images` with the rest of the image code.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from PIL import Image, ImageOps

from visiontune.config import PipelineConfig
from visiontune.data.executor import DataExecutor
from visiontune.data.io import atomic_write, dump_json, holds_work_dir, read_jsonl, sha256_bytes, write_if_changed
from visiontune.data.png import decode_plain_png, png_bytes, rewrap_png
from visiontune.data.resample import resize
from visiontune.images import bounded_size, snap_to_multiple, to_rgb

FORMAT_VERSION = 2  # bump when the resizing code changes its output, so old files are not reused


def normalize_image(
    im: Image.Image, min_px: int, max_px: int, snap: int = 0, uniform_size: Optional[list] = None
) -> Image.Image:
    """The normalized RGB image for ``im`` (pure: no I/O)."""
    im = _upright(im)
    if uniform_size:
        im = to_rgb(im)
        W, H = int(uniform_size[0]), int(uniform_size[1])
        if snap:
            W, H = snap_to_multiple(W, snap), snap_to_multiple(H, snap)
        s = min(W / im.width, H / im.height)
        w, h = max(1, round(im.width * s)), max(1, round(im.height * s))
        inner = resize(im, (w, h))
        canvas = Image.new("RGB", (W, H), (255, 255, 255))
        canvas.paste(inner, ((W - w) // 2, (H - h) // 2))
        return canvas
    if im.mode not in ("RGB", "L"):  # (to_rgb of an upright RGB image is a copy of it; grey: see below)
        im = to_rgb(im)
    w, h = bounded_size(im.width, im.height, min_px, max_px, snap)
    if (w, h) != im.size:
        im = resize(im, (w, h))  # Pillow's Lanczos to shrink, bicubic to enlarge: see visiontune.data.resample
    # Resampling works band by band with the same weights, so resizing the one grey band and then copying it
    # into R, G and B gives the very pixels of converting first: 2.5x less resampling work (measured).
    return im.convert("RGB") if im.mode == "L" else im


_TRANSPOSING = (2, 3, 4, 5, 6, 7, 8)  # EXIF orientations that flip or rotate the stored pixels
_SWAPPING = (5, 6, 7, 8)  # ... and those among them that swap width and height


def _orientation(im: Image.Image) -> Any:
    """The image's EXIF orientation tag (1, the default: stored upright). PIL decodes a PNG to read it."""
    return im.getexif().get(0x0112, 1)


def _upright(im: Image.Image) -> Image.Image:
    """``im`` with its EXIF orientation applied; ``im`` itself when there is none to apply (no copy, unlike
    ``ImageOps.exif_transpose``, which copies the whole image even then)."""
    return ImageOps.exif_transpose(im) if _orientation(im) in _TRANSPOSING else im


def settings_signature(min_px: int, max_px: int, snap: int, uniform_size: Optional[list], image_format: str) -> dict:
    return {"min_px": min_px, "max_px": max_px, "snap_to_patch": snap, "uniform_size": uniform_size,
            "image_format": image_format, "version": FORMAT_VERSION}


def output_name(source_sha256: str, signature: dict) -> str:
    """Content address of a normalized image: hash of the source content and the settings."""
    key = hashlib.sha256(f"{source_sha256}|{json.dumps(signature, sort_keys=True)}".encode()).hexdigest()
    ext = "jpg" if signature["image_format"] == "jpeg" else "png"
    return f"{key[:2]}/{key}.{ext}"


def _encode(im: Image.Image, image_format: str) -> bytes:
    if image_format == "jpeg":
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95, subsampling=0)
        return buf.getvalue()
    return png_bytes(im)  # the same pixels as Pillow's PNG writer, in about 1/7 of its time (see visiontune.data.png)


class SourceChangedError(ValueError):
    """A source image is no longer what validation checked (other bytes, or a path now outside the data root)."""


def _read_source(src: str, sha256: str, roots: tuple[str, ...]) -> bytes:
    """The bytes of ``src``, after checking that it still resolves inside one of the (resolved) data
    ``roots`` and still has the sha256 validation recorded: a file swapped after validation (e.g. a
    symlink re-pointed outside the folder) must not be normalized under the validated hash."""
    resolved = Path(src).resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise SourceChangedError(
            f"{src} now resolves to {resolved}, outside the data root ({' or '.join(roots)}): it changed after "
            "validation (a moved or re-pointed symlink?). Re-run `visiontune validate`, then normalize."
        )
    data = resolved.read_bytes()
    actual = sha256_bytes(data)
    if actual != sha256:
        raise SourceChangedError(
            f"{src} changed after validation: its sha256 is {actual}, validation recorded {sha256}. "
            "Re-run `visiontune validate`, then normalize."
        )
    return data


def _work(job: tuple[str, str, dict, str, tuple[str, ...]]) -> dict[str, Any]:
    src, dst, sig, sha256, roots = job
    source = _read_source(src, sha256, roots)
    with Image.open(io.BytesIO(source)) as im:
        if (sig["image_format"] == "png" and not sig["uniform_size"] and im.format == "PNG" and im.mode == "RGB"
                and bounded_size(*im.size, sig["min_px"], sig["max_px"], sig["snap_to_patch"]) == im.size
                and (same := rewrap_png(source, im.info)) is not None):
            # Nothing to change (validation decoded this very file): its pixel data is copied, not decoded and
            # compressed again; 1/20 of the time of that for the benchmark's in-range PNGs.
            atomic_write(dst, same)
            return {"width": im.width, "height": im.height, "bytes": len(same), "source_width": im.width,
                    "source_height": im.height}
        # A plain 8-bit grey or RGB PNG (no orientation possible) is decoded by ISA-L + C, to the same pixels.
        src = decode_plain_png(source, im.info) if im.format == "PNG" else None
        if src is None:
            src = im
            orientation = _orientation(im)  # (for a PNG, Pillow decodes it here)
            sw, sh = im.size[::-1] if orientation in _SWAPPING else im.size  # the source's upright size
            if im.format == "JPEG" and not sig["uniform_size"] and orientation == 1:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still leaves at least the target size:
                # same result after the resize below, a fraction of the decoding work for large photos. (Not
                # for a JPEG with an orientation tag: those were always decoded at full size, and drafting
                # them now would change their pixels without a FORMAT_VERSION bump.)
                im.draft(im.mode, bounded_size(im.width, im.height, sig["min_px"], sig["max_px"]))
        else:
            sw, sh = src.size
        out = normalize_image(src, sig["min_px"], sig["max_px"], sig["snap_to_patch"], sig["uniform_size"])
        out.load()  # may be ``im`` itself (nothing to change): decode it before the file closes
    data = _encode(out, sig["image_format"])
    atomic_write(dst, data)
    return {"width": out.width, "height": out.height, "bytes": len(data), "source_width": sw, "source_height": sh}


def normalize_records(
    records: list[dict], out_dir: str | Path, roots: Sequence[str | Path], min_px: int, max_px: int, snap: int = 0,
    uniform_size: Optional[list] = None, image_format: str = "png", executor: Optional[DataExecutor] = None,
) -> dict[str, Any]:
    """Normalize every image referenced by ``records`` into ``out_dir`` (on ``executor``: this machine's cores
    by default); returns the manifest and counts.

    Images already present under their content address are not touched. Files in ``out_dir/images`` that
    the new manifest does not reference (left by other settings) are removed. A source image must still
    lie inside one of the data ``roots`` (the raw folder, validation's folder of embedded images) and
    still have its validated sha256, else :class:`SourceChangedError` (nothing is written for it).
    """
    _check_settings(min_px, max_px, uniform_size, image_format)
    out = Path(out_dir)
    sig = settings_signature(min_px, max_px, snap, uniform_size, image_format)
    manifest_path = out / "manifest.json"
    entries, jobs = _plan(records, out, sig, _previous_entries(manifest_path, sig))
    resolved_roots = tuple(str(Path(r).resolve()) for r in roots)
    work = [(src, str(dst), sig, sha, resolved_roots) for sha, src, dst in jobs]
    results = (executor or DataExecutor()).map(_work, work, local=_run_jobs, name="normalize")
    for (sha, src, dst), res in zip(jobs, results):
        entries[sha] = {"path": dst.as_posix(), "source": src, **res}
    manifest = {"settings": sig, "images": dict(sorted(entries.items()))}
    write_if_changed(manifest_path, dump_json(manifest))  # first: if it fails (disk full), the old one's files stay
    removed = _remove_unreferenced(out / "images", entries)
    return {"manifest": manifest, "written": len(jobs), "skipped": len(entries) - len(jobs), "removed": removed}


def _check_settings(min_px: int, max_px: int, uniform_size: Optional[list], image_format: str) -> None:
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"normalize.image_format = {image_format!r}: use 'png' or 'jpeg'")
    if not (0 < min_px <= max_px):
        raise ValueError(f"normalize.min_px = {min_px}, normalize.max_px = {max_px}: need 0 < min_px <= max_px")
    if uniform_size is not None and (len(uniform_size) != 2 or min(int(v) for v in uniform_size) <= 0):
        raise ValueError(f"normalize.uniform_size = {uniform_size!r}: use null or [width, height] with positive sides")


def _previous_entries(manifest_path: Path, sig: dict) -> dict:
    """The previous manifest's images if it was made with the same settings (else nothing to reuse)."""
    if not manifest_path.exists():
        return {}
    try:
        prev = json.loads(manifest_path.read_text())
        return prev.get("images", {}) if prev.get("settings") == sig else {}
    except (json.JSONDecodeError, AttributeError):
        return {}


def _plan(records: list[dict], out: Path, sig: dict, old: dict) -> tuple[dict[str, dict], list[tuple[str, str, Path]]]:
    """(manifest entries reused from ``old``, ``(sha256, source, destination)`` of each image to write)."""
    sources: dict[str, str] = {}
    for rec in records:
        for img in rec["images"]:
            sources.setdefault(img["sha256"], img["path"])
    entries: dict[str, dict] = {}
    jobs = []
    for sha, src in sorted(sources.items()):
        dst = out / "images" / output_name(sha, sig)
        if dst.is_file() and sha in old and old[sha].get("bytes") == dst.stat().st_size:
            entries[sha] = old[sha]
            continue
        if not Path(src).is_file():
            raise FileNotFoundError(f"{src} (source of a validated record) not found: re-run `visiontune validate`")
        jobs.append((sha, src, dst))
    return entries, jobs


def _run_jobs(jobs: list[tuple]) -> list[dict[str, Any]]:
    """``_work`` over ``jobs``, in one process per core when there are several jobs and cores."""
    from tqdm.auto import tqdm

    from visiontune.data.probe import worker_count

    workers = worker_count(len(jobs))
    if workers > 1:
        import multiprocessing as mp

        from visiontune._quiet import pool_worker_init

        with mp.get_context("fork").Pool(workers, initializer=pool_worker_init) as pool:
            return list(tqdm(pool.imap(_work, jobs, chunksize=8), total=len(jobs), desc="normalizing", unit="img"))
    return [_work(j) for j in tqdm(jobs, desc="normalizing", unit="img", disable=len(jobs) < 200)]


def _remove_unreferenced(images_dir: Path, entries: dict[str, dict]) -> int:
    """Delete the files under ``images_dir`` that no manifest entry points at; returns how many."""
    keep = {Path(e["path"]).resolve() for e in entries.values()}
    removed = 0
    if images_dir.is_dir():
        for p in images_dir.rglob("*"):
            if p.is_file() and p.resolve() not in keep:
                p.unlink()
                removed += 1
    return removed


def manifest_stats(manifest: dict, min_px: int, max_px: int) -> dict[str, Any]:
    """Counts for the metrics file (deterministic: no timings, no written/skipped)."""
    imgs = list(manifest["images"].values())
    up = sum(1 for e in imgs if e["width"] * e["height"] > e["source_width"] * e["source_height"])
    down = sum(1 for e in imgs if e["width"] * e["height"] < e["source_width"] * e["source_height"])
    return {
        "images": len(imgs),
        "upscaled": up,
        "downscaled": down,
        "unchanged_size": len(imgs) - up - down,
        "short_side_below_min_px": sum(1 for e in imgs if min(e["width"], e["height"]) < min_px),
        "long_side_above_max_px": sum(1 for e in imgs if max(e["width"], e["height"]) > max_px),
        "bytes": sum(e["bytes"] for e in imgs),
    }


@holds_work_dir  # one run at a time per data.work_dir
def normalize_stage(cfg: PipelineConfig) -> dict[str, Any]:
    """``visiontune normalize``: normalize the images of ``<work_dir>/validated/records.jsonl``."""
    n = cfg.normalize
    work = Path(cfg.data.work_dir)
    records_path = work / "validated" / "records.jsonl"
    if not records_path.is_file():
        raise FileNotFoundError(f"{records_path} not found: run `visiontune validate` first (it writes the valid records)")
    min_px, max_px = n.min_px, n.max_px
    roots = (cfg.data.raw_dir, work / "validated" / "embedded")  # where validation's records point
    res = normalize_records(read_jsonl(records_path), work / "normalized", roots, min_px, max_px, n.multiple_of,
                            n.uniform_size, n.image_format, DataExecutor.of(cfg.data))
    stats = manifest_stats(res["manifest"], min_px, max_px)
    write_if_changed(work / "metrics" / "normalize.json", dump_json(stats))
    return {**stats, "written": res["written"], "skipped": res["skipped"], "removed": res["removed"],
            "manifest": str(work / "normalized" / "manifest.json")}
