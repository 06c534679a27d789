"""The train stage: LoRA fine-tuning with visiontune's SFTTrainer (TRL's), FastVisionModel and VisionDataCollator.

Reads everything from the config; tracks the run in MLflow (params, per-step metrics, system metrics,
data hash and git commit, adapter + processor, resolved config, loss curve); checkpoints every
``train.save_steps`` and resumes from the newest complete checkpoint, so a killed run (even kill -9)
continues where it stopped and reaches the same adapter as an uninterrupted run with the same seed.

One training at a time per ``train.output_dir``: a lock on the folder makes a second run fail at once
instead of attaching to the live run's checkpoints and MLflow run (or deleting them). A run that died
without resuming is marked KILLED in MLflow by the next run; ``tokens_seen`` and ``train_runtime_s`` add up
over resumes (see docs/reliability.md).

TRL serves VLMs here with our collator and three settings (see ``_sft_config``): TRL's own VLM path
would leave image tokens in the labels and cannot do assistant-only loss for VLMs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from visiontune.config import PipelineConfig
from visiontune.data.io import atomic_dir, disk_full_explained, work_dir_lock
from visiontune.pipeline import distributed, tracking
from visiontune.pipeline.resume import latest_checkpoint, resumable_checkpoint

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
LOCK_FILE = ".train.lock"  # inside train.output_dir; held (flock) while a training runs there

class _CountingCollator:
    """Wraps the collator to count the tokens it collates (the run record's token total)."""

    def __init__(self, collator: Any):
        self.collator = collator
        self.tokens = 0

    def __call__(self, examples: list) -> dict:
        batch = self.collator(examples)
        mask = batch.get("attention_mask")  # a padding-free batch has none: every token is real
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch


def _run_clock(train_runtime_s: float = 0.0) -> Any:
    """A callback keeping the training seconds up to the last optimizer step, from ``train_runtime_s`` (the
    time before a resumed checkpoint) on. It is an ``ExportableState``: every checkpoint's trainer_state.json
    (the file that makes a checkpoint complete) stores it, and :func:`checkpoint_counters` reads it back."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class RunClock(TrainerCallback, ExportableState):
        def __init__(self, train_runtime_s: float = 0.0) -> None:
            self.train_runtime_s = self._base = float(train_runtime_s)
            self._t0 = time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            self._t0, self._base = time.perf_counter(), self.train_runtime_s

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            self.train_runtime_s = self._base + time.perf_counter() - self._t0

        def state(self) -> dict:
            return {"args": {}, "attributes": {"train_runtime_s": self.train_runtime_s}}

    return RunClock(train_runtime_s)


def checkpoint_counters(checkpoint: Optional[Path]) -> dict[str, Any]:
    """``{"tokens_seen", "train_runtime_s"}`` up to ``checkpoint`` (zeros for None): what a resumed run adds to.

    Tokens are the trainer's own count of the batches it trained on (``num_input_tokens_seen``, saved with
    the checkpoint); seconds are the run clock's (:func:`_run_clock`).
    """
    if checkpoint is None:
        return {"tokens_seen": 0, "train_runtime_s": 0.0}
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    clock = (state.get("stateful_callbacks") or {}).get("RunClock") or {}
    return {"tokens_seen": int(state.get("num_input_tokens_seen") or 0),
            "train_runtime_s": float((clock.get("attributes") or {}).get("train_runtime_s") or 0.0)}


def _make_callbacks(mlflow_active: bool) -> list:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class MetricsCallback(TrainerCallback):
        """Adds tokens/s and GPU memory to the logs; sends every log line to MLflow; shows loss in the bar.

        Tokens are the trainer's count of the tokens it trained on (``num_input_tokens_seen``, summed over ranks
        by the trainer), not of the batches collated: the data loader collates one batch ahead, which left a
        window without tokens at each epoch's end. The first step of a run (a resumed one too) compiles kernels
        and warms the allocator: it is logged on its own as ``first_step_s`` and left out of ``tokens_per_s``,
        which then measures steady training."""

        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.tok0 = 0
            self.first_step = 1
            self.first_step_s: Optional[float] = None

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            # A resumed run's state is loaded by now: its first step is the one after the checkpoint's.
            self.t0, self.tok0 = time.perf_counter(), state.num_input_tokens_seen
            self.first_step = state.global_step + 1

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == self.first_step:
                now = time.perf_counter()
                self.first_step_s = now - self.t0
                self.t0, self.tok0 = now, state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if logs is None:
                return
            now = time.perf_counter()
            if "loss" in logs:
                tokens = state.num_input_tokens_seen
                if self.first_step_s is not None:
                    logs["first_step_s"] = round(self.first_step_s, 3)
                    self.first_step_s = None
                if tokens > self.tok0:  # a log at the first step itself has no steady window yet
                    logs["tokens_per_s"] = round((tokens - self.tok0) / max(now - self.t0, 1e-9), 1)
                self.t0, self.tok0 = now, tokens
                if torch.cuda.is_available():
                    logs["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            if mlflow_active:
                metrics = {k.replace("train_", "train/") if k.startswith("train_") else k: float(v)
                           for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
                tracking.log_metrics(metrics, step=state.global_step)  # buffered: a server outage stalls nothing

    class PostfixProgress(ProgressCallback):
        """The standard tqdm bar (steps, ETA) with loss and tokens/s in its postfix."""

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=logs.get("tokens_per_s", 0), refresh=False)

    return [MetricsCallback(), PostfixProgress()]


def _sft_config(cfg: PipelineConfig, output_dir: Path) -> Any:
    from visiontune.trainer import SFTConfig

    t = cfg.train
    on_gpu = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(output_dir),
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type="linear",
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,  # resume needs only the newest; one spare in case the newest is partial
        seed=t.seed,
        data_seed=t.seed,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu,
        report_to="none",  # we log to MLflow ourselves (one run across resumes, our metric names)
        disable_tqdm=True,  # replaced by PostfixProgress
        # Our collator does tokenization, images and labels; TRL must not touch the rows.
        remove_unused_columns=False,
        dataset_text_field="",
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        # Counted the way _CountingCollator counts (a padding-free batch has no padding mask), saved with each
        # checkpoint: what a resumed run's tokens_seen starts from.
        include_num_input_tokens_seen="all" if cfg.collator.padding_free else "non_padding",
        dataloader_num_workers=0,
        activation_checkpointing=False,  # FastVisionModel already set checkpointing up as configured
        token_budget=False,  # the stage runs the pre-flight budget itself (preflight), with its own report
        checkpoint_budget=t.checkpoint_budget,
        **distributed.trainer_args(cfg),  # DDP / FSDP2 when this process is one rank of several
    )
    return distributed.fsdp_mixed_precision(args)


def build_model(cfg: PipelineConfig) -> tuple[Any, Any]:
    """Base model + LoRA adapters as the config says."""
    from visiontune.models.fast_vision import FastVisionModel
    from visiontune.testing import ensure_tiny_model

    m, lo = cfg.model, cfg.lora
    if distributed.current().is_main:  # one builder; the other ranks wait for it
        ensure_tiny_model(m.name_or_path, m.tiny_architecture, seed=m.tiny_seed, size=m.tiny_size)
    distributed.from_main()
    model, processor = FastVisionModel.from_pretrained(
        m.name_or_path, max_seq_length=m.max_seq_length, dtype=m.dtype, load_in_4bit=m.load_in_4bit,
        use_gradient_checkpointing=m.use_gradient_checkpointing, use_fused_kernels=m.use_fused_kernels,
        load_in_fp8=m.load_in_fp8,
    )
    target = lo.target_modules if lo.target_modules is not None else "all-linear"
    model = FastVisionModel.get_peft_model(
        model, finetune_vision_layers=lo.finetune_vision_layers, finetune_language_layers=lo.finetune_language_layers,
        finetune_attention_modules=lo.finetune_attention_modules, finetune_mlp_modules=lo.finetune_mlp_modules,
        r=lo.r, lora_alpha=lo.lora_alpha, lora_dropout=lo.lora_dropout, use_rslora=lo.use_rslora,
        target_modules=target, modules_to_save=lo.modules_to_save, random_state=cfg.train.seed,
    )
    return model, processor


def build_collator(cfg: PipelineConfig, model: Any, processor: Any) -> Any:
    from visiontune.collator import VisionDataCollator

    c, im = cfg.collator, cfg.images
    return VisionDataCollator(
        model, processor, max_seq_length=cfg.model.max_seq_length, resize=im.resize, resize_dimension=im.resize_dimension,
        snap_to_patch_size=im.snap_to_patch_size, trim=im.trim, train_on_responses_only=c.train_on_responses_only,
        completion_only_loss=c.completion_only_loss, pad_to_multiple_of=c.pad_to_multiple_of,
        padding_free=c.padding_free,
    )


def plot_loss(history: list[dict], out: Path) -> Path:
    """Training loss (and learning rate) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, losses, marker="o", ms=3, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lrs = [(h["step"], h["learning_rate"]) for h in history if "learning_rate" in h]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), color="tab:orange", alpha=0.5, label="learning rate")
        ax2.set_ylabel("learning rate")
    ax.set_title("visiontune training loss")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def train(cfg: PipelineConfig, train_data: Any, output_dir: Path, mlflow_active: bool = True) -> dict[str, Any]:
    """Train LoRA adapters on ``train_data`` (a datasets.Dataset or a list of conversations).

    Resumes from the newest complete checkpoint in ``output_dir``. Returns the trainer's log history
    and where the adapter was saved; ``tokens_seen`` and ``train_runtime_s`` include the part before the
    checkpoint resumed from.

    In a multi-process run every rank calls this (:mod:`visiontune.pipeline.distributed`): rank 0 picks the
    checkpoint and writes the files; ``mlflow_active`` belongs to rank 0 alone. ``tokens_seen`` counts all ranks.
    """
    from visiontune.budget import preflight
    from visiontune.pipeline.eval_callback import eval_callbacks
    # visiontune's SFTTrainer: TRL's, with the loss on the fused-kernel engine when the kernels are patched
    from visiontune.trainer import SFTTrainer, as_train_dataset

    main = distributed.current().is_main
    model, processor = build_model(cfg)
    collator = build_collator(cfg, model, processor)
    # Every rank measures (the same samples are kept everywhere); rank 0 reports.
    train_data, budget = preflight(collator, train_data, output_dir, mlflow_active, report=main)  # before any step
    data = as_train_dataset(train_data)
    rows = getattr(data, "_vt_rows", None)
    base_collate = collator if rows is None else (lambda exs: collator([rows[e["_vt_index"]] for e in exs]))
    counter = _CountingCollator(base_collate)
    resume = distributed.from_main(latest_checkpoint(output_dir) if main else None)  # one choice for all ranks
    before = checkpoint_counters(resume)
    trainer = SFTTrainer(model=model, args=_sft_config(cfg, output_dir), data_collator=counter,
                         train_dataset=data, processing_class=processor,
                         callbacks=_make_callbacks(mlflow_active) + [_run_clock(before["train_runtime_s"])]
                         + eval_callbacks(cfg, processor, output_dir, mlflow_active))
    trainer.remove_callback(__import__("transformers").trainer_callback.PrinterCallback)
    distributed.check_sharding(trainer, cfg)
    # The loss of a step is the mean over the supervised tokens of the whole global batch (the Trainer counts
    # them over accumulation steps and ranks: num_items_in_batch), not a mean of per-micro-batch or per-rank
    # means: N processes then train exactly as one with the same global batch. transformers marks VLMs as
    # not taking loss kwargs; TRL's SFT loss (its fused lm_head) does the normalization itself.
    trainer.model_accepts_loss_kwargs = True
    if resume and main:
        log.warning("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    adapter_dir = output_dir / ADAPTER_DIR
    gathered = distributed.gather_adapter(trainer.model)  # FSDP2: the LoRA shards, gathered (every rank joins)
    if main:
        with atomic_dir(adapter_dir) as staging:  # a full disk leaves the previous adapter whole
            distributed.write_adapter(model, staging, gathered, processor)
    history = trainer.state.log_history
    if main:
        (output_dir / "log_history.json").write_text(json.dumps(history, indent=2))
    tokens = distributed.sum_over_ranks(counter.tokens)
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "adapter_dir": str(adapter_dir), "global_step": trainer.state.global_step, "history": history,
        "final_loss": losses[-1] if losses else None, "first_loss": losses[0] if losses else None,
        "resumed_from": str(resume) if resume else None, "dropped_samples": collator.dropped + budget["dropped"],
        "token_budget": budget,
        # Cumulative over resumes. After the checkpoint, tokens are counted as the collator builds batches (one
        # batch ahead of training), so a resumed run reports what an uninterrupted one does.
        "train_runtime_s": before["train_runtime_s"] + result.metrics.get("train_runtime", 0.0),
        "tokens_seen": before["tokens_seen"] + tokens,
    }


