"""Throughput of the data stage: validation and normalization of N mixed-size images (default 5,000).

Writes a temporary raw folder of mixed images (PNG and JPEG, grey and colour, long sides from 80 to
2,400 px, a few bad files), then times

* validation: probing every image (full decode, sha256) + both Great Expectations suites + writing the
  records/quarantine/GX result files (``validate_stage``), and
* normalization: EXIF/RGB/resize into 300-1000 px + encoding + manifest (``normalize_stage``),

with ``VISIONTUNE_WORKERS`` processes (default: one per core). Prints images/s for each and a JSON line.

    python benchmarks/bench_data.py                # 5,000 images
    python benchmarks/bench_data.py --n 500 --format jpeg
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _make(args: tuple[int, str]) -> tuple[str, str]:
    i, root = args
    rng = np.random.default_rng(i)
    kind = rng.choice(["in", "small", "large", "strip"], p=[0.6, 0.15, 0.15, 0.1])
    short = {"in": rng.integers(300, 700), "small": rng.integers(80, 300), "large": rng.integers(900, 1600),
             "strip": rng.integers(150, 300)}[kind]
    ratio = rng.uniform(4, 7) if kind == "strip" else rng.uniform(1.0, 1.8)
    w, h = int(short * ratio), int(short)
    if rng.random() < 0.5:
        w, h = h, w
    # Smooth content plus texture: realistic decode/encode cost without making huge random PNGs.
    base = rng.integers(0, 255, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    im = Image.fromarray(base, "RGB").resize((w, h), Image.BILINEAR)
    if rng.random() < 0.3:
        im = im.convert("L")
    fmt = "JPEG" if rng.random() < 0.5 else "PNG"
    name = f"{i:05d}.{'jpg' if fmt == 'JPEG' else 'png'}"
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    data = buf.getvalue()
    if i % 500 == 7:  # a few truncated files
        data = data[: len(data) // 2]
    Path(root, name).write_bytes(data)
    return name, str(rng.integers(0, 99999))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--format", default="png", choices=["png", "jpeg"], help="normalized image format")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed afterwards)")
    args = ap.parse_args()

    from visiontune.config import from_dict
    from visiontune.data.normalize import normalize_stage
    from visiontune.data.probe import worker_count
    from visiontune.data.validate import validate_stage

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        t0 = time.perf_counter()
        with mp.get_context("fork").Pool(cores) as pool:
            rows = pool.map(_make, [(i, str(raw)) for i in range(args.n)], chunksize=32)
        (raw / "annotations.jsonl").write_text("".join(json.dumps({"image": n, "text": t}) + "\n" for n, t in rows))
        gen_s = time.perf_counter() - t0
        mb = sum(p.stat().st_size for p in raw.iterdir()) / 1e6
        cfg = from_dict({"data": {"raw_dir": str(raw), "work_dir": str(Path(tmp) / "work")},
                          "normalize": {"image_format": args.format}})

        t0 = time.perf_counter()
        v = validate_stage(cfg)
        val_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        nrm = normalize_stage(cfg)
        norm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = normalize_stage(cfg)
        rerun_s = time.perf_counter() - t0

    result = {
        "images": args.n, "raw_mb": round(mb, 1), "cores_available": cores, "workers": worker_count(args.n),
        "generate_s": round(gen_s, 1),
        "validate_s": round(val_s, 2), "validate_images_per_s": round(args.n / val_s, 1),
        "valid": v["valid"], "quarantined": v["quarantined"],
        "normalize_s": round(norm_s, 2), "normalize_images_per_s": round(nrm["images"] / norm_s, 1),
        "normalize_format": args.format, "normalize_rerun_s": round(rerun_s, 2), "rerun_written": again["written"],
    }
    print(f"validation:    {result['validate_images_per_s']:8.1f} images/s ({args.n} images in {val_s:.1f} s)")
    print(f"normalization: {result['normalize_images_per_s']:8.1f} images/s ({nrm['images']} images in {norm_s:.1f} s, {args.format})")
    print(f"re-run of normalization with nothing changed: {rerun_s:.2f} s, {again['written']} written")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
