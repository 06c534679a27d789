"""The train stage: MLflow tracking, the params it reads, and resume after kill -9."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml

from visiontune import stages
from visiontune.config import PipelineConfig, from_dict
from visiontune.stages import RecordingConfig
from visiontune.pipeline import train as train_mod


def _cfg(root: Path, work: Path, model_dir: str, **train_overrides) -> dict:
    train = {"output_dir": str(root / "out"), "max_steps": 4, "save_steps": 2, "logging_steps": 1,
             "per_device_train_batch_size": 2, "learning_rate": 5e-3, "warmup_steps": 0}
    train.update(train_overrides)
    return {
        "data": {"work_dir": str(work)},
        "model": {"name_or_path": model_dir, "max_seq_length": 512},
        "lora": {"r": 4, "lora_alpha": 8},
        "images": {"resize": [112, 56]},
        "train": train,
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "t"},
    }


def test_train_stage_tracks_in_mlflow_and_reads_exactly_params(tmp_path, demo_work_dir, tiny_model_dir, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    cfg = from_dict(_cfg(tmp_path, demo_work_dir, tiny_model_dir("qwen2_5_vl")))
    rec = RecordingConfig(cfg)
    record = train_mod.train_stage(rec)  # type: ignore[arg-type]
    assert rec.accessed == set(stages.get("train").params)

    out = Path(cfg.train.output_dir)
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "loss_curve.png").stat().st_size > 1000
    assert record["global_step"] == 4 and record["final_loss"] is not None
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(record["mlflow_run_id"])
    assert run.data.params["lora.r"] == "4" and run.data.params["train.max_steps"] == "4"
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_s"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 4
    # tokens/s measures steady training: the first step (kernel compilation, warm-up) is timed on its own.
    first = client.get_metric_history(run.info.run_id, "first_step_s")
    rates = client.get_metric_history(run.info.run_id, "tokens_per_s")
    assert [m.step for m in first] == [1] and first[0].value > 0
    assert sorted(m.step for m in rates) == [2, 3, 4] and all(m.value > 0 for m in rates)
    assert run.data.tags["dvc_data_md5"] and run.data.tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "loss_curve.png", "resolved_config.yaml"} <= artifacts
    adapter_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter_model.safetensors" in adapter_files and "processor_config.json" in adapter_files | {"processor_config.json"}


def test_train_accepts_a_plain_list(tmp_path, demo_work_dir, tiny_model_dir):
    from datasets import load_from_disk

    rows = list(load_from_disk(str(demo_work_dir / "dataset"))["train"])
    cfg = from_dict(_cfg(tmp_path, demo_work_dir, tiny_model_dir("qwen2_5_vl"), max_steps=2))
    result = train_mod.train(cfg, rows, tmp_path / "list-out", mlflow_active=False)
    assert result["global_step"] == 2 and Path(result["adapter_dir"]).exists()


def _adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _cli(params: Path, cwd: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("visiontune")
    return subprocess.Popen([str(exe), "train", "--params", str(params)], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def kill_minus_9_at(proc: subprocess.Popen, checkpoint: Path, adapter: Path) -> None:
    """SIGKILL ``proc``'s process group as soon as ``checkpoint`` is complete (its trainer_state.json written),
    and check it died of that, before writing its final ``adapter``."""
    deadline = time.time() + 600
    while time.time() < deadline and not (checkpoint / "trainer_state.json").exists():
        assert proc.poll() is None, f"the run ended before {checkpoint.name} was written and it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not adapter.exists(), "the run finished before kill -9"


@contextlib.contextmanager
def lock_held_elsewhere(lock_file: Path) -> Iterator[None]:
    """``lock_file`` held by another live process (a stage run's folder lock) for the duration of the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from filelock import FileLock; l = FileLock(sys.argv[1]); l.acquire(); "
         "print('held', flush=True); sys.stdin.read()", str(lock_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.mark.slow
def test_kill_minus_9_resumes_to_the_same_adapter(tmp_path, demo_work_dir, tiny_model_dir):
    model_dir = tiny_model_dir("qwen2_5_vl")
    runs = {}
    for name in ("straight", "killed"):
        root = tmp_path / name
        root.mkdir()
        params = root / "params.yaml"
        params.write_text(yaml.safe_dump(_cfg(root, demo_work_dir, model_dir, max_steps=40, save_steps=5)))
        runs[name] = (root, params)

    root, params = runs["straight"]
    proc = _cli(params, root)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]

    root, params = runs["killed"]
    out = root / "out"
    proc = _cli(params, root)
    kill_minus_9_at(proc, out / "checkpoint-10", out / "adapter")
    assert train_mod.latest_checkpoint(out) is not None

    proc = _cli(params, root)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    record = yaml.safe_load((out / "run.json").read_text())
    assert record["resumed_from"] and "checkpoint-" in record["resumed_from"]
    assert record["global_step"] == 40
    straight = yaml.safe_load((runs["straight"][0] / "out" / "run.json").read_text())
    assert record["tokens_seen"] == straight["tokens_seen"]  # counted over both parts (issue 14, hole 8)

    a = _adapter_tensors(runs["straight"][0] / "out" / "adapter")
    b = _adapter_tensors(out / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs after resume")
    # the resumed run continued the same MLflow run
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert len(client.search_runs([record["experiment_id"]])) == 1



def test_padding_free_training(tmp_path, demo_work_dir, tiny_model_dir, monkeypatch):
    """collator.padding_free through the real TRL trainer: refused where samples would mix (stock attention
    on the CPU), and trains on packed rows once the engine is on (forced on the CPU here, as on CUDA)."""
    from datasets import load_from_disk

    from visiontune.collator import VisionDataCollator
    from visiontune.kernels import patch_model

    rows = list(load_from_disk(str(demo_work_dir / "dataset"))["train"])
    raw = _cfg(tmp_path, demo_work_dir, tiny_model_dir("qwen2_5_vl"), max_steps=2)
    raw.setdefault("collator", {})["padding_free"] = True
    cfg = from_dict(raw)
    with pytest.raises(ValueError, match="flash_attention_2"):
        train_mod.train(cfg, rows, tmp_path / "refused", mlflow_active=False)

    real_build_model, real_collate = train_mod.build_model, VisionDataCollator.__call__
    batches: list[dict] = []

    def build_model_with_engine(c):
        model, processor = real_build_model(c)
        patch_model(model, enabled=True)
        return model, processor

    def recording_collate(self, examples):
        batches.append(real_collate(self, examples))
        return batches[-1]

    monkeypatch.setattr(train_mod, "build_model", build_model_with_engine)
    monkeypatch.setattr(VisionDataCollator, "__call__", recording_collate)
    result = train_mod.train(cfg, rows, tmp_path / "packed", mlflow_active=False)
    assert result["global_step"] == 2 and Path(result["adapter_dir"]).exists()
    assert batches and all(b["input_ids"].shape[0] == 1 and "attention_mask" not in b and "cu_seq_lens_q" in b
                           for b in batches)
    assert result["tokens_seen"] == sum(b["input_ids"].numel() for b in batches)
    losses = [h["loss"] for h in result["history"] if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_model_load_in_fp8_puts_the_lora_bases_into_fp8_and_trains(tmp_path, demo_work_dir, tiny_model_dir):
    """model.load_in_fp8 (off by default) reaches the train stage's model: every convertible LoRA base in FP8
    (on the CPU the base layers dequantize for their own forward), and training runs and saves the adapter."""
    from datasets import load_from_disk

    from visiontune.kernels.fp8 import convertible, fp8_base_weight
    from visiontune.models.state import vision_state

    assert from_dict({}).model.load_in_fp8 is False
    raw = _cfg(tmp_path, demo_work_dir, tiny_model_dir("qwen2_5_vl"), max_steps=2)
    raw["model"].update(load_in_fp8=True, dtype="bfloat16")
    cfg = from_dict(raw)
    model, _ = train_mod.build_model(cfg)
    lora = [m for m in model.modules() if hasattr(m, "lora_A")]
    fp8 = [m for m in lora if fp8_base_weight(m.get_base_layer()) is not None]
    assert fp8 and vision_state(model).fp8_layers == len(fp8) and not any(convertible(m) for m in lora)
    rows = list(load_from_disk(str(demo_work_dir / "dataset"))["train"])
    result = train_mod.train(cfg, rows, tmp_path / "fp8", mlflow_active=False)
    losses = [h["loss"] for h in result["history"] if "loss" in h]
    assert result["global_step"] == 2 and Path(result["adapter_dir"]).exists()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


# ------------------------------------------------------------------------------- issue 14: holes 5 and 8
def _mlflow_client(cfg: PipelineConfig):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)


def test_a_second_training_on_a_busy_output_dir_fails_fast_and_touches_nothing(tmp_path, demo_work_dir, tiny_model_dir,
                                                                              monkeypatch):
    """Hole 5: a live run holds train.output_dir. A second one (other settings) must neither attach to its
    checkpoints and MLflow run nor delete them."""
    monkeypatch.chdir(tmp_path)
    cfg = from_dict(_cfg(tmp_path, demo_work_dir, tiny_model_dir("qwen2_5_vl")))
    out = Path(cfg.train.output_dir)
    (out / "checkpoint-35").mkdir(parents=True)
    (out / "checkpoint-35" / "trainer_state.json").write_text("{}")
    live = '{"mlflow_run_id": "live-run", "status": "running", "fingerprint": "other settings"}'
    (out / "run.json").write_text(live)
    with lock_held_elsewhere(out / train_mod.LOCK_FILE):  # the live run
        t0 = time.perf_counter()
        with pytest.raises(OSError) as e:
            train_mod.train_stage(cfg)
        assert time.perf_counter() - t0 < 5
    message = str(e.value)
    assert str(out) in message and "another training" in message and "train.output_dir" in message
    assert (out / "checkpoint-35" / "trainer_state.json").exists() and (out / "run.json").read_text() == live
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was started either


def test_an_orphaned_run_is_marked_killed_by_the_next_run(tmp_path, demo_work_dir, tiny_model_dir, monkeypatch):
    """Hole 8: a run killed before its first checkpoint stays RUNNING in MLflow; the next run that does not
    resume it marks it KILLED."""
    from visiontune.pipeline.tracking import setup_mlflow, write_run_file

    monkeypatch.chdir(tmp_path)
    cfg = from_dict(_cfg(tmp_path, demo_work_dir, tiny_model_dir("qwen2_5_vl"), max_steps=1))
    client = _mlflow_client(cfg)
    orphan = client.create_run(setup_mlflow(cfg.tracking.uri, cfg.tracking.experiment)).info.run_id
    write_run_file(cfg.train.output_dir, {"mlflow_run_id": orphan, "tracking_uri": cfg.tracking.uri,
                                          "status": "running", "fingerprint": stages.fingerprint("train", cfg)})
    assert client.get_run(orphan).info.status == "RUNNING"
    record = train_mod.train_stage(cfg)
    assert client.get_run(orphan).info.status == "KILLED"
    assert record["mlflow_run_id"] != orphan and record["killed_run_id"] == orphan
    assert client.get_run(record["mlflow_run_id"]).info.status == "FINISHED"


def test_tokens_and_runtime_are_cumulative_across_a_resume(tmp_path, demo_work_dir, tiny_model_dir, monkeypatch):
    """Hole 8: after a crash at step 3 and a resume from checkpoint-2, tokens_seen equals an uninterrupted
    run's and train_runtime_s adds the time up to the checkpoint to the resumed part."""
    import json

    from transformers import TrainerCallback

    model_dir = tiny_model_dir("qwen2_5_vl")
    straight_root, crashed_root = tmp_path / "straight", tmp_path / "crashed"
    monkeypatch.chdir(tmp_path)
    straight = train_mod.train_stage(from_dict(_cfg(straight_root, demo_work_dir, model_dir)))

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == 3:
                raise RuntimeError("simulated crash at step 3")

    real_callbacks = train_mod._make_callbacks
    monkeypatch.setattr(train_mod, "_make_callbacks", lambda *a: real_callbacks(*a) + [Crash()])
    cfg = from_dict(_cfg(crashed_root, demo_work_dir, model_dir))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_mod.train_stage(cfg)
    monkeypatch.setattr(train_mod, "_make_callbacks", real_callbacks)
    crashed_run = json.loads((crashed_root / "out" / "run.json").read_text())["mlflow_run_id"]
    resumed = train_mod.train_stage(cfg)

    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == 4
    assert resumed["mlflow_run_id"] == crashed_run
    assert resumed["tokens_seen"] == straight["tokens_seen"]
    prior = train_mod.checkpoint_counters(Path(cfg.train.output_dir) / "checkpoint-2")
    assert straight["tokens_seen"] > prior["tokens_seen"] > 0
    history = json.loads((crashed_root / "out" / "log_history.json").read_text())
    segment = next(h["train_runtime"] for h in reversed(history) if "train_runtime" in h)  # HF's: this part only
    assert prior["train_runtime_s"] > 0
    assert resumed["train_runtime_s"] == pytest.approx(prior["train_runtime_s"] + segment, abs=0.05)
