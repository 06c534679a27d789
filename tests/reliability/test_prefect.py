"""Prefect runs the stages through faults: a transient read error is retried, a full disk or a busy
folder is not, and a flow killed in the middle of a stage resumes from its cached upstream results.

Real flow runs on the session's Prefect server (tests/conftest.py ``prefect_harness``), the real stage
tasks (``visiontune.tasks.stages.TASKS``) and, for the kill, the real ``visiontune run`` in a process of
its own. The one injected fault is a read of a source image that fails once.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from prefect import flow

from faults import VISIONTUNE
from visiontune.config import from_dict
from visiontune.data import normalize
from visiontune.data.io import DiskFullError
from visiontune.tasks.stages import TASKS

pytestmark = pytest.mark.usefixtures("prefect_harness")


@flow(name="data-stages")
def data_flow(cfg) -> dict:
    return {name: TASKS[name](cfg) for name in ("validate", "normalize", "convert")}


def _task_states(flow_run_id) -> dict[str, list[str]]:
    """Task name -> the names of its run's states, in order (e.g. Running, AwaitingRetry, Retrying, Completed)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> dict[str, list[str]]:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            out = {}
            for r in runs:
                states = sorted(await client.read_task_run_states(r.id), key=lambda s: s.timestamp)
                out[r.name.rsplit("-", 1)[0]] = [s.name for s in states]
            return out

    return asyncio.run(read())


def _flaky_once(monkeypatch, error: OSError) -> list[str]:
    """The first source image read raises ``error``; the others read the file. Returns the calls."""
    real, calls = normalize._read_source, []

    def read(src, sha256, roots):
        calls.append(src)
        if len(calls) == 1:
            raise error
        return real(src, sha256, roots)

    monkeypatch.setattr(normalize, "_read_source", read)
    return calls


@pytest.fixture
def demo_cfg(tmp_path, monkeypatch):
    from visiontune.data.demo import generate_demo

    monkeypatch.setenv("VISIONTUNE_WORKERS", "1")  # normalize in this process, where the fault is injected
    generate_demo(tmp_path / "raw", n=12, seed=1)
    return from_dict({"data": {"raw_dir": str(tmp_path / "raw"), "work_dir": str(tmp_path / "work")},
                      "validate": {"max_failure_ratio": 0.5}})


