"""Where the data stages do their per-image work: this machine's cores, or a Dask cluster.

Validation probes every image and normalization resizes every image; both are a pure function mapped over
a list, whose results come back in order. :class:`DataExecutor` (read from the ``data`` section) runs that
map either

* ``local``: in one process per core of this machine (:mod:`multiprocessing`, as before), or
* ``dask``: as a Prefect flow whose task runner is prefect-dask's ``DaskTaskRunner``: the list is cut into
  chunks of ``data.dask_chunk`` records (validation: all the images of those annotation rows; normalization:
  that many images), one Prefect task per chunk, on the scheduler at ``data.dask_address`` or on a
  temporary ``LocalCluster`` of ``data.dask_workers`` single-threaded worker processes.

Everything else (the Great Expectations suites, the manifest, every output file but the normalized images)
stays in the stage's own process, and the results are put back in input order, so the outputs are
byte-identical to a local run (tests/data/test_executor.py). Workers read the raw images and write the
normalized ones at the paths the stage gives them: a remote cluster needs the data on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class DataExecutor:
    """How the data stages map their per-image function (see the module docstring)."""

    kind: str = "local"  # "local" or "dask"
    dask_address: Optional[str] = None
    dask_workers: int = 0
    dask_chunk: int = 64

    @classmethod
    def of(cls, data: Any) -> "DataExecutor":
        """The executor the ``data`` config section asks for (every field read, whichever the kind)."""
        return cls(kind=data.executor, dask_address=data.dask_address, dask_workers=data.dask_workers,
                   dask_chunk=data.dask_chunk)

    def map(self, fn: Callable[[T], R], items: Sequence[T], local: Callable[[list[T]], list[R]],
            groups: Optional[Sequence[Any]] = None, name: str = "data") -> list[R]:
        """``[fn(x) for x in items]``: by ``local(items)`` for the local kind, else on Dask (``fn`` must be a
        module-level function). ``groups`` (one key per item, equal keys adjacent) keeps the items of one
        record in one chunk; without it each item counts as a record of its own."""
        if self.kind == "local" or not items:
            return local(list(items))
        if self.kind != "dask":
            raise ValueError(f"data.executor = {self.kind!r}: use 'local' or 'dask'")
        return _run_on_dask(self, fn, chunk_by_record(list(items), groups, self.dask_chunk), name)


def chunk_by_record(items: list[T], groups: Optional[Sequence[Any]], per_chunk: int) -> list[list[T]]:
    """``items`` cut into consecutive chunks of ``per_chunk`` records (a record: a run of equal ``groups`` keys)."""
    keys = list(groups) if groups is not None else list(range(len(items)))
    if len(keys) != len(items):
        raise ValueError(f"{len(keys)} group keys for {len(items)} items")
    chunks: list[list[T]] = []
    records = 0
    for i, item in enumerate(items):
        new_record = i == 0 or keys[i] != keys[i - 1]
        if new_record:
            if records == per_chunk or not chunks:
                chunks.append([])
                records = 0
            records += 1
        chunks[-1].append(item)
    return chunks


def _map_chunk(fn: Callable[[T], R], chunk: list[T]) -> list[R]:
    """One Dask task: ``fn`` over one chunk, on a worker."""
    return [fn(x) for x in chunk]


def _task_runner(ex: DataExecutor) -> Any:
    from prefect_dask import DaskTaskRunner

    if ex.dask_address:
        return DaskTaskRunner(address=ex.dask_address)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Single-threaded worker processes: the per-image work is CPU-bound Python and C that holds the GIL in
    # places (Pillow, numpy), so processes, not threads, give each image its own core. No dashboard: no port
    # to find free, nothing to serve.
    return DaskTaskRunner(cluster_kwargs={"n_workers": ex.dask_workers or cores, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None,
                                          "silence_logs": logging.WARNING})


def _api_for_workers() -> contextlib.AbstractContextManager:
    """Settings under which the Dask workers report to this process's Prefect API.

    Task runs on the workers report their states to the API in the settings Prefect ships with each task.
    Without ``PREFECT_API_URL`` (no server configured) each worker would start a temporary server of its own
    (about 10 s each, measured); instead they are pointed at the one this process runs (started here if the
    stage was called outside a flow)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        return contextlib.nullcontext()
    # As the retrain flow does: the temporary server's usage heartbeat only logs errors offline.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    return temporary_settings({PREFECT_API_URL: url})


def _run_on_dask(ex: DataExecutor, fn: Callable[[T], R], chunks: list[list[T]], name: str) -> list[R]:
    """A Prefect flow on a DaskTaskRunner: one task per chunk; the results in chunk order, flattened."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    # No cache and no persisted results: a chunk's inputs can be image bytes (embedded images) and its
    # outputs are in the flow's memory only until they are joined; the stage's own task caches the stage.
    chunk_task = task(_map_chunk, name=f"{name}-chunk", cache_policy=NO_CACHE, persist_result=False)

    @flow(name=f"visiontune-{name}-dask", task_runner=_task_runner(ex), persist_result=False,
          validate_parameters=False)
    def on_dask() -> list[list[R]]:  # no parameters: nothing of the data goes to the Prefect API
        futures = [chunk_task.submit(fn, c) for c in chunks]
        return [f.result() for f in futures]

    import dask

    with _environ_kept(), _api_for_workers(), dask.config.set(_WORKER_ENV):
        return [r for part in on_dask() for r in part]


# distributed starts worker processes with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's adaptive mmap
# threshold: every image buffer is then a fresh mmap whose pages fault in. Measured on normalize: 23.5 against
# 17.7 ms of CPU per image. None drops it (distributed's documented way to unset a pre-spawn variable).
_WORKER_ENV = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


@contextlib.contextmanager
def _environ_kept() -> Any:
    """Undo what starting a LocalCluster writes into this process's ``os.environ`` (distributed's Nanny sets its
    workers' variables here before spawning them, e.g. OMP_NUM_THREADS=1, which a later ``import torch`` in the
    same ``visiontune run`` would obey)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
