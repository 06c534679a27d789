"""Evaluation during training: generation-based metrics on a fixed validation subset, as MLflow curves.

The loss says how well the model predicts the reference tokens under teacher forcing; what a user gets is
what it *generates*. Every ``train.eval_every_steps`` optimizer steps (and at the last step) the
:class:`GenerationEvalCallback` makes the model answer the first ``train.eval_samples`` rows of the
validation split greedily, through the one generation path of the evaluate stage and the served model
(:func:`visiontune.inference.generate_answers`, with the training image rule), and logs ``val_cer``,
``val_exact_match`` and ``val_seconds`` (what the evaluation cost) to the training run at that step, beside
the loss. The entries also go into the trainer's log history, so they are in every checkpoint's
``trainer_state.json`` (a resumed run keeps its curve and its best step) and in ``log_history.json``.

What it costs, measured on the demo model (2 CPU cores shared with other work): one evaluation of 32 pages
takes about one to two training steps (0.36 s on a quiet machine, where a step took 0.2-0.5 s); a 600-step
run evaluated every 100 steps spent 32.7 s of 1,757 s in evaluation (1.9%), so the default of every 200
steps costs the demo's 1,200-step training about 1%.

The validation split, not the test split: ``train.select_best`` picks an adapter on these numbers, and
picking on the test split would make the final test scores optimistic.

``train.select_best`` (``cer`` or ``exact_match``): whenever the metric improves, the adapter is saved to
``<train.output_dir>/best-adapter``; when training ends its weights are loaded back into the model, so the
adapter the train stage saves (and evaluate and register use) is the best one. The choice is recorded in
the run as tags ``select_best``, ``best_step``, ``selected_step`` and ``best_val_<metric>``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from transformers import TrainerCallback

from visiontune.images import ImageRule
from visiontune.inference import generate_answers, split_conversation
from visiontune.pipeline import distributed

log = logging.getLogger(__name__)

METRICS = ("cer", "exact_match")  # what the in-training evaluation logs, as val_<metric>
LOWER_IS_BETTER = frozenset({"cer"})
BEST_DIR = "best-adapter"
BEST_RECORD = "best.json"


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match and corpus CER (character edits / reference characters, stripped strings), the evaluate
    stage's definitions. Computed here, not imported: the train stage must not re-run when evaluate.py changes."""
    import jiwer

    preds, refs = [p.strip() for p in predictions], [r.strip() for r in references]
    out = jiwer.process_characters(refs, preds)
    edits = out.substitutions + out.deletions + out.insertions
    return {"cer": edits / max(1, sum(len(r) for r in refs)),
            "exact_match": sum(p == r for p, r in zip(preds, refs)) / max(1, len(refs))}


def is_better(metric: str, new: float, old: Optional[float]) -> bool:
    """Whether ``new`` improves on ``old`` (None: nothing yet) for ``metric``."""
    return old is None or (new < old if metric in LOWER_IS_BETTER else new > old)


