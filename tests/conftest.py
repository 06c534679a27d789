"""Shared fixtures: tiny offline models (built once per session) and quiet logs."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in the interpreter on CPU; set before triton loads
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*gemm_4bit.*")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A function arch -> directory of a saved tiny random-weight model of that architecture."""
    from visiontune.testing import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = str(build_tiny_model(arch, root / arch))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary local Prefect server (SQLite) for the session; request it where flows/tasks run."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
