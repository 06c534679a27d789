"""The export stage: the champion as folders that serving engines and llama.cpp load.

After ``register``, this exports the registered model's current champion (or ``export.version``) in each
of ``export.formats``: ``merged_16bit`` (a safetensors folder for vLLM, SGLang, TGI or plain
transformers), ``merged_4bit`` (bitsandbytes NF4), ``lora`` (the adapter) and ``gguf_f16`` /
``gguf_q8_0`` / ``gguf_f32`` (llama.cpp's language model plus mmproj, :mod:`visiontune.gguf`). The model
is loaded exactly as it is served (``mlflow.pyfunc.load_model`` of the model version: base + adapter).

What it writes, in ``export.output_dir``: one folder per format and ``manifest.json`` (model, version,
formats, the sha256 and size of every file). The folder is logged to the version's MLflow run under
``export/v<version>``, the export is recorded on the model version (tags ``export_formats``,
``export_uri``, ``export_manifest_sha256``, ``export_time``: the latest export) beside the promotion
decision's tags, and an entry (:func:`export_entry`: time, version, formats, manifest sha256, logged folder)
is appended to ``exports`` in the version's decision record, ``register/decision.json`` in its run (the
record the run report shows; every export of the version, in order).

Not in ``register.promotions_log``: that file is the register stage's DVC output (and this stage's
dependency); appending to it here would change register's recorded output, so every ``dvc repro`` would
run register again (a new model version) and then this stage.

The registered model's name and registry come from the last record of ``register.promotions_log`` (the
register stage's output), so the stage reads no setting of another stage. With ``export.formats: []``
(the default) it only writes a manifest saying so.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

MERGED_FORMATS = ("merged_16bit", "merged_4bit", "lora")
GGUF_FORMATS = {"gguf_f16": "f16", "gguf_q8_0": "q8_0", "gguf_f32": "f32"}
FORMATS = MERGED_FORMATS + tuple(GGUF_FORMATS)


def check_formats(formats: list[str]) -> list[str]:
    """``formats`` without duplicates, or a clear error naming the unknown ones."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"export.formats {unknown}: choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` of every file under ``folder`` (sorted)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        files[path.relative_to(folder).as_posix()] = {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}
    return files


def last_registration(promotions_log: Path) -> dict[str, Any]:
    """The register stage's latest decision record (model name, version, registry URI)."""
    lines = [line for line in promotions_log.read_text().splitlines() if line.strip()] if promotions_log.is_file() else []
    if not lines:
        raise FileNotFoundError(f"{promotions_log} holds no registration: run the register stage first "
                                "(`visiontune register`)")
    return json.loads(lines[-1])


def _model_version(client: Any, name: str, version: Optional[str]) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, "champion")
    except MlflowException as e:
        which = f"version {version}" if version else "a champion"
        raise LookupError(f"registered model {name!r} has no {which} ({e.message}); set export.version to one of its "
                          "versions or run `visiontune register`") from e


def _export(model: Any, processor: Any, formats: list[str], out: Path) -> None:
    from visiontune.gguf import write_gguf
    from visiontune.models.merge import save_pretrained_merged

    for fmt in formats:
        if fmt in MERGED_FORMATS:
            save_pretrained_merged(model, out / fmt, processor, save_method=fmt)
    types = [GGUF_FORMATS[f] for f in formats if f in GGUF_FORMATS]
    if types:
        write_gguf(model, processor, out / "gguf", types)


DECISION_ARTIFACT = "register/decision.json"  # the register stage's decision record in the version's run


def export_entry(mv: Any, out: Path, manifest: dict[str, Any], manifest_sha: str, export_uri: str) -> dict[str, Any]:
    """The export as an entry of the decision history: a record of the promotion records' family (same keys
    for the same facts: ``timestamp``, ``model_name``, ``version``, ``run_id``, ``registered_uri``,
    ``git_commit``), with ``event: "export"``, the formats, the manifest's sha256 and the logged folder."""
    from visiontune.pipeline.tracking import git_commit

    files = manifest["files"]
    return {"timestamp": manifest["timestamp"], "event": "export", "model_name": mv.name, "version": str(mv.version),
            "formats": list(manifest["formats"]), "manifest_sha256": manifest_sha, "export_uri": export_uri,
            "output_dir": str(out), "files": len(files), "bytes": sum(f["bytes"] for f in files.values()),
            "run_id": mv.run_id, "registered_uri": f"models:/{mv.name}/{mv.version}", "git_commit": git_commit()}


def _append_to_decision(client: Any, mv: Any, entry: dict[str, Any]) -> bool:
    """Append ``entry`` to ``exports`` in the version's decision record (``register/decision.json`` in its run,
    the record the run report shows); False, with a warning, when the run holds no decision of this version."""
    import tempfile

    folder, _, name = DECISION_ARTIFACT.rpartition("/")
    if DECISION_ARTIFACT not in {a.path for a in client.list_artifacts(mv.run_id, folder)}:
        log.warning("run %s holds no %s: export of %s v%s recorded in the version's tags only (it was not registered "
                    "by `visiontune register`)", mv.run_id, DECISION_ARTIFACT, mv.name, mv.version)
        return False
    with tempfile.TemporaryDirectory(prefix="visiontune-export-") as tmp:
        record = json.loads(Path(client.download_artifacts(mv.run_id, DECISION_ARTIFACT, tmp)).read_text())
    if (record.get("model_name"), str(record.get("version"))) != (mv.name, str(mv.version)):
        log.warning("%s of run %s records %s v%s, not %s v%s: export recorded in the version's tags only",
                    DECISION_ARTIFACT, mv.run_id, record.get("model_name"), record.get("version"), mv.name, mv.version)
        return False
    record["exports"] = [*(record.get("exports") or []), entry]
    client.log_dict(mv.run_id, record, DECISION_ARTIFACT)
    return True


def _record(client: Any, mv: Any, out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Log the folder to the version's run, tag the version with the export and append the export to the
    version's decision record (see :func:`export_entry`)."""
    artifact_path = f"export/v{mv.version}"
    client.log_artifacts(mv.run_id, str(out), artifact_path)
    manifest_sha = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    tags = {"export_formats": ",".join(manifest["formats"]), "export_uri": f"runs:/{mv.run_id}/{artifact_path}",
            "export_manifest_sha256": manifest_sha, "export_time": manifest["timestamp"]}
    for key, value in tags.items():
        client.set_model_version_tag(mv.name, mv.version, key, value)
    entry = export_entry(mv, out, manifest, manifest_sha, tags["export_uri"])
    return {**tags, "decision_history": _append_to_decision(client, mv, entry)}


def export_stage(cfg: Any) -> dict[str, Any]:
    """``visiontune export``: export the champion (or ``export.version``) in ``export.formats``; see the module doc."""
    e = cfg.export
    formats, version, out = check_formats(list(e.formats)), e.version, Path(e.output_dir)
    promotions_log, configured_uri = Path(cfg.register.promotions_log), cfg.tracking.uri  # read always: path-free params
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    timestamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if not formats:
        manifest = {"exported": False, "formats": [], "reason": "export.formats is empty", "timestamp": timestamp}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
        return manifest

    import mlflow
    from mlflow import MlflowClient

    from visiontune.pipeline.tracking import resolve_tracking_uri

    registration = last_registration(promotions_log)
    uri = registration.get("tracking_uri") or resolve_tracking_uri(configured_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = _model_version(client, registration["model_name"], version)
    model_uri = f"models:/{mv.name}/{mv.version}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    served = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()  # base + adapter, as served
    _export(served.model, served.processor, formats, out)
    manifest = {"exported": True, "model_name": mv.name, "version": str(mv.version), "model_uri": model_uri,
                "run_id": mv.run_id, "formats": formats, "timestamp": timestamp, "files": file_manifest(out)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    tags = _record(client, mv, out, manifest)
    log.info("exported %s v%s as %s to %s (%s)", mv.name, mv.version, ", ".join(formats), out, tags["export_uri"])
    return {**{k: v for k, v in manifest.items() if k != "files"}, "files": len(manifest["files"]), **tags,
            "output_dir": str(out)}
