"""Prefect 3 tasks for the model stages: thin wrappers over train / evaluate / register.

Same caching rule as the data tasks (see :mod:`visiontune.tasks.data`): the key hashes the stage's
code, the values of exactly the params it reads (its module's ``PARAMS``, the list ``dvc.yaml``
declares) and the content of its input files, so an unchanged dataset and config reuse the trained
adapter, and a changed caption or learning rate retrains.

Retries: training retries once: a crashed run resumes from its newest checkpoint, so the retry
continues rather than starting over. Evaluation and registration retry on transient I/O errors only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

from prefect import task
from prefect.artifacts import create_table_artifact

from visiontune.config import PipelineConfig
from visiontune.data.io import hash_tree
from visiontune.pipeline import evaluate, register, train
from visiontune.tasks.data import retry_on_transient_io

_MODULES: dict[str, Any] = {"train": train, "evaluate": evaluate, "register": register}


def _inputs(stage: str, cfg: PipelineConfig) -> list[Path]:
    out = Path(cfg.train.output_dir)
    if stage == "train":
        return [Path(cfg.data.work_dir) / "dataset"]
    if stage == "evaluate":
        return [Path(cfg.data.work_dir) / "dataset", out / "adapter"]
    return [out / "adapter", Path(cfg.eval.metrics_file)]


def stage_cache_key(stage: str, cfg: PipelineConfig) -> str:
    """Cache key of a model stage: code + the params it reads + content of its inputs + where it writes."""
    module = _MODULES[stage]
    h = hashlib.sha256(stage.encode())
    h.update(Path(module.__file__).read_bytes())
    h.update(json.dumps({k: cfg.get(k) for k in module.PARAMS}, sort_keys=True, default=str).encode())
    h.update(str(Path(cfg.train.output_dir).resolve()).encode())
    h.update(hash_tree([p for p in _inputs(stage, cfg) if p.exists()]).encode())
    return f"visiontune-model-{stage}-{h.hexdigest()}"


def _key_fn(stage: str) -> Callable[[Any, dict[str, Any]], Optional[str]]:
    def key(context: Any, parameters: dict[str, Any]) -> Optional[str]:
        return stage_cache_key(stage, parameters["cfg"])

    key.__name__ = f"{stage}_cache_key"
    return key


@task(name="train", cache_key_fn=_key_fn("train"), retries=1, retry_delay_seconds=5, persist_result=True)
def train_task(cfg: PipelineConfig) -> dict[str, Any]:
    """LoRA training, tracked in MLflow; a retry resumes from the newest checkpoint."""
    return train.train_stage(cfg)


@task(name="evaluate", cache_key_fn=_key_fn("evaluate"), retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_on_transient_io, persist_result=True)
def evaluate_task(cfg: PipelineConfig) -> dict[str, Any]:
    """Base vs fine-tuned metrics on the held-out split; publishes them as a Prefect table artifact."""
    result = evaluate.evaluate_stage(cfg)
    metrics = json.loads(Path(cfg.eval.metrics_file).read_text())
    rows = [{"model": name, **{k: round(float(v), 4) for k, v in values.items() if isinstance(v, (int, float))}}
            for name, values in metrics.items() if isinstance(values, dict)]
    if rows:
        create_table_artifact(key="evaluation-metrics", table=rows,
                              description=f"Held-out metrics ({cfg.eval.split}); primary: {cfg.eval.primary_metric}")
    return result


@task(name="register", cache_key_fn=_key_fn("register"), retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_on_transient_io, persist_result=True)
def register_task(cfg: PipelineConfig) -> dict[str, Any]:
    """Log + register the model; champion only if it beats the current one (decision is an artifact)."""
    return register.register_stage(cfg)
