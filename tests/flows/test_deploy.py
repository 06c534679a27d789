"""``visiontune deploy`` against a real Prefect server, as users run one.

``prefect server start`` on a loopback port (its own ``PREFECT_HOME``), ``visiontune deploy`` puts the
retraining flow on a process work pool with its cron schedule (creating the pool), a run is triggered
through the API, and ``prefect worker start --run-once`` picks it up and runs the whole pipeline in the
project folder: the run ends Completed with the project's outputs and a registered champion.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from flow_settings import tiny_flow  # tests/flows/flow_settings.py

BIN = Path(sys.executable).parent
POOL, NAME, CRON = "visiontune-pool", "nightly", "0 3 * * 1"
TINY = tiny_flow()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (it was started in its own session), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def prefect_server(tmp_path):
    """``prefect server start`` on a free loopback port with a fresh PREFECT_HOME; yields the env to talk to it."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false", "PYTHONUNBUFFERED": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # exported by earlier tests' set_*_uri calls:
        env.pop(key, None)  # the runs use the project's own store
    log_path = tmp_path / "prefect-server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # generous: on 2 busy cores a start has taken minutes
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not come up on {api}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield env
    finally:
        _stop(server)


async def _read(api: str, flow_run_id=None):  # noqa: ANN001, ANN202
    """(deployment, work pool, flow run or None) as the server has them."""
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api) as client:
        deployment = await client.read_deployment_by_name(f"visiontune-retrain/{NAME}")
        pool = await client.read_work_pool(POOL)
        run = await client.read_flow_run(flow_run_id) if flow_run_id else None
    return deployment, pool, run


async def _trigger(api: str, deployment_id):  # noqa: ANN001, ANN202
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api) as client:
        return await client.create_flow_run_from_deployment(deployment_id)


@pytest.mark.slow
def test_deploy_to_a_process_pool_and_a_worker_completes_a_triggered_run(tmp_path, prefect_server):
    import mlflow

    env, api = prefect_server, prefect_server["PREFECT_API_URL"]
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(TINY))
    done = subprocess.run([str(BIN / "visiontune"), "deploy", "--cron", CRON, "--pool", POOL, "--name", NAME],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["work_pool_created"] and result["working_dir"] == str(project)

    deployment, pool, _ = asyncio.run(_read(api))
    assert pool.type == "process" and deployment.work_pool_name == POOL
    assert [s.schedule.cron for s in deployment.schedules] == [CRON]
    assert deployment.entrypoint == "visiontune.flows.retrain.retrain_flow"
    assert deployment.job_variables == {"working_dir": str(project)}
    assert deployment.parameters == {"params": str(project / "params.yaml"), "overrides": []}

    flow_run = asyncio.run(_trigger(api, deployment.id))
    elsewhere = tmp_path / "worker-cwd"  # the run must execute in the deployment's folder, not the worker's
    elsewhere.mkdir()
    worker = subprocess.run([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--run-once", "--limit", "1"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    _, _, run = asyncio.run(_read(api, flow_run.id))
    assert run.state is not None and run.state.is_completed(), (
        f"{run.state}\n{(worker.stdout + worker.stderr)[-4000:]}")
    assert run.work_pool_name == POOL

    assert (project / "outputs" / "eval" / "metrics.json").is_file() and not any(elsewhere.iterdir())
    store = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    champion = client.get_model_version_by_alias("visiontune-demo", "champion")
    assert str(champion.version) == "1"
    promotions = [json.loads(line) for line in (project / "mlflow" / "promotions.jsonl").read_text().splitlines()]
    assert [p["decision"] for p in promotions] == ["champion"]


def test_deploy_refuses_a_bad_cron_and_a_missing_server(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from visiontune.flows.retrain import deploy

    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(ValueError, match="not a valid cron expression"):
        deploy(cron="every monday", pool=POOL, params=str(tmp_path / "params.yaml"))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(ValueError, match=r"needs a Prefect server.*PREFECT_API_URL"):
            deploy(cron=CRON, pool=POOL, params=str(tmp_path / "params.yaml"))
