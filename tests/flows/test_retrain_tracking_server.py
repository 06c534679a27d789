"""The whole retraining flow against a real MLflow tracking server, as users run one.

``mlflow server`` on a loopback port (SQLite backend store, artifacts proxied by the server into a folder
on disk: ``--artifacts-destination``), ``tracking.uri: http://127.0.0.1:PORT`` in params.yaml. The flow
trains, evaluates, registers and reports through it; nothing lands in a local ``mlflow/`` store; the
champion then loads from the server in a fresh Python process that knows only the server's address and
answers as the evaluate stage did for the same image.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from flow_settings import tiny_flow  # tests/flows/flow_settings.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from faults import MlflowServer  # noqa: E402  (tests/reliability/faults.py)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

NAME = "visiontune-served"
TINY = tiny_flow(eval={"batch_size": 1}, register={"model_name": NAME})

FRESH_PROCESS = r"""
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"image": [sys.argv[2]]}))  # base64 image bytes, as a serving request sends
print("RESULT" + json.dumps(list(out)))
"""


def _first_eval_image(dest: Path) -> Path:
    """The image of the evaluate stage's first sample (the default ``eval.split``), saved losslessly."""
    from visiontune.images import decode_image_value, load_image
    from visiontune.inference import chat_parts, split_conversation
    from visiontune.pipeline.evaluate import load_eval_samples

    sample = load_eval_samples("data/dataset", "test", 1)[0]
    _, images = chat_parts(split_conversation(sample["messages"])[0])
    load_image(decode_image_value(images[0])).save(dest)
    return dest


@pytest.fixture
def mlflow_state_restored():
    """MLflow's process-wide tracking/registry URIs and the env vars ``set_tracking_uri`` and
    ``set_registry_uri`` export (setting None clears neither) as before: later tests, and the processes
    they start, must not talk to the server this test stops."""
    import mlflow

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {k: os.environ.get(k) for k in keys}
    yield
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_flow_logs_and_registers_through_a_tracking_server_and_the_champion_loads_elsewhere(
        tmp_path, monkeypatch, mlflow_state_restored):
    import mlflow

    from visiontune.flows.retrain import retrain_flow
    from visiontune.pipeline.pyfunc import encode_image

    server_root = tmp_path / "server"
    server_root.mkdir()
    server = MlflowServer(server_root)
    server.start()
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the URI comes from params.yaml alone
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    (project / "params.yaml").write_text(yaml.safe_dump({**TINY, "tracking": {"uri": server.uri}}))
    try:
        result = retrain_flow(params=str(project / "params.yaml"))
        train, register, report = result["train"], result["register"], result["report"]
        assert train["global_step"] == 2 and register["decision"] == "champion"
        assert register["tracking_uri"] == server.uri

        client = mlflow.MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        champion = client.get_model_version_by_alias(NAME, "champion")
        assert champion.run_id == train["mlflow_run_id"] and champion.tags["decision"] == "champion"
        run = client.get_run(train["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
        assert {"eval_cer", "eval_exact_match"} <= set(run.data.metrics)
        logged = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"adapter", "eval", "register", "report"} <= logged, logged
        decision = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="register/decision.json", tracking_uri=server.uri,
            dst_path=str(tmp_path / "fetched"))).read_text())
        assert decision["version"] == str(champion.version)
        assert report["report_artifact"].startswith("mlflow-artifacts:")
        # Everything went through the server into its artifact folder; no embedded store was made here.
        stored = server_root / "server-artifacts"
        assert any(stored.rglob("adapter_model.safetensors")) and any(stored.rglob("index.html"))
        assert not (project / "mlflow" / "mlflow.db").exists() and not (project / "mlflow" / "artifacts").exists()

        # A fresh process that knows only the server loads the champion and answers as evaluate did.
        with open(project / "outputs" / "eval" / "predictions.csv", newline="") as fh:
            first = next(csv.DictReader(fh))
        image = encode_image(_first_eval_image(tmp_path / "first.png"))
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_REGISTRY_URI"}
        env.update(MLFLOW_TRACKING_URI=server.uri, HF_HUB_OFFLINE="1")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, f"models:/{NAME}@champion", image],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = json.loads(proc.stdout.split("RESULT", 1)[1])
        assert out == [first["prediction"]], (out, first)
    finally:
        server.stop()
