"""The one place where visiontune silences known-benign output of the libraries it runs on.

A first run should show visiontune's progress bars, one line per stage and the final summary, and nothing
that looks like a crash. What was ours is fixed at its cause (the train stage passes TRL's current
``activation_checkpointing`` name; the served model's ``predict`` is annotated; pool workers drop the
signal handlers they inherit, :func:`pool_worker_init`). What is left comes from third-party code and says
nothing a user can act on; :func:`install` filters exactly those messages, each by its text and the module
or logger that emits it, so any other warning from the same library still shows:

* transformers ``FutureWarning: `is_gradient_checkpointing` is deprecated``: read by PEFT's ``PeftModel``
  (0.21) on every adapter wrap/load; visiontune itself uses ``is_activation_checkpointing``.
* bitsandbytes ``Failed to load CPU gemm_4bit_forward from kernels-community``: logged on import by
  bitsandbytes 0.50's CPU backend, which then uses its bundled kernel (the optional ``kernels`` package
  would only speed up 4-bit CPU matmuls on AVX512-BF16 machines).
* Great Expectations ``Created temporary directory ... for ephemeral docs site``: an INFO line of every
  ephemeral context; visiontune builds no docs site.
* MLflow's INFO lines on creating/upgrading the SQLite store and on starting/stopping system-metrics
  monitoring, and its "Downloading artifacts" progress bars (``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``,
  unless set), and the ``datasets`` "Saving the dataset" bars of the convert stage
  (``HF_DATASETS_DISABLE_PROGRESS_BARS``, unless set).

The CLI calls :func:`install` (so do ``visiontune run``, every stage and ``dvc repro``); in a notebook call
it yourself for the same output. ``tests/test_quiet.py`` runs stages and checks none of these appear.
"""

from __future__ import annotations

import logging
import os
import signal
import warnings

# (logger name, start of the message) of third-party log records that carry no information for a user.
_BENIGN_LOG_RECORDS = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("great_expectations.data_context.types.base", "Created temporary directory"),
    ("mlflow.store.db.utils", "Creating initial MLflow database tables"),
    ("mlflow.store.db.utils", "Updating database tables"),
    ("mlflow.system_metrics.system_metrics_monitor", "Skip logging GPU metrics"),
    ("mlflow.system_metrics.system_metrics_monitor", "Started monitoring system metrics"),
    ("mlflow.system_metrics.system_metrics_monitor", "Stopping system metrics monitoring"),
    ("mlflow.system_metrics.system_metrics_monitor", "Successfully terminated system metrics monitoring"),
)

# (message regex, category, module regex) of third-party warnings, as ``warnings.filterwarnings`` takes them.
_BENIGN_WARNINGS = (
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
)

_QUIET_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def install() -> None:
    """Filter the known-benign third-party messages listed in the module docstring. Idempotent; call it
    before the libraries are imported (environment switches are read at import)."""
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for message, category, module in _BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    prefixes: dict[str, tuple[str, ...]] = {}
    for name, prefix in _BENIGN_LOG_RECORDS:
        prefixes[name] = prefixes.get(name, ()) + (prefix,)
    for name, starts in prefixes.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))


def pool_worker_init() -> None:
    """Initializer of visiontune's forked worker pools: SIGTERM back to its default, SIGINT ignored.

    A fork inherits the parent's handlers. Under Prefect the parent's SIGTERM handler raises
    ``TerminationSignal``, so when the pool is closed (``Pool.terminate`` sends SIGTERM) every worker printed
    that exception's traceback on an otherwise successful run. With the default action a worker just ends;
    Ctrl-C reaches the parent, which closes the pool.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
