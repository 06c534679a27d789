"""Fixtures for the data-stage tests: a raw folder full of the bad inputs users really have."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datafixtures import bad_input_cases, ext_of, gradient, png


@pytest.fixture
def bad_raw(tmp_path: Path) -> tuple[Path, dict]:
    """tmp_path/raw with every bad input above, plus a non-UTF-8 line; returns (raw dir, cases)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (tmp_path / "outside.png").write_bytes(png(gradient(400, 300)))  # exists, but outside the root
    cases = bad_input_cases()
    lines = []
    for name, (data, row, _) in cases.items():
        rel = f"{name}{ext_of(name)}"
        if data is not None:
            (raw / rel).write_bytes(data)
        lines.append(json.dumps({"image": rel, **row}).encode())
    (raw / "latin1.png").write_bytes(png(gradient(440, 300)))
    lines.append(b'{"image": "latin1.png", "text": "caf\xe9 \xff"}')  # Latin-1 bytes in a UTF-8 file
    (raw / "annotations.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return raw, cases


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> Path:
    """A small demo dataset (30 records), generated once per session; treat as read-only."""
    from visiontune.data.demo import generate_demo

    raw = tmp_path_factory.mktemp("demo") / "raw"
    generate_demo(raw, n=30, seed=3407)
    return raw
