"""The report stage: one self-contained HTML page per run, built from what the MLflow run holds.

People judging a fine-tune look before they read. The page (``report.output_dir``/index.html) shows the
promotion decision, base vs fine-tuned metrics, the loss and in-training evaluation curves, a gallery of
evaluation images with the reference, base and fine-tuned answers (character errors marked; filters: all,
wrong, fixed by tuning, broken by tuning), error analysis for text answers (per-sample CER histogram,
exact match by answer length, most frequent character confusions), a data summary (validated and
quarantined records by reason, image sizes before and after normalization) and the run's lineage (data
hash, git commit, params).

Everything on the page comes from the MLflow run, so ``visiontune report --run RUN_ID`` rebuilds the page
of any past run from MLflow alone. The stage first records into the run the two things only the local
workspace knows (``report/data_summary.json`` and ``report/thumbnails/<index>.jpg``, the evaluated images),
then builds the page from MLflow exactly as a rebuild does. The page is logged to the run as
``report/index.html`` and linked from the promotion decision record (the version's ``report`` tag and
``register/decision.json``).

Self-contained: Jinja2 renders one HTML file with its CSS, a few lines of JavaScript, the matplotlib
charts (SVG) and the thumbnails inlined as data URIs; a Content-Security-Policy forbids any network
request, so the file opens anywhere.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Optional

from visiontune.pipeline.tracking import read_run_file, resolve_tracking_uri

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("templates") / "report.html.j2"
THUMBNAIL_PX = 256
MAX_SIZE_POINTS = 5000  # image sizes kept per distribution (an even sample of larger datasets)
CURVES = ("loss", "learning_rate", "val_cer", "val_exact_match", "val_seconds")


# ------------------------------------------------------------------------------ what only the workspace knows
def _read_json(path: Path) -> Optional[Any]:
    return json.loads(path.read_text()) if path.is_file() else None


def data_summary(work_dir: Path) -> dict[str, Any]:
    """The data stages' summaries (validated, quarantined by reason, normalization, splits) and the image
    sizes before and after normalization; parts whose files are missing are None."""
    from visiontune.data.validate import REASONS

    validated = _read_json(work_dir / "validated" / "summary.json")
    manifest = _read_json(work_dir / "normalized" / "manifest.json")
    sizes = None
    if manifest:
        images = list(manifest["images"].values())
        every = max(1, math.ceil(len(images) / MAX_SIZE_POINTS))
        sizes = {"count": len(images),
                 "source": [[e["source_width"], e["source_height"]] for e in images[::every]],
                 "normalized": [[e["width"], e["height"]] for e in images[::every]]}
    keep = ("records", "valid", "quarantined", "failure_ratio", "max_failure_ratio", "failures_by_reason",
            "worst_offenders")
    return {
        "validate": {k: validated[k] for k in keep if k in validated} if validated else None,
        "reasons": {k: REASONS.get(k, "") for k in (validated or {}).get("failures_by_reason", {})},
        "normalize": _read_json(work_dir / "metrics" / "normalize.json"),
        "normalize_settings": manifest.get("settings") if manifest else None,
        "convert": _read_json(work_dir / "metrics" / "convert.json"),
        "sizes": sizes,
    }


def _thumbnail(messages: list[dict]) -> Optional[bytes]:
    """The prompt's first image as a JPEG of at most THUMBNAIL_PX a side; None without a readable image."""
    from visiontune.images import decode_image_value, load_image
    from visiontune.inference import chat_parts, split_conversation

    values = chat_parts(split_conversation(messages)[0])[1]
    if not values:
        return None
    try:
        img = load_image(decode_image_value(values[0])).convert("RGB")
    except (FileNotFoundError, OSError) as e:
        log.warning("no thumbnail: %s", e)
        return None
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_thumbnails(dataset_dir: Path, split: str, rows: list[dict[str, str]], out: Path) -> int:
    """``out/<thumbnail key>.jpg`` for each predictions row, its image found by record id in ``split`` (by
    position when the row has none); returns how many were written."""
    from visiontune.data.convert import load_split
    from visiontune.pipeline.report_views import thumbnail_key

    ds = load_split(dataset_dir, split, setting="the split in the metrics file")
    ids = ds["record_id"] if "record_id" in ds.column_names else []
    position = {rid: i for i, rid in enumerate(ids) if rid}
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for row in rows:
        i = position.get(row.get("record_id") or "", int(row["index"]))
        data = _thumbnail(ds[i]["messages"]) if i < len(ds) else None
        if data:
            (out / f"{thumbnail_key(row)}.jpg").write_bytes(data)
            written += 1
    return written


