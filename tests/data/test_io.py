"""Annotation sources users actually have: JSONL, CSV, Parquet, and a `datasets` dataset with embedded images."""

from __future__ import annotations


import datasets
import pandas as pd
import pytest
from PIL import Image

from datafixtures import gradient, make_cfg, png
from visiontune.data.convert import convert_stage
from visiontune.data.io import read_annotations
from visiontune.data.normalize import normalize_stage
from visiontune.data.validate import validate_stage


def _images(raw, n=3):
    raw.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (raw / f"{i}.png").write_bytes(png(gradient(320 + 10 * i, 300)))


def test_csv_with_empty_caption_and_non_utf8_cell(tmp_path):
    raw = tmp_path / "raw"
    _images(raw)
    (raw / "caps.csv").write_bytes(b'image,text\n0.png,"hello, world"\n1.png,\n2.png,caf\xe9\n')
    rows = read_annotations(raw, "caps.csv", "image", "text")
    assert rows[0].answers == ["hello, world"] and rows[0].text_utf8
    assert rows[1].answers == [""]
    assert rows[2].text_utf8 is False and rows[2].answers == ["caf\ufffd"]
    summary = validate_stage(make_cfg(raw, tmp_path / "w", annotations="caps.csv", max_failure_ratio=1.0))
    assert summary["failures_by_reason"] == {"text_not_utf8": 1, "text_too_short": 1}


def test_parquet_with_question_answer_columns_and_extra_images(tmp_path):
    raw = tmp_path / "raw"
    _images(raw)
    pd.DataFrame({"img": ["0.png", "1.png"], "question": ["What?", "Why?"], "answer": ["a", "b"],
                  "more": [["2.png"], []]}).to_parquet(raw / "qa.parquet")
    cfg = make_cfg(raw, tmp_path / "w", annotations="qa.parquet", image_column="img", text_column="answer",
                   question_column="question", extra_images_column="more")
    assert validate_stage(cfg)["valid"] == 2
    normalize_stage(cfg)
    assert convert_stage(cfg)["multi_image_rows"] == 1


def _radiology_like(n=4):
    """Layout of a radiology caption set: image (embedded), image_id, caption, cui."""
    ims = [gradient(350 + 20 * i, 330, "L") for i in range(n)]
    return datasets.Dataset.from_dict(
        {"image": ims, "image_id": [f"ROCO_{i:05d}" for i in range(n)], "caption": [f"finding {i}" for i in range(n)],
         "cui": [["C0040405"]] * n},
        features=datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("string"),
                                    "caption": datasets.Value("string"), "cui": datasets.List(datasets.Value("string"))}),
    )


@pytest.mark.parametrize("how", ["save_to_disk", "parquet"])
def test_datasets_dataset_with_embedded_images(tmp_path, how):
    raw = tmp_path / "raw"
    raw.mkdir()
    ds = _radiology_like()
    if how == "save_to_disk":
        datasets.DatasetDict({"train": ds}).save_to_disk(str(raw / "roco"))
        annotations = "roco"
    else:
        ds.to_parquet(str(raw / "roco.parquet"))
        annotations = "roco.parquet"
    work = tmp_path / "w"
    cfg = make_cfg(raw, work, annotations=annotations, text_column="caption", instruction="Describe the image.")
    assert validate_stage(cfg)["valid"] == 4
    extracted = sorted((work / "validated" / "embedded").iterdir())
    assert len(extracted) == 4
    normalize_stage(cfg)
    convert_stage(cfg)
    dd = datasets.load_from_disk(str(work / "dataset"))
    rows = [r for s in dd for r in dd[s]]
    assert sorted(r["answer"] for r in rows) == [f"finding {i}" for i in range(4)]
    with Image.open(rows[0]["images"][0]) as im:
        assert im.mode == "RGB" and min(im.size) >= 300


def test_unsupported_format_and_plain_folder_are_clear_errors(tmp_path):
    raw = tmp_path / "raw"
    (raw / "notadataset").mkdir(parents=True)
    (raw / "caps.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported annotation format '.txt'"):
        read_annotations(raw, "caps.txt", "image", "text")
    with pytest.raises(ValueError, match="not a dataset saved with datasets' save_to_disk"):
        read_annotations(raw, "notadataset", "image", "text")
