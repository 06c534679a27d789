"""A real MLflow tracking server crashes and comes back in the middle of a training: nothing is lost.

The server is ``mlflow server`` on a loopback port (SQLite store, proxied artifacts), killed with SIGKILL
while the tiny model trains and restarted on the same port and store. Every metric of every step, every
param and every artifact must be in the run afterwards, the run must end FINISHED, and training must not
stall while the server is away (metrics wait in a buffer, :class:`visiontune.pipeline.tracking.MetricsBuffer`).
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from faults import MlflowServer, free_port, tiny_train_settings
from visiontune.config import from_dict
from visiontune.pipeline import train as train_mod
from visiontune.pipeline.tracking import MetricsBuffer, TrackingUnavailableError, buffered_metrics, log_metrics

STEPS, SAVE_EVERY, CRASH_AT = 16, 2, 4  # crash once checkpoint-4 is written; down for DOWN_S + the restart
DOWN_S = 2.0


def _newest_step(out: Path) -> int:
    ckpt = train_mod.latest_checkpoint(out)
    return int(ckpt.name.split("-")[-1]) if ckpt else 0


def _crash_and_restart(server: MlflowServer, out: Path, timeline: dict) -> None:
    """Wait for checkpoint-CRASH_AT, SIGKILL the server, keep it down DOWN_S seconds, start it again."""
    try:
        deadline = time.monotonic() + 600
        while not (out / f"checkpoint-{CRASH_AT}" / "trainer_state.json").exists():
            if time.monotonic() > deadline or timeline.get("stop"):
                return
            time.sleep(0.05)
        server.crash()
        timeline.update(crashed_at_step=_newest_step(out), finished_before_crash=(out / "adapter").exists())
        time.sleep(DOWN_S)
        timeline["restarting_at_step"] = _newest_step(out)
        timeline["restart_s"] = server.start()
        timeline["back_at_step"] = _newest_step(out)
    except Exception as e:  # reported by the test
        timeline["error"] = repr(e)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_tracking_server_restarted_mid_training_loses_nothing(tmp_path, small_dataset, tiny_model_dir, monkeypatch,
                                                                 mlflow_uri_restored):
    import mlflow

    monkeypatch.chdir(tmp_path)
    server = MlflowServer(tmp_path)
    server.start()
    cfg = from_dict(tiny_train_settings(tmp_path, small_dataset, tiny_model_dir("qwen2_5_vl"), tracking_uri=server.uri,
                                        max_steps=STEPS, save_steps=SAVE_EVERY))
    out = Path(cfg.train.output_dir)
    timeline: dict = {}
    chaos = threading.Thread(target=_crash_and_restart, args=(server, out, timeline), daemon=True)
    chaos.start()
    try:
        t0 = time.monotonic()
        record = train_mod.train_stage(cfg)
        timeline["train_s"] = time.monotonic() - t0
        chaos.join(timeout=300)
        print("timeline", timeline)
        assert "error" not in timeline, timeline
        assert "restart_s" in timeline and not timeline["finished_before_crash"], f"the crash missed training: {timeline}"
        # Training went on while the server was away (before: the first log call after the crash waited for
        # the server, through MLflow's HTTP retries, and the step stood still until after it was back).
        assert timeline["back_at_step"] > timeline["crashed_at_step"], timeline
        _assert_nothing_lost(server.uri, record, cfg, tmp_path / "fetched")
    finally:
        timeline["stop"] = True
        server.stop()


def _assert_nothing_lost(uri: str, record: dict, cfg, fetch_dir: Path) -> None:
    """Every param, every step of the per-step metrics, the summary metrics and the artifacts (byte for
    byte) are in the run, and it ended FINISHED."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED" and record["status"] == "finished"
    expected = {k: str(v)[:500] for k, v in cfg.flat().items()}
    assert {k: run.data.params.get(k) for k in expected} == expected
    for key in ("loss", "learning_rate", "grad_norm"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(1, STEPS + 1)), f"{key}: steps {steps}"
    # The first step (compiling, warming up) is timed on its own, every later step's tokens/s is there.
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "first_step_s")) == [1]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "tokens_per_s"))
    assert steps == list(range(2, STEPS + 1)), f"tokens_per_s: steps {steps}"
    assert {"train/runtime", "train/loss"} <= set(run.data.metrics)  # the end-of-training summary
    out = Path(cfg.train.output_dir)
    for name in ("loss_curve.png", "resolved_config.yaml", "adapter/adapter_model.safetensors"):
        fetched = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name,
                                                      dst_path=str(fetch_dir), tracking_uri=uri)
        assert _sha(Path(fetched)) == _sha(out / name), name


def test_metrics_for_a_store_that_never_comes_back_are_reported_not_dropped(monkeypatch):
    """Nothing listens on the port: close() gives up after its timeout with an error that counts the unsent
    values and says where they still are; logging itself never blocked."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    buffer = MetricsBuffer("0" * 32, f"http://127.0.0.1:{free_port()}", flush_timeout_s=1.5)
    t0 = time.monotonic()
    for step in range(1, 51):
        buffer.log({"loss": 1.0 / step, "learning_rate": 1e-3}, step)
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(TrackingUnavailableError, match=r"100 metric values .*\(unreachable for .*log_history\.json"):
        buffer.close()
    assert buffer.failed_attempts >= 1 and buffer.sent == 0


def test_metrics_the_store_refuses_stop_at_once_and_the_body_error_wins(tmp_path, mlflow_uri_restored):
    """A refusal (HTTP 4xx: here a run that does not exist) is not retried: close() raises at once. Inside
    buffered_metrics, an error of the body is the one that propagates."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    buffer = MetricsBuffer("f" * 32, uri, flush_timeout_s=60)
    buffer.log({"loss": 1.0}, 1)
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match="refused"):
        buffer.close()
    assert time.monotonic() - t0 < 30

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        with pytest.raises(RuntimeError, match="the body failed"):
            with buffered_metrics(run.info.run_id, uri):
                log_metrics({"loss": 0.5}, step=3)
                raise RuntimeError("the body failed")
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]  # what the failed body logged was delivered
