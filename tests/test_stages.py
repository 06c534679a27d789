"""The stage registry is the one home of every stage: dvc.yaml, settings read, code deps, cache keys.

* ``dvc.yaml`` is exactly what the registry generates.
* Each stage reads exactly the settings its entry lists (run under :class:`RecordingConfig`; the model
  stages are checked the same way in tests/pipeline), and only from its own section, the shared sections
  and the output locations of stages upstream of it.
* Code deps come from imports: the collator, the model modules and the kernels are deps of the stages
  that import them. The slow test shows that after an edit to such a file ``dvc status`` and the
  Prefect cache keys (:func:`visiontune.stages.fingerprint`) name the same stages.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
from datafixtures import sh  # noqa: E402  (tests/data/datafixtures.py)

from visiontune import stages
from visiontune.config import PipelineConfig, from_dict, to_yaml
from visiontune.stages import RecordingConfig

REPO = Path(__file__).resolve().parents[1]

# Which sections belong to which stage; everything else a stage reads must be shared or an upstream output.
OWN_SECTIONS = {"demo-data": {"demo"}, "tiny-model": set(), "pretrain": {"pretrain"}, "validate": {"validate"}, "normalize": {"normalize"},
                "convert": {"convert"}, "train": {"train", "lora", "collator"}, "align": {"align"},
                "evaluate": {"eval"}, "register": {"register"}, "export": {"export"}, "report": {"report"}}
SHARED_SECTIONS = {"data", "model", "images", "tracking"}


def test_dvc_yaml_is_generated_from_the_registry():
    assert (REPO / "dvc.yaml").read_text() == stages.dvc_yaml(), "run `visiontune dvc-yaml` and commit dvc.yaml"


def test_every_stage_has_a_cli_command_and_a_task():
    from visiontune.cli import build_parser
    from visiontune.tasks.stages import TASKS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {s.name for s in stages.STAGES} <= set(sub.choices)
    assert set(TASKS) == {s.name for s in stages.pipeline()}
    assert [s.name for s in stages.pipeline()] == ["validate", "normalize", "convert", "train", "align", "evaluate",
                                                   "register", "export", "report"]


def _upstream_output_keys(stage: stages.Stage) -> set[str]:
    keys: set[str] = set()
    for s in stages.pipeline():
        if s.name == stage.name:
            break
        keys |= {k for o in s.outs for k in stages._TEMPLATE.findall(o.path)}
    return keys


@pytest.mark.parametrize("stage", [s.name for s in stages.STAGES])
def test_a_stage_reads_its_own_section_shared_ones_and_upstream_outputs(stage):
    spec = stages.get(stage)
    cfg = PipelineConfig()
    for key in spec.params:
        cfg.get(key)  # every listed key exists
        section = key.split(".")[0]
        assert section in OWN_SECTIONS[stage] | SHARED_SECTIONS or key in _upstream_output_keys(spec), (
            f"stage {stage!r} reads {key}: neither its own section, a shared one, nor an upstream output")
    assert stages.template_keys(spec) <= set(spec.params), "a path template names a setting the stage does not list"
    assert len(set(spec.params)) == len(spec.params), "a key is listed twice"


def test_code_deps_follow_imports():
    train, evaluate = stages.code_files(stages.get("train")), stages.code_files(stages.get("evaluate"))
    assert {"visiontune/collator.py", "visiontune/models/fast_vision.py", "kernels/patch.py", "kernels/lora.py",
            "visiontune/pipeline/train.py"} <= set(train)
    assert {"visiontune/models/fast_vision.py", "kernels/patch.py", "visiontune/inference.py"} <= set(evaluate)
    assert "visiontune/pipeline/pyfunc_model.py" in stages.code_files(stages.get("register"))
    for stage in ("validate", "normalize", "convert"):  # the data stages load no model code
        deps = stages.code_files(stages.get(stage))
        assert not any(d.startswith("kernels/") or d.endswith("fast_vision.py") for d in deps), (stage, deps)
        assert f"visiontune/data/{stage}.py" in deps
    for spec in stages.STAGES:
        assert not set(stages.code_files(spec)) & set(stages._NOT_CODE_DEPS)
    # a C extension counts by its source, whether or not this machine compiled it
    assert {"visiontune/data/_pixels.c", "visiontune/data/resample.py"} <= set(stages.code_files(stages.get("normalize")))


def test_fingerprint_changes_with_params_of_the_stage_only(tmp_path):
    cfg = from_dict({"data": {"raw_dir": str(tmp_path / "raw"), "work_dir": str(tmp_path / "w")}})
    other = from_dict({"data": {"raw_dir": str(tmp_path / "raw"), "work_dir": str(tmp_path / "w")},
                       "convert": {"instruction": "Read it."}})
    changed = {s.name for s in stages.pipeline() if stages.fingerprint(s, cfg) != stages.fingerprint(s, other)}
    assert changed == {"convert"}


def test_unknown_stage_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown stage 'trian'; stages are"):
        stages.get("trian")


# --------------------------------------------------------------------------------- settings each reads
def _demo_cfg(tmp_path: Path) -> PipelineConfig:
    from visiontune.data.demo import generate_demo

    raw = tmp_path / "raw"
    if not raw.exists():
        generate_demo(raw, n=12, seed=1)
    return from_dict({"data": {"raw_dir": str(raw), "work_dir": str(tmp_path / "work")},
                      "validate": {"max_failure_ratio": 0.5}})


def _reads(name: str, cfg: PipelineConfig) -> set[str]:
    rec = RecordingConfig(cfg)
    stages.get(name).function()(rec)
    return rec.accessed


def _run_validate(tmp_path: Path) -> set[str]:
    return _reads("validate", _demo_cfg(tmp_path))


def _run_normalize(tmp_path: Path) -> set[str]:
    cfg = _demo_cfg(tmp_path)
    stages.get("validate").function()(cfg)
    return _reads("normalize", cfg)


def _run_convert(tmp_path: Path) -> set[str]:
    cfg = _demo_cfg(tmp_path)
    for name in ("validate", "normalize"):
        stages.get(name).function()(cfg)
    return _reads("convert", cfg)


def _run_demo_data(tmp_path: Path) -> set[str]:
    return _reads("demo-data", from_dict({"data": {"raw_dir": str(tmp_path / "demo")}, "demo": {"samples": 10}}))


def _run_tiny_model(tmp_path: Path) -> set[str]:
    return _reads("tiny-model", from_dict({"model": {"name_or_path": str(tmp_path / "models" / "tiny-x"),
                                                     "tiny_architecture": "qwen2_vl", "tiny_size": "test"}}))


def _run_pretrain(tmp_path: Path) -> set[str]:  # a 2-step test-size run: builds, evaluates, records, logs
    return _reads("pretrain", from_dict({
        "pretrain": {"output_dir": str(tmp_path / "base"), "size": "test", "steps": 2, "batch_size": 2,
                     "eval_every": 2, "eval_samples": 2, "num_workers": 1, "device": "cpu"},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}))


def _run_export(tmp_path: Path) -> set[str]:  # formats [] (off): reads every setting, loads no model
    return _reads("export", from_dict({"export": {"output_dir": str(tmp_path / "export")}}))


# The model stages (train, evaluate, register; export with formats) are checked in tests/pipeline with their fixtures.
STAGE_RUNNERS: dict[str, Callable[[Path], set[str]]] = {
    "validate": _run_validate, "normalize": _run_normalize, "convert": _run_convert,
    "demo-data": _run_demo_data, "tiny-model": _run_tiny_model, "export": _run_export, "pretrain": _run_pretrain,
}


@pytest.mark.parametrize("stage", sorted(STAGE_RUNNERS))
def test_stage_reads_exactly_its_listed_settings(stage, tmp_path):
    read, declared = STAGE_RUNNERS[stage](tmp_path), set(stages.get(stage).params)
    assert read == declared, (f"stage {stage!r}: reads but does not list {sorted(read - declared)}; "
                              f"lists but does not read {sorted(declared - read)}")


# --------------------------------------------------------------------------------- both front doors
def _dvc_changed(repo: Path) -> set[str]:
    # The JSON is one line; DVC may add warnings around it (e.g. that the frozen pretrain stage is not checked).
    lines = [ln for ln in sh(repo, "dvc", "status", "--json").splitlines() if ln.startswith("{")]
    status = json.loads(lines[-1] if lines else "{}")
    return {name.split(":")[-1] for name in status if not name.endswith(".dvc")}


def _fingerprints(repo: Path, cfg: PipelineConfig) -> dict[str, str]:
    return {s.name: stages.fingerprint(s, cfg, code_root=repo) for s in stages.pipeline()}


@pytest.mark.slow
def test_full_pipeline_repro_noop_and_both_front_doors_agree_on_code_edits(tmp_path, monkeypatch):
    """All six stages of the real dvc.yaml through `dvc repro` (tiny settings), then a no-op re-run; then
    edits to the collator, a model module and a kernel: `dvc status` and the Prefect cache keys name the
    same stages, and exactly the stages that import the edited file."""
    from visiontune.data.demo import generate_demo

    repo = tmp_path / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    for folder in ("visiontune", "kernels"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # The frozen pretrain stage's output is committed (a fresh clone has it): dvc repro skips the stage, but
    # refuses to start if its output is missing.
    shutil.copytree(REPO / "models" / "visiontune-read-base", repo / "models" / "visiontune-read-base")
    cfg = PipelineConfig()
    cfg.train.max_steps, cfg.train.save_steps, cfg.train.logging_steps = 2, 2, 1
    cfg.eval.max_samples, cfg.eval.max_new_tokens, cfg.eval.grid_samples = 3, 3, 2
    cfg.register.input_example, cfg.register.max_new_tokens = False, 3
    (repo / "params.yaml").write_text(to_yaml(cfg))
    generate_demo(repo / "data" / "raw", n=30, seed=5)
    sh(repo, "dvc", "add", "-q", "data/raw")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the embedded store inside the temp repo

    names = [s.name for s in stages.pipeline()]
    out = sh(repo, "dvc", "repro")
    assert {s for s in names if f"Running stage '{s}'" in out} == set(names), out
    assert (repo / cfg.train.output_dir / "adapter").is_dir()
    assert (repo / cfg.register.promotions_log).is_file()
    assert "finetuned" in (repo / cfg.eval.metrics_file).read_text()
    again = sh(repo, "dvc", "repro")
    for s in names:
        assert f"Stage '{s}' didn't change, skipping" in again, again
    shown = sh(repo, "dvc", "plots", "show", "--json")
    assert "loss.json" in shown

    monkeypatch.chdir(repo)  # the config's relative paths are the repo's
    for edited in ("visiontune/collator.py", "visiontune/models/fast_vision.py", "kernels/lora.py",
                   "visiontune/data/normalize.py"):
        before = _fingerprints(repo, cfg)
        original = (repo / edited).read_text()
        (repo / edited).write_text(original + "\n# an edit\n")
        keys_changed = {n for n, fp in _fingerprints(repo, cfg).items() if fp != before[n]}
        importers = {s.name for s in stages.pipeline() if edited in stages.code_files(s)}
        assert keys_changed == _dvc_changed(repo) == importers, (edited, keys_changed, importers)
        (repo / edited).write_text(original)
        assert _dvc_changed(repo) == set()
