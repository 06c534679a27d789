"""The command line: an error is one line that says what was wrong and what to do, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from visiontune import cli


def test_an_uncached_hub_model_while_offline_is_one_clear_line(tmp_path):
    """Issue 14, hole 7: this printed 70 lines and three tracebacks, then ten lines (MLflow's start-up, a
    three-line loader message) and a FAILED MLflow run."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"work_dir": str(tmp_path / "data")},
                                      "train": {"output_dir": str(tmp_path / "out")},
                                      "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}))
    exe = Path(sys.executable).with_name("visiontune")
    proc = subprocess.run([str(exe), "train", "--set", "model.name_or_path=someorg/not-cached", "--params", str(params)],
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("visiontune train: base model 'someorg/not-cached' (model.name_or_path)")
    assert "HF_HUB_OFFLINE" in lines[0] and "hf download someorg/not-cached" in lines[0]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()  # failed before any work


def test_a_multi_line_error_is_printed_on_one_line(tmp_path, monkeypatch, capsys):
    from visiontune.pipeline import train

    def fail(cfg):
        raise OSError("could not load model 'x': We couldn't connect.\nCheck your internet connection.\n")

    monkeypatch.setattr(train, "train_stage", fail)
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  max_steps: 1\n")
    assert cli.main(["train", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err == "visiontune train: could not load model 'x': We couldn't connect. Check your internet connection.\n"
