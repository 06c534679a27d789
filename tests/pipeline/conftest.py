"""Fixtures for the evaluate/register/pyfunc tests: a tiny model, a LoRA adapter, a small conversation
dataset and a real MLflow run in a SQLite store under ``tmp_path`` (no train stage, no mocks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

ARCH = "qwen2_5_vl"
INSTRUCTIONS = ["Read.", "Transcribe the handwritten digits in this image.", "What number is shown here, exactly?"]
ANSWERS = ["12", "345", "6789", "0", "42"]


def conversation(image: str, instruction: str, answer: str) -> dict[str, Any]:
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": instruction}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ], "answer": answer, "record_id": f"rec-{answer}"}


@pytest.fixture(scope="session")
def assets(tiny_model_dir, tmp_path_factory) -> dict[str, Any]:
    """Tiny base model dir, a saved LoRA adapter (+ processor) that changes outputs, and a DatasetDict on disk.

    Test rows have prompts of different lengths (so batches need padding) and 5 distinct small PNGs.
    """
    import datasets
    import torch

    from visiontune.models.fast_vision import FastVisionModel

    root = tmp_path_factory.mktemp("pipeline-assets")
    base = tiny_model_dir(ARCH)
    model, processor = FastVisionModel.from_pretrained(base, use_gradient_checkpointing=False, use_fused_kernels=False)
    peft = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, finetune_vision_layers=False, random_state=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero (adapter == identity); make it change the outputs
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    adapter = root / "adapter"
    peft.save_pretrained(adapter)
    processor.save_pretrained(adapter)

    rng = np.random.RandomState(0)
    img_dir = root / "images"
    img_dir.mkdir()
    rows = []
    for i, answer in enumerate(ANSWERS):
        path = img_dir / f"img{i}.png"
        Image.fromarray((rng.rand(40 + 8 * i, 56, 3) * 255).astype("uint8")).save(path)
        rows.append(conversation(str(path), INSTRUCTIONS[i % len(INSTRUCTIONS)], answer))
    work_dir = root / "data"
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                               "validation": datasets.Dataset.from_list(rows[:1]),
                               "test": datasets.Dataset.from_list(rows)})
    dd.save_to_disk(str(work_dir / "dataset"))
    return {"base": base, "adapter": str(adapter), "work_dir": str(work_dir), "images": sorted(img_dir.glob("*.png"))}


def _make_cfg(tmp: Path, assets: dict[str, Any], base: str | None = None, **sections: dict) -> Any:
    """A PipelineConfig for a project rooted at ``tmp`` (the test's cwd) with fast eval settings."""
    from visiontune.config import from_dict

    raw: dict[str, dict] = {
        "data": {"work_dir": assets["work_dir"]},
        "model": {"name_or_path": base or assets["base"], "use_fused_kernels": False},
        "train": {"output_dir": str(tmp / "outputs" / "train")},
        "eval": {"max_new_tokens": 4, "batch_size": 3, "max_samples": 0, "grid_samples": 4},
        "register": {"model_name": "vt-test", "input_example": False, "max_new_tokens": 4, "batch_size": 3},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "vt-test"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)


def _start_training_run(cfg: Any, adapter: str, base: str, tracking_uri: str | None = None) -> str:
    """Stand-in for the train stage's contract: a finished MLflow run + run.json, handed on to evaluate and
    register by the align stage (off). Returns the run id."""
    import mlflow

    from visiontune.pipeline.align import align_stage
    from visiontune.pipeline.tracking import setup_mlflow, write_run_file

    uri = tracking_uri or cfg.tracking.uri
    exp_id = setup_mlflow(uri, cfg.tracking.experiment)
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_param("model.name_or_path", base)
        mlflow.log_metric("train_loss", 1.0)
    write_run_file(cfg.train.output_dir, {"mlflow_run_id": run.info.run_id, "tracking_uri": uri,
                                          "experiment_id": exp_id, "adapter_dir": adapter, "base_model": base})
    align_stage(cfg)
    return run.info.run_id


def _write_metrics(cfg: Any, **finetuned: float) -> Path:
    """An evaluate-stage metrics file with the given fine-tuned scores (the register stage's input)."""
    from visiontune.data.io import hash_tree
    from visiontune.pipeline.tracking import read_run_file

    scores = {"exact_match": 0.0, "cer": 1.0, "chrf": 0.0, "rougeL": 0.0, **finetuned}
    run = read_run_file(cfg.train.output_dir)  # the metrics belong to this run's adapter, as evaluate writes them
    path = Path(cfg.eval.metrics_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"finetuned": scores, "base": scores, "primary_metric": cfg.eval.primary_metric,
                                "n_samples": 5, "mlflow_run_id": run["mlflow_run_id"],
                                "adapter_sha256": hash_tree([run["adapter_dir"]])}))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """cwd = tmp_path (the embedded store and relative outputs land there); MLflow state reset after."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # set_registry_uri exports $MLFLOW_REGISTRY_URI: setenv first, so teardown restores its state before the test
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def make_cfg(project, assets):
    """``make_cfg(base=None, **sections)`` -> PipelineConfig rooted at the test's tmp dir."""
    return lambda base=None, **sections: _make_cfg(project, assets, base, **sections)


