"""Normalization: every valid image -> RGB, EXIF orientation applied, sides within [min_px, max_px].

Aspect ratio is kept. An image whose long side exceeds ``max_px`` is scaled down to it; one whose short
side is below ``min_px`` is scaled up, but never so far that its long side passes ``max_px`` (a 6:1
strip therefore ends with its long side at ``max_px`` and its short side under ``min_px``: the pixel
budget wins over the lower bound, and the manifest counts such images). Optional: ``normalize.multiple_of``
rounds each side to a multiple of the model's patch size; ``uniform_size`` letterboxes every image onto
one ``[width, height]`` white canvas.

Outputs are content-addressed: the file name is a hash of the source image's sha256 plus the settings,
so an image is written once, and a re-run with unchanged inputs and params writes nothing.
``<work_dir>/normalized/manifest.json`` maps source sha256 -> output path and size. The size rule
(:func:`visiontune.images.bounded_size`) and the RGB conversion (:func:`visiontune.images.to_rgb`) live in
:mod:`visiontune.images` with the rest of the image code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from PIL import Image, ImageOps

from visiontune.config import PipelineConfig
from visiontune.data.io import atomic_write, dump_json, read_jsonl, write_if_changed
from visiontune.images import bounded_size, snap_to_multiple, to_rgb

FORMAT_VERSION = 2  # bump when the resizing code changes its output, so old files are not reused


def normalize_image(
    im: Image.Image, min_px: int, max_px: int, snap: int = 0, uniform_size: Optional[list] = None
) -> Image.Image:
    """The normalized RGB image for ``im`` (pure: no I/O)."""
    im = to_rgb(im)
    if uniform_size:
        W, H = int(uniform_size[0]), int(uniform_size[1])
        if snap:
            W, H = snap_to_multiple(W, snap), snap_to_multiple(H, snap)
        s = min(W / im.width, H / im.height)
        w, h = max(1, round(im.width * s)), max(1, round(im.height * s))
        inner = im.resize((w, h), Image.LANCZOS if s < 1 else Image.BICUBIC, reducing_gap=3.0 if s < 0.5 else None)
        canvas = Image.new("RGB", (W, H), (255, 255, 255))
        canvas.paste(inner, ((W - w) // 2, (H - h) // 2))
        return canvas
    w, h = bounded_size(im.width, im.height, min_px, max_px, snap)
    if (w, h) == im.size:
        return im
    down = w * h < im.width * im.height
    return im.resize((w, h), Image.LANCZOS if down else Image.BICUBIC, reducing_gap=3.0 if down else None)


def settings_signature(min_px: int, max_px: int, snap: int, uniform_size: Optional[list], image_format: str) -> dict:
    return {"min_px": min_px, "max_px": max_px, "snap_to_patch": snap, "uniform_size": uniform_size,
            "image_format": image_format, "version": FORMAT_VERSION}


def output_name(source_sha256: str, signature: dict) -> str:
    """Content address of a normalized image: hash of the source content and the settings."""
    key = hashlib.sha256(f"{source_sha256}|{json.dumps(signature, sort_keys=True)}".encode()).hexdigest()
    ext = "jpg" if signature["image_format"] == "jpeg" else "png"
    return f"{key[:2]}/{key}.{ext}"


def _encode(im: Image.Image, image_format: str) -> bytes:
    import io

    buf = io.BytesIO()
    if image_format == "jpeg":
        im.save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        im.save(buf, format="PNG", compress_level=1)  # level 1: ~40% faster than 3, ~15% larger files
    return buf.getvalue()


def _work(job: tuple[str, str, dict]) -> dict[str, Any]:
    src, dst, sig = job
    with Image.open(src) as im:
        sw, sh = ImageOps.exif_transpose(im).size if im.getexif().get(0x0112, 1) != 1 else im.size
        if im.format == "JPEG" and not sig["uniform_size"]:
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still leaves at least the target size:
            # same result after the resize below, a fraction of the decoding work for large photos.
            im.draft(im.mode, bounded_size(im.width, im.height, sig["min_px"], sig["max_px"]))
        out = normalize_image(im, sig["min_px"], sig["max_px"], sig["snap_to_patch"], sig["uniform_size"])
    data = _encode(out, sig["image_format"])
    atomic_write(dst, data)
    return {"width": out.width, "height": out.height, "bytes": len(data), "source_width": sw, "source_height": sh}


def normalize_records(
    records: list[dict], out_dir: str | Path, min_px: int, max_px: int, snap: int = 0,
    uniform_size: Optional[list] = None, image_format: str = "png",
) -> dict[str, Any]:
    """Normalize every image referenced by ``records`` into ``out_dir``; returns the manifest and counts.

    Images already present under their content address are not touched. Files in ``out_dir/images`` that
    the new manifest does not reference (left by other settings) are removed.
    """
    from tqdm.auto import tqdm

    from visiontune.data.probe import worker_count

    if image_format not in ("png", "jpeg"):
        raise ValueError(f"normalize.image_format = {image_format!r}: use 'png' or 'jpeg'")
    if not (0 < min_px <= max_px):
        raise ValueError(f"normalize.min_px = {min_px}, normalize.max_px = {max_px}: need 0 < min_px <= max_px")
    if uniform_size is not None and (len(uniform_size) != 2 or min(int(v) for v in uniform_size) <= 0):
        raise ValueError(f"normalize.uniform_size = {uniform_size!r}: use null or [width, height] with positive sides")
    out = Path(out_dir)
    sig = settings_signature(min_px, max_px, snap, uniform_size, image_format)
    manifest_path = out / "manifest.json"
    old: dict = {}
    if manifest_path.exists():
        try:
            prev = json.loads(manifest_path.read_text())
            old = prev.get("images", {}) if prev.get("settings") == sig else {}
        except (json.JSONDecodeError, AttributeError):
            old = {}
    sources: dict[str, str] = {}
    for rec in records:
        for img in rec["images"]:
            sources.setdefault(img["sha256"], img["path"])
    entries: dict[str, dict] = {}
    jobs, job_keys = [], []
    for sha, src in sorted(sources.items()):
        rel = output_name(sha, sig)
        dst = out / "images" / rel
        if dst.is_file() and sha in old and old[sha].get("bytes") == dst.stat().st_size:
            entries[sha] = old[sha]
            continue
        if not Path(src).is_file():
            raise FileNotFoundError(f"{src} (source of a validated record) not found: re-run `visiontune validate`")
        jobs.append((src, str(dst), sig))
        job_keys.append((sha, src, dst))
    workers = worker_count(len(jobs))
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            results = list(tqdm(pool.imap(_work, jobs, chunksize=8), total=len(jobs), desc="normalizing", unit="img"))
    else:
        results = [_work(j) for j in tqdm(jobs, desc="normalizing", unit="img", disable=len(jobs) < 200)]
    for (sha, src, dst), res in zip(job_keys, results):
        entries[sha] = {"path": dst.as_posix(), "source": src, **res}
    keep = {Path(e["path"]).resolve() for e in entries.values()}
    removed = 0
    if (out / "images").is_dir():
        for p in (out / "images").rglob("*"):
            if p.is_file() and p.resolve() not in keep:
                p.unlink()
                removed += 1
    manifest = {"settings": sig, "images": dict(sorted(entries.items()))}
    write_if_changed(manifest_path, dump_json(manifest))
    return {"manifest": manifest, "written": len(jobs), "skipped": len(entries) - len(jobs), "removed": removed}


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


def normalize_stage(cfg: PipelineConfig) -> dict[str, Any]:
    """``visiontune normalize``: normalize the images of ``<work_dir>/validated/records.jsonl``."""
    n = cfg.normalize
    work = Path(cfg.data.work_dir)
    records_path = work / "validated" / "records.jsonl"
    if not records_path.is_file():
        raise FileNotFoundError(f"{records_path} not found: run `visiontune validate` first (it writes the valid records)")
    min_px, max_px = n.min_px, n.max_px
    res = normalize_records(
        read_jsonl(records_path), work / "normalized", min_px, max_px, n.multiple_of, n.uniform_size, n.image_format
    )
    stats = manifest_stats(res["manifest"], min_px, max_px)
    write_if_changed(work / "metrics" / "normalize.json", dump_json(stats))
    return {**stats, "written": res["written"], "skipped": res["skipped"], "removed": res["removed"],
            "manifest": str(work / "normalized" / "manifest.json")}
