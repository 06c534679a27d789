"""The pre-flight token budget: every sample measured once, before training, by the collator's own rule."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from visiontune import FastVisionModel, VisionDataCollator
from visiontune.budget import HISTOGRAM_FILE, preflight, token_budget
from visiontune.collator import SampleTooLongError
from visiontune.config import from_dict
from visiontune.testing import ARCHITECTURES


def _sample(w: int, h: int, answer: str = "305", images: int = 1) -> dict:
    rng = np.random.RandomState(w + h)
    content = [{"type": "image", "image": Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))}] * images
    return {"messages": [
        {"role": "user", "content": [*content, {"type": "text", "text": "Read."}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}


@pytest.fixture(scope="module")
def qwen(tiny_model_dir):
    return FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing=False)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_measures_each_sample_as_the_collator_encodes_it_alone(arch, tiny_model_dir):
    """Chunks mix text-only, one- and two-image rows: each count equals the sample's own batch."""
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir(arch), use_gradient_checkpointing=False)
    collator = VisionDataCollator(model, processor)
    samples = [_sample(90, 60, images=0), _sample(90, 60), _sample(60, 90, " ".join(["7"] * 30), images=2),
               _sample(56, 56, images=0)]
    report = token_budget(collator, samples, chunk_size=3, progress=False)
    alone = [collator([s]) for s in samples]
    assert report.lengths == [int(b["attention_mask"].sum()) for b in alone]
    assert report.image_ends[0] == report.image_ends[3] == 0 and 0 < report.image_ends[1] < report.lengths[1]


def test_verdicts_follow_the_collators_rule(qwen):
    model, processor = qwen
    small, long_text, big_image = _sample(56, 56), _sample(56, 56, " ".join(["12345"] * 40)), _sample(448, 448)
    free = token_budget(VisionDataCollator(model, processor, resize=None), [small, long_text, big_image], progress=False)
    limit = free.lengths[0] + 5  # the small sample fits, the long answer is cut, the big image cannot be
    assert free.image_ends[2] > limit and free.image_ends[1] < limit < free.lengths[1]
    collator = VisionDataCollator(model, processor, resize=None, max_seq_length=limit)
    report = token_budget(collator, [small, long_text, big_image], progress=False)
    assert report.verdicts == ["fit", "truncate", "drop"] and report.kept == [0, 1]
    summary = report.summary()
    assert (summary["samples"], summary["fit"], summary["truncated"], summary["dropped"]) == (3, 1, 1, 1)
    assert summary["tokens_max"] == max(report.lengths) and summary["tokens_min"] == min(report.lengths)
    # the collator, batch by batch, keeps and cuts exactly those
    with pytest.warns(UserWarning, match="dropped a sample"):
        batch = collator([small, long_text, big_image])
    assert batch["input_ids"].shape == (2, limit) and (collator.dropped, collator.truncated) == (1, 1)


def test_preflight_drops_reports_and_logs_to_mlflow(qwen, tmp_path):
    import mlflow
    from datasets import Dataset

    model, processor = qwen
    samples = [_sample(56, 56), _sample(448, 448), _sample(60, 90)]
    collator = VisionDataCollator(model, processor, resize=None, max_seq_length=40)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        kept, summary = preflight(collator, samples, tmp_path / "out")
    assert kept == [samples[0], samples[2]] and summary["dropped"] == 1
    assert json.loads((tmp_path / "out" / "token_budget.json").read_text()) == summary
    assert (tmp_path / "out" / HISTOGRAM_FILE).stat().st_size > 0
    logged = mlflow.get_run(run.info.run_id)
    assert logged.data.metrics["budget/dropped"] == 1 and logged.data.metrics["budget/samples"] == 3
    assert {HISTOGRAM_FILE, "token_budget.json"} <= {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    # a datasets.Dataset comes back as a Dataset of the kept rows; nothing fits: an error before training
    data = Dataset.from_list([{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi " * n}]},
                                            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]}
                              for n in (1, 2)])
    rows, _ = preflight(collator, data, tmp_path / "out2", mlflow_active=False)
    assert isinstance(rows, Dataset) and len(rows) == 2
    with pytest.raises(SampleTooLongError, match="all 1 training samples"):
        preflight(collator, [samples[1]], tmp_path / "out3", mlflow_active=False)


def test_train_runs_the_budget_before_the_first_step(tmp_path, tiny_model_dir):
    """A sample whose image cannot fit is left out before training: no mid-training drop warning."""
    from visiontune.pipeline import train as train_mod

    cfg = from_dict({"model": {"name_or_path": tiny_model_dir("qwen2_5_vl"), "max_seq_length": 40},
                     "lora": {"r": 4, "lora_alpha": 8}, "images": {"resize": None},
                     "train": {"max_steps": 2, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2,
                               "warmup_steps": 0, "eval_every_steps": 0}})
    rows = [_sample(56, 56), _sample(448, 448), _sample(60, 90), _sample(56, 56, "12")]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dropped a sample.*")
        result = train_mod.train(cfg, rows, tmp_path / "out", mlflow_active=False)
    assert result["token_budget"]["dropped"] == 1 and result["dropped_samples"] == 1
    assert result["global_step"] == 2 and (tmp_path / "out" / HISTOGRAM_FILE).exists()
