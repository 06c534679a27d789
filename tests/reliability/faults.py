"""Real parts the fault-injection tests start, stop and break: an ``mlflow server`` on a loopback port that
can be killed and restarted on the same port and store, the tiny training settings, and a child process
with a file-size limit (a disk that fills up).

A plain module (not conftest) so the reliability tests import it by a unique name.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

VISIONTUNE = str(Path(sys.executable).with_name("visiontune"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on ``127.0.0.1:<port>`` with a SQLite store and an artifact folder under ``root``.

    :meth:`crash` kills it (SIGKILL, its whole process group: no graceful shutdown), :meth:`start` brings
    it back on the same port with the same store, as a restarted server would come back.
    """

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    def start(self, timeout: float = 300) -> float:
        """Start the server and wait until ``/health`` answers; returns the seconds that took. A server that does
        not come up within ``timeout`` (generous: on 2 busy cores a start has taken over 2 minutes) is killed
        before the error is raised, so it does not outlive the test."""
        t0 = time.monotonic()
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "server-artifacts")],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True,
            # No background job runners (huey consumers: seven more Python processes competing for 2 cores).
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        log.close()
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                self.crash()
                raise RuntimeError(f"mlflow server did not come up on {self.uri} within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, n: int = 3000) -> str:
        return (self.root / f"server-{self.starts}.log").read_text(errors="replace")[-n:]

    def crash(self) -> None:
        """SIGKILL the server's process group and wait until the port refuses connections."""
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None


def solid_colour_raw(raw: Path, n: int) -> Path:
    """``raw``: ``n`` small solid-colour PNGs (all different) and an ``annotations.jsonl`` captioning them."""
    from PIL import Image

    raw.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (40, 30), (i * 37 % 256, i * 91 % 256, i * 53 % 256)).save(raw / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "text": f"colour {i}"}) + "\n")
    (raw / "annotations.jsonl").write_text("".join(rows))
    return raw


TINY_TRAINING = {  # the tiny training of tests/pipeline/test_train.py: a few steps on CPU in seconds
    "model": {"max_seq_length": 512}, "lora": {"r": 4, "lora_alpha": 8}, "images": {"resize": [112, 56]},
    "train": {"max_steps": 4, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2,
              "learning_rate": 5e-3, "warmup_steps": 0},
}


def tiny_train_settings(root: Path, work_dir: Path, model_dir: str, tracking_uri: Optional[str] = None,
                        **train: Any) -> dict[str, Any]:
    """:data:`TINY_TRAINING` on ``work_dir``'s dataset, writing under ``root`` (``train`` overrides its section)."""
    settings = copy.deepcopy(TINY_TRAINING)
    settings["model"]["name_or_path"] = model_dir
    settings["train"].update(output_dir=str(root / "out"), **train)
    settings["data"] = {"work_dir": str(work_dir)}
    settings["tracking"] = {"uri": tracking_uri or f"sqlite:///{root / 'mlflow.db'}", "experiment": "t"}
    return settings


def crash_at(step: int) -> Any:
    """A trainer callback that raises RuntimeError once training reaches ``step`` (a crash after a checkpoint)."""
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == step:
                raise RuntimeError(f"crash at step {step}")

    return CrashAt()


def file_size_limit(max_bytes: int):
    """A ``preexec_fn`` giving the child a file-size limit (RLIMIT_FSIZE): a write past ``max_bytes`` in
    any file fails with EFBIG, as on a full disk. Python ignores SIGXFSZ, so the write raises OSError
    instead of killing the process."""

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return set_limit


def run_cli(args: list[str], cwd: Path, limit: Optional[int] = None, timeout: float = 600,
            env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``visiontune <args>`` in ``cwd`` (optionally under a file-size limit); output captured as text."""
    return subprocess.run([VISIONTUNE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=file_size_limit(limit) if limit else None, env=env)
