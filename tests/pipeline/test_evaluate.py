"""Evaluate stage: metric values on hand-checkable strings, batched generation, and the whole stage
against a tiny model + adapter + dataset + real MLflow run (SQLite store in tmp_path)."""

from __future__ import annotations

import base64
import csv
import json

import pytest
from PIL import Image

from visiontune.pipeline.evaluate import (
    METRICS,
    PARAMS,
    compute_metrics,
    decode_image_value,
    evaluate_stage,
    generate_answers,
    sample_cer,
    split_conversation,
)
from visiontune.testing import ARCHITECTURES


def test_metrics_on_hand_computed_strings():
    m = compute_metrics(["123"], ["124"])
    assert m["cer"] == pytest.approx(1 / 3)  # one substitution in three characters
    assert m["exact_match"] == 0.0
    # edits 1 + 2 (empty prediction: both chars deleted) + 0 over 3 + 2 + 4 reference chars; stripping first.
    m = compute_metrics(["123", "", " ab c \n"], ["124", "xy", "ab c"])
    assert m["cer"] == pytest.approx(3 / 9)
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["rougeL"] == pytest.approx(1 / 3)  # only the third pair shares words (F1 = 1)
    assert set(m) == set(METRICS)
    same = compute_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == {"exact_match": 1.0, "cer": 0.0, "bleu": pytest.approx(100.0), "rougeL": 1.0}
    assert compute_metrics(["zzzz"], ["the cat sat on the mat"])["bleu"] == 0.0
    assert compute_metrics(["日本 語"], ["日本 語"])["rougeL"] == 1.0  # non-Latin words are tokens too
    assert sample_cer("12345", "12") == pytest.approx(3 / 2)  # insertions: CER can exceed 1


def test_metrics_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="need at least one pair"):
        compute_metrics([], [])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="reference 1 is empty"):
        compute_metrics(["a", "b"], ["a", "  "])


def test_split_conversation_and_image_values(tmp_path):
    conv = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "q1", "image": None}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a1", "image": None}]},
        {"role": "user", "content": [{"type": "text", "text": "q2", "image": None}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a2", "image": None}]},
    ]}
    prompt, ref = split_conversation(conv["messages"])
    assert ref == "a2" and len(prompt) == 3  # multi-turn: earlier turns stay in the prompt
    assert split_conversation(conv["messages"][:1]) == (conv["messages"][:1], None)
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)
    assert decode_image_value(str(path)) == str(path)
    assert decode_image_value(base64.b64encode(path.read_bytes()).decode()) == path.read_bytes()
    with pytest.raises(FileNotFoundError, match="neither an existing file nor base64"):
        decode_image_value("no/such/file.png")


def test_batched_generation_matches_one_by_one(assets):
    """Left padding done right: a sample's greedy answer does not depend on its batch neighbours."""
    import datasets

    from visiontune.models.fast_vision import FastVisionModel

    samples = list(datasets.load_from_disk(assets["work_dir"] + "/dataset")["test"])
    model, processor = FastVisionModel.from_pretrained(assets["base"], use_gradient_checkpointing=False,
                                                       use_fused_kernels=False)
    kw = dict(max_new_tokens=4, resize="min", snap_to_patch_size=True, progress=False)
    batched = generate_answers(model, processor, samples, batch_size=5, **kw)
    single = generate_answers(model, processor, samples, batch_size=1, **kw)
    assert batched == single
    assert len(batched) == len(samples) and all(isinstance(a, str) for a in batched)
    assert processor.tokenizer.padding_side == "right"  # restored for training
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate_answers(model, processor, samples, max_new_tokens=0, batch_size=1)


def test_evaluate_stage_end_to_end(make_cfg, start_training_run, assets, project):
    import mlflow

    from visiontune.config import RecordingConfig

    cfg = make_cfg()
    run_id = start_training_run(cfg, assets["adapter"], assets["base"])
    recorded = RecordingConfig(cfg)
    summary = evaluate_stage(recorded)
    assert recorded.accessed == set(PARAMS)  # PARAMS (for dvc.yaml) lists exactly what the stage reads

    metrics = json.loads((project / "outputs/eval/metrics.json").read_text())
    assert metrics["n_samples"] == 5 and metrics["primary_metric"] == "cer" and metrics["split"] == "test"
    for which in ("base", "finetuned"):
        assert set(metrics[which]) == set(METRICS)
        assert 0.0 <= metrics[which]["exact_match"] <= 1.0 and metrics[which]["cer"] >= 0.0
    assert metrics["delta"]["cer"] == pytest.approx(metrics["finetuned"]["cer"] - metrics["base"]["cer"])
    assert summary["cer"] == metrics["finetuned"]["cer"] and summary["mlflow_run_id"] == run_id

    with open(project / "outputs/eval/predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["reference"] for r in rows] == ["12", "345", "6789", "0", "42"]
    assert {"index", "prediction", "base_prediction", "cer", "base_cer", "exact_match"} <= set(rows[0])
    # The per-sample file and the aggregate agree: corpus CER = sum(cer_i * len_i) / sum(len_i).
    total = sum(float(r["cer"]) * len(r["reference"]) for r in rows) / sum(len(r["reference"]) for r in rows)
    assert total == pytest.approx(metrics["finetuned"]["cer"], abs=1e-5)
    assert compute_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows]) == metrics["finetuned"]
    with Image.open(project / "outputs/eval/predictions.png") as grid:
        assert grid.width > 300 and grid.height > 200

    client = mlflow.MlflowClient(cfg.register.tracking_uri)
    logged = client.get_run(run_id).data.metrics
    for k in METRICS:
        assert logged[f"eval_{k}"] == pytest.approx(metrics["finetuned"][k])
        assert logged[f"eval_base_{k}"] == pytest.approx(metrics["base"][k])
    assert logged["train_loss"] == 1.0  # same run as training, not a new one
    names = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert names == {"eval/metrics.json", "eval/predictions.csv", "eval/predictions.png"}


def test_evaluate_stage_errors(make_cfg, start_training_run, assets):
    cfg = make_cfg(eval={"split": "holdout"})
    with pytest.raises(FileNotFoundError, match="run the train stage first"):
        evaluate_stage(cfg)
    start_training_run(cfg, assets["adapter"], assets["base"])
    with pytest.raises(ValueError, match="'holdout' is not a split"):
        evaluate_stage(cfg)
    with pytest.raises(ValueError, match="primary_metric='wer'"):
        evaluate_stage(make_cfg(eval={"primary_metric": "wer"}))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_on_every_architecture(tiny_model_dir, arch):
    """Every supported architecture's processor/chat template goes through the same generation path, and
    batching (left padding, different prompt and image sizes) does not change the greedy answers."""
    import numpy as np

    from visiontune.models.fast_vision import FastVisionModel

    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(40 + 8 * i, 56, 3) * 255).astype("uint8")) for i in range(3)]
    samples = [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": images[i]}, {"type": "text", "text": "Read" + " it" * i}]},
        {"role": "assistant", "content": [{"type": "text", "text": "1"}]},
    ]} for i in range(3)]
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir(arch), use_gradient_checkpointing=False,
                                                       use_fused_kernels=False)
    kw = dict(max_new_tokens=3, resize="min", snap_to_patch_size=True, progress=False)
    batched = generate_answers(model, processor, samples, batch_size=3, **kw)
    assert batched == generate_answers(model, processor, samples, batch_size=1, **kw)
    assert len(batched) == 3 and all(isinstance(a, str) for a in batched)
