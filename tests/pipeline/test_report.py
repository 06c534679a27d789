"""The run report: built by the real stages (train with in-training evaluation -> evaluate -> register ->
report), rebuilt from MLflow alone, and opened from disk in headless Chromium: no console errors, the numbers
shown are metrics.json's, every gallery image loads, the filters work; a screenshot is saved."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

from visiontune import stages
from visiontune.config import from_dict
from visiontune.pipeline.report_views import cards, confusions, segments

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1700")


# ------------------------------------------------------------------------------------------ the browser
@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Debian's headless Chromium driven by Selenium through Debian's chromedriver (no browser download)."""
    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("no Chromium here: install Debian's `chromium` and `chromium-driver` (.ci/run does: "
                    "apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency: pip install -e .[dev]")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    with tempfile.TemporaryDirectory() as profile:
        for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}",):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
        try:
            yield driver
        finally:
            driver.quit()


def open_report(driver: Any, page: Path, metrics: dict, screenshot: Path) -> dict[str, Any]:
    """Load ``page`` from disk and check what every report must hold; returns what the page shows."""
    driver.get(page.resolve().as_uri())
    shown = driver.execute_script("""
        const imgs = sel => Array.from(document.querySelectorAll(sel)).map(i => [i.complete, i.naturalWidth]);
        return {gallery: imgs('#gallery img'), charts: imgs('.charts img'), cards: document.querySelectorAll('.card').length,
                cells: Array.from(document.querySelectorAll('td[data-metric]')).map(
                    td => [td.dataset.model, td.dataset.metric, td.textContent.trim()])};""")
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == [], errors
    assert shown["gallery"] and all(ok and width > 0 for ok, width in shown["gallery"]), shown["gallery"]
    assert shown["charts"] and all(ok and width > 0 for ok, width in shown["charts"]), shown["charts"]
    assert {(m, k) for m, k, _ in shown["cells"]} == {(m, k) for m in ("base", "finetuned") for k in metrics[m]}
    for model, metric, text in shown["cells"]:
        assert float(text) == pytest.approx(metrics[model][metric], abs=5e-5), (model, metric, text)
    driver.save_screenshot(str(screenshot))
    with Image.open(screenshot) as im:
        assert im.width >= 1000 and im.height >= 1000
    return shown


def visible_after(driver: Any, name: str) -> list[str]:
    driver.find_element("css selector", f'.filters button[data-filter="{name}"]').click()
    visible = driver.execute_script(
        "return Array.from(document.querySelectorAll('#gallery .card')).filter(c => !c.hidden).map(c => c.dataset.index)")
    assert driver.find_element("id", "shown").text == str(len(visible))
    return visible


def test_report_stage_reads_its_params_and_links_the_page(pipeline_run):
    import mlflow

    cfg, result = pipeline_run["cfg"], pipeline_run["result"]
    assert pipeline_run["read"] == set(stages.get("report").params)
    page = Path(cfg.report.output_dir) / "index.html"
    assert result["report"] == str(page) and page.stat().st_size > 20_000
    assert result["gallery_samples"] == result["gallery_images"] == 10 and result["decision"] == "champion"

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    run_id = result["mlflow_run_id"]
    assert "report/index.html" in {a.path for a in client.list_artifacts(run_id, "report")}
    assert client.get_run(run_id).data.tags["report"] == result["report_artifact"]
    version = client.get_model_version("vt-report", pipeline_run["decision"]["version"])
    assert version.tags["report"] == result["report_artifact"]
    decision = json.loads(Path(client.download_artifacts(run_id, "register/decision.json",
                                                         str(pipeline_run["root"]))).read_text())
    assert decision["report"] == result["report_artifact"] and decision["decision"] == "champion"
    assert [m.step for m in client.get_metric_history(run_id, "val_cer")] == [2, 4]  # eval curves beside the loss


