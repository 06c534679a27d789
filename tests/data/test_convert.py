"""Conversion to a DatasetDict: paths as strings, hash split stable when rows are added, multi-turn kept."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from datafixtures import gradient, make_cfg, numbered_raw, png
from visiontune.data.convert import assign_split, convert_stage
from visiontune.data.normalize import normalize_stage
from visiontune.data.validate import validate_stage


def _splits(work: Path) -> dict[str, str]:
    dd = datasets.load_from_disk(str(work / "dataset"))
    return {r["answer"]: s for s in dd for r in dd[s]}


def test_split_is_stable_when_rows_are_added_and_follows_the_seed(tmp_path):
    work = tmp_path / "w"
    cfg = make_cfg(numbered_raw(tmp_path, 30), work, split_ratios=[0.6, 0.2, 0.2])
    for stage in (validate_stage, normalize_stage, convert_stage):
        stage(cfg)
    first = _splits(work)
    assert set(first.values()) == {"train", "validation", "test"}
    numbered_raw(tmp_path, 40)
    for stage in (validate_stage, normalize_stage, convert_stage):
        stage(cfg)
    second = _splits(work)
    assert {k: second[k] for k in first} == first, "existing rows must keep their split"
    assert len(second) == 40
    other_seed = [assign_split(f"k{i}", 1, [0.5, 0.25, 0.25]) for i in range(200)]
    assert other_seed != [assign_split(f"k{i}", 2, [0.5, 0.25, 0.25]) for i in range(200)]
    assert other_seed == [assign_split(f"k{i}", 1, [0.5, 0.25, 0.25]) for i in range(200)]


def test_dataset_rows_hold_path_strings_and_instruction(tmp_path):
    work = tmp_path / "w"
    cfg = make_cfg(numbered_raw(tmp_path, 12), work, instruction="Read the digits.")
    for stage in (validate_stage, normalize_stage):
        stage(cfg)
    summary = convert_stage(cfg)
    assert summary["rows"] == 12 and summary["written"]
    assert convert_stage(cfg)["written"] is False  # unchanged inputs: nothing rewritten
    dd = datasets.load_from_disk(str(work / "dataset"))
    assert set(dd) == {"train", "validation", "test"}
    row = next(r for s in dd for r in dd[s])
    image_part, text_part = row["messages"][0]["content"]
    assert isinstance(image_part["image"], str) and Path(image_part["image"]).is_file()
    assert "normalized" in image_part["image"]
    assert text_part["text"] == "Read the digits."
    assert row["messages"][1]["content"][0]["text"] == row["answer"]


def test_multi_image_multi_turn_rows_survive_conversion(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("a", "b", "c"):
        (raw / f"{name}.png").write_bytes(png(gradient(320 + ord(name), 300)))
    rows = [
        {"image": "a.png", "extra": ["b.png", "c.png"], "q": ["How many images?", "Which is widest?"], "text": ["3", "c"]},
        {"image": "b.png", "extra": [], "q": ["Colour?"], "text": ["grey"]},
    ]
    (raw / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    work = tmp_path / "w"
    cfg = make_cfg(raw, work, annotations="qa.jsonl", question_column="q", extra_images_column="extra", instruction="")
    for stage in (validate_stage, normalize_stage):
        stage(cfg)
    summary = convert_stage(cfg)
    assert summary["multi_image_rows"] == 1 and summary["multi_turn_rows"] == 1
    dd = datasets.load_from_disk(str(work / "dataset"))
    got = {r["answer"]: r for s in dd for r in dd[s]}
    multi = got["c"]
    assert len(multi["images"]) == 3 and len(multi["messages"]) == 4
    assert [p["type"] for p in multi["messages"][0]["content"]] == ["image", "image", "image", "text"]
    assert multi["messages"][2]["content"][0]["text"] == "Which is widest?"


def test_bad_split_ratios_is_a_clear_error():
    with pytest.raises(ValueError, match="split_ratios"):
        assign_split("x", 1, [0.5, 0.5])