def _record_inputs(client: Any, run_id: str, work_dir: Path, gallery_samples: int) -> None:
    """Log the data summary and the gallery's thumbnails into the run (what a rebuild cannot find elsewhere)."""
    client.log_dict(run_id, data_summary(work_dir), "report/data_summary.json")
    with tempfile.TemporaryDirectory() as tmp:
        metrics_path, predictions_path = _eval_files(client, run_id)
        metrics, rows = _artifact_json(client, run_id, metrics_path, tmp), _predictions(client, run_id, predictions_path, tmp)
        if metrics and rows:
            thumbs = Path(tmp) / "thumbnails"
            if write_thumbnails(work_dir / "dataset", metrics["split"], _gallery_rows(rows, gallery_samples), thumbs):
                client.log_artifacts(run_id, str(thumbs), "report/thumbnails")


# ------------------------------------------------------------------------------------ what MLflow holds
def _eval_files(client: Any, run_id: str) -> tuple[Optional[str], Optional[str]]:
    """The evaluate stage's metrics (the .json) and predictions (the .csv) artifacts under ``eval/``; their
    names are those of eval.metrics_file and eval.predictions_file at the time."""
    paths = sorted(a.path for a in client.list_artifacts(run_id, "eval") if not a.is_dir)
    return (next((p for p in paths if p.endswith(".json")), None), next((p for p in paths if p.endswith(".csv")), None))


def _download(client: Any, run_id: str, path: Optional[str], dst: str) -> Optional[Path]:
    """The artifact ``path`` of the run downloaded under ``dst``, or None if the run has none."""
    if path is None or path not in {a.path for a in client.list_artifacts(run_id, path.rpartition("/")[0] or None)}:
        return None
    return Path(client.download_artifacts(run_id, path, dst))


def _artifact_json(client: Any, run_id: str, path: Optional[str], dst: str) -> Optional[Any]:
    local = _download(client, run_id, path, dst)
    return json.loads(local.read_text()) if local else None


def _predictions(client: Any, run_id: str, path: Optional[str], dst: str) -> list[dict[str, str]]:
    local = _download(client, run_id, path, dst)
    if not local:
        return []
    with local.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _gallery_rows(rows: list[dict[str, str]], gallery_samples: int) -> list[dict[str, str]]:
    return rows[:gallery_samples] if gallery_samples > 0 else rows


def _thumbnails(client: Any, run_id: str, dst: str) -> dict[str, str]:
    """Thumbnail key (:func:`~visiontune.pipeline.report_views.thumbnail_key`) -> data URI of the image,
    from the run's report/thumbnails."""
    if "report/thumbnails" not in {a.path for a in client.list_artifacts(run_id, "report")}:
        return {}
    folder = Path(client.download_artifacts(run_id, "report/thumbnails", dst))
    return {p.stem: "data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode()
            for p in sorted(folder.glob("*.jpg"))}


def collect(client: Any, run_id: str, gallery_samples: int) -> dict[str, Any]:
    """Every fact the page shows, read from the MLflow run ``run_id`` (nothing local)."""
    run = client.get_run(run_id)
    metrics_path, predictions_path = _eval_files(client, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        facts = {
            "metrics": _artifact_json(client, run_id, metrics_path, tmp),
            "decision": _artifact_json(client, run_id, "register/decision.json", tmp),
            "data": _artifact_json(client, run_id, "report/data_summary.json", tmp),
            "rows": _predictions(client, run_id, predictions_path, tmp),
            "thumbnails": _thumbnails(client, run_id, tmp),
        }
    facts["curves"] = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in CURVES}
    facts["gallery"] = _gallery_rows(facts["rows"], gallery_samples)
    experiment = client.get_experiment(run.info.experiment_id)
    facts["run"] = {"id": run_id, "name": run.info.run_name, "status": run.info.status,
                    "experiment": experiment.name if experiment else run.info.experiment_id,
                    "start": _time(run.info.start_time), "end": _time(run.info.end_time),
                    "artifact_uri": run.info.artifact_uri}
    facts["params"], facts["tags"], facts["run_metrics"] = dict(run.data.params), dict(run.data.tags), dict(run.data.metrics)
    return facts


def _time(ms: Optional[int]) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else ""


