"""The align stage: GRPO (GSPO, Dr. GRPO) with task rewards or DPO on the SFT adapter, between train and evaluate.

The hand-off: this stage always writes ``align.output_dir/run.json``, the record of the model that evaluate
and register take (they read it instead of the train stage's). It is the train stage's record (same
MLflow run, base model, instruction) with ``adapter_dir`` pointing at the model to evaluate and that
adapter's content hash, so a changed adapter changes the file that evaluate depends on:

* ``align.method: none`` (the default): the SFT adapter is handed on. Nothing is loaded; the stage costs
  milliseconds and the pipeline scores and registers exactly what it did without this stage.
* ``grpo``: TRL's GRPO through :class:`visiontune.align.GRPOTrainer` (``align.loss_type``: grpo,
  dr_grpo, dapo, ...; ``align.importance_sampling_level: sequence`` is GSPO) with the rewards named in
  ``align.rewards`` (:mod:`visiontune.rewards`; each sample's reference answer is the conversation's last
  answer), started from the SFT adapter. The reference model is the SFT model: TRL keeps a frozen copy
  of the starting LoRA weights as adapter ``"ref"`` beside the trained one (adapter weights only, no copy
  of the base).
* ``dpo``: TRL's DPO through :class:`visiontune.align.DPOTrainer`, on pairs from the split's
  ``align.chosen_column``/``align.rejected_column`` if it has them, else built from
  ``align.num_generations`` samples of the SFT model per prompt scored by the first reward.

Resume: GRPO and DPO checkpoint every ``align.save_steps`` into ``align.output_dir`` (``checkpoint-N``, the
newest two kept) and record the run in ``align_state.json`` (status, the stage's fingerprint: code, settings,
dataset, SFT adapter). A run killed on the way (even by kill -9) and started again with the same fingerprint
resumes from the newest complete checkpoint: the same step count, sampling and data order (the RNG states
are in the checkpoint), the same MLflow run with each step's metrics logged once, and the adapter an
uninterrupted run ends at. With anything changed the warning names the changed settings (or says the code
or inputs changed) and the run starts over. A finished run removes its checkpoints. One alignment at a time
per folder (an OS lock, ``.align.lock``; a second run fails at once).

The aligned adapter (``align.output_dir/adapter``, ``"default"`` adapter only) is evaluated and registered
in place of the SFT one. MLflow: metrics ``align/<name>`` per logging step (reward and per-reward curves,
KL, completion lengths, entropy; for DPO chosen/rejected rewards, accuracies, margins), a sample table
``align/samples.json`` (completions with their rewards, or the DPO pairs), ``align/config.json`` and the
adapter under ``align/adapter``, all in the training run named in train's ``run.json``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

from visiontune.pipeline.resume import resumable_checkpoint
from visiontune.pipeline.tracking import read_run_file, resolve_tracking_uri, write_run_file

log = logging.getLogger(__name__)

METHODS = ("none", "grpo", "dpo")
ADAPTER_DIR = "adapter"


def _settings(cfg: Any) -> dict[str, Any]:
    """Every setting the stage reads, read up front whatever the method (DVC's params list is fixed)."""
    a, m, im = cfg.align, cfg.model, cfg.images
    names = ("method", "output_dir", "split", "max_samples", "rewards", "reward_weights", "numeric_tolerance",
             "format_pattern", "loss_type", "importance_sampling_level", "num_generations", "max_completion_length",
             "temperature", "beta", "learning_rate", "max_steps", "per_device_train_batch_size", "logging_steps",
             "save_steps", "seed", "chosen_column", "rejected_column", "sample_table_rows")
    s = {n: getattr(a, n) for n in names}
    s["model"] = {n: getattr(m, n) for n in ("name_or_path", "max_seq_length", "dtype", "load_in_4bit",
                                              "use_fused_kernels", "use_gradient_checkpointing")}
    s["images"] = {n: getattr(im, n) for n in ("resize", "resize_dimension", "snap_to_patch_size", "trim")}
    s["work_dir"], s["train_dir"], s["tracking_uri"] = cfg.data.work_dir, cfg.train.output_dir, cfg.tracking.uri
    if s["method"] not in METHODS:
        raise ValueError(f"align.method={s['method']!r}: choose one of {', '.join(METHODS)}")
    return s


def _reward_funcs(s: dict[str, Any]) -> list[Callable]:
    from visiontune import rewards

    if not s["rewards"]:
        raise ValueError("align.rewards is empty: name at least one of " + ", ".join(rewards.NAMES))
    return [rewards.get(n, s["numeric_tolerance"], s["format_pattern"]) for n in s["rewards"]]


class SampleTable:
    """The latest completions with their rewards, as the trainer scored them: MLflow's sample table.

    :meth:`wrap` a reward function (TRL calls the functions one after the other on the same completions);
    the first one starts each batch's rows, every one adds its column.
    """

    def __init__(self, limit: int) -> None:
        self.rows: deque = deque(maxlen=max(1, limit))
        self._batch: list[dict[str, Any]] = []
        self._order = ["step", "answer", "completion"]  # the column order (rows restored from JSON come sorted)

    def wrap(self, func: Callable, first: bool) -> Callable:
        from visiontune.rewards import completion_text

        self._order.append(func.__name__)

        @functools.wraps(func)
        def scored(prompts: Any = None, completions: Any = (), **kwargs: Any) -> list[float]:
            scores = func(prompts=prompts, completions=completions, **kwargs)
            if first:
                state = kwargs.get("trainer_state")
                step = state.global_step if state is not None else 0
                answers = kwargs.get("answer") or [None] * len(completions)
                self._batch = [{"step": step, "answer": a, "completion": completion_text(c)}
                               for a, c in zip(answers, completions)]
                self.rows.extend(self._batch)
            for row, score in zip(self._batch, scores):
                row[func.__name__] = score
            return scores

        return scored

    def columns(self) -> dict[str, list]:
        seen = set(k for row in self.rows for k in row)
        keys = [k for k in self._order if k in seen] + sorted(seen - set(self._order))
        return {k: [row.get(k) for row in self.rows] for k in keys}

    def callback(self) -> Any:
        """A trainer callback that stores the rows in every checkpoint (``trainer_state.json``), for :meth:`restore`."""
        from transformers import TrainerCallback
        from transformers.trainer_callback import ExportableState

        table = self

        class AlignSampleTable(TrainerCallback, ExportableState):
            def state(self) -> dict:
                return {"args": {}, "attributes": {"rows": list(table.rows)}}

        return AlignSampleTable()

    def restore(self, checkpoint: Path) -> None:
        """The rows as ``checkpoint`` stored them (a resumed run's table continues the interrupted one's)."""
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        saved = (state.get("stateful_callbacks") or {}).get("AlignSampleTable") or {}
        self.rows.clear()
        self.rows.extend((saved.get("attributes") or {}).get("rows") or [])


def _mlflow_callback(logged: Optional[dict[str, set[int]]] = None, prefix: str = "align/") -> Any:
    """Every numeric log line of the trainer into the active MLflow run, as ``align/<name>``, except the
    (metric, step) pairs in ``logged``: what the interrupted run a resumed one continues had logged already
    (:func:`_logged_since`), so each step keeps one value."""
    import math

    from transformers import TrainerCallback

    skip = logged or {}

    class MlflowMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            import mlflow

            metrics = {prefix + k: float(v) for k, v in (logs or {}).items()
                       if isinstance(v, (int, float)) and math.isfinite(float(v))
                       and state.global_step not in skip.get(prefix + k, ())}
            if metrics:
                mlflow.log_metrics(metrics, step=state.global_step)

    return MlflowMetrics()


def _logged_since(run_id: str, since_ms: int, prefix: str = "align/") -> dict[str, set[int]]:
    """{metric: steps} of the ``align/`` metrics logged to ``run_id`` from ``since_ms`` (epoch milliseconds) on.

    A run killed after its last checkpoint had logged some steps past it; resumed, it computes those steps
    again and must not log them twice. Entries older than ``since_ms`` belong to earlier align runs into the
    same training run and do not count.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    names = [k for k in client.get_run(run_id).data.metrics if k.startswith(prefix)]
    return {k: {m.step for m in client.get_metric_history(run_id, k) if m.timestamp >= since_ms} for k in names}


def _load_policy(s: dict[str, Any], sft_adapter: Path) -> tuple[Any, Any, Any]:
    """(base + SFT adapter as a trainable PEFT model, its processor, the training image resizer)."""
    from peft import PeftModel

    from visiontune.images import ImageRule
    from visiontune.inference import adapter_processor, model_resizer
    from visiontune.models.fast_vision import FastVisionModel

    m = s["model"]
    model, processor = FastVisionModel.from_pretrained(
        m["name_or_path"], max_seq_length=m["max_seq_length"], dtype=m["dtype"], load_in_4bit=m["load_in_4bit"],
        use_gradient_checkpointing=m["use_gradient_checkpointing"], use_fused_kernels=m["use_fused_kernels"])
    processor = adapter_processor(sft_adapter, processor)
    resizer = model_resizer(ImageRule(**s["images"]), model.config, processor)
    return PeftModel.from_pretrained(model, str(sft_adapter), is_trainable=True), processor, resizer


def _samples(s: dict[str, Any]) -> list[dict]:
    from visiontune.data.convert import load_split

    ds = load_split(Path(s["work_dir"]) / "dataset", s["split"], setting="align.split")
    n = min(s["max_samples"], len(ds)) if s["max_samples"] else len(ds)
    if n == 0:
        raise ValueError(f"split {s['split']!r} is empty: nothing to align on (align.split)")
    return [ds[i] for i in range(n)]


def _common_args(s: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch

    return dict(output_dir=str(out), learning_rate=s["learning_rate"], max_steps=s["max_steps"],
                per_device_train_batch_size=s["per_device_train_batch_size"], logging_steps=s["logging_steps"],
                beta=s["beta"], seed=s["seed"], report_to="none", disable_tqdm=True,
                use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                # checkpoints a killed run resumes from (align_stage); the newest complete one is all it needs
                save_strategy="steps", save_steps=s["save_steps"], save_total_limit=2)


def _grpo(s: dict[str, Any], model: Any, processor: Any, resizer: Any, out: Path, table: SampleTable,
          callbacks: list, resume: Optional[Path]) -> Any:
    from visiontune.align import GRPOConfig, GRPOTrainer, grpo_rows

    funcs = _reward_funcs(s)
    args = GRPOConfig(**_common_args(s, out), num_generations=s["num_generations"],
                      max_completion_length=s["max_completion_length"], temperature=s["temperature"],
                      loss_type=s["loss_type"], importance_sampling_level=s["importance_sampling_level"],
                      reward_weights=s["reward_weights"])
    return GRPOTrainer(model=model, reward_funcs=[table.wrap(f, i == 0) for i, f in enumerate(funcs)], args=args,
                       train_dataset=grpo_rows(_samples(s), resizer), processing_class=processor, callbacks=callbacks)


SAMPLED_ANSWERS = "dpo_sampled_answers.json"  # the SFT model's sampled answers the DPO pairs were built from


def _preference_rows(s: dict[str, Any], model: Any, processor: Any, resizer: Any, table: SampleTable, out: Path,
                     resume: Optional[Path]) -> list[dict]:
    """Pairs from the split's chosen/rejected columns, else from sampled answers scored by the first reward.

    Sampled answers are drawn with ``align.seed`` and kept in ``align.output_dir``: a resumed run trains on
    the pairs the interrupted one started with, not on a fresh draw."""
    import torch

    from visiontune.align import dpo_rows, sample_answers, sampled_pairs

    samples = _samples(s)
    if all(s["chosen_column"] in x and s["rejected_column"] in x for x in samples[:1]):
        rows = dpo_rows(samples, s["chosen_column"], s["rejected_column"], resizer)
    else:
        kept = out / SAMPLED_ANSWERS
        if resume is not None and kept.is_file():
            answers = json.loads(kept.read_text())
        else:
            torch.manual_seed(s["seed"])
            answers = sample_answers(model, processor, samples, s["num_generations"], s["max_completion_length"],
                                     s["temperature"], resizer)
            kept.write_text(json.dumps(answers))
        rows = sampled_pairs(samples, answers, _reward_funcs(s)[0], resizer)
        if not rows:
            raise ValueError(f"no DPO pairs: the SFT model's {s['num_generations']} samples scored alike on every "
                             "prompt; raise align.temperature or align.num_generations, or add chosen/rejected "
                             "columns")
    table.rows.extend({"chosen": r["chosen"][0]["content"][0]["text"],
                       "rejected": r["rejected"][0]["content"][0]["text"]} for r in rows)
    return rows


def _dpo(s: dict[str, Any], model: Any, processor: Any, resizer: Any, out: Path, table: SampleTable,
         callbacks: list, resume: Optional[Path]) -> Any:
    from visiontune.align import DPOConfig, DPOTrainer
    from visiontune.align.mllama import check_dpo
    from visiontune.models.fast_vision import FastVisionModel

    check_dpo(model)  # before sampling the pairs
    rows = _preference_rows(s, model, processor, resizer, table, out, resume)
    FastVisionModel.for_training(model)
    return DPOTrainer(model=model, args=DPOConfig(**_common_args(s, out)), train_dataset=rows,
                      processing_class=processor, callbacks=callbacks)


def _log_run(s: dict[str, Any], adapter: Path, table: SampleTable) -> None:
    import mlflow

    config = {k: v for k, v in s.items() if k not in ("model", "images", "work_dir", "train_dir", "tracking_uri")}
    mlflow.log_dict(config, "align/config.json")
    if table.rows:
        mlflow.log_table(data=table.columns(), artifact_file="align/samples.json")
    mlflow.log_artifacts(str(adapter), artifact_path=f"align/{ADAPTER_DIR}")
    mlflow.set_tags({"align_method": s["method"], "align_loss_type": s["loss_type"],
                     "align_importance_sampling_level": s["importance_sampling_level"]})


STATE_FILE = "align_state.json"  # the align run in align.output_dir: status, fingerprint, settings, start time
LOCK_FILE = ".align.lock"  # inside align.output_dir; held (flock) while an alignment runs there


def _read_state(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _clear_checkpoints(out: Path) -> None:
    for stale in out.glob("checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _changed(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``name: old -> new`` for each setting that differs between two :func:`_settings` dicts."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return diffs


def _resume_point(out: Path, s: dict[str, Any], fingerprint: str) -> tuple[Optional[Path], dict[str, Any]]:
    """(the checkpoint to resume from or None, the state record of this run).

    An interrupted run (state ``running``) with the same fingerprint (:func:`visiontune.stages.fingerprint`:
    the stage's code, settings, dataset, SFT adapter and train run.json) resumes from its newest complete
    checkpoint. Otherwise any checkpoints left are stale and are removed, with a warning that says why.
    Only call this holding the folder's lock.
    """
    old = _read_state(out)
    checkpoint = resumable_checkpoint(out, old, fingerprint)
    if checkpoint is not None:
        log.warning("align: resuming the interrupted %s run from %s", s["method"], checkpoint)
        return checkpoint, old
    interrupted = old.get("status") == "running"
    if interrupted and old.get("fingerprint") != fingerprint:
        diffs = _changed(old.get("settings") or {}, json.loads(json.dumps(s, default=str)))
        what = ("settings changed since it was interrupted (" + "; ".join(diffs) + ")" if diffs else
                "code or inputs (the SFT adapter, its run.json, the dataset) changed since it was interrupted")
        log.warning("align: not resuming the interrupted run in %s: its %s; its checkpoints are discarded and "
                    "alignment starts over (re-run with the old settings to resume it instead)", out, what)
    elif interrupted:  # same fingerprint, no complete checkpoint
        log.warning("align: the interrupted run in %s left no complete checkpoint (align.save_steps=%s); starting "
                    "over", out, s["save_steps"])
    _clear_checkpoints(out)
    return None, {"status": "running", "fingerprint": fingerprint, "method": s["method"],
                  "started_ms": int(time.time() * 1000), "settings": s}


def _train(s: dict[str, Any], run: dict[str, Any], sft_adapter: Path, out: Path, fingerprint: str) -> dict[str, Any]:
    """Align the SFT adapter, tracked in the training run, checkpointed every ``align.save_steps`` and resumed
    from the newest complete checkpoint of an interrupted run with the same fingerprint; returns the aligned
    adapter and a summary."""
    import mlflow

    from visiontune.data.io import atomic_dir

    resume, state = _resume_point(out, s, fingerprint)
    state["mlflow_run_id"] = run["mlflow_run_id"]
    (out / STATE_FILE).write_text(json.dumps(state, indent=1, default=str))
    model, processor, resizer = _load_policy(s, sft_adapter)
    table = SampleTable(s["sample_table_rows"])
    mlflow.set_tracking_uri(run.get("tracking_uri") or resolve_tracking_uri(s["tracking_uri"]))
    with mlflow.start_run(run_id=run["mlflow_run_id"]):  # the training run, reopened by every attempt
        logged = _logged_since(run["mlflow_run_id"], state["started_ms"]) if resume else None
        callbacks = [_mlflow_callback(logged), table.callback()]
        trainer = (_grpo if s["method"] == "grpo" else _dpo)(s, model, processor, resizer, out, table, callbacks,
                                                             resume)
        if resume is not None:
            table.restore(resume)
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        adapter = out / ADAPTER_DIR
        with atomic_dir(adapter) as staging:
            model.save_pretrained(staging, selected_adapters=["default"])  # not TRL's frozen "ref" copy
            processor.save_pretrained(staging)
        _log_run(s, adapter, table)
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    name, key = ("reward", "reward") if s["method"] == "grpo" else ("accuracy", "rewards/accuracies")
    curve = [h[key] for h in history if key in h]
    return {"adapter": adapter, "global_step": trainer.state.global_step, "runtime_s": time.perf_counter() - start,
            "resumed_from": str(resume) if resume else None,
            f"{name}_first": curve[0] if curve else None, f"{name}_last": curve[-1] if curve else None,
            "fused_engine": getattr(trainer, "uses_fused_engine", False)}


class OutputDirBusyError(BlockingIOError):
    """``align.output_dir`` is in use by another align run."""


def _output_dir_lock(out: Path) -> Any:
    """Hold ``align.output_dir``'s lock (an OS lock: gone with its process, even after kill -9); fail at once if
    another alignment holds it, instead of resuming from or deleting its checkpoints."""
    from visiontune.data.io import folder_lock

    return folder_lock(out / LOCK_FILE, (
        f"{out} is in use by another align run (it holds {out / LOCK_FILE}); wait for that run to finish, or give "
        "this one its own folder: --set align.output_dir=<another folder>"), OutputDirBusyError)


def align_stage(cfg: Any) -> dict[str, Any]:
    """``visiontune align``: hand the SFT adapter on (``align.method: none``) or align it with GRPO or DPO;
    write ``align.output_dir/run.json`` for evaluate and register. Returns a summary.

    GRPO and DPO checkpoint every ``align.save_steps``; run again after a crash (even kill -9) with the same
    settings, code and inputs, the stage resumes from the newest complete checkpoint and continues the same
    MLflow run and step count, ending at the adapter an uninterrupted run reaches. With anything changed it
    says what and starts over."""
    from visiontune import stages
    from visiontune.data.io import hash_tree
    from visiontune.pipeline.evaluate import trained_adapter

    s = _settings(cfg)
    run = read_run_file(s["train_dir"])
    sft_adapter = trained_adapter(run, s["train_dir"])
    out = Path(s["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    with _output_dir_lock(out) if s["method"] != "none" else contextlib.nullcontext():
        shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)  # what an earlier run aligned is stale now
        (out / "log_history.json").unlink(missing_ok=True)
        summary: dict[str, Any] = {"method": s["method"], "sft_adapter_dir": str(sft_adapter)}
        adapter = sft_adapter
        if s["method"] != "none":
            result = _train(s, run, sft_adapter, out, stages.fingerprint("align", cfg))
            adapter = result.pop("adapter")
            summary.update(result)
        record = {**run, "adapter_dir": str(adapter), "adapter_sha256": hash_tree([adapter]),
                  "align_method": s["method"], "sft_adapter_dir": str(sft_adapter)}
        write_run_file(out, record)
        # Done: nothing to resume. The checkpoints go (they would only be hashed into DVC's cache with the folder).
        if (out / STATE_FILE).exists():
            state = _read_state(out)
            (out / STATE_FILE).write_text(json.dumps({**state, "status": "finished"}, indent=1, default=str))
        _clear_checkpoints(out)
        (out / SAMPLED_ANSWERS).unlink(missing_ok=True)
    log.info("align (%s): evaluate and register take %s", s["method"], adapter)
    return {**summary, "adapter_dir": str(adapter), "mlflow_run_id": run["mlflow_run_id"]}