@pytest.fixture
def start_training_run():
    """``start_training_run(cfg, adapter, base, tracking_uri=None)`` -> run id (run.json written)."""
    return _start_training_run


@pytest.fixture
def write_metrics():
    """``write_metrics(cfg, cer=..., ...)`` -> metrics file path."""
    return _write_metrics


@pytest.fixture(scope="session")
def demo_work_dir(tmp_path_factory) -> Path:
    """A work dir holding a small real conversation dataset, made by the real data stages from the demo
    generator (24 pages). Shared by the train and distributed tests; read-only to them."""
    from visiontune.config import from_dict
    from visiontune.data.convert import convert_stage
    from visiontune.data.demo import generate_demo
    from visiontune.data.normalize import normalize_stage
    from visiontune.data.validate import validate_stage

    root = tmp_path_factory.mktemp("demo-data")
    generate_demo(root / "raw", n=24, seed=5)
    cfg = from_dict({"data": {"raw_dir": str(root / "raw"), "work_dir": str(root / "work")},
                     "validate": {"max_failure_ratio": 0.5}})
    validate_stage(cfg)
    normalize_stage(cfg)
    convert_stage(cfg)
    return root / "work"


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, demo_work_dir, tiny_model_dir) -> dict[str, Any]:
    """train (evaluation every 2 steps) -> align (none) -> evaluate -> register -> report: demo data, tiny model.
    Shared by the report tests and the served-model test (tests/pipeline/test_pyfunc.py)."""
    from test_train import _cfg  # tests/pipeline/test_train.py
    from visiontune.config import from_dict
    import mlflow

    from visiontune.pipeline.align import align_stage
    from visiontune.pipeline.evaluate import evaluate_stage
    from visiontune.pipeline.register import register_stage
    from visiontune.pipeline.report import report_stage
    from visiontune.pipeline.train import train_stage
    from visiontune.stages import RecordingConfig

    root = tmp_path_factory.mktemp("report-run")
    raw = _cfg(root, demo_work_dir, tiny_model_dir("qwen2_5_vl"), max_steps=4, eval_every_steps=2, eval_samples=4,
               eval_max_new_tokens=4)
    out = root / "outputs"
    raw["eval"] = {"split": "train", "max_samples": 10, "max_new_tokens": 4, "batch_size": 10, "grid_samples": 0,
                   "metrics_file": str(out / "eval" / "metrics.json"), "predictions_file": str(out / "eval" / "p.csv")}
    raw["register"] = {"model_name": "vt-report", "input_example": False, "log_base_model": False, "max_new_tokens": 4,
                       "promotions_log": str(root / "promotions.jsonl")}
    raw["report"] = {"output_dir": str(out / "report")}
    raw["align"] = {"output_dir": str(out / "align")}  # method none: the SFT adapter handed on
    raw["images"] = {**raw["images"], "trim": True}  # the demo's rule: the served model must trim as evaluation did
    cfg = from_dict(raw)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        train_stage(cfg)
        align_stage(cfg)
        evaluate_stage(cfg)
        decision = register_stage(cfg)
        recording = RecordingConfig(cfg)
        result = report_stage(recording)
    while mlflow.active_run():
        mlflow.end_run()
    return {"cfg": cfg, "result": result, "read": recording.accessed, "decision": decision, "root": root,
            "metrics": json.loads(Path(cfg.eval.metrics_file).read_text())}
