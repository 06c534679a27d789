"""Throughput of the data stage: validation and normalization of N mixed-size images (default 5,000).

Writes a raw folder of mixed images (PNG and JPEG, grey and colour, long sides from 80 to 2,900 px, a few
bad files), then times

* validation: probing every image (full decode, sha256) + both Great Expectations suites + writing the
  records/quarantine/GX result files (``validate_stage``), and
* normalization: EXIF/RGB/resize into 300-1000 px + encoding + manifest (``normalize_stage``), once per
  ``--format``,

with ``VISIONTUNE_WORKERS`` processes (default: one per core). Prints images/s for each and a JSON line.

Before/after in one run: ``--compare-with DIR`` times a second checkout of visiontune (e.g. the commit
before a change: ``git worktree add --detach /var/tmp/vt-old <commit>``) on the same raw folder, each side
in a fresh process (one after the other) whose ``import visiontune`` is its own checkout, and checks that
both wrote the same images (PNG: same pixels; JPEG: same bytes). ``--executor dask`` times the stages on
a Dask cluster (``data.executor: dask``, a temporary LocalCluster of ``--dask-workers`` processes; the time
includes starting it, not the temporary Prefect server, which starts first as it is up already inside
``visiontune run``). Besides images/s, each stage's CPU time per image (its process and its finished
workers) is reported: on shared cores it moves far less than the wall clock. ``--raw DIR`` keeps the
generated images in DIR (generated only if DIR has none), so several runs can share them.

    python benchmarks/bench_data.py                                   # 5,000 images, PNG, this checkout
    python benchmarks/bench_data.py --format png jpeg --compare-with /var/tmp/vt-old
    python benchmarks/bench_data.py --n 3000 --executor local dask --dask-workers 2
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve()


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


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def generate(raw: Path, n: int) -> float:
    """Write ``n`` images and annotations.jsonl into ``raw`` unless it already holds them; seconds spent."""
    if (raw / "annotations.jsonl").is_file() and len((raw / "annotations.jsonl").read_text().splitlines()) == n:
        return 0.0
    raw.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(_cores()) as pool:
        rows = pool.map(_make, [(i, str(raw)) for i in range(n)], chunksize=32)
    (raw / "annotations.jsonl").write_text("".join(json.dumps({"image": n, "text": t}) + "\n" for n, t in rows))
    return time.perf_counter() - t0


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (the stages' worker processes, joined at the
    end of each stage): unlike wall time, hardly moved by other jobs sharing the cores."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_stages(raw: str, work: str, formats: list[str], executor: str, dask_workers: int, dask_chunk: int) -> dict:
    """Validate once, then normalize once per format (each into its own copy of the validated records)."""
    import visiontune
    from visiontune.config import from_dict
    from visiontune.data.normalize import normalize_stage
    from visiontune.data.validate import validate_stage

    def cfg(work_dir: Path, fmt: str = "png"):
        data = {"raw_dir": raw, "work_dir": str(work_dir)}
        if executor != "local":  # (an old checkout has no executor settings)
            data.update(executor=executor, dask_workers=dask_workers, dask_chunk=dask_chunk)
        return from_dict({"data": data, "normalize": {"image_format": fmt}})

    out: dict = {"code": str(Path(visiontune.__file__).resolve().parents[1]), "executor": executor}
    if executor == "dask":  # the Prefect API up first, as inside `visiontune run` or with a server: not timed
        from visiontune.data.executor import _api_for_workers

        t0 = time.perf_counter()
        api = _api_for_workers()
        api.__enter__()
        out["prefect_api_start_s"] = round(time.perf_counter() - t0, 1)
    t0, c0 = time.perf_counter(), _cpu()
    v = validate_stage(cfg(Path(work) / "v"))
    out["validate_s"] = round(time.perf_counter() - t0, 2)
    out["validate_cpu_ms_per_image"] = round((_cpu() - c0) / v["records"] * 1000, 2)
    out.update(records=v["records"], valid=v["valid"], quarantined=v["quarantined"])
    for fmt in formats:
        w = Path(work) / fmt
        shutil.copytree(Path(work) / "v" / "validated", w / "validated")
        t0, c0 = time.perf_counter(), _cpu()
        res = normalize_stage(cfg(w, fmt))
        out[f"normalize_{fmt}_s"] = round(time.perf_counter() - t0, 2)
        out[f"normalize_{fmt}_cpu_ms_per_image"] = round((_cpu() - c0) / res["images"] * 1000, 2)
        out[f"normalize_{fmt}_images"] = res["images"]
        out[f"normalize_{fmt}_mb"] = round(res["bytes"] / 1e6, 1)
        t0 = time.perf_counter()
        again = normalize_stage(cfg(w, fmt))
        out[f"normalize_{fmt}_rerun_s"] = round(time.perf_counter() - t0, 2)
        assert again["written"] == 0, again
    return out


def same_outputs(a: Path, b: Path, fmt: str) -> str:
    """Whether two normalize runs wrote the same images: every PNG decoding to the same RGB pixels, every JPEG
    the same bytes (the encoder saw the same pixels); a summary line."""
    ma = json.loads((a / "normalized" / "manifest.json").read_text())["images"]
    mb = json.loads((b / "normalized" / "manifest.json").read_text())["images"]
    if ma.keys() != mb.keys():
        return f"different sources: {len(ma)} against {len(mb)} images"
    differ = 0
    for sha, ea in ma.items():
        pa, pb = Path(ea["path"]), Path(mb[sha]["path"])
        if fmt == "jpeg":
            differ += pa.read_bytes() != pb.read_bytes()
        else:
            with Image.open(pa) as ia, Image.open(pb) as ib:
                differ += ia.mode != ib.mode or not np.array_equal(np.asarray(ia), np.asarray(ib))
    kind = "bytes" if fmt == "jpeg" else "pixels"
    return f"{len(ma) - differ} of {len(ma)} images: same {kind}" + (f"; {differ} differ" if differ else "")


def _side(code: Path, raw: Path, work: Path, args: argparse.Namespace, executor: str) -> dict:
    """:func:`time_stages` in a fresh process whose ``import visiontune`` is the checkout at ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(HERE), "--_time", json.dumps({
        "raw": str(raw), "work": str(work), "formats": args.format, "executor": executor,
        "dask_workers": args.dask_workers, "dask_chunk": args.dask_chunk})]
    proc = subprocess.run(cmd, env=env, cwd=code, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{code} ({executor}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--format", nargs="+", default=["png"], choices=["png", "jpeg"], help="normalized image format(s)")
    ap.add_argument("--dir", default=None, help="parent of the temporary work folder (default: the system's)")
    ap.add_argument("--raw", default=None, help="keep the generated raw images here (reused when present)")
    ap.add_argument("--compare-with", default=None, help="another visiontune checkout, timed on the same images")
    ap.add_argument("--executor", nargs="+", default=["local"], choices=["local", "dask"])
    ap.add_argument("--dask-workers", type=int, default=2)
    ap.add_argument("--dask-chunk", type=int, default=256)
    ap.add_argument("--_time", default=None, help=argparse.SUPPRESS)  # internal: one side of a comparison
    args = ap.parse_args()
    if args._time:
        print(json.dumps(time_stages(**json.loads(args._time))))
        return

    here = HERE.parents[1]
    sides = [(here, ex) for ex in args.executor]
    if args.compare_with:
        sides = [(Path(args.compare_with).resolve(), "local")] + sides
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        raw = Path(args.raw).resolve() if args.raw else Path(tmp) / "raw"
        gen_s = generate(raw, args.n)
        mb = sum(p.stat().st_size for p in raw.iterdir()) / 1e6
        runs = []
        for k, (code, ex) in enumerate(sides):
            r = _side(code, raw, Path(tmp) / f"work{k}", args, ex)
            runs.append(r)
            r["work"] = str(Path(tmp) / f"work{k}")
            print(f"{r['code']} [{ex}]: validation {args.n / r['validate_s']:.1f} images/s ({r['validate_s']} s); "
                  + "; ".join(f"normalization {f} {r[f'normalize_{f}_images'] / r[f'normalize_{f}_s']:.1f} images/s "
                              f"({r[f'normalize_{f}_s']} s, {r[f'normalize_{f}_mb']} MB)" for f in args.format), flush=True)
        if args.compare_with:  # inside the with: both sides' outputs are still there
            same = {f: same_outputs(Path(runs[0]["work"]) / f, Path(runs[1]["work"]) / f, f) for f in args.format}
    for r in runs:
        r.pop("work")
        r["validate_images_per_s"] = round(args.n / r["validate_s"], 1)
        for f in args.format:
            r[f"normalize_{f}_images_per_s"] = round(r[f"normalize_{f}_images"] / r[f"normalize_{f}_s"], 1)
    result = {"images": args.n, "raw_mb": round(mb, 1), "cores_available": _cores(),
              "local_workers": int(os.environ.get("VISIONTUNE_WORKERS", _cores())), "generate_s": round(gen_s, 1),
              "runs": runs}
    if args.compare_with:
        old, new = runs[0], runs[1]
        result["speedup"] = {f"normalize_{f}": round(old[f"normalize_{f}_s"] / new[f"normalize_{f}_s"], 2)
                             for f in args.format}
        result["speedup"]["validate"] = round(old["validate_s"] / new["validate_s"], 2)
        result["same_output"] = same
        result["cpu_speedup"] = {f"normalize_{f}": round(old[f"normalize_{f}_cpu_ms_per_image"]
                                                         / new[f"normalize_{f}_cpu_ms_per_image"], 2)
                                 for f in args.format}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