def test_a_transient_read_error_is_retried_and_the_flow_completes(demo_cfg, monkeypatch):
    calls = _flaky_once(monkeypatch, OSError(errno.EIO, "Input/output error"))
    state = data_flow(demo_cfg, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["normalize"]["written"] == result["validate"]["valid"] > 0
    states = _task_states(state.state_details.flow_run_id)
    assert states["normalize"][-1] == "Completed" and "AwaitingRetry" in states["normalize"], states
    assert len(calls) == 1 + result["normalize"]["written"]  # the failed read, then every image once
    assert states["convert"][-1] == "Completed"


@pytest.mark.parametrize("error", [
    DiskFullError(errno.ENOSPC, "No space left on device"),
    FileNotFoundError(errno.ENOENT, "No such file or directory"),
], ids=["disk-full", "missing-file"])
def test_a_lasting_error_is_not_retried(demo_cfg, monkeypatch, error):
    calls = _flaky_once(monkeypatch, error)
    state = data_flow(demo_cfg, return_state=True)
    assert state.is_failed()
    states = _task_states(state.state_details.flow_run_id)
    assert states["normalize"][-1] == "Failed" and "AwaitingRetry" not in states["normalize"], states
    assert len(calls) == 1 and "convert" not in states


def test_a_cached_result_is_reused_only_over_the_outputs_its_run_wrote(tmp_path, monkeypatch):
    """Data A, then data B, then A again: the third run must not take A's cached results, whose files B's run
    replaced (it did: validate, normalize and convert came back Cached with B's dataset on disk). A run with
    nothing changed is still all Cached, and outputs deleted by hand make their stage run again."""
    import shutil

    from visiontune.data.demo import generate_demo

    monkeypatch.setenv("VISIONTUNE_WORKERS", "1")
    generate_demo(tmp_path / "raw_a", n=12, seed=1)
    generate_demo(tmp_path / "raw_b", n=16, seed=2)
    raw = tmp_path / "raw"
    cfg = from_dict({"data": {"raw_dir": str(raw), "work_dir": str(tmp_path / "work")},
                     "validate": {"max_failure_ratio": 0.5}})

    def run(source: str) -> tuple[dict, dict]:
        if raw.exists():
            shutil.rmtree(raw)
        shutil.copytree(tmp_path / source, raw)
        state = data_flow(cfg, return_state=True)
        assert state.is_completed(), state.message
        states = _task_states(state.state_details.flow_run_id)
        return {name: s[-1] for name, s in states.items()}, state.result()

    first, result_a = run("raw_a")
    assert set(first.values()) == {"Completed"}, first
    again, _ = run("raw_a")
    assert set(again.values()) == {"Cached"}, again  # nothing changed: nothing runs
    changed, result_b = run("raw_b")
    assert set(changed.values()) == {"Completed"}, changed
    assert result_b["convert"]["rows"] != result_a["convert"]["rows"]
    back, result_back = run("raw_a")
    assert set(back.values()) == {"Completed"}, back  # B's files were on disk: A's results could not stand
    assert result_back["convert"]["rows"] == result_a["convert"]["rows"]
    assert len((tmp_path / "work" / "validated" / "records.jsonl").read_text().splitlines()) == result_a["validate"]["valid"]
    shutil.rmtree(tmp_path / "work" / "normalized")
    deleted, _ = run("raw_a")
    assert deleted["validate"] == "Cached" and deleted["normalize"] == "Completed", deleted
    assert (tmp_path / "work" / "normalized").is_dir()


TINY_FLOW = {
    "demo": {"samples": 24},
    "validate": {"max_failure_ratio": 0.5},
    "model": {"max_seq_length": 512},
    "lora": {"r": 4, "lora_alpha": 8},
    "images": {"resize": [112, 56]},
    "train": {"max_steps": 10, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2},
    "eval": {"max_samples": 2, "max_new_tokens": 2, "grid_samples": 0, "compare_base": False},
    "register": {"input_example": False},
    "report": {"gallery_samples": 2},
}


def _flow_env(tmp_path: Path) -> dict:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(),
               PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "prefect-results"))  # both runs see the same results
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own store under tmp_path
    return env


@pytest.mark.slow
def test_a_flow_killed_mid_training_resumes_from_cached_upstream_results(tmp_path):
    """``visiontune run`` is killed (SIGKILL) while it trains; the next run takes validate, normalize and
    convert from Prefect's cache (not re-run: their files keep their mtimes) and the train stage resumes
    from the newest checkpoint of the same MLflow run."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_FLOW))
    env, out = _flow_env(tmp_path), tmp_path / "outputs" / "train"
    first = subprocess.Popen([VISIONTUNE, "run", "--params", "params.yaml"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (out / "checkpoint-4" / "trainer_state.json").exists():
        assert first.poll() is None, first.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint-4 within 10 minutes"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    assert first.wait(timeout=30) == -signal.SIGKILL
    assert not (out / "adapter").exists(), "the training finished before the kill"
    data_files = [p for p in (tmp_path / "data").rglob("*")
                  if p.is_file() and "raw" not in p.parts and not p.name.endswith(".lock")]
    mtimes = {p: p.stat().st_mtime_ns for p in data_files}

    second = subprocess.run([VISIONTUNE, "run", "--params", "params.yaml"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    flow_run_id = _latest_flow_run_id()
    states = _task_states(flow_run_id)
    assert all(states[s][-1] == "Cached" for s in ("validate", "normalize", "convert")), states
    assert states["train"][-1] == "Completed" and states["register"][-1] == "Completed", states
    assert {p: p.stat().st_mtime_ns for p in data_files} == mtimes  # the cached stages wrote nothing
    record = yaml.safe_load((out / "run.json").read_text())
    assert record["status"] == "finished" and record["global_step"] == TINY_FLOW["train"]["max_steps"]
    assert Path(record["resumed_from"]).name.startswith("checkpoint-") and record["killed_run_id"] is None
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([record["experiment_id"]])
    assert [r.info.run_id for r in runs] == [record["mlflow_run_id"]] and runs[0].info.status == "FINISHED"


def _latest_flow_run_id():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    async def read():
        async with get_client() as client:
            return (await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1))[0].id

    return asyncio.run(read())
