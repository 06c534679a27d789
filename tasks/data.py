"""Prefect 3 tasks for the data stage: thin wrappers over the stage functions that ``dvc.yaml`` runs.

Caching is keyed on content, not on the flow run: the key hashes the stage's code, the values of exactly
the params the stage reads (``PARAMS`` of its module, the same list ``dvc.yaml`` declares) and the
sha256 of its input files. So a re-run of the flow with unchanged data and params reuses the result, and
editing one caption or one setting re-runs exactly the stages that see it — the same rule DVC applies.
(If you delete a stage's outputs by hand, run with ``refresh_cache=True``; the stages are idempotent.)

Retries: only transient I/O errors (an ``OSError`` other than a missing file or a permission problem,
e.g. a network filesystem hiccup) are retried; a bad configuration or a failed validation is not, since
retrying cannot fix it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

from prefect import task

from visiontune.config import PipelineConfig
from visiontune.data import convert, normalize, validate
from visiontune.data.io import annotations_path, hash_tree

_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _code_hash(*modules: Any) -> str:
    h = hashlib.sha256()
    for m in modules:
        h.update(Path(m.__file__).read_bytes())
    return h.hexdigest()


def _input_files(stage: str, cfg: PipelineConfig) -> list[Path]:
    d = cfg.data
    work = Path(d.work_dir)
    if stage == "validate":
        return [Path(d.raw_dir), annotations_path(d.raw_dir, d.annotations)]
    if stage == "normalize":  # records.jsonl carries the sha256 of every source image
        return [work / "validated" / "records.jsonl"]
    return [work / "validated" / "records.jsonl", work / "normalized" / "manifest.json"]


_STAGES: dict[str, Any] = {"validate": validate, "normalize": normalize, "convert": convert}


def stage_cache_key(stage: str, cfg: PipelineConfig) -> str:
    """Cache key of ``stage`` for ``cfg``: code + the params it reads + content of its input files."""
    import visiontune.data.conversation as conversation
    import visiontune.data.io as io_mod
    import visiontune.data.probe as probe

    module = _STAGES[stage]
    params = {k: cfg.get(k) for k in module.PARAMS}
    h = hashlib.sha256()
    h.update(stage.encode())
    h.update(_code_hash(module, io_mod, probe, conversation).encode())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    # Where the outputs go, resolved: two checkouts with identical data must not share a cached result,
    # since the cached summary would stand for files that exist only in the other one.
    h.update(str(Path(cfg.data.work_dir).resolve()).encode())
    h.update(hash_tree(_input_files(stage, cfg)).encode())
    return f"visiontune-data-{stage}-{h.hexdigest()}"


def _key_fn(stage: str) -> Callable[[Any, dict[str, Any]], Optional[str]]:
    def key(context: Any, parameters: dict[str, Any]) -> Optional[str]:
        return stage_cache_key(stage, parameters["cfg"])

    key.__name__ = f"{stage}_cache_key"
    return key


def retry_on_transient_io(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry OSErrors that are not 'missing' or 'forbidden'."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:  # noqa: BLE001 - we only classify it
            exc = e
    return isinstance(exc, OSError) and not isinstance(exc, _NOT_TRANSIENT)


_COMMON = dict(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_transient_io, persist_result=True)


@task(name="validate", cache_key_fn=_key_fn("validate"), **_COMMON)
def validate_task(cfg: PipelineConfig) -> dict[str, Any]:
    """Validate raw data with the GX suites and quarantine bad records (see :func:`validate.validate_stage`)."""
    return validate.validate_stage(cfg)


@task(name="normalize", cache_key_fn=_key_fn("normalize"), **_COMMON)
def normalize_task(cfg: PipelineConfig) -> dict[str, Any]:
    """Normalize valid images, content-addressed (see :func:`normalize.normalize_stage`)."""
    return normalize.normalize_stage(cfg)


@task(name="convert", cache_key_fn=_key_fn("convert"), **_COMMON)
def convert_task(cfg: PipelineConfig) -> dict[str, Any]:
    """Build the split conversation DatasetDict (see :func:`convert.convert_stage`)."""
    return convert.convert_stage(cfg)
