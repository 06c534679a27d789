"""Register stage: the promotion rule, champion/challenger aliases and the decision records, on a real
MLflow SQLite store and on a real `mlflow server` started on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from visiontune.pipeline.register import CHALLENGER, CHAMPION, artifact_key, decide, register_stage


@pytest.mark.parametrize("new, champ, metric, margin, expected", [
    (0.5, None, "cer", 0.0, CHAMPION),           # first version ever
    (0.2, 0.3, "cer", 0.0, CHAMPION),            # lower CER wins
    (0.3, 0.3, "cer", 0.0, CHALLENGER),          # a tie is not an improvement
    (0.4, 0.3, "cer", 0.0, CHALLENGER),
    (0.25, 0.3, "cer", 0.05, CHALLENGER),        # better by exactly the margin: not more than it
    (0.24, 0.3, "cer", 0.05, CHAMPION),
    (0.9, 0.8, "exact_match", 0.0, CHAMPION),    # higher is better for the others
    (0.7, 0.8, "exact_match", 0.0, CHALLENGER),
    (40.0, 39.0, "chrf", 2.0, CHALLENGER),
    (0.6, 0.5, "rougeL", 0.05, CHAMPION),
    (float("nan"), 0.5, "cer", 0.0, CHALLENGER),  # a broken evaluation never promotes
    (0.5, float("nan"), "cer", 0.0, CHAMPION),
])
def test_decide(new, champ, metric, margin, expected):
    decision, reason = decide(new, champ, metric, margin)
    assert decision == expected
    assert reason and (metric in reason)


def test_decide_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown metric 'wer'"):
        decide(0.1, 0.2, "wer", 0.0)
    with pytest.raises(ValueError, match="margin -0.1"):
        decide(0.1, 0.2, "cer", -0.1)


def test_artifact_key():
    assert artifact_key("promotion-VisionTune_Demo v2") == "promotion-visiontune-demo-v2"
    with pytest.raises(ValueError, match="no letters or digits"):
        artifact_key("__")


def _register(cfg, start_training_run, write_metrics, assets, **scores):
    start_training_run(cfg, assets["adapter"], assets["base"])
    write_metrics(cfg, **scores)
    return register_stage(cfg)


def test_promotion_and_non_promotion_are_recorded(make_cfg, start_training_run, write_metrics, assets, project):
    import mlflow

    from visiontune import stages
    from visiontune.stages import RecordingConfig

    cfg = make_cfg()
    name = cfg.register.model_name
    start_training_run(cfg, assets["adapter"], assets["base"])
    write_metrics(cfg, cer=0.5)
    recording = RecordingConfig(cfg)
    first = register_stage(recording)
    assert recording.accessed == set(stages.get("register").params)  # the registry lists exactly what it reads
    assert (first["version"], first["decision"], first["champion_version"]) == ("1", CHAMPION, None)

    worse = _register(cfg, start_training_run, write_metrics, assets, cer=0.7)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    assert worse["decision"] == CHALLENGER and worse["champion_version"] == "1" and worse["champion_value"] == 0.5
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"  # champion unchanged
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"

    better = _register(cfg, start_training_run, write_metrics, assets, cer=0.2)
    assert better["decision"] == CHAMPION and better["champion_version"] == "1"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "3"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"

    # The records: version tags, the run's decision.json, the local JSONL audit trail.
    tags = client.get_model_version(name, "2").tags
    assert tags["decision"] == CHALLENGER and tags["decision_champion_version"] == "1"
    assert float(tags["decision_value"]) == 0.7 and float(tags["decision_champion_value"]) == 0.5
    assert "not promoted" in tags["decision_reason"] and float(tags["eval_cer"]) == 0.7
    assert client.get_model_version(name, "3").tags["decision"] == CHAMPION
    mv2 = client.get_model_version(name, "2")
    local = mlflow.artifacts.download_artifacts(run_id=mv2.run_id, artifact_path="register/decision.json",
                                                tracking_uri=cfg.tracking.uri)
    assert json.loads(open(local).read())["decision"] == CHALLENGER
    assert client.get_run(mv2.run_id).data.tags["promotion_decision"] == CHALLENGER
    lines = [json.loads(x) for x in (project / "mlflow" / "promotions.jsonl").read_text().splitlines()]
    assert [(r["version"], r["decision"], r["value"]) for r in lines] == [("1", CHAMPION, 0.5), ("2", CHALLENGER, 0.7),
                                                                         ("3", CHAMPION, 0.2)]
    assert first["prefect_artifact"] is None  # not inside a Prefect run
    # The registered model carries the adapter and (local base) the base model directory, plus its signature.
    local_model = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/3", dst_path=str(project / "dl"))
    from pathlib import Path

    import yaml

    pyfunc_conf = yaml.safe_load((Path(local_model) / "MLmodel").read_text())["flavors"]["python_function"]
    stored = {k: Path(local_model) / v["path"] for k, v in pyfunc_conf["artifacts"].items()}
    assert (stored["adapter"] / "adapter_config.json").is_file()
    assert (stored["base_model"] / "model.safetensors").is_file()  # the local base model travels with the model
    assert (Path(local_model) / pyfunc_conf["code"] / "visiontune" / "pipeline" / "pyfunc.py").is_file()
    assert not (Path(local_model) / "python_model.pkl").exists()  # logged as code, not pickled
    info = mlflow.models.get_model_info(f"models:/{name}/3")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image", "prompt"]


def test_higher_is_better_metric_and_margin(make_cfg, start_training_run, write_metrics, assets):
    cfg = make_cfg(eval={"primary_metric": "exact_match"}, register={"promotion_margin": 0.1})
    assert _register(cfg, start_training_run, write_metrics, assets, exact_match=0.5)["decision"] == CHAMPION
    assert _register(cfg, start_training_run, write_metrics, assets, exact_match=0.55)["decision"] == CHALLENGER
    assert _register(cfg, start_training_run, write_metrics, assets, exact_match=0.7)["decision"] == CHAMPION


def test_register_errors(make_cfg, start_training_run, assets):
    cfg = make_cfg()
    start_training_run(cfg, assets["adapter"], assets["base"])
    with pytest.raises(FileNotFoundError, match="run the evaluate stage first"):
        register_stage(cfg)


def test_metrics_of_another_run_are_refused(make_cfg, start_training_run, write_metrics, assets):
    """Evaluate run A, then train run B into the same folder: registering B with A's scores is refused."""
    cfg = make_cfg()
    start_training_run(cfg, assets["adapter"], assets["base"])
    write_metrics(cfg, cer=0.01)  # run A's (excellent) scores
    start_training_run(cfg, assets["adapter"], assets["base"])  # run B, not evaluated
    with pytest.raises(ValueError, match="re-run `visiontune evaluate` for this adapter"):
        register_stage(cfg)
    write_metrics(cfg, cer=0.5)  # B evaluated: its own scores are accepted
    assert register_stage(cfg)["value"] == 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_register_against_a_real_tracking_server(make_cfg, start_training_run, write_metrics, assets, project,
                                                 monkeypatch):
    import mlflow

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(project / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{project}/server.db", "--artifacts-destination", str(project / "server-art")],
        stdout=log, stderr=subprocess.STDOUT, cwd=project, start_new_session=True,  # own group: killpg gets all
        # No background job runners (huey consumers: seven more Python processes competing for 2 cores).
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up on {uri}:\n{(project / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        cfg = make_cfg(tracking={"uri": None})
        run_id = start_training_run(cfg, assets["adapter"], assets["base"], tracking_uri=uri)
        write_metrics(cfg, cer=0.4)
        record = register_stage(cfg)
        assert record["tracking_uri"] == uri and record["decision"] == CHAMPION
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        mv = client.get_model_version_by_alias(cfg.register.model_name, CHAMPION)
        assert str(mv.version) == record["version"] and mv.run_id == run_id and mv.tags["decision"] == CHAMPION
        # Artifacts went through the server's proxy into its artifact destination, not into the test's cwd.
        assert any((project / "server-art").rglob("adapter_config.json"))
        assert not (project / "mlflow" / "artifacts").exists()
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait(timeout=5)
        log.close()


def test_decision_becomes_a_prefect_markdown_artifact_inside_a_flow(make_cfg, start_training_run, write_metrics,
                                                                     assets):
    from prefect import flow
    from prefect.artifacts import Artifact
    from prefect.testing.utilities import prefect_test_harness

    cfg = make_cfg()
    start_training_run(cfg, assets["adapter"], assets["base"])
    write_metrics(cfg, cer=0.3)

    @flow
    def register_flow() -> dict:
        return register_stage(cfg)

    with prefect_test_harness(server_startup_timeout=120):
        record = register_flow()
        assert record["prefect_artifact"] == "promotion-vt-test"
        artifact = Artifact.get("promotion-vt-test")
    assert artifact is not None and artifact.type == "markdown"
    assert "vt-test v1: **champion**" in artifact.data and "no current champion" in artifact.data
