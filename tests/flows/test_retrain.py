"""The retraining flow end to end on tiny settings: real Prefect runs, real MLflow, caching, serve."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

TINY = {
    "demo": {"samples": 40},
    "model": {"max_seq_length": 512},
    "lora": {"r": 4, "lora_alpha": 8},
    "images": {"resize": [112, 56]},
    "train": {"max_steps": 3, "save_steps": 3, "logging_steps": 1, "per_device_train_batch_size": 2},
    "eval": {"max_samples": 3, "max_new_tokens": 3, "grid_samples": 2},
    "register": {"input_example": False},
}


def _params(root: Path) -> Path:
    p = root / "params.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def _artifact_keys() -> set[str]:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts() if a.key}

    return asyncio.run(read())


def test_flow_runs_end_to_end_and_caches(tmp_path, monkeypatch):
    import mlflow

    from visiontune.flows.retrain import retrain_flow

    monkeypatch.chdir(tmp_path)
    params = _params(tmp_path)
    first = retrain_flow(params=str(params))
    assert first["validate"]["valid"] > 0
    assert first["train"]["global_step"] == 3
    assert first["register"]["decision"] == "champion" and first["register"]["version"] == "1"
    assert Path("data/raw").exists() and Path("outputs/eval/metrics.json").exists()
    assert {"validation-summary", "evaluation-metrics"} <= _artifact_keys()
    assert any(k.startswith("promotion-") for k in _artifact_keys())

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("visiontune-demo", "champion").version) == "1"

    # Unchanged data and params: every task is a cache hit, nothing is retrained or re-registered.
    second = retrain_flow(params=str(params))
    assert second["train"]["mlflow_run_id"] == first["train"]["mlflow_run_id"]
    assert len(client.search_model_versions("name='visiontune-demo'")) == 1

    # One changed training param retrains (new run) but the data stages stay cached.
    third = retrain_flow(params=str(params), overrides=["train.learning_rate=0.001"])
    assert third["train"]["mlflow_run_id"] != first["train"]["mlflow_run_id"]
    assert len(client.search_model_versions("name='visiontune-demo'")) == 2


def test_serve_registers_a_schedule_and_a_triggered_run_completes(tmp_path):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    params = _params(tmp_path)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri in earlier tests exports it; use the default store
    exe = Path(sys.executable).with_name("visiontune")
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(exe), "serve", "--cron", "0 3 * * 1", "--name", "nightly", "--params", str(params)],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        run = None
        while time.time() < deadline:
            try:
                run = run_deployment("visiontune-retrain/nightly", timeout=0)
                break
            except Exception:  # deployment not registered yet
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        assert run is not None, "deployment never appeared"
        import asyncio

        from prefect.client.orchestration import get_client

        async def wait_state():
            async with get_client() as client:
                deployment = await client.read_deployment_by_name("visiontune-retrain/nightly")
                schedules = deployment.schedules
                for _ in range(600):
                    fr = await client.read_flow_run(run.id)
                    if fr.state and fr.state.is_final():
                        return fr.state, schedules
                    await asyncio.sleep(1)
                return None, schedules

        state, schedules = asyncio.run(wait_state())
        assert schedules and schedules[0].schedule.cron == "0 3 * * 1"
        assert state is not None and state.is_completed(), (tmp_path / "serve.log").read_text()[-3000:]
        # the triggered run did what a manual run does: a registered champion in the store under the serve dir
        assert (tmp_path / "outputs" / "eval" / "metrics.json").exists()
        assert (tmp_path / "mlflow" / "mlflow.db").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
