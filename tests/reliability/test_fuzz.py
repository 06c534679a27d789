"""Fuzz: a few hundred randomly corrupted images and annotation rows through the real validate stage.

Zero crashes; every row read comes out exactly once, either valid or quarantined with a known reason;
every row judged valid really decodes (and normalizes). Where a corruption has one certain verdict (a
path out of the root, a text that is a dict, a header claiming a bomb...) the reason is checked too.
The RNG is seeded: the same corpus every run.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

from PIL import Image

from visiontune.config import from_dict
from visiontune.data.io import read_jsonl, sha256_file
from visiontune.data.normalize import normalize_stage
from visiontune.data.validate import REASONS, validate_stage

SEED, ROWS = 14, 300


def _image(rng: random.Random) -> bytes:
    """A small random-noise image (all different) in a random format and mode."""
    w, h = rng.randint(8, 64), rng.randint(8, 64)
    im = Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3)).convert(rng.choice(["RGB", "L", "RGBA", "P"]))
    fmt = rng.choice(["PNG", "JPEG", "WEBP"]) if im.mode in ("RGB", "L") else "PNG"
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _flip_bits(data: bytes, rng: random.Random, n: int) -> bytes:
    b = bytearray(data)
    for _ in range(n):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _huge_header(_: bytes, rng: random.Random) -> bytes:
    """A PNG whose IHDR claims 60000 x 60000 pixels (valid CRC): a decompression bomb's header."""
    data = bytearray(_image_png(rng))
    data[16:24] = struct.pack(">II", 60000, 60000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _image_png(rng: random.Random) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (16, 16), rng.randbytes(768)).save(buf, format="PNG")
    return buf.getvalue()


# Image corruptions: name -> (mutate(bytes, rng) -> bytes, the reason it must get, or None: no certain verdict).
IMAGE_FAULTS: dict[str, tuple[Callable[[bytes, random.Random], bytes], Optional[str]]] = {
    "intact": (lambda d, r: d, None),
    "empty": (lambda d, r: b"", "undecodable"),
    "truncated": (lambda d, r: d[: r.randrange(1, len(d))], None),
    "header-only": (lambda d, r: d[:24], "undecodable"),
    "bit-flips": (lambda d, r: _flip_bits(d, r, r.randint(1, 16)), None),
    "garbage": (lambda d, r: r.randbytes(r.randint(1, 4096)), "undecodable"),
    "text-file": (lambda d, r: "not an image\n".encode() * r.randint(1, 50), "undecodable"),
    "bomb-header": (_huge_header, "too_many_pixels"),
}


def _text(rng: random.Random, i: int) -> str:
    return f"row {i} " + "".join(rng.choice("0123456789 abcxyzé漢") for _ in range(rng.randint(1, 30)))


def _row(image: Any, rng: random.Random, i: int) -> bytes:
    """An annotation line naming ``image`` with a plain caption."""
    return json.dumps({"image": image, "text": _text(rng, i)}).encode()


# Row corruptions: name -> (line(rng, row number, image name) -> bytes, the reason it must get, or None).
ROW_FAULTS: dict[str, tuple[Callable[[random.Random, int, str], bytes], Optional[str]]] = {
    "intact": (lambda r, i, img: _row(img, r, i), None),
    "text-is-a-dict": (lambda r, i, img: json.dumps({"image": img, "text": {"a": i}}).encode(), "unparsable_row"),
    "text-is-a-number": (lambda r, i, img: json.dumps({"image": img, "text": i * 7 + 1}).encode(), None),
    "text-is-null": (lambda r, i, img: json.dumps({"image": img, "text": None}).encode(), "missing_text"),
    "text-missing": (lambda r, i, img: json.dumps({"image": img}).encode(), "missing_text"),
    "text-empty": (lambda r, i, img: json.dumps({"image": img, "text": "   "}).encode(), "text_too_short"),
    "text-huge": (lambda r, i, img: json.dumps({"image": img, "text": "x" * r.randint(4001, 200_000)}).encode(),
                  "text_too_long"),
    "text-not-utf8": (lambda r, i, img: b'{"image": "' + img.encode() + b'", "text": "caf\xe9 ' + r.randbytes(3)
                      .replace(b'"', b"x").replace(b"\\", b"x").replace(b"\n", b"x").replace(b"\r", b"x") + b'\xff"}',
                      "text_not_utf8"),
    "image-is-a-number": (lambda r, i, img: _row(12345, r, i), "unparsable_row"),
    "image-is-a-dict": (lambda r, i, img: _row({"x": 1}, r, i), "unparsable_row"),
    "image-escapes": (lambda r, i, img: _row("../" * r.randint(1, 5) + img, r, i), "path_escapes_root"),
    "image-absolute": (lambda r, i, img: _row("/etc/passwd", r, i), "path_escapes_root"),
    "image-nul": (lambda r, i, img: _row(img + "\x00.png", r, i), "path_escapes_root"),
    # longer than a file name can be (255 bytes)
    "image-huge-name": (lambda r, i, img: _row("a" * r.randint(300, 20_000), r, i), "missing_file"),
    "image-missing": (lambda r, i, img: _row(f"nope-{i}.png", r, i), "missing_file"),
    "image-folder": (lambda r, i, img: _row(".", r, i), "missing_file"),
    "not-an-object": (lambda r, i, img: json.dumps(r.choice([[img, "text"], "a string", 42, None, True])).encode(),
                      "unparsable_row"),
    "truncated-json": (lambda r, i, img: _row(img, r, i)[:-r.randint(1, 8)], "unparsable_row"),
    "bit-flips": (lambda r, i, img: _flip_bits(_row(img, r, i), r, r.randint(1, 6)), None),
}


