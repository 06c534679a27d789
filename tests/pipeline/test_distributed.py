"""Training on two processes (visiontune.pipeline.distributed) equals training on one, for DDP and FSDP2.

Two gloo CPU processes started the user's way (``train.num_processes: 2``: the train stage launches torchrun)
train a tiny Qwen2.5-VL with a global batch of 4 (2 per process); the reference is one process with the same
global batch in the same micro-batches (2 per micro-batch, 2 accumulation steps). Every run has the fused-kernel
engine patched in (on the CPU: its torch references), padding-free packing and gradient checkpointing on. The
loss curves and the final LoRA weights must agree to fp32 noise. Measured after 6 steps: DDP equals the
reference bit for bit; FSDP2 (its reduce-scatter sums in another order) is within 1.3e-7 of each LoRA tensor's
norm. Against one process taking all 4 samples in one micro-batch, two processes differ as any other split of
the batch does (one process with 2 accumulation steps gives the very same numbers): 3e-6 to 4e-5 of a tensor's
norm, depending on the data, from the order of the sums over tokens.

DDP runs uninterrupted (:func:`test_ddp_on_two_processes_trains_as_one`); FSDP2 is killed with kill -9 after its
first checkpoint and resumed, and the result of both parts together must equal the one-process run
(:func:`test_fsdp2_killed_with_kill_minus_9_resumes_to_the_one_process_result`): three launches of two ranks
in all, each of which spends most of its time importing the stack (11 s of CPU per rank here).

The ranks get two CPU-only switches through ``tests/pipeline/cpu_ranks/sitecustomize.py`` (the engine on the
CPU, and accelerate's FSDP plugin on a CPU process group); everything else is the path users run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from visiontune.config import from_dict
from visiontune.pipeline import train as train_mod

CPU_RANKS = Path(__file__).parent / "cpu_ranks"
GLOBAL_BATCH, STEPS = 4, 6  # 12 training rows: two epochs, an epoch boundary for the samplers


def _switches():
    spec = importlib.util.spec_from_file_location("cpu_ranks_switches", CPU_RANKS / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the switches; applies none (no RANK in this process)
    return module


def _raw(root: Path, work: Path, model_dir: str, processes: int, mode: str = "ddp") -> dict:
    return {
        "data": {"work_dir": str(work)},
        "model": {"name_or_path": model_dir, "max_seq_length": 512, "use_gradient_checkpointing": True},
        "lora": {"r": 4, "lora_alpha": 8},
        "images": {"resize": [112, 56]},
        "collator": {"padding_free": True},
        "train": {"output_dir": str(root / "out"), "max_steps": STEPS, "save_steps": 2, "logging_steps": 1,
                  "per_device_train_batch_size": 2, "gradient_accumulation_steps": GLOBAL_BATCH // 2 // processes,
                  "learning_rate": 5e-3, "warmup_steps": 0, "eval_every_steps": 0, "num_processes": processes,
                  "distributed": mode},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "t"},
    }


@pytest.fixture(scope="module")
def demo_dataset(demo_work_dir, tmp_path_factory) -> Path:
    """A work dir whose train split is 12 conversations made by the real data stages from the demo generator:
    three global batches an epoch (a partial last batch is filled up differently by one and by two processes)."""
    import shutil

    from datasets import load_from_disk

    from visiontune.data.convert import META_FILE

    root = tmp_path_factory.mktemp("dist-data")
    dataset = load_from_disk(str(demo_work_dir / "dataset"))
    assert len(dataset["train"]) >= 3 * GLOBAL_BATCH
    dataset["train"] = dataset["train"].select(range(3 * GLOBAL_BATCH))
    dataset.save_to_disk(str(root / "work12" / "dataset"))
    shutil.copy(demo_work_dir / "dataset" / META_FILE, root / "work12" / "dataset" / META_FILE)
    return root / "work12"


@pytest.fixture(scope="module")
def reference(demo_dataset, tiny_model_dir, tmp_path_factory) -> dict:
    """One process, the same global batch per step: losses, adapter tensors and tokens seen."""
    from datasets import load_from_disk

    root = tmp_path_factory.mktemp("dist-reference")
    cfg = from_dict(_raw(root, demo_dataset, tiny_model_dir("qwen2_5_vl"), processes=1))
    rows = list(load_from_disk(str(demo_dataset / "dataset"))["train"])
    switches = _switches()
    with pytest.MonkeyPatch.context() as mp:
        switches.engine_on_cpu(mp.setattr)
        result = train_mod.train(cfg, rows, root / "out", mlflow_active=False)
    return {"losses": [h["loss"] for h in result["history"] if "loss" in h], "tokens_seen": result["tokens_seen"],
            "adapter": _adapter(Path(result["adapter_dir"]))}


@pytest.fixture
def cpu_ranks(monkeypatch):
    """The switches (engine, FSDP on gloo) for the ranks this test's train stage launches."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(CPU_RANKS), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("VISIONTUNE_TEST_RANK_SWITCHES", "engine,fsdp-on-cpu")


