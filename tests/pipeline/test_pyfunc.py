"""The registered pyfunc model: loaded by MLflow's own API in a fresh Python process from
``models:/<name>@champion``, with the local base model gone (it travels as an artifact) and the
development install of visiontune hidden (the model's own code copy is used).

What the served model refuses (paths outside ``register.image_root``, decompression bombs) is tested in
tests/reliability/test_served_images.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from visiontune.images import ImageRule
from visiontune.pipeline.pyfunc import _build_samples, encode_image

FRESH_PROCESS = r"""
import json, sys
# Hide the development install of visiontune: the model must bring its own code (code_paths).
sys.meta_path = [f for f in sys.meta_path if "editable" not in str(f)]
# (the venv may live inside the repo, e.g. .venv: keep its site-packages)
sys.path = [p for p in sys.path if p not in ("", ".") and (not p.startswith({repo!r}) or "site-packages" in p)]
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{name}@champion")
import visiontune
assert "/code/visiontune/" in visiontune.__file__, visiontune.__file__
df = pd.DataFrame({{"image": [sys.argv[1], sys.argv[2]], "prompt": ["Read.", "Read."]}})
out = model.predict(df)
short = model.predict(df.iloc[:1], params={{"max_new_tokens": 1}})
try:  # a path outside register.image_root is refused, whether the file exists or not
    model.predict(pd.DataFrame({{"image": [sys.argv[3]], "prompt": ["Read."]}}))
    refused = None
except Exception as e:
    refused = str(e)
print("RESULT" + json.dumps({{"out": list(out), "short": list(short), "refused": refused}}))
"""


def test_champion_loads_and_generates_in_a_fresh_process(make_cfg, start_training_run, write_metrics, assets, project,
                                                         caplog):
    from peft import PeftModel

    from visiontune.models.fast_vision import FastVisionModel
    from visiontune.inference import generate_answers
    from visiontune.pipeline.register import register_stage

    base_copy = project / "models" / "tiny-base"
    shutil.copytree(assets["base"], base_copy)
    image_root = assets["images"][0].parent  # requests may name files in this folder only (register.image_root)
    cfg = make_cfg(base=str(base_copy), register={"input_example": True, "image_root": str(image_root)})
    start_training_run(cfg, assets["adapter"], str(base_copy))
    write_metrics(cfg, cer=0.3)
    mlflow_logger = logging.getLogger("mlflow")  # propagate=False: caplog must listen on it directly
    mlflow_logger.addHandler(caplog.handler)
    try:
        record = register_stage(cfg)
    finally:
        mlflow_logger.removeHandler(caplog.handler)
    # MLflow ran the logged input example (base64 image) through load_context + predict; it only warns on failure.
    assert "Failed to validate serving input" not in caplog.text
    assert record["decision"] == "champion" and record["base_model_logged"]
    shutil.rmtree(base_copy)  # the served model must not need the original base model directory

    image = str(assets["images"][1])
    script = FRESH_PROCESS.format(name=cfg.register.model_name, repo=str(Path(__file__).resolve().parents[2]))
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking.uri, "HF_HUB_OFFLINE": "1"}
    outside = project / "outside.png"
    shutil.copy(image, outside)
    proc = subprocess.run([sys.executable, "-c", script, image, encode_image(image), str(outside)], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    out, short = result["out"], result["short"]
    assert len(out) == 2 and all(isinstance(x, str) for x in out)
    assert out[0] == out[1]  # a path under image_root and the same image's base64 bytes are the same input
    from visiontune.images import REFUSED_IMAGE

    assert result["refused"] and REFUSED_IMAGE in result["refused"]

    # Same answer as base + adapter in this process, with the training collator's image settings.
    model, processor = FastVisionModel.from_pretrained(assets["base"], use_gradient_checkpointing=False,
                                                       use_fused_kernels=False)
    model = PeftModel.from_pretrained(model, assets["adapter"])
    sample = {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                        {"type": "text", "text": "Read."}]}]}
    kw = dict(rule=cfg.images, progress=False)
    expected = generate_answers(model, processor, [sample], max_new_tokens=cfg.register.max_new_tokens, batch_size=1, **kw)
    assert out[0] == expected[0]
    one_token = generate_answers(model, processor, [sample], max_new_tokens=1, batch_size=1, **kw)
    assert short == one_token  # params={"max_new_tokens": 1} reached generate


def test_input_frames():
    samples = _build_samples(pd.DataFrame({"image": ["a.png", None], "prompt": ["Read.", "Just text"]}))
    assert samples[0]["messages"][0]["content"] == [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Read."}]
    assert samples[1]["messages"][0]["content"] == [{"type": "text", "text": "Just text"}]  # no image: text only
    assert len(_build_samples([{"image": "a.png", "prompt": "x"}])) == 1
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['prompt'\]"):
        _build_samples(pd.DataFrame({"image": ["a.png"]}))


def test_prompt_defaults_to_the_recorded_instruction():
    samples = _build_samples(pd.DataFrame({"image": ["a.png", "b.png"], "prompt": ["Read.", None]}), "Transcribe.")
    assert samples[0]["messages"][0]["content"][1]["text"] == "Read."
    assert samples[1]["messages"][0]["content"][1]["text"] == "Transcribe."
    only_images = _build_samples(pd.DataFrame({"image": ["a.png"]}), "Transcribe.")
    assert only_images[0]["messages"][0]["content"] == [{"type": "image", "image": "a.png"},
                                                         {"type": "text", "text": "Transcribe."}]


def test_the_champion_answers_as_the_evaluate_stage_on_the_same_images(pipeline_run):
    """The model a user loads from the registry (``models:/<name>@champion``, MLflow's own loader) gives, image for
    image, the answers the evaluate stage scored: same adapter, same image rule, same greedy decoding, the
    prompt defaulting to the instruction recorded at training. Real stages on the demo data (the session's
    pipeline run: 10 evaluation images, evaluated in one batch of 10; the served model batches by 8)."""
    import csv

    import mlflow

    from visiontune.pipeline.evaluate import load_eval_samples

    cfg = pipeline_run["cfg"]
    scored = list(csv.DictReader(open(cfg.eval.predictions_file, newline="")))
    samples = load_eval_samples(Path(cfg.data.work_dir) / "dataset", cfg.eval.split, cfg.eval.max_samples)
    assert [s.get("record_id", "") for s in samples] == [r["record_id"] for r in scored] and len(scored) == 10
    images = []
    for sample in samples:
        user = next(m for m in sample["messages"] if m["role"] == "user")
        images.append(next(c["image"] for c in user["content"] if c.get("type") == "image"))

    mlflow.set_tracking_uri(cfg.tracking.uri)
    mlflow.set_registry_uri(cfg.tracking.uri)
    served = mlflow.pyfunc.load_model(f"models:/{cfg.register.model_name}@champion")
    assert served.unwrap_python_model().rule == ImageRule.of(cfg.images) and cfg.images.trim  # the training rule
    answers = served.predict(pd.DataFrame({"image": [encode_image(p) for p in images]}))
    assert list(answers) == [r["prediction"] for r in scored]
    assert len(set(answers)) > 1  # not one answer for every image