def _resumable_run(output_dir: Path, old: dict[str, Any], fingerprint: str, processes: int = 1) -> Optional[str]:
    """The MLflow run id to continue, if ``old`` (the run.json in ``output_dir``) is an unfinished run with the
    same fingerprint, on the same number of ``processes``, and a checkpoint to resume from.

    Checkpoints of a finished or a differently configured run are stale (its adapter is already in
    MLflow) and are cleared. Only call this holding the folder's lock (:func:`output_dir_lock`).
    """
    previous = None
    if (resumable_checkpoint(output_dir, old, fingerprint)
            and old.get("processes", 1) == processes):  # another world size: another global batch
        previous = old.get("mlflow_run_id")
    if previous is None:
        for stale in output_dir.glob("checkpoint-*"):
            shutil.rmtree(stale)
    return previous


class OutputDirBusyError(BlockingIOError):
    """``train.output_dir`` is in use by another training run."""


def output_dir_lock(output_dir: Path) -> contextlib.AbstractContextManager:
    """Hold ``output_dir``'s lock for the body; fail at once if another training holds it.

    An OS file lock (flock, :func:`visiontune.data.io.folder_lock`): the kernel drops it when its process
    dies, even by kill -9, so a crash leaves no stale lock behind.
    """
    from visiontune.data.io import folder_lock

    return folder_lock(output_dir / LOCK_FILE, (
        f"{output_dir} is in use by another training run (it holds {output_dir / LOCK_FILE}); wait for that "
        "run to finish, or give this one its own folder: --set train.output_dir=<another folder>"), OutputDirBusyError)