def _adapter(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _assert_same_training(out: Path, reference: dict) -> None:
    """Losses to 1e-5 relative; each LoRA tensor within 1e-5 of its norm."""
    history = json.loads((out / "log_history.json").read_text())
    assert [h["loss"] for h in history if "loss" in h] == pytest.approx(reference["losses"], rel=1e-5)
    got = _adapter(out / "adapter")
    assert got.keys() == reference["adapter"].keys()
    for name, want in reference["adapter"].items():
        error = float((got[name] - want).norm() / want.norm().clamp(min=1e-12))
        assert error < 1e-5, f"{name}: relative difference {error:.2e} from the one-process run"


@pytest.mark.slow
def test_ddp_on_two_processes_trains_as_one(tmp_path, demo_dataset, tiny_model_dir, reference, cpu_ranks, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    cfg = from_dict(_raw(tmp_path, demo_dataset, tiny_model_dir("qwen2_5_vl"), processes=2, mode="ddp"))
    record = train_mod.train_stage(cfg)  # launches torchrun: 2 ranks

    out = Path(cfg.train.output_dir)
    assert record["processes"] == 2 and record["global_step"] == STEPS and record["status"] == "finished"
    _assert_same_training(out, reference)
    assert record["tokens_seen"] == reference["tokens_seen"]  # both ranks' tokens
    last = out / f"checkpoint-{STEPS}"
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= {p.name for p in last.iterdir()}

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    runs = client.search_runs([record["experiment_id"]])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 0 alone opened a run
    assert runs[0].data.tags["processes"] == "2" and runs[0].data.params["train.distributed"] == "ddp"
    assert len(client.get_metric_history(record["mlflow_run_id"], "loss")) == STEPS  # logged once per step


def _ranks_in(root: Path) -> list[str]:
    """Command lines of the live processes working in ``root`` (the CLI, torchrun's agent, the ranks)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if proc.info["cwd"] == str(root) and "visiontune" in " ".join(proc.info["cmdline"] or []):
                found.append(" ".join(proc.info["cmdline"]))
        except (psutil.Error, TypeError):
            continue
    return found


@pytest.mark.slow
def test_fsdp2_killed_with_kill_minus_9_resumes_to_the_one_process_result(tmp_path, demo_dataset, tiny_model_dir,
                                                                          reference, cpu_ranks):
    """FSDP2 on 2 processes through `visiontune train`, killed (kill -9 of its process group) after its first
    checkpoint: no rank outlives it (each dies with its parent), and the next run resumes from the newest complete
    checkpoint (accelerate's FSDP checkpoint) to the losses and the adapter of the one-process run."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_raw(tmp_path, demo_dataset, tiny_model_dir("qwen2_5_vl"), 2, "fsdp2")))
    out = tmp_path / "out"
    exe = Path(sys.executable).with_name("visiontune")

    def cli(log: str) -> subprocess.Popen:
        return subprocess.Popen([str(exe), "train", "--params", str(params)], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / log, "w"), start_new_session=True)

    proc = cli("killed.log")
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "adapter").exists(), "the run finished before kill -9"
    deadline = time.time() + 20
    while _ranks_in(tmp_path) and time.time() < deadline:
        time.sleep(0.2)
    assert not _ranks_in(tmp_path), "a rank outlived the killed launcher"

    proc = cli("resumed.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert "checkpoint-" in record["resumed_from"] and record["global_step"] == STEPS and record["processes"] == 2
    last = out / f"checkpoint-{STEPS}"  # the model was sharded: accelerate's FSDP files, and each rank's RNG state
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in last.iterdir()}
    _assert_same_training(out, reference)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(client.search_runs([record["experiment_id"]])) == 1  # the resumed run continued the killed one


# ------------------------------------------------------------------------------------ launch decisions, errors
def test_the_stage_launches_runs_as_a_rank_or_alone(monkeypatch):
    from visiontune.pipeline import distributed

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = lambda **train: from_dict({"train": train})  # noqa: E731
    assert distributed.plan(cfg()) == "single" and distributed.plan(cfg(num_processes=4)) == "launch"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.plan(cfg()) == "rank" and distributed.plan(cfg(num_processes=2, distributed="fsdp2")) == "rank"
    assert distributed.current() == distributed.Ranks(rank=1, world_size=2, local_rank=0)
    with pytest.raises(ValueError, match="WORLD_SIZE=2.*train.num_processes to 2"):
        distributed.plan(cfg(num_processes=4))
    with pytest.raises(Exception, match="distributed"):
        cfg(distributed="zero3")  # the config refuses what plan() could not run


def test_the_first_failing_rank_is_reported_with_its_error_type(tmp_path):
    from visiontune.pipeline import distributed

    def report(rank: int, kind: str, type_: str, message: str) -> None:
        (tmp_path / f"error-rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "world_size": 2, "type": type_, "kind": kind, "message": message, "traceback_tail": "x"}))
        time.sleep(0.02)  # reports are ordered by their time

    report(0, "OSError", "OutputDirBusyError", "out is in use by another training run")
    report(1, "other", "DistBackendError", "Connection closed by peer")
    error = distributed._rank_error(tmp_path, 1)
    assert isinstance(error, train_mod.OutputDirBusyError) and str(error).startswith("rank 0 of 2: out is in use")
    for p in tmp_path.iterdir():
        p.unlink()
    report(1, "ValueError", "ValueError", "train.distributed=fsdp2: accelerate turned its FSDP plugin down")
    assert type(distributed._rank_error(tmp_path, 1)) is ValueError
    assert "before any rank reported" in str(distributed._rank_error(tmp_path / "none", 1))