# ------------------------------------------------------------------------------------------ the page
def build_report(client: Any, run_id: str, out_path: Path, gallery_samples: int) -> dict[str, Any]:
    """Render the page of ``run_id`` from MLflow into ``out_path``, log it to the run, link it from the
    decision record; returns a summary."""
    from visiontune.pipeline.report_views import page_context, thumbnail_key

    facts = collect(client, run_id, gallery_samples)
    html = render(page_context(facts))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(html, encoding="utf-8")
    client.log_artifact(run_id, str(out_path), "report")
    uri = f"{facts['run']['artifact_uri'].rstrip('/')}/report/{out_path.name}"
    _link_from_decision(client, run_id, facts, uri)
    shown = facts["gallery"]
    return {"report": str(out_path), "mlflow_run_id": run_id, "report_artifact": uri, "gallery_samples": len(shown),
            "gallery_images": sum(thumbnail_key(r) in facts["thumbnails"] for r in shown),
            "decision": (facts["decision"] or {}).get("decision"), "bytes": len(html.encode())}


def render(context: dict[str, Any]) -> str:
    """The HTML of the page for a context made by :func:`visiontune.pipeline.report_views.page_context`."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE.parent)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(TEMPLATE.name).render(**context)


def _link_from_decision(client: Any, run_id: str, facts: dict[str, Any], uri: str) -> None:
    """The report's location in the run's tags, the model version's tags and the run's decision.json."""
    client.set_tag(run_id, "report", uri)
    decision = facts["decision"]
    if not decision:
        return
    client.set_model_version_tag(decision["model_name"], decision["version"], "report", uri)
    if decision.get("report") != uri:
        client.log_dict(run_id, {**decision, "report": uri}, "register/decision.json")


# ------------------------------------------------------------------------------------------ entry points
def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _check_upstream(metrics_file: Path, promotions_log: Path, run_id: str) -> None:
    """The local evaluation must be this run's; a missing promotion decision is only worth a warning."""
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} not found: run the evaluate stage first (`visiontune evaluate`)")
    scored = json.loads(metrics_file.read_text()).get("mlflow_run_id")
    if scored != run_id:
        raise ValueError(f"{metrics_file} scored run {scored}, but the trained run is {run_id}: re-run `visiontune evaluate`")
    lines = promotions_log.read_text().splitlines() if promotions_log.is_file() else []
    if not any(json.loads(line).get("run_id") == run_id for line in lines if line.strip()):
        log.warning("%s holds no decision for run %s: the report shows none (run `visiontune register` first)",
                    promotions_log, run_id)


def report_stage(cfg: Any) -> dict[str, Any]:
    """``visiontune report``: record the data summary and thumbnails into the training run, then build its
    page from MLflow into ``report.output_dir``/index.html (see the module doc)."""
    r = cfg.report
    out_dir, gallery_samples, configured_uri = Path(r.output_dir), r.gallery_samples, cfg.tracking.uri
    run = read_run_file(cfg.align.output_dir)  # the record evaluate and register took: the same MLflow run
    run_id = run["mlflow_run_id"]
    _check_upstream(Path(cfg.eval.metrics_file), Path(cfg.register.promotions_log), run_id)
    client = _client(run.get("tracking_uri") or resolve_tracking_uri(configured_uri))
    _record_inputs(client, run_id, Path(cfg.data.work_dir), gallery_samples)
    return build_report(client, run_id, out_dir / "index.html", gallery_samples)


def report_for_run(cfg: Any, run_id: str) -> dict[str, Any]:
    """``visiontune report --run RUN_ID``: rebuild the page of any past run from MLflow alone, into
    ``report.output_dir``/runs/RUN_ID/index.html (and into the run's artifacts)."""
    from mlflow.exceptions import MlflowException

    r, uri = cfg.report, resolve_tracking_uri(cfg.tracking.uri)
    client = _client(uri)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"no MLflow run {run_id!r} in {uri} ({e.message}): pass a run id that `mlflow ui` lists, "
                         "or point tracking.uri / MLFLOW_TRACKING_URI at the store that holds it") from e
    return build_report(client, run_id, Path(r.output_dir) / "runs" / run_id / "index.html", r.gallery_samples)


def prefect_report(result: dict[str, Any], cfg: Any) -> None:
    """A Prefect link artifact to the page."""
    from prefect.artifacts import create_link_artifact

    create_link_artifact(key="run-report", link=Path(result["report"]).resolve().as_uri(), link_text="run report",
                         description=f"Report of MLflow run {result['mlflow_run_id']}")