def _log_outputs(cfg: PipelineConfig, output_dir: Path, history: list[dict], adapter_dir: str) -> None:
    """Loss curve (PNG for MLflow, JSON for DVC plots), resolved config and adapter into the run."""
    import mlflow

    from visiontune.config import to_yaml

    curve = plot_loss(history, output_dir / "loss_curve.png")
    (output_dir / "resolved_config.yaml").write_text(to_yaml(cfg))
    mlflow.log_artifact(str(curve))
    mlflow.log_artifact(str(output_dir / "resolved_config.yaml"))
    mlflow.log_artifacts(adapter_dir, artifact_path=ADAPTER_DIR)
    (output_dir / "loss.json").write_text(json.dumps(
        [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h], indent=1))


def check_base_model(name: str) -> None:
    """Fail before any work (lock, MLflow run) when the base model ``name`` can only come from the hub, the
    hub is off (``HF_HUB_OFFLINE``) and the cache lacks it: one line that says what to do, instead of the
    loading errors from deep inside transformers."""
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    if not is_offline_mode() or Path(name).expanduser().exists() or Path(name).name.startswith("tiny-"):
        return  # online, a local folder, or the demo's tiny model (built on first use)
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a hub id either: FastVisionModel.from_pretrained says what is wrong with it
        return
    if not isinstance(cached, str):
        raise OSError(
            f"base model {name!r} (model.name_or_path) is neither a local folder nor in the Hugging Face cache, "
            f"and HF_HUB_OFFLINE is set: download it once while online (`hf download {name}`), or set "
            "model.name_or_path to a local folder")


