"""The align stage: off it hands the SFT adapter on (evaluate and register behave as without it); on, GRPO
or DPO aligns the adapter, tracked in the training run, and evaluate and register take the aligned one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _tiny_grpo(**extra):
    return {"method": "grpo", "split": "test", "rewards": ["cer", "format"], "num_generations": 4,
            "per_device_train_batch_size": 8, "max_steps": 2, "max_completion_length": 4, "logging_steps": 1,
            "learning_rate": 1e-2, **extra}


def test_off_hands_the_sft_adapter_on(make_cfg, start_training_run, assets, project):
    from visiontune import stages
    from visiontune.data.io import hash_tree
    from visiontune.pipeline.align import align_stage
    from visiontune.pipeline.tracking import read_run_file
    from visiontune.stages import RecordingConfig

    cfg = make_cfg()
    run_id = start_training_run(cfg, assets["adapter"], assets["base"])  # runs align (off) once
    recorded = RecordingConfig(cfg)
    result = align_stage(recorded)
    assert recorded.accessed == set(stages.get("align").params)  # off reads what on reads: DVC's params are fixed
    handoff = read_run_file(cfg.align.output_dir)
    assert handoff == {**read_run_file(cfg.train.output_dir), "adapter_dir": assets["adapter"],
                       "adapter_sha256": hash_tree([assets["adapter"]]), "align_method": "none",
                       "sft_adapter_dir": assets["adapter"]}
    assert result["adapter_dir"] == assets["adapter"] and result["mlflow_run_id"] == run_id
    assert sorted(p.name for p in Path(cfg.align.output_dir).iterdir()) == ["run.json"]


def test_grpo_aligns_the_adapter_that_evaluate_and_register_take(make_cfg, start_training_run, write_metrics, assets,
                                                                 project):
    import mlflow

    from visiontune import stages
    from visiontune.data.io import hash_tree
    from visiontune.pipeline.align import align_stage
    from visiontune.pipeline.evaluate import evaluate_stage
    from visiontune.pipeline.register import register_stage
    from visiontune.stages import RecordingConfig

    run_id = start_training_run(make_cfg(), assets["adapter"], assets["base"])
    cfg = make_cfg(align=_tiny_grpo(importance_sampling_level="sequence", loss_type="dr_grpo"))
    recorded = RecordingConfig(cfg)
    result = align_stage(recorded)
    assert recorded.accessed == set(stages.get("align").params)
    aligned = Path(cfg.align.output_dir) / "adapter"
    assert result["adapter_dir"] == str(aligned) and result["global_step"] == 2 and result["fused_engine"]
    assert (aligned / "adapter_config.json").is_file() and not (aligned / "ref").exists()  # TRL's frozen copy stays out
    assert hash_tree([aligned]) != hash_tree([assets["adapter"]])

    client = mlflow.MlflowClient(cfg.tracking.uri)
    data = client.get_run(run_id).data
    for name in ("align/reward", "align/rewards/cer/mean", "align/rewards/answer_format/mean", "align/kl",
                 "align/completions/mean_length", "align/entropy"):
        assert name in data.metrics, (name, sorted(data.metrics))
    assert [m.step for m in client.get_metric_history(run_id, "align/reward")] == [1, 2]
    assert data.tags["align_method"] == "grpo" and data.metrics["train_loss"] == 1.0  # the training run itself
    table = json.loads(Path(client.download_artifacts(run_id, "align/samples.json", str(project))).read_text())
    assert {"step", "answer", "completion", "cer", "answer_format"} <= set(table["columns"]) and table["data"]

    summary = evaluate_stage(cfg)
    assert summary["mlflow_run_id"] == run_id
    metrics = json.loads(Path(cfg.eval.metrics_file).read_text())
    assert metrics["adapter_sha256"] == hash_tree([aligned])  # the aligned adapter was scored
    assert metrics["sft_adapter_sha256"] == hash_tree([assets["adapter"]])  # ... and the SFT one it started from
    record = register_stage(cfg)
    assert record["run_id"] == run_id  # its scores match the hand-off: registered
    assert record["aligned_vs_sft"]["sft"] == metrics["sft"]["cer"]  # the gate records aligned vs SFT


def test_dpo_builds_pairs_from_sft_samples(make_cfg, start_training_run, assets):
    import mlflow

    from visiontune.pipeline.align import align_stage

    cfg = make_cfg(align={"method": "dpo", "split": "test", "rewards": ["cer"], "num_generations": 4,
                          "per_device_train_batch_size": 2, "max_steps": 2, "max_completion_length": 4,
                          "logging_steps": 1, "temperature": 1.5, "beta": 0.1})
    run_id = start_training_run(make_cfg(), assets["adapter"], assets["base"])
    align_stage(cfg)
    handoff = json.loads((Path(cfg.align.output_dir) / "run.json").read_text())
    assert handoff["align_method"] == "dpo" and handoff["adapter_dir"].endswith("adapter")
    assert handoff["sft_adapter_dir"] == assets["adapter"]
    metrics = mlflow.MlflowClient(cfg.tracking.uri).get_run(run_id).data.metrics
    assert {"align/rewards/accuracies", "align/rewards/margins", "align/rewards/chosen"} <= set(metrics)


def test_bad_settings_say_what_to_change(make_cfg, start_training_run, assets):
    from visiontune.config import ConfigError, from_dict
    from visiontune.pipeline.align import align_stage

    with pytest.raises(ConfigError, match="align.method='ppo' is out of range"):
        from_dict({"align": {"method": "ppo"}})
    cfg = make_cfg()
    with pytest.raises(FileNotFoundError, match="run the train stage first"):
        align_stage(cfg)
    start_training_run(cfg, assets["adapter"], assets["base"])
    with pytest.raises(ValueError, match="unknown reward 'bleu'"):
        align_stage(make_cfg(align=_tiny_grpo(rewards=["bleu"])))
