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

The aligned adapter (``align.output_dir/adapter``, ``"default"`` adapter only) is evaluated and registered
in place of the SFT one. MLflow: metrics ``align/<name>`` per logging step (reward and per-reward curves,
KL, completion lengths, entropy; for DPO chosen/rejected rewards, accuracies, margins), a sample table
``align/samples.json`` (completions with their rewards, or the DPO pairs), ``align/config.json`` and the
adapter under ``align/adapter``, all in the training run named in train's ``run.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

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
             "seed", "chosen_column", "rejected_column", "sample_table_rows")
    s = {n: getattr(a, n) for n in names}
    s["model"] = {n: getattr(m, n) for n in ("name_or_path", "max_seq_length", "dtype", "load_in_4bit",
                                              "use_fused_kernels", "use_gradient_checkpointing")}
    s["images"] = {n: getattr(im, n) for n in ("resize", "resize_dimension", "snap_to_patch_size")}
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

    def wrap(self, func: Callable, first: bool) -> Callable:
        from visiontune.rewards import completion_text

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
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        return {k: [row.get(k) for row in self.rows] for k in keys}


def _mlflow_callback(prefix: str = "align/") -> Any:
    import math

    from transformers import TrainerCallback

    class MlflowMetrics(TrainerCallback):
        """Every numeric log line of the trainer into the active MLflow run, as ``align/<name>``."""

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            import mlflow

            metrics = {prefix + k: float(v) for k, v in (logs or {}).items()
                       if isinstance(v, (int, float)) and math.isfinite(float(v))}
            if metrics:
                mlflow.log_metrics(metrics, step=state.global_step)

    return MlflowMetrics()


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
                beta=s["beta"], seed=s["seed"], save_strategy="no", report_to="none", disable_tqdm=True,
                use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)


def _grpo(s: dict[str, Any], model: Any, processor: Any, resizer: Any, out: Path, table: SampleTable) -> Any:
    from visiontune.align import GRPOConfig, GRPOTrainer, grpo_rows

    funcs = _reward_funcs(s)
    args = GRPOConfig(**_common_args(s, out), num_generations=s["num_generations"],
                      max_completion_length=s["max_completion_length"], temperature=s["temperature"],
                      loss_type=s["loss_type"], importance_sampling_level=s["importance_sampling_level"],
                      reward_weights=s["reward_weights"])
    return GRPOTrainer(model=model, reward_funcs=[table.wrap(f, i == 0) for i, f in enumerate(funcs)], args=args,
                       train_dataset=grpo_rows(_samples(s), resizer), processing_class=processor,
                       callbacks=[_mlflow_callback()])


def _preference_rows(s: dict[str, Any], model: Any, processor: Any, resizer: Any, table: SampleTable) -> list[dict]:
    """Pairs from the split's chosen/rejected columns, else from sampled answers scored by the first reward."""
    from visiontune.align import dpo_rows, sample_answers, sampled_pairs

    samples = _samples(s)
    if all(s["chosen_column"] in x and s["rejected_column"] in x for x in samples[:1]):
        rows = dpo_rows(samples, s["chosen_column"], s["rejected_column"], resizer)
    else:
        answers = sample_answers(model, processor, samples, s["num_generations"], s["max_completion_length"],
                                 s["temperature"], resizer)
        rows = sampled_pairs(samples, answers, _reward_funcs(s)[0], resizer)
        if not rows:
            raise ValueError(f"no DPO pairs: the SFT model's {s['num_generations']} samples scored alike on every "
                             "prompt; raise align.temperature or align.num_generations, or add chosen/rejected "
                             "columns")
    table.rows.extend({"chosen": r["chosen"][0]["content"][0]["text"],
                       "rejected": r["rejected"][0]["content"][0]["text"]} for r in rows)
    return rows


def _dpo(s: dict[str, Any], model: Any, processor: Any, resizer: Any, out: Path, table: SampleTable) -> Any:
    from visiontune.align import DPOConfig, DPOTrainer
    from visiontune.models.fast_vision import FastVisionModel

    rows = _preference_rows(s, model, processor, resizer, table)
    FastVisionModel.for_training(model)
    return DPOTrainer(model=model, args=DPOConfig(**_common_args(s, out)), train_dataset=rows,
                      processing_class=processor, callbacks=[_mlflow_callback()])


def _log_run(s: dict[str, Any], adapter: Path, table: SampleTable) -> None:
    import mlflow

    config = {k: v for k, v in s.items() if k not in ("model", "images", "work_dir", "train_dir", "tracking_uri")}
    mlflow.log_dict(config, "align/config.json")
    if table.rows:
        mlflow.log_table(data=table.columns(), artifact_file="align/samples.json")
    mlflow.log_artifacts(str(adapter), artifact_path=f"align/{ADAPTER_DIR}")
    mlflow.set_tags({"align_method": s["method"], "align_loss_type": s["loss_type"],
                     "align_importance_sampling_level": s["importance_sampling_level"]})


def _train(s: dict[str, Any], run: dict[str, Any], sft_adapter: Path, out: Path) -> dict[str, Any]:
    """Align the SFT adapter, tracked in the training run; returns the aligned adapter and a summary."""
    import mlflow

    model, processor, resizer = _load_policy(s, sft_adapter)
    table = SampleTable(s["sample_table_rows"])
    mlflow.set_tracking_uri(run.get("tracking_uri") or resolve_tracking_uri(s["tracking_uri"]))
    with mlflow.start_run(run_id=run["mlflow_run_id"]):
        trainer = (_grpo if s["method"] == "grpo" else _dpo)(s, model, processor, resizer, out, table)
        start = time.perf_counter()
        trainer.train()
        adapter = out / ADAPTER_DIR
        model.save_pretrained(adapter, selected_adapters=["default"])  # not TRL's frozen "ref" copy
        processor.save_pretrained(adapter)
        _log_run(s, adapter, table)
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    name, key = ("reward", "reward") if s["method"] == "grpo" else ("accuracy", "rewards/accuracies")
    curve = [h[key] for h in history if key in h]
    return {"adapter": adapter, "global_step": trainer.state.global_step, "runtime_s": time.perf_counter() - start,
            f"{name}_first": curve[0] if curve else None, f"{name}_last": curve[-1] if curve else None,
            "fused_engine": getattr(trainer, "uses_fused_engine", False)}


def align_stage(cfg: Any) -> dict[str, Any]:
    """``visiontune align``: hand the SFT adapter on (``align.method: none``) or align it with GRPO or DPO;
    write ``align.output_dir/run.json`` for evaluate and register. Returns a summary."""
    from visiontune.data.io import hash_tree
    from visiontune.pipeline.evaluate import trained_adapter

    s = _settings(cfg)
    run = read_run_file(s["train_dir"])
    sft_adapter = trained_adapter(run, s["train_dir"])
    out = Path(s["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)  # what an earlier run aligned is stale now
    (out / "log_history.json").unlink(missing_ok=True)
    summary: dict[str, Any] = {"method": s["method"], "sft_adapter_dir": str(sft_adapter)}
    adapter = sft_adapter
    if s["method"] != "none":
        result = _train(s, run, sft_adapter, out)
        adapter = result.pop("adapter")
        summary.update(result)
    record = {**run, "adapter_dir": str(adapter), "adapter_sha256": hash_tree([adapter]),
              "align_method": s["method"], "sft_adapter_dir": str(sft_adapter)}
    write_run_file(out, record)
    log.info("align (%s): evaluate and register take %s", s["method"], adapter)
    return {**summary, "adapter_dir": str(adapter), "mlflow_run_id": run["mlflow_run_id"]}
