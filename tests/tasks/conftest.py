"""Prefect tests run against the session's temporary local server (tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _prefect(prefect_harness):
    yield
