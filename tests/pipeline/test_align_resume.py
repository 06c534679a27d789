"""The align stage resumes after kill -9: a GRPO run killed mid-way and run again with the same settings
continues from its last checkpoint (across an epoch of the prompts) and ends at the adapter, the step count,
the MLflow metrics and the sample table of an uninterrupted run, in the same MLflow run; with changed settings
it says what changed and starts over."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train import _adapter_tensors, kill_minus_9_at, lock_held_elsewhere  # tests/pipeline/test_train.py

# 5 prompts (the test split), 2 per step: 2 steps an epoch, so the kill after checkpoint-2 resumes in epoch 2
GRPO = {"method": "grpo", "split": "test", "rewards": ["cer"], "num_generations": 2, "per_device_train_batch_size": 4,
        "max_completion_length": 4, "max_steps": 4, "save_steps": 2, "logging_steps": 1, "learning_rate": 1e-2}
STEPS = [1, 2, 3, 4]


def _project(make_cfg, start_training_run, assets, root: Path, **align):
    """A finished training (MLflow run + run.json) under ``root`` and the params.yaml of a GRPO run on it."""
    from visiontune.config import to_yaml

    root.mkdir()
    where = dict(train={"output_dir": str(root / "train")},
                 tracking={"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "vt-test"})
    start_training_run(make_cfg(align={"output_dir": str(root / "align")}, **where), assets["adapter"], assets["base"])
    cfg = make_cfg(align={"output_dir": str(root / "align"), **GRPO, **align}, **where)
    (root / "params.yaml").write_text(to_yaml(cfg))
    return cfg


def _cli(root: Path, log: str) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("visiontune")
    with open(root / log, "wb") as err:  # a file, not a pipe: nobody reads while the run is being killed
        return subprocess.Popen([str(exe), "align", "--params", str(root / "params.yaml")], cwd=root,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def _finish(proc: subprocess.Popen, root: Path, log: str) -> str:
    proc.wait(timeout=600)
    err = (root / log).read_text(errors="replace")
    assert proc.returncode == 0, err[-3000:]
    return err


@pytest.mark.slow
def test_kill_minus_9_mid_grpo_resumes_to_the_same_adapter_in_the_same_run(make_cfg, start_training_run, assets,
                                                                            project):
    import mlflow

    straight = _project(make_cfg, start_training_run, assets, project / "straight")
    killed = _project(make_cfg, start_training_run, assets, project / "killed")
    _finish(_cli(project / "straight", "align.log"), project / "straight", "align.log")

    out = Path(killed.align.output_dir)
    kill_minus_9_at(_cli(project / "killed", "killed.log"), out / "checkpoint-2", out / "adapter")
    state = json.loads((out / "align_state.json").read_text())
    assert state["status"] == "running"

    err = _finish(_cli(project / "killed", "resumed.log"), project / "killed", "resumed.log")
    assert "resuming the interrupted grpo run from" in err
    record = json.loads((out / "run.json").read_text())
    assert record["adapter_dir"] == str(out / "adapter") and record["align_method"] == "grpo"
    assert json.loads((out / "align_state.json").read_text())["status"] == "finished"
    assert not list(out.glob("checkpoint-*"))  # done: nothing left to resume (nor to hash into DVC's cache)
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "reward" in h] == STEPS  # the step count went on

    a = _adapter_tensors(Path(straight.align.output_dir) / "adapter")
    b = _adapter_tensors(out / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs after resume")

    # one MLflow run, the training run, continued: each align step logged once, with the uninterrupted run's values
    runs = {}
    for name, cfg in (("straight", straight), ("killed", killed)):
        client = mlflow.MlflowClient(cfg.tracking.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("vt-test").experiment_id])
        assert run.info.status == "FINISHED"
        runs[name] = (client, run.info.run_id)
    assert record["mlflow_run_id"] == runs["killed"][1]
    for metric in ("align/reward", "align/kl", "align/loss"):
        want = [(m.step, m.value) for m in runs["straight"][0].get_metric_history(runs["straight"][1], metric)]
        got = sorted((m.step, m.value) for m in runs["killed"][0].get_metric_history(runs["killed"][1], metric))
        assert [s for s, _ in got] == STEPS, (metric, got)
        assert [v for _, v in got] == pytest.approx([v for _, v in sorted(want)], rel=1e-4, abs=1e-6), metric
    tables = [json.loads(Path(client.download_artifacts(run_id, "align/samples.json", str(project / n))).read_text())
              for n, (client, run_id) in runs.items()]
    steps = [sorted({row[t["columns"].index("step")] for row in t["data"]}) for t in tables]
    assert steps[0] == steps[1] == [s - 1 for s in STEPS]  # the table kept the rows from before the kill
    assert tables[0]["data"] == tables[1]["data"]


def test_changed_settings_start_over_and_say_what_changed(make_cfg, start_training_run, assets, project, caplog):
    """An interrupted run's checkpoint under other settings is not resumed: the warning names the setting,
    the stale checkpoints go, and the run starts at step 1."""
    from visiontune.pipeline import align as align_mod

    cfg = _project(make_cfg, start_training_run, assets, project / "p", max_steps=2, save_steps=1)
    out = Path(cfg.align.output_dir)
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
    settings = align_mod._settings(cfg)
    (out / "align_state.json").write_text(json.dumps({
        "status": "running", "fingerprint": "the fingerprint of other settings", "method": "grpo", "started_ms": 0,
        "settings": {**settings, "learning_rate": 0.5, "model": {**settings["model"], "max_seq_length": 64}}}))
    with caplog.at_level(logging.WARNING, logger="visiontune.pipeline.align"):
        result = align_mod.align_stage(cfg)
    message = caplog.text
    assert "not resuming the interrupted run" in message and "starts over" in message
    assert "learning_rate: 0.5 -> 0.01" in message and "model.max_seq_length: 64 -> " in message
    assert result["resumed_from"] is None and result["global_step"] == 2
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "reward" in h] == [1, 2]
    assert not (out / "checkpoint-1").exists()


def test_a_crashed_dpo_run_resumes_to_the_same_adapter(make_cfg, start_training_run, assets, project, monkeypatch):
    """DPO on pairs sampled from the SFT model: a run that fails after its checkpoint at step 2 resumes on the
    same pairs (kept beside the checkpoints) and reaches the adapter of an uninterrupted run."""
    from visiontune.pipeline import align as align_mod

    dpo = {"method": "dpo", "rewards": ["cer"], "num_generations": 4, "per_device_train_batch_size": 2,
           "max_steps": 4, "save_steps": 2, "max_completion_length": 4, "temperature": 1.5, "beta": 0.1}
    straight = _project(make_cfg, start_training_run, assets, project / "straight", **dpo)
    crashed = _project(make_cfg, start_training_run, assets, project / "crashed", **dpo)
    align_mod.align_stage(straight)

    real = align_mod._mlflow_callback

    def crashing(*args):  # the stage's MLflow callback, failing once step 3 is done
        callback = real(*args)

        class CrashAtStep3(type(callback)):
            def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
                if state.global_step == 3:
                    raise RuntimeError("simulated crash at step 3")

        callback.__class__ = CrashAtStep3
        return callback

    monkeypatch.setattr(align_mod, "_mlflow_callback", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        align_mod.align_stage(crashed)
    out = Path(crashed.align.output_dir)
    assert (out / align_mod.SAMPLED_ANSWERS).is_file() and not (out / "adapter").exists()
    monkeypatch.setattr(align_mod, "_mlflow_callback", real)
    result = align_mod.align_stage(crashed)
    assert result["resumed_from"].endswith("checkpoint-2") and result["global_step"] == 4
    a = _adapter_tensors(Path(straight.align.output_dir) / "adapter")
    b = _adapter_tensors(out / "adapter")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs after resume")


def test_a_second_align_on_a_busy_output_dir_fails_fast_and_touches_nothing(make_cfg, start_training_run, assets,
                                                                          project):
    """A live align run holds align.output_dir: another one must neither resume from its checkpoints nor
    delete them."""
    from visiontune.pipeline import align as align_mod

    cfg = _project(make_cfg, start_training_run, assets, project / "p")
    out = Path(cfg.align.output_dir)
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with lock_held_elsewhere(out / align_mod.LOCK_FILE):  # the live run
        t0 = time.perf_counter()
        with pytest.raises(align_mod.OutputDirBusyError, match="in use by another align run.*align.output_dir"):
            align_mod.align_stage(cfg)
        assert time.perf_counter() - t0 < 5
    assert (out / "checkpoint-2" / "trainer_state.json").exists() and (out / "run.json").exists()