def _corpus(raw: Path, rng: random.Random) -> tuple[list[bytes], list[tuple[str, str]]]:
    """Write ROWS images (about half corrupted) and their annotation lines (about half corrupted) under
    ``raw``; returns (the lines, (image fault, row fault) per line)."""
    raw.mkdir()
    lines, faults = [], []
    for i in range(ROWS):
        image_fault = "intact" if rng.random() < 0.5 else rng.choice(list(IMAGE_FAULTS))
        row_fault = "intact" if rng.random() < 0.5 else rng.choice(list(ROW_FAULTS))
        name = f"img{i}.{rng.choice(['png', 'jpg', 'webp', 'bin'])}"
        (raw / name).write_bytes(IMAGE_FAULTS[image_fault][0](_image(rng), rng))
        lines.append(ROW_FAULTS[row_fault][0](rng, i, name))
        faults.append((image_fault, row_fault))
    (raw / "annotations.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return lines, faults


def test_fuzzed_images_and_rows_are_each_valid_or_quarantined_with_a_reason(tmp_path, capsys):
    rng = random.Random(SEED)
    raw, work = tmp_path / "raw", tmp_path / "work"
    lines, faults = _corpus(raw, rng)
    cfg = from_dict({"data": {"raw_dir": str(raw), "work_dir": str(work)}, "validate": {"max_failure_ratio": 1.0},
                     "normalize": {"min_px": 32, "max_px": 64}})
    summary = validate_stage(cfg)  # must not raise

    # A bit flip can turn a byte into a line break: the rows are the non-blank lines the file now has.
    n_rows = len([x for x in (raw / "annotations.jsonl").read_bytes().splitlines() if x.strip()])
    good = read_jsonl(work / "validated" / "records.jsonl")
    bad = read_jsonl(work / "validated" / "quarantine.jsonl")
    assert summary["records"] == n_rows == len(good) + len(bad)
    assert sorted(r["row"] for r in good + bad) == list(range(n_rows))  # every row exactly once
    assert all(b["reasons"] and set(b["reasons"]) <= set(REASONS) for b in bad)
    for rec in good:  # "valid" means it really decodes, and is the file that was checked
        for img in rec["images"]:
            assert sha256_file(img["path"]) == img["sha256"]
            with Image.open(img["path"]) as im:
                im.load()
                assert im.size == (img["width"], img["height"])
    _check_certain_verdicts(lines, faults, n_rows, {b["row"]: set(b["reasons"]) for b in bad})
    normalized = normalize_stage(cfg)  # what validation passed, normalization takes
    assert normalized["images"] == len({i["sha256"] for r in good for i in r["images"]})

    kinds = Counter(f"{part}:{f}" for pair in faults for part, f in zip(("image", "row"), pair) if f != "intact")
    with capsys.disabled():
        print(f"\nfuzz: {n_rows} rows ({sum(1 for a, b in faults if a != 'intact' or b != 'intact')} corrupted: "
              f"{sum(kinds.values())} faults of {len(kinds)} kinds), {len(good)} valid, {len(bad)} quarantined, "
              f"0 crashes; by reason {dict(Counter(c for b in bad for c in b['reasons']).most_common())}")


def _check_certain_verdicts(lines: list[bytes], faults: list[tuple[str, str]], n_rows: int,
                            reasons: dict[int, set[str]]) -> None:
    """Where each line stayed one row (no line break was flipped in), a corruption with a certain verdict got it."""
    if n_rows != len(lines):
        return
    for row, (image_fault, row_fault) in enumerate(faults):
        expected = ROW_FAULTS[row_fault][1]
        if expected is None and row_fault == "intact":
            expected = IMAGE_FAULTS[image_fault][1]
        if expected is not None:
            assert expected in reasons.get(row, set()), (row, image_fault, row_fault, reasons.get(row))
