"""The data tasks run for real inside a flow; caching follows content and params, not the run id."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from prefect import flow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from datafixtures import numbered_raw  # noqa: E402  (tests/data/datafixtures.py)

from visiontune.config import PipelineConfig, from_dict
from visiontune.tasks.stages import TASKS, retry_on_transient_io, stage_cache_key

validate_task, normalize_task, convert_task = TASKS["validate"], TASKS["normalize"], TASKS["convert"]


def _raw(tmp_path: Path, n: int = 20) -> Path:
    return numbered_raw(tmp_path, n, size=(310, 300))


def _cfg(tmp_path: Path, convert: dict | None = None, **data) -> PipelineConfig:
    return from_dict({"data": {"raw_dir": str(tmp_path / "raw"), "work_dir": str(tmp_path / "w"), **data},
                      "convert": convert or {}})


@flow
def data_flow(cfg: PipelineConfig) -> dict:
    v = validate_task(cfg)
    n = normalize_task(cfg, wait_for=[v])
    c = convert_task(cfg, wait_for=[n])
    return {"validate": v, "normalize": n, "convert": c}


def test_tasks_in_a_flow_and_cache_across_runs(tmp_path):
    _raw(tmp_path)
    cfg = _cfg(tmp_path)
    first = data_flow(cfg)
    assert first["validate"]["valid"] == 20 and first["normalize"]["written"] == 20
    assert first["convert"]["rows"] == 20 and (tmp_path / "w" / "dataset" / "dataset_dict.json").is_file()

    # Second flow run: every task is a cache hit (a re-executed normalize would report written=0).
    second = data_flow(cfg)
    assert second == first

    # One caption edited: validate's key changes, so it re-runs; its new records change normalize's and convert's keys.
    lines = (tmp_path / "raw" / "annotations.jsonl").read_text().splitlines()
    lines[0] = json.dumps({"image": "0.png", "text": "zero"})
    (tmp_path / "raw" / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    third = data_flow(cfg)
    assert third["normalize"]["written"] == 0 and third["normalize"]["skipped"] == 20  # re-ran, images reused

    # A param only convert reads: only convert's key changes.
    cfg2 = _cfg(tmp_path, convert={"instruction": "Other words."})
    for stage in ("validate", "normalize"):
        assert stage_cache_key(stage, cfg2) == stage_cache_key(stage, cfg)
    assert stage_cache_key("convert", cfg2) != stage_cache_key("convert", cfg)


def test_plain_functions_and_clear_failure(tmp_path):
    _raw(tmp_path, 12)
    cfg = _cfg(tmp_path)
    assert validate_task.fn(cfg)["valid"] == 12
    assert normalize_task.fn(cfg)["images"] == 12
    assert convert_task.fn(cfg)["rows"] == 12
    with pytest.raises(FileNotFoundError, match="visiontune demo-data"):
        validate_task.fn(_cfg(tmp_path, annotations="nope.jsonl"))


def test_retry_only_on_transient_io_errors():
    from prefect.states import Failed

    assert retry_on_transient_io(None, None, Failed(data=OSError(5, "Input/output error")))
    assert not retry_on_transient_io(None, None, Failed(data=FileNotFoundError("x")))
    assert not retry_on_transient_io(None, None, Failed(data=ValueError("validation failed")))
