"""MLflow plumbing shared by the train, evaluate and register stages.

The default store is embedded: a SQLite database (the model registry needs a database backend) and an
artifact folder under ``mlflow/`` at the repository root. ``MLFLOW_TRACKING_URI`` (or
``tracking.uri``) points everything at a real tracking server instead, unchanged.

Per-step metrics of a training go through a :class:`MetricsBuffer` (:func:`buffered_metrics`,
:func:`log_metrics`): a tracking server that crashes or restarts mid-training delays them, never loses
them, and never stalls the training (tests/reliability/test_tracking_server.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

log = logging.getLogger(__name__)

RUN_FILE = "run.json"  # written by train (train.output_dir) and align (align.output_dir: read by evaluate, register)


def default_store(root: Optional[Path] = None) -> tuple[str, str]:
    """(tracking URI, artifact location) of the embedded store under ``<root>/mlflow``."""
    root = Path(root or os.getcwd()).resolve()
    store = root / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


def resolve_tracking_uri(configured: Optional[str]) -> str:
    """``tracking.uri`` if set, else ``$MLFLOW_TRACKING_URI``, else the embedded store."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_store()[0]


def setup_mlflow(configured_uri: Optional[str], experiment: str) -> str:
    """Point MLflow at the store and make sure ``experiment`` exists (artifacts under mlflow/ when embedded).

    Returns the experiment id. Raises ImportError when MLflow is not installed, also when ``import mlflow``
    only finds the repository's own ``mlflow/`` store folder (a namespace package, run from the repo root).
    """
    import mlflow

    if getattr(mlflow, "__file__", None) is None:
        raise ImportError(f"MLflow is not installed: `import mlflow` found only the folder(s) {list(mlflow.__path__)} "
                          "(the tracking store); pip install mlflow")
    uri = resolve_tracking_uri(configured_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    artifact_location = default_store()[1] if uri.startswith("sqlite:") else None
    return client.create_experiment(experiment, artifact_location=artifact_location)


def git_commit(cwd: Optional[Path] = None) -> str:
    """The current git commit (with '-dirty' when the tree has changes), or 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def dvc_data_hash(dvc_file: Path = Path("data.dvc")) -> str:
    """The md5 DVC recorded for the raw data (``outs[0].md5`` of ``data.dvc``), or 'untracked'."""
    import yaml

    if not dvc_file.exists():
        return "untracked"
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "untracked"))


def read_run_file(output_dir: str | Path) -> dict[str, Any]:
    """The train stage's record of its MLflow run and adapter location."""
    path = Path(output_dir) / RUN_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the train stage first (`visiontune train`, then `visiontune align`)")
    return json.loads(path.read_text())


def write_run_file(output_dir: str | Path, record: dict[str, Any]) -> Path:
    path = Path(output_dir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def mark_killed(record: dict[str, Any]) -> Optional[str]:
    """Set the MLflow run of a train ``record`` whose process died (run.json still says 'running') to KILLED.

    Returns its run id, or None when it is not RUNNING (a Python error already ended it as FAILED) or its
    store cannot be reached (a warning then: the next training must not fail over bookkeeping).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run_id = record.get("mlflow_run_id")
    if not run_id:
        return None
    try:
        client = MlflowClient(tracking_uri=record.get("tracking_uri"))
        if client.get_run(run_id).info.status != "RUNNING":
            return None
        client.set_terminated(run_id, "KILLED")
    except (MlflowException, OSError) as e:
        log.warning("could not mark the orphaned MLflow run %s as KILLED: %s", run_id, e)
        return None
    log.warning("MLflow run %s was left RUNNING by a training that died; marked KILLED", run_id)
    return run_id


# ------------------------------------------------------------------------------------ buffered metrics
FLUSH_TIMEOUT_S = 600.0  # how long the end of a training waits for an unreachable store to take its metrics
RETRY_S = (1.0, 30.0)  # pause between two failed sends: doubles from the first value up to the second
BATCH = 1000  # metrics per request: MLflow's limit for one log_batch


class TrackingUnavailableError(OSError):
    """Metrics of a run could not be delivered to its tracking store."""


def _permanent(error: Exception) -> bool:
    """An error that sending again cannot fix: the store refused the request (HTTP 4xx other than 429).
    Connection errors, 5xx and a locked SQLite file are transient."""
    from mlflow.exceptions import MlflowException

    status = error.get_http_status_code() if isinstance(error, MlflowException) else 500
    return 400 <= status < 500 and status != 429


class MetricsBuffer:
    """The metrics of one MLflow run, sent in batches by a background thread.

    :meth:`log` only appends (with the time of the call, so the recorded timestamps are the training's) and
    returns at once. The thread sends whatever is pending; when the store is unreachable it keeps the
    metrics and tries again, with a growing pause (:data:`RETRY_S`; each attempt also carries MLflow's own
    HTTP retries, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``). A batch sent twice (the answer lost in a crash)
    is harmless: the store drops a metric identical in key, step, timestamp and value. :meth:`close`
    waits until everything is sent, for at most ``flush_timeout_s``.
    """

    def __init__(self, run_id: str, tracking_uri: str, flush_timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        from mlflow import MlflowClient

        self.run_id, self.tracking_uri, self.flush_timeout_s = run_id, tracking_uri, flush_timeout_s
        self.sent = 0
        self.failed_attempts = 0
        self._client = MlflowClient(tracking_uri)
        self._pending: list[Any] = []
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._error: Optional[Exception] = None  # the last failure
        self._refused = False  # a permanent failure stopped the sender
        self._thread = threading.Thread(target=self._send_loop, name=f"metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` (name -> value) at ``step``."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        with self._cond:
            self._pending.extend(Metric(k, float(v), timestamp, step) for k, v in metrics.items())
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def _next_batch(self) -> list[Any]:
        with self._cond:
            while not self._pending and not self._closing.is_set():
                self._cond.wait()
            return self._pending[:BATCH]

    def _send_loop(self) -> None:
        pause = RETRY_S[0]
        while batch := self._next_batch():
            try:
                self._client.log_batch(self.run_id, metrics=batch)
            except Exception as e:  # noqa: BLE001 - every failure keeps the metrics; only 4xx stops
                self._error, self.failed_attempts = e, self.failed_attempts + 1
                if _permanent(e):
                    log.error("the tracking store refused metrics of run %s: %s", self.run_id, e)
                    self._refused = True
                    return
                if self.failed_attempts == 1:
                    log.warning("tracking store %s unreachable; metrics of run %s are kept and sent when it is "
                                "back: %s", self.tracking_uri, self.run_id, e)
                self._closing.wait(pause)  # a close() cuts the pause short: try once more at once
                pause = min(2 * pause, RETRY_S[1])
                continue
            pause = RETRY_S[0]
            with self._cond:
                del self._pending[:len(batch)]
                self.sent += len(batch)

    def close(self) -> None:
        """Wait until every queued metric is sent (at most ``flush_timeout_s``); raise
        :class:`TrackingUnavailableError` naming how many were not, if any."""
        with self._cond:
            self._closing.set()
            self._cond.notify_all()
        self._thread.join(self.flush_timeout_s)
        left = self.pending()
        if left:
            raise TrackingUnavailableError(
                f"{left} metric values of MLflow run {self.run_id} could not be sent to {self.tracking_uri} "
                f"({'refused' if self._refused else f'unreachable for {self.flush_timeout_s:.0f} s'}: {self._error}); "
                "they are in the training's log_history.json. Bring the tracking server back and re-run the "
                "stage: it resumes the same run")


_BUFFERS: dict[str, MetricsBuffer] = {}  # run id -> the buffer open for it (buffered_metrics)


def log_metrics(metrics: dict[str, float], step: int) -> None:
    """Log ``metrics`` at ``step`` to the active run: through its buffer when :func:`buffered_metrics` opened
    one for it, else directly (``mlflow.log_metrics``)."""
    import mlflow

    run = mlflow.active_run()
    buffer = _BUFFERS.get(run.info.run_id) if run else None
    if buffer is None:
        mlflow.log_metrics(metrics, step=step)
    else:
        buffer.log(metrics, step)


@contextlib.contextmanager
def buffered_metrics(run_id: str, tracking_uri: str,
                     flush_timeout_s: float = FLUSH_TIMEOUT_S) -> Iterator[MetricsBuffer]:
    """Send :func:`log_metrics` calls for ``run_id`` through a :class:`MetricsBuffer` while the body runs,
    and deliver all of them before it ends. When the body raises, what it logged is still delivered (a
    resumed run continues those curves); a delivery failure then only warns, so the body's error shows."""
    buffer = MetricsBuffer(run_id, tracking_uri, flush_timeout_s)
    _BUFFERS[run_id] = buffer
    try:
        yield buffer
    except BaseException:
        try:
            buffer.close()
        except TrackingUnavailableError as e:
            log.warning("%s", e)
        raise
    finally:
        _BUFFERS.pop(run_id, None)
    buffer.close()
