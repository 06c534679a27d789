"""The bundled demo: real sklearn digits, deterministic bytes, mixed sizes, a few planted bad rows."""

from __future__ import annotations

import json

import pytest

from datafixtures import make_cfg, snapshot
from visiontune.data.demo import demo_stage, generate_demo
from visiontune.data.validate import validate_stage


def test_demo_is_deterministic_and_rerun_touches_nothing(demo_raw, tmp_path):
    other = tmp_path / "again"
    generate_demo(other, n=30, seed=3407)
    a, b = snapshot(demo_raw), snapshot(other)
    assert [v[0] for v in a.values()] == [v[0] for v in b.values()], "same seed, same bytes"
    again = generate_demo(other, n=30, seed=3407)
    assert again["files_written"] == 0 and snapshot(other) == b


def test_demo_rows_are_digit_strings_with_mixed_sizes_and_planted_failures(demo_raw, tmp_path):
    rows = [json.loads(line) for line in (demo_raw / "annotations.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    assert sum(r["text"].isdigit() and 2 <= len(r["text"]) <= 5 for r in rows) == 29  # one planted empty caption
    summary = validate_stage(make_cfg(demo_raw, tmp_path / "w"))
    assert summary["valid"] == 26 and summary["quarantined"] == 4
    assert summary["failures_by_reason"] == {"duplicate": 1, "missing_file": 1, "text_too_short": 1, "undecodable": 1}


def test_demo_refuses_to_overwrite_user_data(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "annotations.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        demo_stage(make_cfg(raw, tmp_path / "w", samples=10))


def test_all_three_stages_leave_raw_bytes_and_mtimes_unchanged(demo_raw, tmp_path):
    from visiontune.data.convert import convert_stage
    from visiontune.data.normalize import normalize_stage

    before = snapshot(demo_raw)
    cfg = make_cfg(demo_raw, tmp_path / "w")
    validate_stage(cfg)
    normalize_stage(cfg)
    summary = convert_stage(cfg)
    assert summary["rows"] == 26
    assert snapshot(demo_raw) == before
