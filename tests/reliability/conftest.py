"""Fixtures of the fault-injection suite: a small real dataset made by the real data stages, and MLflow's
process-wide state put back after a test that points it at a server of its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """``data.work_dir`` of a 24-page demo dataset (validated, normalized, converted); read-only."""
    from visiontune import stages
    from visiontune.config import from_dict

    root = tmp_path_factory.mktemp("reliability-data")
    cfg = from_dict({"data": {"raw_dir": str(root / "raw"), "work_dir": str(root / "work")},
                     "demo": {"samples": 24, "seed": 5}, "validate": {"max_failure_ratio": 0.5}})
    for name in ("demo-data", "validate", "normalize", "convert"):  # the real stages, as `visiontune run` does
        stages.get(name).function()(cfg)
    return root / "work"


@pytest.fixture
def mlflow_uri_restored():
    """Put MLflow's tracking and registry URIs (and ``$MLFLOW_TRACKING_URI``, which ``set_tracking_uri``
    exports) back as they were: later tests must not talk to a server this test stopped."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    registry_before = os.environ.get("MLFLOW_REGISTRY_URI")
    yield
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(before)
    mlflow.set_registry_uri(before)
    # set_registry_uri exports $MLFLOW_REGISTRY_URI and set_registry_uri(None) does not clear it (MLflow 3.17):
    # restore the variable itself, or later tests retry a server this test stopped.
    if registry_before is None:
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
    else:
        os.environ["MLFLOW_REGISTRY_URI"] = registry_before
