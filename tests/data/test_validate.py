"""Validation with the real GX suites: every bad input gets its reason, nothing crashes, raw stays intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datafixtures import make_cfg, snapshot
from visiontune.data.io import read_jsonl
from visiontune.data.validate import validate_stage


def test_every_bad_input_gets_its_reason_and_raw_is_untouched(bad_raw, tmp_path):
    raw, cases = bad_raw
    before = snapshot(raw)
    work = tmp_path / "work"
    summary = validate_stage(make_cfg(raw, work, max_failure_ratio=0.9))

    assert snapshot(raw) == before, "validation must never modify the raw folder (bytes or mtimes)"
    out = work / "validated"
    quarantine = {q["row"]: q for q in read_jsonl(out / "quarantine.jsonl")}
    good = {r["row"]: r for r in read_jsonl(out / "records.jsonl")}
    names = list(cases) + ["latin1"]
    for row, name in enumerate(names):
        expected = cases[name][2] if name in cases else ["text_not_utf8"]
        if expected:
            assert row in quarantine, f"{name} should be quarantined"
            assert quarantine[row]["reasons"] == expected, f"{name}: {quarantine[row]}"
            assert quarantine[row]["messages"], f"{name}: no human-readable reason"
        else:
            assert row in good, f"{name} should be valid, got {quarantine.get(row)}"
    assert summary["records"] == len(names)
    assert summary["quarantined"] == len(quarantine)
    assert summary["valid"] == len(good)

    # The detail says what was found, e.g. the bomb's size and the truncation.
    by_name = {names[r]: q for r, q in quarantine.items()}
    assert "15000x15000" in by_name["bomb"]["detail"]
    assert "truncated" in by_name["truncated_png"]["detail"]
    assert "zero-byte" in by_name["zero_byte"]["detail"]

    # Good records point at files inside raw with their content hash and true size.
    rot = good[names.index("exif_rotated")]["images"][0]
    assert rot["exif_orientation"] == 6 and (rot["width"], rot["height"]) == (400, 300)
    assert Path(rot["path"]).is_file()

    # GX result JSON is the real validation result, with the suite and unexpected indexes.
    gx_result = json.loads((out / "gx_result.json").read_text())
    assert set(gx_result) == {"images", "records"}
    types = {r["expectation_config"]["type"] for r in gx_result["images"]["results"]}
    assert "expect_column_values_to_be_between" in types and "expect_column_values_to_be_in_set" in types
    assert gx_result["images"]["success"] is False
    # Counts per failure kind in the summary and the metrics file agree.
    metrics = json.loads((work / "metrics" / "validate.json").read_text())
    assert metrics["failures_by_reason"]["undecodable"] == 4
    assert metrics["quarantined"] == summary["quarantined"]
    md = (out / "summary.md").read_text()
    assert "Worst offenders" in md and "too_many_pixels" in md


def test_failure_ratio_exceeded_fails_with_counts_and_quarantine_path(bad_raw, tmp_path):
    raw, _ = bad_raw
    work = tmp_path / "work"
    with pytest.raises(ValueError, match=r"records quarantined .*max_failure_ratio.*quarantine\.jsonl"):
        validate_stage(make_cfg(raw, work, max_failure_ratio=0.1))
    assert (work / "validated" / "quarantine.jsonl").is_file(), "outputs are written before failing"


def test_mode_not_in_allowed_modes_is_quarantined(bad_raw, tmp_path):
    raw, cases = bad_raw
    cfg = make_cfg(raw, tmp_path / "w", max_failure_ratio=1.0, allowed_modes=["RGB", "L", "LA", "RGBA", "P", "I;16", "I"])
    validate_stage(cfg)
    q = {r["row"]: r for r in read_jsonl(tmp_path / "w" / "validated" / "quarantine.jsonl")}
    assert q[list(cases).index("cmyk")]["reasons"] == ["mode_not_allowed"]


def test_missing_annotation_file_message_names_file_and_fix(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(FileNotFoundError, match=r"annotations\.jsonl not found: point data\.annotations .*visiontune demo-data"):
        validate_stage(make_cfg(raw, tmp_path / "w"))
    with pytest.raises(FileNotFoundError, match="data.raw_dir"):
        validate_stage(make_cfg(tmp_path / "nope", tmp_path / "w"))


def test_missing_column_is_a_config_error(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "annotations.jsonl").write_text('{"img": "a.png", "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"column\(s\) \['image', 'text'\] not found.*data.image_column"):
        validate_stage(make_cfg(raw, tmp_path / "w"))


def test_unparsable_jsonl_line_is_quarantined_not_fatal(tmp_path):
    from datafixtures import gradient, png

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.png").write_bytes(png(gradient(400, 300)))
    (raw / "annotations.jsonl").write_text('{"image": "a.png", "text": "1"}\n{"image": "a.png", "text": \n')
    summary = validate_stage(make_cfg(raw, tmp_path / "w", max_failure_ratio=0.5))
    assert summary["failures_by_reason"] == {"unparsable_row": 1}


def test_no_image_at_all_is_quarantined_not_a_crash(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "annotations.jsonl").write_text('{"image": null, "text": "1"}\nnot json\n')
    with pytest.raises(ValueError, match="2 of 2 records quarantined"):
        validate_stage(make_cfg(raw, tmp_path / "w"))
    q = read_jsonl(tmp_path / "w" / "validated" / "quarantine.jsonl")
    assert [r["reasons"] for r in q] == [["no_image"], ["unparsable_row"]]


def test_qa_turn_checks_and_text_length_bound(tmp_path):
    from datafixtures import gradient, png

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(4):
        (raw / f"{i}.png").write_bytes(png(gradient(400 + i, 300)))
    rows = [
        {"image": "0.png", "q": ["How many?", "Which?"], "a": ["2", "the left one"]},  # valid multi-turn
        {"image": "1.png", "q": ["How many?"], "a": ["2", "3"]},  # 1 question, 2 answers
        {"image": "2.png", "q": [""], "a": ["2"]},  # empty question
        {"image": "3.png", "q": ["Say a lot"], "a": ["x" * 50]},  # longer than max_text_chars
    ]
    (raw / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(raw, tmp_path / "w", annotations="qa.jsonl", text_column="a", question_column="q",
                   max_text_chars=20, max_failure_ratio=1.0)
    validate_stage(cfg)
    q = {r["row"]: r["reasons"] for r in read_jsonl(tmp_path / "w" / "validated" / "quarantine.jsonl")}
    assert q == {1: ["turn_mismatch"], 2: ["question_missing"], 3: ["text_too_long"]}
    meta = (tmp_path / "w" / "validated" / "image_metadata.csv").read_text().splitlines()
    assert meta[0].startswith("image_id,row,ref,within_root,exists,bytes,sha256,decodable") and len(meta) == 5


def test_the_first_valid_copy_is_kept_when_an_earlier_twin_is_quarantined(tmp_path):
    """Duplicates are ranked among valid records: a twin quarantined for its own reason (here an empty
    caption) does not make the valid copy after it a duplicate (issue 14, hole 6)."""
    from datafixtures import gradient, png

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.png").write_bytes(png(gradient(400, 300)))
    rows = [{"image": "a.png", "text": ""}, {"image": "a.png", "text": "7"}, {"image": "a.png", "text": "8"}]
    (raw / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    validate_stage(make_cfg(raw, tmp_path / "w", max_failure_ratio=1.0))
    out = tmp_path / "w" / "validated"
    q = {r["row"]: r["reasons"] for r in read_jsonl(out / "quarantine.jsonl")}
    assert q == {0: ["text_too_short"], 2: ["duplicate"]}
    assert [r["row"] for r in read_jsonl(out / "records.jsonl")] == [1]