def test_report_of_the_real_run_in_chromium(pipeline_run, tmp_path):
    page = Path(pipeline_run["cfg"].report.output_dir) / "index.html"
    with chromium() as driver:
        shown = open_report(driver, page, pipeline_run["metrics"], tmp_path / "report.png")
        assert shown["cards"] == 10
        wrong = visible_after(driver, "wrong")
        assert len(wrong) == round(10 * (1 - pipeline_run["metrics"]["finetuned"]["exact_match"]))
        assert len(visible_after(driver, "all")) == 10


def test_rebuild_from_mlflow_alone_is_the_same_page(pipeline_run, tmp_path):
    """`visiontune report --run ID` in an empty folder (no data, no outputs, no run.json): the same page."""
    cfg, result = pipeline_run["cfg"], pipeline_run["result"]
    exe = Path(sys.executable).with_name("visiontune")
    p = subprocess.run([str(exe), "report", "--run", result["mlflow_run_id"], "--set", f"tracking.uri={cfg.tracking.uri}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rebuilt = tmp_path / "outputs" / "report" / "runs" / result["mlflow_run_id"] / "index.html"
    assert json.loads(p.stdout)["report"] == str(rebuilt.relative_to(tmp_path))
    assert rebuilt.read_text() == Path(result["report"]).read_text()


# ------------------------------------------------------------------------------------------ a scripted run
ROWS = [  # reference, base, fine-tuned: right/right, fixed, broken, wrong/wrong, wrong/right
    ("12", "12", "12"), ("345", "34", "345"), ("6789", "6789", "6788"), ("0", "9", "77"), ("42", "4", "42")]


def _scripted_run(root: Path) -> tuple[str, str, dict]:
    """An MLflow run holding what the stages log (curves, metrics, predictions, decision, data summary,
    thumbnails), with answers chosen to hit every gallery filter. Returns (tracking uri, run id, metrics)."""
    import mlflow

    from visiontune.pipeline.evaluate import compute_metrics, sample_cer, write_predictions_csv
    from visiontune.pipeline.tracking import setup_mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    refs, base, tuned = (list(c) for c in zip(*ROWS))
    metrics = {"finetuned": compute_metrics(tuned, refs), "base": compute_metrics(base, refs), "primary_metric": "cer",
               "n_samples": len(ROWS), "split": "test", "adapter_sha256": "ab" * 32}
    rows = [{"index": i, "record_id": f"r{i}", "reference": r, "prediction": t, "cer": sample_cer(t, r),
             "exact_match": int(t == r), "base_prediction": b, "base_cer": sample_cer(b, r)} for i, (r, b, t) in enumerate(ROWS)]
    thumbs = root / "thumbs"
    thumbs.mkdir()
    for i in range(len(ROWS)):
        Image.new("RGB", (120 + 20 * i, 60), (40 * i, 90, 160)).save(thumbs / f"r{i}.jpg")  # named by record id
    data = {"validate": {"records": 7, "valid": 5, "quarantined": 2, "failure_ratio": 0.2857, "max_failure_ratio": 0.5,
                         "failures_by_reason": {"undecodable": 1, "duplicate": 1}},
            "reasons": {"undecodable": "file cannot be decoded", "duplicate": "same image as an earlier record"},
            "convert": {"train_rows": 3, "validation_rows": 1, "test_rows": 1},
            "sizes": {"count": 2, "source": [[40, 20], [2000, 900]], "normalized": [[600, 300], [1000, 450]]}}
    with mlflow.start_run(experiment_id=setup_mlflow(uri, "report-test")) as run:
        mlflow.log_params({"train.max_steps": 4, "lora.r": 4})
        mlflow.set_tags({"git_commit": "abc123", "dvc_data_md5": "d41d8cd9"})
        for step in range(1, 5):
            mlflow.log_metrics({"loss": 2.0 / step, "learning_rate": 1e-3}, step=step)
        for step, cer in ((2, 0.6), (4, 0.4)):
            mlflow.log_metrics({"val_cer": cer, "val_exact_match": 1 - cer, "val_seconds": 0.5}, step=step)
        mlflow.log_metric("train/runtime", 10.0)
        metrics["mlflow_run_id"] = run.info.run_id
        mlflow.log_dict(metrics, "eval/metrics.json")
        mlflow.log_artifact(str(write_predictions_csv(root / "predictions.csv", rows)), "eval")
        mlflow.log_dict(data, "report/data_summary.json")
        mlflow.log_artifacts(str(thumbs), "report/thumbnails")
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("vt-scripted")
    version = client.create_model_version("vt-scripted", f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version
    client.log_dict(run.info.run_id, {"model_name": "vt-scripted", "version": str(version), "decision": "challenger",
                                      "metric": "cer", "value": metrics["finetuned"]["cer"], "champion_version": "1",
                                      "champion_value": 0.1, "margin": 0.0, "reason": "not better", "timestamp": "t",
                                      "registered_uri": f"models:/vt-scripted/{version}"}, "register/decision.json")
    return uri, run.info.run_id, metrics


def test_gallery_filters_in_chromium(tmp_path, monkeypatch):
    from visiontune.pipeline.report import report_for_run

    monkeypatch.chdir(tmp_path)
    uri, run_id, metrics = _scripted_run(tmp_path)
    result = report_for_run(from_dict({"tracking": {"uri": uri}}), run_id)
    assert result["gallery_images"] == len(ROWS) and result["decision"] == "challenger"
    with chromium() as driver:
        open_report(driver, Path(result["report"]), metrics, tmp_path / "scripted.png")
        assert driver.find_element("id", "decision-value").text == "challenger"
        assert visible_after(driver, "wrong") == ["2", "3"]
        assert visible_after(driver, "fixed") == ["1", "4"]
        assert visible_after(driver, "broken") == ["2"]
        assert visible_after(driver, "all") == ["0", "1", "2", "3", "4"]


def test_a_run_with_nothing_but_a_loss_still_renders(tmp_path, monkeypatch):
    import mlflow

    from visiontune.pipeline.report import report_for_run
    from visiontune.pipeline.tracking import setup_mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow.start_run(experiment_id=setup_mlflow(uri, "bare")) as run:
        mlflow.log_metric("loss", 1.0, step=1)
    result = report_for_run(from_dict({"tracking": {"uri": uri}}), run.info.run_id)
    html = Path(result["report"]).read_text()
    assert "not registered" in html and "has no evaluation" in html and "No data summary" in html
    assert result["gallery_samples"] == 0 and result["decision"] is None


# ------------------------------------------------------------------------------------------ what it computes
def test_errors_are_marked_as_the_cer_counts_them():
    assert segments("6789", "6788") == [{"kind": "ok", "text": "678", "want": "678"},
                                        {"kind": "sub", "text": "8", "want": "9"}]
    assert [s["kind"] for s in segments("12", "1x2")] == ["ok", "ins", "ok"]
    assert segments("12", "") == [{"kind": "del", "text": "12", "want": "12"}]
    assert confusions([("6789", "6788"), ("19", "18"), ("12", "1"), ("3", "37")]) == [
        {"want": "9", "got": "8", "count": 2}, {"want": "2", "got": "∅", "count": 1}, {"want": "∅", "got": "7", "count": 1}]
    statuses = [c["status"] for c in cards([{"index": str(i), "reference": r, "prediction": t, "cer": "0",
                                             "base_prediction": b, "base_cer": "0"} for i, (r, b, t) in enumerate(ROWS)], {})]
    assert statuses == [[], ["fixed"], ["wrong", "broken"], ["wrong"], ["fixed"]]


def test_the_stage_refuses_another_runs_evaluation(tmp_path):
    from visiontune.pipeline.report import report_stage
    from visiontune.pipeline.tracking import write_run_file

    cfg = from_dict({"align": {"output_dir": str(tmp_path / "align")}, "eval": {"metrics_file": str(tmp_path / "m.json")}})
    write_run_file(cfg.align.output_dir, {"mlflow_run_id": "abc"})
    with pytest.raises(FileNotFoundError, match="run the evaluate stage first"):
        report_stage(cfg)
    (tmp_path / "m.json").write_text(json.dumps({"mlflow_run_id": "other"}))
    with pytest.raises(ValueError, match="scored run other, but the trained run is abc: re-run `visiontune evaluate`"):
        report_stage(cfg)