class GenerationEvalCallback(TrainerCallback):
    """Generates answers for a fixed sample set every ``every_steps`` steps and at the end; see the module doc."""

    def __init__(self, samples: list[dict], references: list[str], processor: Any, *, every_steps: int,
                 max_new_tokens: int, batch_size: int, rule: ImageRule, output_dir: Path,
                 select_best: Optional[str] = None, mlflow_active: bool = True):
        self.samples, self.references, self.processor = samples, references, processor
        self.every, self.max_new_tokens, self.batch_size, self.rule = every_steps, max_new_tokens, batch_size, rule
        self.best_dir, self.select_best, self.mlflow_active = Path(output_dir) / BEST_DIR, select_best, mlflow_active
        self.history: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
        if state.global_step == 0 and distributed.current().is_main:  # a fresh run: an earlier run's best is not ours
            shutil.rmtree(self.best_dir, ignore_errors=True)
        self.history = [h for h in state.log_history if "val_cer" in h]  # restored from a checkpoint on resume

    def on_step_end(self, args, state, control, model=None, **kw):  # noqa: ANN001
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self.evaluate(model, state)

    def on_train_end(self, args, state, control, model=None, **kw):  # noqa: ANN001
        if not self.history or self.history[-1]["step"] != state.global_step:  # training stopped off the schedule
            self.evaluate(model, state)
        if self.select_best:
            self._restore_best(model)

    def best(self) -> Optional[dict[str, float]]:
        """The history entry best on ``select_best`` (the first of equals), or None."""
        best = None
        for h in self.history:
            if self.select_best and is_better(self.select_best, h[f"val_{self.select_best}"],
                                              None if best is None else best[f"val_{self.select_best}"]):
                best = h
        return best

    def evaluate(self, model: Any, state: Any) -> dict[str, float]:
        """Score ``model`` on the sample set at ``state.global_step``; log, record and keep the best adapter."""
        from visiontune.models.fast_vision import FastVisionModel

        t0 = time.perf_counter()
        try:
            preds = generate_answers(model, self.processor, self.samples, self.max_new_tokens, self.batch_size,
                                     rule=self.rule, progress=False)
        finally:
            FastVisionModel.for_training(model)
        scores = generation_scores(preds, self.references)
        entry = {"step": state.global_step, **{f"val_{k}": round(float(v), 6) for k, v in scores.items()},
                 "val_seconds": round(time.perf_counter() - t0, 3)}
        state.log_history.append(entry)
        self.history.append(entry)
        log.info("step %d: val_cer %.4f, val_exact_match %.4f (%d samples, %.1f s)", entry["step"], entry["val_cer"],
                 entry["val_exact_match"], len(self.samples), entry["val_seconds"])
        if self.mlflow_active:
            import mlflow

            mlflow.log_metrics({k: v for k, v in entry.items() if k != "step"}, step=state.global_step)
        if self.select_best and self.best() is entry:  # every rank evaluates; rank 0 writes (FSDP2: gathered first)
            distributed.save_adapter(model, self.best_dir)
            if distributed.current().is_main:
                (self.best_dir / BEST_RECORD).write_text(json.dumps(entry))
        return entry

    def _restore_best(self, model: Any) -> None:
        """Load the best evaluation's adapter weights into ``model`` and record the choice in the run."""
        from safetensors.torch import load_file

        best, last = self.best(), self.history[-1]
        record = self.best_dir / BEST_RECORD
        saved = json.loads(record.read_text()) if record.exists() else {}
        selected = last
        if best is not None and best is not last and saved.get("step") == best["step"]:
            distributed.load_adapter_weights(model, load_file(str(self.best_dir / "adapter_model.safetensors")))
            selected = best
        elif best is not None and best is not last:
            log.warning("the best adapter (step %s) was not saved (found %s): keeping the last one", best["step"],
                        saved.get("step"))
        metric = self.select_best
        log.info("select_best=%s: best step %s, adapter of step %s kept", metric, best and best["step"], selected["step"])
        if self.mlflow_active:
            import mlflow

            mlflow.set_tags({"select_best": metric, "best_step": best["step"] if best else "", "selected_step":
                             selected["step"], f"best_val_{metric}": best[f"val_{metric}"] if best else ""})


def _eval_rows(dataset_dir: Path, n: int) -> tuple[list[dict], list[str]]:
    """(samples, references): the first ``n`` rows of the validation split that have an answer."""
    from visiontune.data.convert import load_split

    ds = load_split(dataset_dir, "validation", setting="split (train.eval_every_steps evaluates on it; 0 turns it off)")
    samples, references = [], []
    for row in ds.select(range(min(n, len(ds)))):
        reference = split_conversation(row["messages"])[1]
        if reference and reference.strip():
            samples.append(row)
            references.append(reference)
    return samples, references


def eval_callbacks(cfg: Any, processor: Any, output_dir: Path, mlflow_active: bool = True) -> list[TrainerCallback]:
    """The train stage's evaluation callback as ``cfg.train`` configures it (an empty list when it is off or
    there is nothing to evaluate)."""
    t, im = cfg.train, cfg.images
    every, n, max_new, select = t.eval_every_steps, t.eval_samples, t.eval_max_new_tokens, t.select_best
    batch_size = t.per_device_train_batch_size
    rule = ImageRule.of(im)
    if select is not None and (select not in METRICS or every <= 0 or n <= 0):  # each value's range: the config's
        raise ValueError(f"train.select_best={select!r}: use null, or one of {', '.join(METRICS)} together with "
                         f"train.eval_every_steps > 0 and train.eval_samples > 0 (now {every} and {n})")
    if every == 0 or n == 0:
        return []
    samples, references = _eval_rows(Path(cfg.data.work_dir) / "dataset", n)
    if not samples:
        log.warning("the validation split has no rows with an answer: no evaluation during training")
        return []
    return [GenerationEvalCallback(samples, references, processor, every_steps=every, max_new_tokens=max_new,
                                   batch_size=batch_size, rule=rule, output_dir=output_dir, select_best=select,
                                   mlflow_active=mlflow_active)]
