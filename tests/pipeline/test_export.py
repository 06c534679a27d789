"""Export stage: the champion (or a given version) exported as a merged folder, the adapter and GGUF,
with a sha256 manifest, logged to the version's MLflow run, recorded on the model version and appended to
the version's decision record (the decision history the run report shows), leaving the register stage's
promotions log (its DVC output) untouched; off by default; reads exactly the settings its registry entry
lists."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import pytest
import torch

from visiontune import stages
from visiontune.pipeline.export import check_formats, export_stage, last_registration
from visiontune.pipeline.register import register_stage
from visiontune.stages import RecordingConfig


def _register(cfg, start_training_run, write_metrics, assets, cer: float) -> dict:
    start_training_run(cfg, assets["adapter"], assets["base"])
    write_metrics(cfg, cer=cer)
    return register_stage(cfg)


def _decision(client, run_id: str) -> dict:
    """The version's decision record as the tracking server holds it (``register/decision.json`` of its run)."""
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, "register/decision.json", tmp)).read_text())


def _greedy(model, processor, image_path: Path) -> list[int]:
    from PIL import Image

    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read."}]}], add_generation_prompt=True)
    inputs = processor(text=[text], images=[[Image.open(image_path).convert("RGB")]], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return ids[0, inputs["input_ids"].shape[1]:].tolist()


def test_export_of_the_champion(make_cfg, start_training_run, write_metrics, assets, project):
    import mlflow
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = make_cfg(export={"formats": ["merged_16bit", "lora", "gguf_q8_0"]})
    assert _register(cfg, start_training_run, write_metrics, assets, cer=0.5)["decision"] == "champion"
    assert _register(cfg, start_training_run, write_metrics, assets, cer=0.9)["decision"] == "challenger"
    promotions_log = Path(cfg.register.promotions_log)
    log_before = promotions_log.read_bytes()
    recording = RecordingConfig(cfg)
    result = export_stage(recording)
    assert recording.accessed == set(stages.get("export").params)  # the registry lists exactly what it reads
    assert (result["version"], result["formats"]) == ("1", ["merged_16bit", "lora", "gguf_q8_0"])  # the champion

    out = Path(cfg.export.output_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"merged_16bit/config.json", "merged_16bit/model.safetensors", "merged_16bit/chat_template.jinja",
            "lora/adapter_config.json", "gguf/model-Q8_0.gguf", "gguf/mmproj-model-F16.gguf"} <= set(manifest["files"])
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == entry["sha256"], rel

    # The merged folder answers as the registered model does (base + adapter, loaded as served).
    served = mlflow.pyfunc.load_model("models:/vt-test/1").unwrap_python_model()
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged_16bit", dtype=torch.float32)
    image = assets["images"][0]
    assert _greedy(merged, AutoProcessor.from_pretrained(out / "merged_16bit"), image) == _greedy(
        served.model, served.processor, image)

    # Recorded on the version, and logged to its run with the manifest.
    client = mlflow.MlflowClient(cfg.tracking.uri)
    mv = client.get_model_version("vt-test", "1")
    assert mv.tags["export_formats"] == "merged_16bit,lora,gguf_q8_0"
    assert mv.tags["export_uri"] == f"runs:/{mv.run_id}/export/v1"
    assert mv.tags["export_manifest_sha256"] == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    logged = {a.path for a in client.list_artifacts(mv.run_id, "export/v1")}
    assert {"export/v1/manifest.json", "export/v1/merged_16bit", "export/v1/gguf"} <= logged
    assert "export_formats" not in client.get_model_version("vt-test", "2").tags

    # The decision history: the export is appended to v1's decision record (the promotion record's family:
    # same keys for the same facts), the promotion decision itself unchanged; v2's record has no export; the
    # promotions log (register's DVC output, export's dependency) is byte for byte what register wrote, and
    # its last record is still the last registration.
    v1 = _decision(client, mv.run_id)
    mv2 = client.get_model_version("vt-test", "2")
    assert (v1["decision"], v1["version"], result["decision_history"]) == ("champion", "1", True)
    (entry,) = v1["exports"]
    assert entry == {"timestamp": result["timestamp"], "event": "export", "model_name": "vt-test", "version": "1",
                     "formats": ["merged_16bit", "lora", "gguf_q8_0"], "manifest_sha256": mv.tags["export_manifest_sha256"],
                     "export_uri": f"runs:/{mv.run_id}/export/v1", "output_dir": str(out), "files": len(manifest["files"]),
                     "bytes": sum(f["bytes"] for f in manifest["files"].values()), "run_id": mv.run_id,
                     "registered_uri": "models:/vt-test/1", "git_commit": v1["git_commit"]}
    assert {k for k in entry if k in v1} == {"timestamp", "model_name", "version", "run_id", "registered_uri", "git_commit"}
    assert "exports" not in _decision(client, mv2.run_id)
    assert promotions_log.read_bytes() == log_before and last_registration(promotions_log)["version"] == "2"

    # A given version instead of the champion; each export is one more entry, in order.
    again = export_stage(make_cfg(export={"formats": ["lora"], "version": "2"}))
    assert again["version"] == "2" and sorted(p.name for p in out.iterdir()) == ["lora", "manifest.json"]
    assert [e["formats"] for e in _decision(client, mv2.run_id)["exports"]] == [["lora"]]
    export_stage(make_cfg(export={"formats": ["lora"], "version": "1"}))
    history = _decision(client, mv.run_id)["exports"]
    assert [(e["version"], e["formats"]) for e in history] == [("1", ["merged_16bit", "lora", "gguf_q8_0"]), ("1", ["lora"])]
    assert history[0] == entry and history[1]["timestamp"] >= entry["timestamp"]
    assert promotions_log.read_bytes() == log_before

    # The run report shows the exports under the promotion decision, and its link to the page (written back
    # into decision.json) keeps them.
    from visiontune.pipeline.report import build_report

    page = build_report(client, mv.run_id, project / "report" / "index.html", 0)
    html = Path(page["report"]).read_text()
    assert 'id="decision-exports"' in html and "exported as merged_16bit, lora, gguf_q8_0" in html
    assert history[1]["manifest_sha256"][:16] in html
    linked = _decision(client, mv.run_id)
    assert linked["exports"] == history and linked["report"] == page["report_artifact"]


def test_export_is_off_by_default_and_errors_are_clear(make_cfg, start_training_run, write_metrics, assets, project):
    cfg = make_cfg()
    started = time.perf_counter()
    result = export_stage(cfg)
    assert result["exported"] is False and result["formats"] == [] and time.perf_counter() - started < 1.0
    assert json.loads((Path(cfg.export.output_dir) / "manifest.json").read_text())["exported"] is False
    with pytest.raises(ValueError, match=r"export.formats \['gguf_q4'\]: choose from merged_16bit"):
        check_formats(["gguf_q4"])
    with pytest.raises(FileNotFoundError, match="run the register stage first"):
        export_stage(make_cfg(export={"formats": ["lora"]}))
    _register(cfg, start_training_run, write_metrics, assets, cer=0.5)
    with pytest.raises(LookupError, match="has no version 7"):
        export_stage(make_cfg(export={"formats": ["lora"], "version": "7"}))
