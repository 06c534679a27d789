"""Prefect tasks for the pipeline stages, one per entry of the stage registry (:mod:`visiontune.stages`).

Each task is a thin wrapper: it calls the stage's function (the same one ``dvc.yaml`` runs through the
CLI), then publishes the stage's Prefect artifacts if it has a ``report``. Nothing here is specific to
one stage; a new stage gets its task from its registry entry.

Caching is keyed on content, not on the flow run: the key is :func:`visiontune.stages.fingerprint`
(the stage's code as computed from its imports, the values of exactly the settings it reads, the
content of its inputs, where it writes). An unchanged dataset and config reuse the result; editing a
caption, a setting or a module a stage imports re-runs exactly the stages DVC would re-run.

A cached result stands for the files its run wrote, so it is reused only while they are still on disk as
that run left them. Each run records (fingerprint, :func:`visiontune.stages.outputs_signature`, cache key)
beside Prefect's results; the key function returns the recorded key only when both still match, and
otherwise a key of the task run's own (a miss: the stage runs). Without this, going back to an earlier
dataset or setting (A, then B, then A again) reused A's result over B's files, and every later stage
trained on B; outputs deleted by hand were not noticed either.

Retries: a stage with ``retry_any`` (train) retries any failure, since a crashed run resumes from its
newest checkpoint; the others retry only transient I/O errors (an ``OSError`` such as EIO from a network
filesystem hiccup): retrying cannot fix a bad configuration, a missing file or a permission problem.
No stage retries a full disk (2 s later it is still full) or a folder another run holds (that run is
refused; retrying would interleave the two runs' stages). tests/reliability/test_prefect.py runs these
retries in real flows.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

from prefect import Task, task

from visiontune import stages
from visiontune.config import PipelineConfig
from visiontune.data.io import DISK_FULL

_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _failure(state: Any) -> Optional[BaseException]:
    """The exception a failed task run's ``state`` holds."""
    if isinstance(state.data, BaseException):
        return state.data
    try:
        state.result(raise_on_failure=True)
    except BaseException as e:  # noqa: BLE001 - we only classify it
        return e
    return None


def _refused(exc: Optional[BaseException]) -> bool:
    """A folder another run holds (BlockingIOError) or a full disk: waiting 2 s changes neither."""
    return isinstance(exc, BlockingIOError) or (isinstance(exc, OSError) and exc.errno in DISK_FULL)


def retry_on_transient_io(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry OSErrors that are not 'missing', 'forbidden', 'busy' or 'disk full'."""
    exc = _failure(state)
    return isinstance(exc, OSError) and not isinstance(exc, _NOT_TRANSIENT) and not _refused(exc)


def retry_unless_refused(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn`` of a ``retry_any`` stage (train: a crashed run resumes from its newest
    checkpoint): any failure but a busy folder or a full disk."""
    return not _refused(_failure(state))


def stage_cache_key(stage: str, cfg: PipelineConfig) -> str:
    """The Prefect cache key of ``stage`` for ``cfg`` (its registry fingerprint)."""
    return f"visiontune-{stage}-{stages.fingerprint(stage, cfg)}"


def _record_file(stage: str, cfg: PipelineConfig) -> Path:
    """Where the last run of ``stage`` writing to these output paths is recorded: beside Prefect's results (one
    file per stage and resolved output paths; nothing in the project's folders)."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    where = "\n".join(str(Path(stages.render(o.path, cfg)).resolve()) for o in stages.get(stage).outs)
    name = f"{stage}-{hashlib.sha256(where.encode()).hexdigest()[:24]}.json"
    return Path(PREFECT_LOCAL_STORAGE_PATH.value()).expanduser() / "visiontune-outputs" / name


def _recorded(stage: str, cfg: PipelineConfig) -> dict[str, str]:
    try:
        return json.loads(_record_file(stage, cfg).read_text())
    except (OSError, ValueError):
        return {}


# task run id -> (fingerprint, key) its key function computed (read back by the task body to record them, so the
# inputs are not hashed a second time)
_KEYS: dict[Any, tuple[str, str]] = {}


def cache_key(stage: str, cfg: PipelineConfig, task_run_id: Any) -> str:
    """The key under which ``stage`` looks up (and stores) its result: the recorded run's key while the
    fingerprint and the outputs on disk are still that run's, else one of this task run's own."""
    fp = stages.fingerprint(stage, cfg)
    rec = _recorded(stage, cfg)
    if rec.get("fingerprint") == fp and rec.get("outputs") == stages.outputs_signature(stage, cfg) and rec.get("key"):
        key = rec["key"]
    else:
        key = f"{stage_cache_key(stage, cfg)}-{task_run_id}"
    _KEYS[task_run_id] = (fp, key)
    return key


def _record_run(stage: str, cfg: PipelineConfig) -> None:
    """After the stage ran in a task run: record its fingerprint, its outputs and the key of its result."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    computed = _KEYS.pop(ctx.task_run.id, None) if ctx is not None else None
    if computed is None:
        return
    fp, key = computed
    path = _record_file(stage, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"fingerprint": fp,
                               "outputs": stages.outputs_signature(stage, cfg), "key": key}))
    os.replace(tmp, path)


def _key_fn(name: str) -> Callable[[Any, dict[str, Any]], Optional[str]]:
    def key(context: Any, parameters: dict[str, Any]) -> Optional[str]:
        return cache_key(name, parameters["cfg"], context.task_run.id)

    key.__name__ = f"{name.replace('-', '_')}_cache_key"
    return key


def _in_run() -> bool:
    from prefect.context import get_run_context
    from prefect.exceptions import MissingContextError

    try:
        get_run_context()
    except MissingContextError:
        return False
    return True


def _report(stage: stages.Stage, result: Any, cfg: PipelineConfig) -> None:
    """The stage's Prefect artifacts; only inside a flow or task run (``task.fn(cfg)`` runs the bare function)."""
    if stage.report and _in_run():
        module, func = stage.report.split(":")
        getattr(importlib.import_module(module), func)(result, cfg)


def make_task(stage: stages.Stage) -> Task:
    """The Prefect task of one registry stage."""
    run = stage.function()

    def call(cfg: PipelineConfig) -> dict[str, Any]:
        result = run(cfg)
        _record_run(stage.name, cfg)
        _report(stage, result, cfg)
        return result

    call.__name__ = f"{stage.name.replace('-', '_')}_task"
    call.__doc__ = f"{stage.help} (Prefect task over {stage.entry})."
    retry = retry_unless_refused if stage.retry_any else retry_on_transient_io
    return task(call, name=stage.name, cache_key_fn=_key_fn(stage.name), retries=stage.retries,
                retry_delay_seconds=2, persist_result=True, retry_condition_fn=retry)


TASKS: dict[str, Task] = {s.name: make_task(s) for s in stages.pipeline()}