def train_stage(cfg: PipelineConfig) -> dict[str, Any]:
    """CLI / DVC / Prefect entry: train on the train split, tracked in MLflow, resumable.

    One training at a time per ``train.output_dir`` (:func:`output_dir_lock`). With ``train.num_processes`` > 1
    it starts that many processes through torchrun and returns rank 0's record; under a launcher it is one
    rank of the launcher's run (:mod:`visiontune.pipeline.distributed`).
    """
    how = distributed.plan(cfg)
    if how == "launch":
        return distributed.launch(cfg)
    check_base_model(cfg.model.name_or_path)
    output_dir = Path(cfg.train.output_dir)
    if how == "rank":
        distributed.die_with_parent()
        if not distributed.init().is_main:
            return _follow(cfg, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with work_dir_lock(cfg.data.work_dir), output_dir_lock(output_dir):  # its data must not change under it either
        return _train_locked(cfg, output_dir)


def _follow(cfg: PipelineConfig, output_dir: Path) -> dict[str, Any]:
    """A rank other than 0: wait for rank 0's go-ahead (it holds the locks, has cleared stale checkpoints and
    opened the MLflow run), then train beside it. Rank 0 writes every file and logs; if it fails before the
    go-ahead, the launcher stops this rank."""
    from visiontune.data.convert import load_split

    run_id = distributed.from_main()
    train_data = load_split(Path(cfg.data.work_dir) / "dataset", "train")
    result = train(cfg, train_data, output_dir, mlflow_active=False)
    return {"rank": distributed.current().rank, "mlflow_run_id": run_id, "global_step": result["global_step"]}


def _train_locked(cfg: PipelineConfig, output_dir: Path) -> dict[str, Any]:
    """:func:`train_stage` once it holds ``output_dir``'s lock."""
    import mlflow

    from visiontune import stages
    from visiontune.data.convert import load_split, read_dataset_meta

    dataset_dir = Path(cfg.data.work_dir) / "dataset"
    train_data = load_split(dataset_dir, "train")
    experiment_id = tracking.setup_mlflow(cfg.tracking.uri, cfg.tracking.experiment)
    # Resume only an unfinished run of the same code, settings and data (the stage's registry fingerprint,
    # the same value that keys the Prefect cache).
    fingerprint = stages.fingerprint("train", cfg)
    processes = distributed.current().world_size
    old = tracking.read_run_file(output_dir) if (output_dir / tracking.RUN_FILE).exists() else {}
    previous = _resumable_run(output_dir, old, fingerprint, processes)
    # We hold the lock, so no process trains here: a run left 'running' that is not resumed died (kill -9,
    # power loss) and would stay RUNNING in MLflow forever.
    killed = tracking.mark_killed(old) if previous is None and old.get("status") == "running" else None
    with mlflow.start_run(run_id=previous, experiment_id=None if previous else experiment_id,
                          log_system_metrics=True) as run:
        record = {"mlflow_run_id": run.info.run_id, "tracking_uri": mlflow.get_tracking_uri(),
                  "experiment_id": run.info.experiment_id, "base_model": cfg.model.name_or_path,
                  "adapter_dir": str(output_dir / ADAPTER_DIR), "status": "running", "fingerprint": fingerprint,
                  "instruction": read_dataset_meta(dataset_dir).get("instruction"), "killed_run_id": killed,
                  "processes": processes}
        tracking.write_run_file(output_dir, record)
        if previous is None:
            mlflow.log_params({k: str(v)[:500] for k, v in cfg.flat().items()})
            mlflow.set_tags({"dvc_data_md5": tracking.dvc_data_hash(), "git_commit": tracking.git_commit(),
                             "base_model": cfg.model.name_or_path, "visiontune.stage": "train",
                             "train_samples": str(len(train_data)), "processes": str(processes)})
        with tracking.buffered_metrics(run.info.run_id, mlflow.get_tracking_uri()), disk_full_explained(output_dir, (
                "Complete checkpoints and the previous adapter are untouched (a partial checkpoint is skipped): free "
                "some space and run the stage again; it resumes from the newest complete checkpoint")):
            distributed.from_main(run.info.run_id)  # the other ranks' go-ahead (a no-op in one process)
            result = train(cfg, train_data, output_dir)
        _log_outputs(cfg, output_dir, result.pop("history"), result["adapter_dir"])
        record.update({k: v for k, v in result.items() if k != "adapter_dir"})
        record["status"] = "finished"
        tracking.write_run_file(output_dir, record)
    return record
