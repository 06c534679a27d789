"""Prefect tests run against a temporary local SQLite-backed server (one per session)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
