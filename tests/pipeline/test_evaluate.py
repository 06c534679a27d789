"""Evaluate stage: metric values on hand-checkable strings and the whole stage against a tiny model +
adapter + dataset + real MLflow run (SQLite store in tmp_path). Generation itself: tests/test_inference.py."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from visiontune.pipeline.evaluate import (
    METRICS,
    compute_metrics,
    evaluate_stage,
    sample_cer,
)


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
    assert same == {"exact_match": 1.0, "cer": 0.0, "chrf": pytest.approx(100.0), "rougeL": 1.0}
    assert compute_metrics(["zzzz"], ["the cat sat on the mat"])["chrf"] == 0.0
    assert compute_metrics(["日本 語"], ["日本 語"])["rougeL"] == 1.0  # non-Latin words are tokens too
    assert sample_cer("12345", "12") == pytest.approx(3 / 2)  # insertions: CER can exceed 1


def test_metrics_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="need at least one pair"):
        compute_metrics([], [])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="reference 1 is empty"):
        compute_metrics(["a", "b"], ["a", "  "])


def test_evaluate_stage_end_to_end(make_cfg, start_training_run, assets, project):
    import mlflow

    from visiontune import stages
    from visiontune.stages import RecordingConfig

    cfg = make_cfg()
    run_id = start_training_run(cfg, assets["adapter"], assets["base"])
    recorded = RecordingConfig(cfg)
    summary = evaluate_stage(recorded)
    assert recorded.accessed == set(stages.get("evaluate").params)  # the registry lists exactly what it reads

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

    client = mlflow.MlflowClient(cfg.tracking.uri)
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


def test_extra_sets_are_scored_base_vs_finetuned_with_the_splits_instruction(make_cfg, start_training_run, assets,
                                                                              project):
    """eval.extra_sets: a second held-out set (the demo's layout-shifted handwriting) scored beside the split,
    base vs fine-tuned, with the split's instruction; the per-set figures equal scoring the same rows alone."""
    import mlflow

    held = project / "held"
    (held / "images").mkdir(parents=True)
    refs = ["12", "6789", "42"]
    lines = []
    for i, (img, ref) in enumerate(zip(assets["images"][:3], refs)):
        (held / "images" / f"{i}.png").write_bytes(img.read_bytes())
        lines.append(json.dumps({"image": f"images/{i}.png", "text": ref}))
    (held / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    cfg = make_cfg(eval={"extra_sets": {"heldout": str(held / "annotations.jsonl")}})
    run_id = start_training_run(cfg, assets["adapter"], assets["base"])
    summary = evaluate_stage(cfg)
    metrics = json.loads((project / "outputs/eval/metrics.json").read_text())
    one = metrics["sets"]["heldout"]
    assert one["n_samples"] == 3 and set(one["finetuned"]) == set(METRICS) and set(one["base"]) == set(METRICS)
    assert summary["heldout_cer"] == one["finetuned"]["cer"]
    assert metrics["n_samples"] == 5  # the split itself is unchanged

    from visiontune.pipeline.evaluate import load_eval_samples, load_extra_set

    test = load_eval_samples(cfg.data.work_dir + "/dataset", "test", 0)
    rows = load_extra_set("heldout", held / "annotations.jsonl", test[0], 0)
    assert rows[0]["messages"][0]["content"][1]["text"] == test[0]["messages"][0]["content"][1]["text"]
    assert [r["messages"][1]["content"][0]["text"] for r in rows] == refs
    logged = mlflow.MlflowClient(cfg.tracking.uri).get_run(run_id).data.metrics
    assert logged["eval_heldout_cer"] == pytest.approx(one["finetuned"]["cer"])
    assert logged["eval_heldout_base_exact_match"] == pytest.approx(one["base"]["exact_match"])

    with pytest.raises(FileNotFoundError, match=r"eval.extra_sets\['gone'\].*does not exist"):
        evaluate_stage(make_cfg(eval={"extra_sets": {"gone": str(project / "nope.jsonl")}}))


def test_aligned_model_is_scored_against_its_sft_model_and_the_gate_records_it(make_cfg, start_training_run, assets,
                                                                                project):
    """An aligned hand-off (align_method != none): evaluate scores base, aligned and SFT adapters on the same
    samples in one model load; register records aligned-vs-SFT beside the champion comparison."""
    import shutil
    from pathlib import Path

    import mlflow
    from safetensors.torch import load_file, save_file

    from visiontune import stages
    from visiontune.data.io import hash_tree
    from visiontune.pipeline.register import register_stage
    from visiontune.pipeline.tracking import read_run_file, write_run_file
    from visiontune.stages import RecordingConfig

    # A second, different adapter stands in for the aligned one (GRPO/DPO themselves: tests/pipeline/test_align.py).
    aligned = project / "aligned-adapter"
    shutil.copytree(assets["adapter"], aligned)
    weights = load_file(aligned / "adapter_model.safetensors")
    save_file({k: -v if "lora_B" in k else v for k, v in weights.items()}, aligned / "adapter_model.safetensors")
    cfg = make_cfg()
    run_id = start_training_run(cfg, assets["adapter"], assets["base"])
    evaluate_stage(cfg)  # the SFT model alone (align off): what its figures must be in the three-way evaluation
    with open(cfg.eval.predictions_file, newline="") as fh:
        sft_alone = [r["prediction"] for r in csv.DictReader(fh)]
    sft_alone_metrics = json.loads(Path(cfg.eval.metrics_file).read_text())["finetuned"]
    handoff = read_run_file(cfg.align.output_dir)
    write_run_file(cfg.align.output_dir, {**handoff, "adapter_dir": str(aligned),
                                          "adapter_sha256": hash_tree([aligned]), "align_method": "grpo"})

    recorded = RecordingConfig(cfg)
    summary = evaluate_stage(recorded)
    assert recorded.accessed == set(stages.get("evaluate").params)  # the SFT adapter comes from run.json, not params
    metrics = json.loads(Path(cfg.eval.metrics_file).read_text())
    assert set(metrics["sft"]) == set(METRICS) and metrics["adapter_sha256"] == hash_tree([aligned])
    assert metrics["sft_adapter_sha256"] == hash_tree([assets["adapter"]])
    for k in METRICS:
        assert metrics["delta_sft"][k] == pytest.approx(metrics["finetuned"][k] - metrics["sft"][k])
    assert summary["sft_cer"] == metrics["sft"]["cer"]
    with open(cfg.eval.predictions_file, newline="") as fh:
        rows = list(csv.DictReader(fh))
    # The SFT figures are those of the SFT adapter on the same samples: equal to evaluating it as the hand-off
    # (the second adapter loaded beside the aligned one and switched to answers as the SFT adapter alone does).
    assert [r["sft_prediction"] for r in rows] == sft_alone and metrics["sft"] == sft_alone_metrics
    assert [r["sft_prediction"] for r in rows] != [r["prediction"] for r in rows]  # two different models answered
    logged = mlflow.MlflowClient(cfg.tracking.uri).get_run(run_id).data.metrics
    for k in METRICS:
        assert logged[f"eval_sft_{k}"] == pytest.approx(metrics["sft"][k])
        assert logged[f"eval_delta_sft_{k}"] == pytest.approx(metrics["delta_sft"][k])

    # Register: the champion rule is unchanged (first version: champion); the record compares with the SFT model.
    # Make the aligned model worse than its SFT model on the primary metric, as the gate must then say.
    metrics["finetuned"]["cer"] = metrics["sft"]["cer"] + 0.25
    Path(cfg.eval.metrics_file).write_text(json.dumps(metrics))
    record = register_stage(cfg)
    assert record["decision"] == "champion" and record["align_method"] == "grpo"
    assert record["aligned_vs_sft"] == {"metric": "cer", "aligned": pytest.approx(metrics["sft"]["cer"] + 0.25),
                                        "sft": metrics["sft"]["cer"], "delta": pytest.approx(0.25), "verdict": "worse"}
    assert record["sft_scores"] == metrics["sft"]
    assert "aligned model is worse than its own SFT model" in record["reason"]
    logged_row = json.loads((project / "mlflow" / "promotions.jsonl").read_text().splitlines()[-1])
    assert logged_row["aligned_vs_sft"]["verdict"] == "worse" and logged_row["sft_scores"] == metrics["sft"]
    tags = mlflow.MlflowClient(cfg.tracking.uri).get_model_version(cfg.register.model_name, record["version"]).tags
    assert tags["decision_aligned_vs_sft"] == "worse"
