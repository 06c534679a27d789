"""Real DVC in a temporary git repo: repro, no-op re-run, one param -> one stage, push/pull to a local remote.

The whole pipeline through DVC, and its agreement with the Prefect cache keys, is in tests/test_stages.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from datafixtures import sh
from visiontune.config import PipelineConfig, to_yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def ran(out: str) -> set[str]:
    return {s for s in ("validate", "normalize", "convert") if f"Running stage '{s}'" in out}


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    from visiontune.data.demo import generate_demo

    repo = tmp_path / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    # The real dvc.yaml (data stages) and the code files it lists as deps.
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    data_stages = {k: stages[k] for k in ("validate", "normalize", "convert")}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": data_stages}, sort_keys=False))
    shutil.copytree(REPO / "visiontune", repo / "visiontune", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(to_yaml(PipelineConfig()))
    generate_demo(repo / "data" / "raw", n=24, seed=5)
    sh(repo, "dvc", "add", "-q", "data/raw")
    return repo


def test_repro_noop_param_change_and_push_pull(dvc_repo: Path, tmp_path: Path):
    out = sh(dvc_repo, "dvc", "repro")
    assert ran(out) == {"validate", "normalize", "convert"}
    assert (dvc_repo / "data" / "dataset" / "dataset_dict.json").is_file()
    metrics = sh(dvc_repo, "dvc", "metrics", "show")
    assert "data/metrics/validate.json" in metrics and "quarantined" in metrics

    again = sh(dvc_repo, "dvc", "repro")
    assert ran(again) == set()
    for s in ("validate", "normalize", "convert"):
        assert f"Stage '{s}' didn't change, skipping" in again

    params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    params["convert"]["instruction"] = "Write down the digits."
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(dvc_repo, "dvc", "repro")
    assert ran(out) == {"convert"}, out

    params["normalize"]["max_px"] = 800
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(dvc_repo, "dvc", "repro")
    assert "normalize" in ran(out) and "validate" not in ran(out)

    # A local remote: push, lose the workspace data and the cache, pull it back.
    remote = tmp_path / "remote"
    sh(dvc_repo, "dvc", "remote", "add", "-d", "local", str(remote))
    sh(dvc_repo, "dvc", "push")
    manifest = (dvc_repo / "data" / "normalized" / "manifest.json").read_bytes()
    for p in ("data/raw", "data/normalized", "data/dataset", "data/validated", ".dvc/cache"):
        shutil.rmtree(dvc_repo / p)
    sh(dvc_repo, "dvc", "pull")
    assert (dvc_repo / "data" / "normalized" / "manifest.json").read_bytes() == manifest
    assert (dvc_repo / "data" / "raw" / "annotations.jsonl").is_file()
    assert ran(sh(dvc_repo, "dvc", "repro")) == set()
