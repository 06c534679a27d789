"""A fresh clone: `make setup` generates the demo data, which matches data.dvc exactly, and a plain `dvc repro`
runs on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fresh_clone(dest: Path) -> Path:
    """The repository as a clone would have it: the files git tracks plus untracked, not ignored ones (the
    working tree under test, uncommitted edits included), in a new git repository."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the working tree is not in the clone either
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=visiontune-test", "-c", "user.email=test@visiontune.invalid"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "fresh clone"]):
        subprocess.run(git + args, cwd=dest, check=True, capture_output=True)
    return dest


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None or shutil.which("git") is None, reason="needs make and git")
def test_plain_dvc_repro_works_on_a_fresh_clone_after_make_setup(tmp_path):
    """No data/raw in a clone: `make setup` generates it (3,000 pages, about a minute), the pages hash exactly
    to the committed data.dvc, and a plain `dvc repro` (no Makefile) runs the pipeline's first stage on them."""
    clone = _fresh_clone(tmp_path / "clone")
    assert not (clone / "data" / "raw").exists() and (clone / "data.dvc").exists()
    venv = Path(sys.executable).parent.parent  # the venv running this test: `-o` keeps make from building one
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    setup = subprocess.run(["make", "-o", f"{venv}/.installed", "setup", f"VENV={venv}"], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=900)
    assert setup.returncode == 0, (setup.stdout + setup.stderr)[-4000:]
    assert (clone / "data" / "raw" / "annotations.jsonl").exists()
    done = subprocess.run([str(venv / "bin" / "dvc"), "repro", "validate"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert (clone / "data" / "validated" / "records.jsonl").exists()
    status = subprocess.run([str(venv / "bin" / "dvc"), "data", "status", "--json"], cwd=clone, env=env,
                            capture_output=True, text=True, check=True)
    uncommitted = json.loads(status.stdout).get("uncommitted", {})
    changed = [p for paths in uncommitted.values() for p in paths if p.startswith("data/raw")]
    assert not changed, f"the generated demo data differs from data.dvc: {changed}"
    diff = subprocess.run(["git", "diff", "--quiet", "--", "data.dvc"], cwd=clone)
    assert diff.returncode == 0, "dvc repro rewrote data.dvc: the generated data hashed differently"
