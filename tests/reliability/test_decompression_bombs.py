"""Decompression bombs are refused before decoding, on every decode path, with bounded memory.

Each bomb is a real PNG (tests/reliability/bombs.py): under 4 MB on disk, 0.9 to 3.6 GB decoded. Memory is
measured in a fresh child process by its own high-water mark (``VmHWM`` in /proc/self/status, before and
after the call), so what the test process or an earlier test allocated cannot hide or fake a decode.
(Not ``ru_maxrss``: Linux carries it over fork and exec, so a child of a 1.9 GB pytest process reported
1.9 GB before doing anything.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bombs import decoded_bytes, png_bomb

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
# Growth of the peak RSS allowed for one call on a bomb: reading a 3.6 MB file, hashing it, PIL's header
# parser. Decoding the smallest bomb here would add 858 MiB (30000 x 30000 L).
BOUND = 64 * MiB

CHILD = r"""
import json, sys
sys.path.insert(0, {here!r})
from visiontune.data.probe import probe_image
from visiontune.images import load_image

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB

def call():
    if {what!r} == "probe":
        return probe_image({name!r}, {root!r}, None, 40_000_000)
    try:
        load_image({path!r})
    except Exception as e:  # the type is checked by the caller: a bomb must not pass as a broken file
        return {{"refused": str(e), "type": type(e).__name__}}
    return {{"refused": None}}

before = peak()
result = call()
print("RESULT" + json.dumps({{"result": result, "growth": peak() - before, "peak": peak()}}))
"""


def _in_child(what: str, path: Path) -> dict:
    script = CHILD.format(here=str(HERE), what=what, name=path.name, root=str(path.parent), path=str(path))
    proc = subprocess.run([sys.executable, "-c", script], cwd=path.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.fixture(scope="module")
def bomb_files(tmp_path_factory) -> dict[str, Path]:
    """The bombs on disk: 30000 x 30000 in L and RGBA, and a 10000 x 10000 RGBA one that PIL's own guard
    (89 M pixels warn, 179 M refuse) lets through with only a warning."""
    root = tmp_path_factory.mktemp("bombs")
    files = {}
    for w, h, mode in ((30000, 30000, "L"), (30000, 30000, "RGBA"), (10000, 10000, "RGBA")):
        path = root / f"bomb-{w}x{h}-{mode}.png"
        path.write_bytes(png_bomb(w, h, mode))
        assert path.stat().st_size < 4_000_000 and decoded_bytes(w, h, mode) > 350_000_000
        files[f"{w}{mode}"] = path
    return files


@pytest.mark.parametrize("key", ["30000L", "30000RGBA"])
def test_probe_reads_a_bomb_header_without_decoding_it(bomb_files, key):
    out = _in_child("probe", bomb_files[key])
    row = out["result"]
    assert (row["width"], row["height"], row["pixels"]) == (30000, 30000, 900_000_000)
    assert row["decodable"] is None and "not decoded" in row["error"]
    assert out["growth"] < BOUND, f"probing {key} grew the peak RSS by {out['growth'] / MiB:.0f} MiB"


@pytest.mark.parametrize("key", ["10000RGBA", "30000L"])
def test_load_image_refuses_a_bomb_before_decoding(bomb_files, key):
    """The loader of training, evaluation and serving: a clear error, and no decode (PIL's own guard alone
    decodes the 10000 x 10000 RGBA bomb: +2.3 GB)."""
    out = _in_child("load", bomb_files[key])
    assert out["result"]["refused"], f"{key} was decoded"
    assert out["result"]["type"] == "ImageTooLargeError"
    assert "pixels" in out["result"]["refused"] and "before decoding" in out["result"]["refused"]
    assert out["growth"] < BOUND, f"loading {key} grew the peak RSS by {out['growth'] / MiB:.0f} MiB"


def test_validate_quarantines_bombs_as_too_many_pixels(bomb_files, tmp_path):
    """The validate stage as a whole (GX suites included) stays far below one bomb's decoded size."""
    from PIL import Image

    raw = tmp_path / "raw"
    raw.mkdir()
    Image.new("RGB", (400, 300), "white").save(raw / "good.png")
    rows = [{"image": "good.png", "text": "1"}]
    for key in ("30000L", "30000RGBA"):
        (raw / bomb_files[key].name).write_bytes(bomb_files[key].read_bytes())
        rows.append({"image": bomb_files[key].name, "text": "2"})
    (raw / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = (
        "import json; from visiontune.config import from_dict; "
        "from visiontune.data.validate import validate_stage; "
        f"s = validate_stage(from_dict({{'data': {{'raw_dir': {str(raw)!r}, 'work_dir': {str(tmp_path / 'work')!r}}}, "
        "'validate': {'max_failure_ratio': 0.9}})); "
        "hwm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]; "
        "print('RESULT' + json.dumps({'summary': s, 'peak': hwm}))"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["summary"]["valid"] == 1 and out["summary"]["failures_by_reason"]["too_many_pixels"] == 2
    quarantine = [json.loads(line) for line in (tmp_path / "work" / "validated" / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantine) == 2 and all("too_many_pixels" in q["reasons"] for q in quarantine)
    assert all("30000x30000" in q["detail"] for q in quarantine)
    rgba = decoded_bytes(30000, 30000, "RGBA")
    assert out["peak"] < 1024 * MiB < rgba / 3, f"validate peaked at {out['peak'] / MiB:.0f} MiB"
