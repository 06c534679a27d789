"""Each dvc.yaml stage declares exactly the params its stage function reads.

A stage that reads a setting DVC does not know about would not re-run when it changes; one that declares
a setting it does not read re-runs for nothing. Each entry of STAGE_RUNNERS runs a stage function under
:class:`visiontune.config.RecordingConfig` and the test compares the keys it read with ``dvc.yaml``.
To cover a new stage, add ``"name": runner`` where ``runner(tmp_path) -> set of keys read`` prepares
whatever inputs the stage needs (earlier stages may run with a plain config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import yaml

from visiontune.config import PipelineConfig, RecordingConfig, from_dict

REPO = Path(__file__).resolve().parents[1]


def dvc_stage_params(stage: str) -> set[str]:
    """The `params` list of a dvc.yaml stage (entries may be keys or {file: [keys]} mappings)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    keys: set[str] = set()
    for item in stages[stage].get("params", []):
        if isinstance(item, dict):
            for v in item.values():
                keys.update(v)
        else:
            keys.add(item)
    return keys


def recorded(func: Callable[[PipelineConfig], object], cfg: PipelineConfig) -> set[str]:
    rec = RecordingConfig(cfg)
    func(rec)  # type: ignore[arg-type]  # duck-typed: stages only read attributes
    return rec.accessed


def _demo_cfg(tmp_path: Path) -> PipelineConfig:
    from visiontune.data.demo import generate_demo

    raw = tmp_path / "raw"
    if not raw.exists():
        generate_demo(raw, n=12, seed=1)
    return from_dict({"data": {"raw_dir": str(raw), "work_dir": str(tmp_path / "work"), "max_failure_ratio": 0.5}})


def _run_validate(tmp_path: Path) -> set[str]:
    from visiontune.data.validate import validate_stage

    return recorded(validate_stage, _demo_cfg(tmp_path))


def _run_normalize(tmp_path: Path) -> set[str]:
    from visiontune.data.normalize import normalize_stage
    from visiontune.data.validate import validate_stage

    cfg = _demo_cfg(tmp_path)
    validate_stage(cfg)
    return recorded(normalize_stage, cfg)


def _run_convert(tmp_path: Path) -> set[str]:
    from visiontune.data.convert import convert_stage
    from visiontune.data.normalize import normalize_stage
    from visiontune.data.validate import validate_stage

    cfg = _demo_cfg(tmp_path)
    validate_stage(cfg)
    normalize_stage(cfg)
    return recorded(convert_stage, cfg)


# stage name in dvc.yaml -> runner(tmp_path) returning the set of `section.key` the stage read.
STAGE_RUNNERS: dict[str, Callable[[Path], set[str]]] = {
    "validate": _run_validate,
    "normalize": _run_normalize,
    "convert": _run_convert,
}


@pytest.mark.parametrize("stage", sorted(STAGE_RUNNERS))
def test_dvc_params_equal_keys_read(stage, tmp_path):
    read = STAGE_RUNNERS[stage](tmp_path)
    declared = dvc_stage_params(stage)
    assert read == declared, (
        f"dvc.yaml stage {stage!r}: reads but does not declare {sorted(read - declared)}; "
        f"declares but does not read {sorted(declared - read)}"
    )


@pytest.mark.parametrize("stage", ["validate", "normalize", "convert"])
def test_module_params_constant_matches_dvc_yaml(stage):
    """The Prefect cache keys use each data module's PARAMS; it must be the dvc.yaml list too."""
    import importlib

    module = importlib.import_module(f"visiontune.data.{stage}")
    assert set(module.PARAMS) == dvc_stage_params(stage)


@pytest.mark.parametrize("stage", ["train", "evaluate", "register"])
def test_model_stage_params_constant_matches_dvc_yaml(stage):
    """The model stages' PARAMS (checked against what each stage reads in tests/pipeline) equal dvc.yaml's
    lists, which the Prefect cache keys of tasks/model.py use too."""
    import importlib

    module = importlib.import_module(f"visiontune.pipeline.{stage}")
    assert set(module.PARAMS) == dvc_stage_params(stage)
