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
    assert sum(r["text"].isdigit() and 1 <= len(r["text"]) <= 8 for r in rows) == 29  # one planted empty caption
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


def test_heldout_pages_come_from_the_other_half_of_the_digits_in_other_layouts(tmp_path):
    """demo.heldout: clean pages of 3-7 digits from the second half of scikit-learn's digits, in their own
    folder (the pipeline's data stages read only the top-level annotations), rendered with HELDOUT_LAYOUT."""
    from sklearn.datasets import load_digits

    from visiontune.data import demo

    out = tmp_path / "raw"
    summary = generate_demo(out, n=12, seed=3407, heldout=10)
    rows = [json.loads(line) for line in (out / "heldout" / "annotations.jsonl").read_text().splitlines()]
    assert summary["heldout"] == 10 and len(rows) == 10
    assert all(r["text"].isdigit() and 3 <= len(r["text"]) <= 7 and (out / "heldout" / r["image"]).exists() for r in rows)
    images, targets = load_digits(return_X_y=True)
    train, test = demo.digit_halves(len(images))
    assert train.stop == test.start and len(train) + len(test) == len(images)
    # The layouts differ: no pen colour range of the held-out set overlaps the training one in the red channel.
    assert demo.HELDOUT_LAYOUT.pen[0][0] > demo.TRAIN_LAYOUT.pen[0][1]
    assert demo.HELDOUT_LAYOUT.blur[1] > demo.TRAIN_LAYOUT.blur[1]
    # Re-running without a held-out set removes the folder; the training pages are unchanged.
    before = (out / "annotations.jsonl").read_text()
    generate_demo(out, n=12, seed=3407, heldout=0)
    assert not (out / "heldout").exists() and (out / "annotations.jsonl").read_text() == before
