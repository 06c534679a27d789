"""Evaluation during training: val_* curves in the MLflow run, best-adapter selection, resume, settings."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_train import _adapter_tensors, _cfg  # tests/pipeline/test_train.py
from visiontune.config import from_dict
from visiontune.pipeline import eval_callback
from visiontune.pipeline.eval_callback import BEST_DIR, GenerationEvalCallback, eval_callbacks, generation_scores
from visiontune.pipeline.evaluate import compute_metrics


def test_scores_are_the_evaluate_stages():
    pairs = [("123", "124"), ("", "xy"), (" ab c \n", "ab c"), ("7", "7"), ("12345", "12")]
    preds, refs = zip(*pairs)
    expected = compute_metrics(preds, refs)
    got = generation_scores(preds, refs)
    assert got["cer"] == pytest.approx(expected["cer"]) and got["exact_match"] == pytest.approx(expected["exact_match"])


def test_curves_in_mlflow_and_the_best_adapter_is_kept(tmp_path, demo_work_dir, tiny_model_dir, monkeypatch):
    """Evaluations at steps 2, 4, 6 score (scripted) CER 0.5, 0.3, 0.9: the adapter saved is step 4's."""
    import mlflow

    from visiontune.pipeline.train import train_stage

    scripted = iter([0.5, 0.3, 0.9])
    real = generation_scores
    monkeypatch.setattr(eval_callback, "generation_scores",
                        lambda p, r: {**real(p, r), "cer": next(scripted)})
    monkeypatch.chdir(tmp_path)
    cfg = from_dict(_cfg(tmp_path, demo_work_dir, tiny_model_dir("qwen2_5_vl"), max_steps=6, save_steps=2,
                         eval_every_steps=2, eval_samples=3, eval_max_new_tokens=3, select_best="cer"))
    record = train_stage(cfg)

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    run_id = record["mlflow_run_id"]
    history = client.get_metric_history(run_id, "val_cer")
    assert [(m.step, m.value) for m in history] == [(2, 0.5), (4, 0.3), (6, 0.9)]
    assert [m.step for m in client.get_metric_history(run_id, "val_exact_match")] == [2, 4, 6]
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "val_seconds"))
    tags = client.get_run(run_id).data.tags
    assert (tags["select_best"], tags["best_step"], tags["selected_step"], tags["best_val_cer"]) == ("cer", "4", "4", "0.3")

    out = Path(cfg.train.output_dir)
    logged = [h for h in json.loads((out / "log_history.json").read_text()) if "val_cer" in h]
    assert [h["step"] for h in logged] == [2, 4, 6]
    final, step4, step6 = (_adapter_tensors(p) for p in (out / "adapter", out / "checkpoint-4", out / "checkpoint-6"))
    assert json.loads((out / BEST_DIR / "best.json").read_text())["step"] == 4
    for k in final:
        torch.testing.assert_close(final[k], step4[k], rtol=0, atol=0)
    assert any(not torch.equal(final[k], step6[k]) for k in final), "the last step's adapter was kept"


def test_a_resumed_run_keeps_its_curve_and_a_fresh_one_drops_a_stale_best(tmp_path):
    (tmp_path / BEST_DIR).mkdir()
    cb = GenerationEvalCallback([], [], None, every_steps=2, max_new_tokens=2, batch_size=1, rule=None,
                                output_dir=tmp_path, select_best="exact_match")
    entries = [{"step": 2, "val_cer": 0.4, "val_exact_match": 0.5}, {"step": 4, "val_cer": 0.2, "val_exact_match": 0.5}]
    cb.on_train_begin(None, SimpleNamespace(global_step=4, log_history=[{"loss": 1.0, "step": 2}, *entries]), None)
    assert cb.history == entries and cb.best() is entries[0]  # equals do not replace the first best
    assert (tmp_path / BEST_DIR).exists()
    cb.on_train_begin(None, SimpleNamespace(global_step=0, log_history=[]), None)
    assert cb.history == [] and not (tmp_path / BEST_DIR).exists()


@pytest.mark.parametrize("train, match", [
    ({"select_best": "bleu"}, "select_best='bleu'"),
    ({"select_best": "cer", "eval_every_steps": 0}, "eval_every_steps > 0"),
    ({"eval_every_steps": -1}, "eval_every_steps=-1"),
])
def test_bad_settings_say_what_to_use(tmp_path, train, match):
    with pytest.raises(ValueError, match=match):
        eval_callbacks(from_dict({"train": train}), None, tmp_path)


def test_off_when_every_steps_is_zero(tmp_path):
    assert eval_callbacks(from_dict({"train": {"eval_every_steps": 0}}), None, tmp_path) == []
