"""A DVC remote, as docs/scaling-out.md sets one up: ``dvc remote add -d local /path``, ``dvc push``, and on a
fresh ``git clone`` elsewhere ``dvc pull`` brings back the data and the pipeline's outputs byte for byte,
after which the clone's pipeline is up to date (``dvc repro`` runs nothing).

The project is a minimal one in a temporary git repository: the real ``dvc.yaml`` (its stages up to train),
the code files it lists as deps, tiny settings, 24 demo pages. The data-stage push/pull in one workspace
is in tests/data/test_dvc_pipeline.py.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
from datafixtures import sh  # noqa: E402  (tests/data/datafixtures.py)

from visiontune.config import from_dict, to_yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ("validate", "normalize", "convert", "train")


def _tree_hashes(root: Path, folders: list[str]) -> dict[str, str]:
    """sha256 of every file under ``folders`` of ``root``, by path relative to ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for f in folders for p in sorted((root / f).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_push_to_a_local_remote_and_pull_on_a_fresh_clone(tmp_path):
    from visiontune.data.demo import generate_demo

    repo = tmp_path / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {s: stages[s] for s in STAGES}}, sort_keys=False))
    for folder in ("visiontune", "kernels"):  # the code deps dvc.yaml lists
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = from_dict({"model": {"tiny_size": "test", "max_seq_length": 512}, "images": {"resize": [112, 56]},
                     "train": {"max_steps": 2, "save_steps": 2, "logging_steps": 1}})
    (repo / "params.yaml").write_text(to_yaml(cfg))
    (repo / ".gitignore").write_text("/mlflow/\n/models/\n.visiontune.lock\n")  # run-time files, never versioned
    generate_demo(repo / "data" / "raw", n=24, seed=5)
    sh(repo, "dvc", "add", "-q", "data/raw")
    out = sh(repo, "dvc", "repro", *STAGES)
    assert all(f"Running stage '{s}'" in out for s in STAGES), out

    remote = tmp_path / "remote"  # the docs' recipe: a folder as the default remote, committed in .dvc/config
    sh(repo, "dvc", "remote", "add", "-d", "local", str(remote))
    sh(repo, "dvc", "push")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "pipeline with a local remote")
    versioned = ["data/raw", "data/validated", "data/normalized", "data/dataset", "outputs/train"]
    expected = _tree_hashes(repo, versioned)
    assert any(k.endswith("adapter/adapter_model.safetensors") for k in expected)

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not any((clone / f).exists() for f in versioned)  # git holds none of it
    sh(clone, "dvc", "pull")
    assert _tree_hashes(clone, versioned) == expected
    again = sh(clone, "dvc", "repro", *STAGES)
    for s in STAGES:
        assert f"Stage '{s}' didn't change, skipping" in again, again
    assert "up to date" in sh(clone, "dvc", "status").lower()
