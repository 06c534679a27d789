"""MLflow plumbing shared by the train, evaluate and register stages.

The default store is embedded: a SQLite database (the model registry needs a database backend) and an
artifact folder under ``mlflow/`` at the repository root. ``MLFLOW_TRACKING_URI`` (or
``tracking.uri``) points everything at a real tracking server instead, unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

RUN_FILE = "run.json"  # written by train (train.output_dir) and align (align.output_dir: read by evaluate, register)


def default_store(root: Optional[Path] = None) -> tuple[str, str]:
    """(tracking URI, artifact location) of the embedded store under ``<root>/mlflow``."""
    root = Path(root or os.getcwd()).resolve()
    store = root / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


def resolve_tracking_uri(configured: Optional[str]) -> str:
    """``tracking.uri`` if set, else ``$MLFLOW_TRACKING_URI``, else the embedded store."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_store()[0]


def setup_mlflow(configured_uri: Optional[str], experiment: str) -> str:
    """Point MLflow at the store and make sure ``experiment`` exists (artifacts under mlflow/ when embedded).

    Returns the experiment id.
    """
    import mlflow

    uri = resolve_tracking_uri(configured_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    artifact_location = default_store()[1] if uri.startswith("sqlite:") else None
    return client.create_experiment(experiment, artifact_location=artifact_location)


def git_commit(cwd: Optional[Path] = None) -> str:
    """The current git commit (with '-dirty' when the tree has changes), or 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def dvc_data_hash(dvc_file: Path = Path("data.dvc")) -> str:
    """The md5 DVC recorded for the raw data (``outs[0].md5`` of ``data.dvc``), or 'untracked'."""
    import yaml

    if not dvc_file.exists():
        return "untracked"
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "untracked"))


def read_run_file(output_dir: str | Path) -> dict[str, Any]:
    """The train stage's record of its MLflow run and adapter location."""
    path = Path(output_dir) / RUN_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the train stage first (`visiontune train`, then `visiontune align`)")
    return json.loads(path.read_text())


def write_run_file(output_dir: str | Path, record: dict[str, Any]) -> Path:
    path = Path(output_dir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def mark_killed(record: dict[str, Any]) -> Optional[str]:
    """Set the MLflow run of a train ``record`` whose process died (run.json still says 'running') to KILLED.

    Returns its run id, or None when it is not RUNNING (a Python error already ended it as FAILED) or its
    store cannot be reached (a warning then: the next training must not fail over bookkeeping).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run_id = record.get("mlflow_run_id")
    if not run_id:
        return None
    try:
        client = MlflowClient(tracking_uri=record.get("tracking_uri"))
        if client.get_run(run_id).info.status != "RUNNING":
            return None
        client.set_terminated(run_id, "KILLED")
    except (MlflowException, OSError) as e:
        log.warning("could not mark the orphaned MLflow run %s as KILLED: %s", run_id, e)
        return None
    log.warning("MLflow run %s was left RUNNING by a training that died; marked KILLED", run_id)
    return run_id
