"""Two runs on one repository at once corrupt neither the data nor the registry.

Each side is a real process (tests/reliability/racer.py) released at the same instant as the other:
two Prefect flows of the data stages with different normalize settings on one ``data.work_dir``, and two
``register`` stages of two trainings into one registry. A data stage holds the work folder's lock
(``visiontune.data.io.holds_work_dir``; training holds it too), so the second flow is refused with one
clear error and the folder holds exactly one run's outputs. Registrations wait for each other
(``register.registry_lock``), so the second compares itself against the first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from faults import solid_colour_raw

RACER = str(Path(__file__).with_name("racer.py"))


def _race(kind: str, params: list[Path], cwd: Path, envs: list[dict]) -> list[dict]:
    """Start one racer per params file (and environment), release them together once all are ready; their
    results, in order."""
    go, procs = cwd / "go", []
    for i, (p, env) in enumerate(zip(params, envs)):
        ready = cwd / f"ready-{kind}-{i}"
        procs.append((subprocess.Popen([sys.executable, RACER, kind, str(p), str(ready), str(go)], cwd=cwd, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), ready))
    deadline = time.monotonic() + 300
    while not all(ready.exists() for _, ready in procs):
        for proc, _ in procs:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the racers did not get ready"
        time.sleep(0.05)
    go.touch()
    results = []
    for proc, _ in procs:
        out, err = proc.communicate(timeout=600)
        assert "RESULT " in out, err[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    return results


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_two_data_flows_at_once_leave_one_runs_outputs(tmp_path):
    """Flow A normalizes with min_px 300, flow B with 320, same raw data and work folder. Without the lock
    both ran: each normalize deletes the images the other's manifest names, so what is on disk at the end
    depends on who finished last, and a flow reports outputs that are no longer there."""
    from prefect.settings import PREFECT_API_URL

    raw, work = solid_colour_raw(tmp_path / "raw", 150), tmp_path / "work"
    params = []
    for name, min_px in (("a", 300), ("b", 320)):
        params.append(tmp_path / f"{name}.yaml")
        params[-1].write_text(yaml.safe_dump({"data": {"raw_dir": str(raw), "work_dir": str(work)},
                                              "normalize": {"min_px": min_px}}))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results")}
    outcomes = _race("flow", params, tmp_path, [env, env])

    refused = [r for r in outcomes if not r["ok"]]
    for r in refused:
        assert r["type"] == "FolderBusyError" and f"{work} is in use by another visiontune run" in r["error"], r
    # Released together, both are in validate at once: exactly one is refused (before the lock both "succeeded",
    # and the one that finished first reported outputs that the other had already replaced or deleted).
    assert len(refused) == 1, outcomes
    winner = next(i for i, r in enumerate(outcomes) if r["ok"])
    manifest = json.loads((work / "normalized" / "manifest.json").read_text())
    assert manifest["settings"]["min_px"] == (300, 320)[winner]
    named = {Path(e["path"]).resolve() for e in manifest["images"].values()}
    on_disk = {p.resolve() for p in (work / "normalized" / "images").rglob("*") if p.is_file()}
    assert named == on_disk and len(named) == 150
    from datasets import load_from_disk

    rows = [r for split in load_from_disk(str(work / "dataset")).values() for r in split]
    assert len(rows) == 150 and {Path(i).resolve() for r in rows for i in r["images"]} == named


def _registered_training(root: Path, name: str, cer: float) -> Path:
    """A finished training (MLflow run, run.json, a stand-in adapter folder), handed on by the align stage
    and scored by a metrics file; returns the params file that registers it. The registry race does not
    depend on the weights, so the adapter is a small folder with an adapter_config.json."""
    import mlflow

    from visiontune.config import from_dict
    from visiontune.data.io import hash_tree
    from visiontune.pipeline.align import align_stage
    from visiontune.pipeline.tracking import setup_mlflow, write_run_file

    settings = {"model": {"name_or_path": "tiny-base"}, "train": {"output_dir": str(root / f"train-{name}")},
                "align": {"output_dir": str(root / f"align-{name}")},
                "eval": {"metrics_file": str(root / f"eval-{name}" / "metrics.json")},
                "register": {"model_name": "race", "input_example": False, "log_base_model": False}}
    adapter = root / f"adapter-{name}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "name": name}))
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    exp = setup_mlflow(uri, "race")
    run = mlflow.MlflowClient(uri).create_run(exp).info.run_id
    write_run_file(settings["train"]["output_dir"], {"mlflow_run_id": run, "tracking_uri": uri, "experiment_id": exp,
                                                     "adapter_dir": str(adapter), "base_model": "tiny-base"})
    align_stage(from_dict(settings))
    scores = {"exact_match": 0.0, "cer": cer, "chrf": 0.0, "rougeL": 0.0}
    metrics = Path(settings["eval"]["metrics_file"])
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"finetuned": scores, "base": scores, "primary_metric": "cer", "n_samples": 5,
                                   "mlflow_run_id": run, "adapter_sha256": hash_tree([adapter])}))
    params = root / f"register-{name}.yaml"
    params.write_text(yaml.safe_dump(settings))
    return params


@pytest.mark.slow
def test_two_registrations_at_once_compare_against_each_other(tmp_path, monkeypatch, mlflow_uri_restored):
    """Training A (cer 0.5) and training B (cer 0.3, better) register at once. Without the lock both read "no
    champion", both became champion, and whichever moved the alias last kept it: the worse model half the time."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    params = [_registered_training(tmp_path, "a", 0.5), _registered_training(tmp_path, "b", 0.3)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's own store
    # Each side, having read the current champion, waits for the other to have read it too.
    envs = [{**env, "RACE_ARRIVED": str(tmp_path / f"arrived-{me}"), "RACE_OTHER": str(tmp_path / f"arrived-{1 - me}")}
            for me in (0, 1)]
    results = _race("register", params, tmp_path, envs)
    assert all(r["ok"] for r in results), results

    decisions = [json.loads(line) for line in (tmp_path / "mlflow" / "promotions.jsonl").read_text().splitlines()]
    assert len(decisions) == 2 and decisions[0]["champion_version"] is None
    assert decisions[1]["champion_version"] == decisions[0]["version"], decisions  # the second saw the first
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("race", "champion")
    assert champion.tags["eval_cer"] == "0.3"  # B, the better one, whichever came first

