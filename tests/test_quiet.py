"""A first run is quiet: no worker tracebacks, no third-party warnings visiontune knows to be benign."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from PIL import Image

from visiontune._quiet import _BENIGN_LOG_RECORDS, install
from visiontune.data.probe import probe_images

# What a first run used to print (issue 13), each a fixed cause or a filter in visiontune/_quiet.py.
NOISE = ["Traceback", "TerminationSignal", "FutureWarning", "gemm_4bit_forward", "Add type hints",
         "Created temporary directory", "Creating initial MLflow database tables", "Updating database tables",
         "system metrics monitoring", "Skip logging GPU metrics", "Downloading artifacts", "Saving the dataset"]


def test_pool_workers_end_quietly_under_prefects_sigterm_handler(tmp_path, capfd, monkeypatch):
    """Prefect's SIGTERM handler raises TerminationSignal; forked workers inherited it and printed its traceback
    when the pool closed. The pools' initializer (visiontune._quiet.pool_worker_init) resets it."""
    from prefect.utilities.engine import capture_sigterm

    monkeypatch.setenv("VISIONTUNE_WORKERS", "2")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with capture_sigterm():
        rows = probe_images([("a.png", str(tmp_path), None, 10**6)] * 256)
    assert len(rows) == 256 and all(r["decodable"] for r in rows)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "TerminationSignal" not in err, err


@pytest.mark.slow
def test_stage_runs_print_none_of_the_known_noise(tmp_path, tiny_model_dir):
    """demo-data and the pipeline's stages up to register through the CLI: bitsandbytes, transformers/PEFT,
    MLflow and datasets stay quiet; the stages' results print. Two processes, data stages and model stages:
    Great Expectations routes all later warnings of its process into logging (``logging.captureWarnings``),
    which would hide them from this test."""
    from visiontune import stages as registry

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "demo": {"samples": 40}, "model": {"name_or_path": tiny_model_dir("qwen2_5_vl"), "max_seq_length": 512},
        "lora": {"r": 4, "lora_alpha": 8}, "images": {"resize": [112, 56]},
        "train": {"max_steps": 2, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2,
                  "eval_every_steps": 0},
        "eval": {"max_samples": 2, "max_new_tokens": 2, "grid_samples": 2},
    }))
    names = [s.name for s in registry.pipeline()]
    split = names.index("train")
    out = ""
    for stages in (["demo-data", *names[:split]], names[split: names.index("register") + 1]):
        script = textwrap.dedent(f"""
            import sys
            from visiontune.cli import main
            for stage in {stages!r}:
                if main([stage, "--params", {str(params)!r}]) != 0:
                    sys.exit(f"stage {{stage}} failed")
        """)
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        out += done.stdout + done.stderr
        assert done.returncode == 0, out[-3000:]
    assert '"decision": "champion"' in out and (tmp_path / "outputs/train/adapter").exists()
    printed = [n for n in NOISE if n in out]
    assert not printed, f"{printed} in the output:\n{out[-6000:]}"


def test_log_filters_are_narrow(caplog):
    """Each filtered record goes; any other record of the same logger still shows."""
    install()
    for name, prefix in _BENIGN_LOG_RECORDS:
        logger = logging.getLogger(name)
        with caplog.at_level(logging.INFO, logger=name):
            caplog.clear()
            logger.warning(prefix + ": %s", "detail")
            logger.warning("something else from %s", name)
        assert [r.getMessage() for r in caplog.records] == [f"something else from {name}"]
