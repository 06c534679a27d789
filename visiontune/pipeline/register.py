"""The register stage: log the fine-tuned model to MLflow, register it, and decide its alias.

The model (a :class:`visiontune.pipeline.pyfunc.VisionLoraModel`: base model + LoRA adapter) is logged as
code (``pyfunc_model.py``, with the ``visiontune`` package as ``code_paths``; no pickle) into the training
run recorded in ``run.json`` and registered as a new version of ``register.model_name``. The version
takes alias ``champion`` only if its primary metric (the one the evaluate stage's metrics file names) beats the current champion's by more than ``register.promotion_margin``; otherwise it
takes ``challenger``. The first version ever is champion.

An aligned model (align stage on) is also compared with the SFT model it started from, on the same
evaluation (the metrics file's ``sft`` section): the record's ``aligned_vs_sft`` holds both values, the
difference and a verdict (better, worse, equal), and when alignment made the model worse the reason says
so. The promotion rule itself stays champion-only: the SFT model is not a registered version.

MLflow aliases keep no history, so every decision is recorded three ways:

* tags on the new model version (``decision``, ``decision_reason``, ``decision_metric``,
  ``decision_value``, ``decision_champion_version``, ``decision_champion_value``, ``decision_margin``,
  ``decision_aligned_vs_sft`` for an aligned model, plus ``eval_<metric>`` for every metric);
* ``register/decision.json`` in the training run's artifacts (travels with the tracking server), and one
  JSON line appended to the local ``register.promotions_log`` (default ``mlflow/promotions.jsonl``: an
  audit trail you can read with ``jq`` without a server);
* a Prefect markdown artifact (key ``promotion-<model-name>``) when running inside a Prefect flow/task run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import math
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from visiontune.images import ImageRule
from visiontune.pipeline.evaluate import LOWER_IS_BETTER, METRICS, trained_adapter
from visiontune.pipeline.tracking import git_commit, read_run_file, resolve_tracking_uri

log = logging.getLogger(__name__)

# The model is logged as code (this file defines it with mlflow.models.set_model), not as a pickle.
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
CHAMPION = "champion"
CHALLENGER = "challenger"


def decide(new: float, champion: Optional[float], metric: str, margin: float) -> tuple[str, str]:
    """``("champion" | "challenger", reason)`` for a new version scoring ``new`` on ``metric``.

    ``champion`` is the current champion's value (None: there is none, so the new version wins). The new
    version wins only if it is better by strictly more than ``margin`` (cer: lower is better; exact_match,
    chrf, rougeL: higher is better). A NaN new value never wins; a NaN champion value always loses.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (eval.primary_metric): choose one of {', '.join(METRICS)}")
    if margin is None or margin < 0 or math.isnan(margin):
        raise ValueError(f"promotion margin {margin!r} (register.promotion_margin) must be a number >= 0")
    if new is None or math.isnan(new):
        return CHALLENGER, f"new {metric} is {new!r}, not a number: never promoted"
    if champion is None:
        return CHAMPION, f"no current champion: first version becomes champion ({metric}={new:.6g})"
    if math.isnan(champion):
        return CHAMPION, f"current champion's {metric} is NaN: replaced ({metric}={new:.6g})"
    lower = metric in LOWER_IS_BETTER
    gain = (champion - new) if lower else (new - champion)
    direction = "lower" if lower else "higher"
    verdict = f"{metric} {new:.6g} vs champion {champion:.6g} ({direction} is better): improvement {gain:.6g}"
    if gain > margin:
        return CHAMPION, f"{verdict} > margin {margin:g}: promoted"
    return CHALLENGER, f"{verdict} <= margin {margin:g}: not promoted"


def artifact_key(text: str) -> str:
    """A Prefect artifact key from ``text``: lowercase letters, digits and dashes only."""
    key = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not key:
        raise ValueError(f"cannot make a Prefect artifact key from {text!r}: it has no letters or digits")
    return key


def _requirements() -> list[str]:
    """Pinned requirements of the served model (explicit: MLflow's inference would load the model once more)."""
    reqs = []
    for dist in ("mlflow", "torch", "torchvision", "transformers", "peft", "pillow", "pandas", "tqdm", "pyyaml"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            if dist != "torchvision":  # only the Qwen-VL video processors need it
                reqs.append(dist)
    return reqs


def _champion(client: Any, name: str, metric: str) -> tuple[Optional[Any], Optional[float]]:
    """The current champion version of ``name`` and its ``metric`` value (version tag, else its run's metric)."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    value = mv.tags.get(f"eval_{metric}")
    if value is not None:
        return mv, float(value)
    if mv.run_id:
        run_value = client.get_run(mv.run_id).data.metrics.get(f"eval_{metric}")
        if run_value is not None:
            return mv, float(run_value)
    return mv, None


def compare_with_sft(scores: dict[str, Any], metric: str) -> Optional[dict[str, Any]]:
    """The aligned model against its own SFT model on ``metric`` from the evaluate stage's metrics file
    (``{"metric", "aligned", "sft", "delta", "verdict"}``, verdict better / worse / equal), or None when
    the file has no ``sft`` section (the model was not aligned)."""
    sft = scores.get("sft")
    if not sft:
        return None
    if metric not in sft:
        raise ValueError(f"the metrics file's sft section has no {metric} (has {sorted(sft)}): re-run "
                         "`visiontune evaluate`")
    aligned, before = float(scores["finetuned"][metric]), float(sft[metric])
    gain = (before - aligned) if metric in LOWER_IS_BETTER else (aligned - before)
    verdict = "unknown" if math.isnan(gain) else "better" if gain > 0 else "worse" if gain < 0 else "equal"
    return {"metric": metric, "aligned": aligned, "sft": before, "delta": aligned - before, "verdict": verdict}


def _markdown(d: dict[str, Any]) -> str:
    champ = "none" if d["champion_version"] is None else f"v{d['champion_version']} ({d['metric']}={d['champion_value']})"
    return "\n".join([
        f"# {d['model_name']} v{d['version']}: **{d['decision']}**",
        "",
        f"- reason: {d['reason']}",
        f"- {d['metric']}: {d['value']}",
        f"- compared against: {champ}",
        f"- margin: {d['margin']}",
        *([f"- aligned vs its SFT model: {d['aligned_vs_sft']['verdict']} ({d['metric']} "
           f"{d['aligned_vs_sft']['aligned']} vs {d['aligned_vs_sft']['sft']})"] if d.get("aligned_vs_sft") else []),
        f"- run: `{d['run_id']}`, commit `{d['git_commit']}`",
        f"- model: `{d['model_uri']}`",
    ])


def _prefect_artifact(decision: dict[str, Any]) -> Optional[str]:
    """Create a markdown artifact when inside a Prefect flow or task run; return its key (None outside)."""
    try:
        from prefect.context import get_run_context
        from prefect.exceptions import MissingContextError
    except ImportError:
        return None
    try:
        get_run_context()
    except MissingContextError:
        return None
    from prefect.artifacts import create_markdown_artifact

    key = artifact_key(f"promotion-{decision['model_name']}")
    create_markdown_artifact(markdown=_markdown(decision), key=key,
                             description=f"Promotion decision for {decision['model_name']} v{decision['version']}")
    return key


def read_scores(metrics_path: Path, run: dict[str, Any], adapter_dir: Path,
                full: bool = False) -> tuple[str, float, dict[str, Any]]:
    """(primary metric, its fine-tuned value, all fine-tuned scores; with ``full`` the whole file instead)
    from the evaluate stage's metrics file,
    after checking that the file scored this training run's adapter (run id and adapter content hash):
    registering one model with another's scores could promote the worse one."""
    from visiontune.data.io import hash_tree

    if not metrics_path.exists():
        raise FileNotFoundError(f"{metrics_path} not found: run the evaluate stage first (`visiontune evaluate`)")
    scores = json.loads(metrics_path.read_text())
    scored = (scores.get("mlflow_run_id"), scores.get("adapter_sha256"))
    expected = (run.get("mlflow_run_id"), hash_tree([adapter_dir]))
    if scored != expected:
        raise ValueError(
            f"{metrics_path} scored run {scored[0]} / adapter {str(scored[1])[:12]}, but the model to register is run "
            f"{expected[0]} / adapter {expected[1][:12]} ({adapter_dir}): re-run `visiontune evaluate` for this adapter")
    metric = scores.get("primary_metric")
    if metric not in METRICS:
        raise ValueError(f"{metrics_path}: primary_metric={metric!r} is not one of {', '.join(METRICS)}; "
                         "re-run `visiontune evaluate` (eval.primary_metric)")
    finetuned = scores.get("finetuned") or {}
    if metric not in finetuned:
        raise ValueError(f"{metrics_path} has no finetuned.{metric} (has {sorted(finetuned)}): re-run `visiontune evaluate`")
    return metric, float(finetuned[metric]), scores if full else finetuned


def _log_model(cfg: Any, run: dict[str, Any], adapter_dir: Path, base: str) -> tuple[Any, list[str]]:
    """Log the pyfunc (base + adapter, as code) into the training run: (MLflow's ModelInfo, artifact names)."""
    import mlflow
    import pandas as pd

    from visiontune.pipeline.pyfunc import ADAPTER_ARTIFACT, BASE_MODEL_ARTIFACT, example_image_b64, model_signature

    r, im = cfg.register, cfg.images
    log_base_model, with_example = r.log_base_model, r.input_example  # read always: the params list is path-free
    artifacts = {ADAPTER_ARTIFACT: str(adapter_dir.resolve())}
    if Path(base).is_dir() and log_base_model:
        artifacts[BASE_MODEL_ARTIFACT] = str(Path(base).resolve())
    rule = ImageRule.of(im)
    instruction = run.get("instruction")
    model_config = {"base_model": base, "max_new_tokens": int(r.max_new_tokens), "batch_size": int(r.batch_size),
                    **dataclasses.asdict(rule), "dtype": cfg.model.dtype, "instruction": instruction,
                    "image_root": r.image_root, "max_pixels": int(r.max_pixels)}  # what requests may read and decode
    input_example = None
    if with_example:
        input_example = pd.DataFrame({"image": [example_image_b64()], "prompt": [instruction or "Describe the image."]})
    package_dir = Path(__file__).resolve().parents[1]  # the visiontune package: the model loads without an install
    with mlflow.start_run(run_id=run["mlflow_run_id"]):
        info = mlflow.pyfunc.log_model(
            name=r.artifact_name, python_model=str(MODEL_CODE), artifacts=artifacts, model_config=model_config,
            signature=model_signature(r.max_new_tokens), input_example=input_example,
            pip_requirements=_requirements(), code_paths=[str(package_dir)],
        )
    return info, sorted(artifacts)


def _record_decision(client: Any, record: dict[str, Any], promotions_log: Path) -> None:
    """Version tags, the run's decision.json and the local promotions log; the alias moves last."""
    name, version, run_id = record["model_name"], record["version"], record["run_id"]
    tags = {
        "decision": record["decision"], "decision_reason": record["reason"], "decision_metric": record["metric"],
        "decision_value": str(record["value"]), "decision_champion_version": str(record["champion_version"]),
        "decision_champion_value": str(record["champion_value"]), "decision_margin": str(record["margin"]),
        "decision_time": record["timestamp"], "git_commit": record["git_commit"],
    }
    if record.get("aligned_vs_sft"):
        tags["decision_aligned_vs_sft"] = record["aligned_vs_sft"]["verdict"]
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.log_dict(run_id, record, "register/decision.json")
    client.set_tag(run_id, "registered_model", f"{name}/{version}")
    client.set_tag(run_id, "promotion_decision", record["decision"])
    client.set_registered_model_alias(name, record["decision"], version)  # act only once the decision is on record
    promotions_log.parent.mkdir(parents=True, exist_ok=True)
    with promotions_log.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


REGISTRY_LOCK_WAIT_S = 600.0  # how long a registration waits for another one on the same repository


def registry_lock(promotions_log: Path) -> contextlib.AbstractContextManager:
    """Hold the repository's registration lock (next to ``register.promotions_log``), waiting for another
    registration to finish (seconds) for at most :data:`REGISTRY_LOCK_WAIT_S`.

    Two registrations at once would both compare against the same champion and both take ``champion``; the
    one that moved the alias last would keep it, the worse one as likely as the better
    (tests/reliability/test_concurrency.py). Registrations from other repositories to the same tracking
    server do not see this lock: give each its own ``register.model_name``.
    """
    from visiontune.data.io import folder_lock

    lock_file = promotions_log.with_name(promotions_log.name + ".lock")
    return folder_lock(lock_file, (
        f"another registration on this repository (it holds {lock_file}) did not finish within "
        f"{REGISTRY_LOCK_WAIT_S:.0f} s: wait for it or stop it, then run `visiontune register` again"),
        wait_s=REGISTRY_LOCK_WAIT_S)


def register_stage(cfg: Any) -> dict[str, Any]:
    """``visiontune register``: log + register the fine-tuned model; move ``champion`` or set ``challenger``.

    Returns the decision record (also written to the version's tags, the run and the promotions log).
    """
    import mlflow
    from mlflow import MlflowClient

    from visiontune.pipeline.pyfunc import BASE_MODEL_ARTIFACT

    r = cfg.register
    margin, promotions_log = float(r.promotion_margin), Path(r.promotions_log)
    configured_uri, configured_base = cfg.tracking.uri, cfg.model.name_or_path
    run = read_run_file(cfg.align.output_dir)  # the align stage's hand-off: the SFT or the aligned adapter
    adapter_dir = trained_adapter(run, cfg.align.output_dir)
    metric, value, scores = read_scores(Path(cfg.eval.metrics_file), run, adapter_dir, full=True)
    finetuned, vs_sft = scores["finetuned"], compare_with_sft(scores, metric)
    base = str(run.get("base_model") or configured_base)

    uri = run.get("tracking_uri") or resolve_tracking_uri(configured_uri)  # the store the training run lives in
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient()
    run_id = run["mlflow_run_id"]
    info, logged = _log_model(cfg, run, adapter_dir, base)
    eval_tags = {f"eval_{k}": str(v) for k, v in finetuned.items() if k in METRICS}
    with registry_lock(promotions_log):  # from the new version to its alias: one registration at a time
        version = str(mlflow.register_model(info.model_uri, r.model_name, tags={"run_id": run_id, **eval_tags}).version)
        champ_mv, champ_value = _champion(client, r.model_name, metric)
        if champ_mv is not None and str(champ_mv.version) == version:  # cannot happen for a fresh version; be safe
            champ_mv, champ_value = None, None
        decision, reason = decide(value, champ_value, metric, margin)
        if champ_mv is not None and champ_value is None:
            decision, reason = CHAMPION, f"current champion v{champ_mv.version} has no {metric} recorded: replaced"
        if vs_sft is not None and vs_sft["verdict"] == "worse":
            reason += (f"; the aligned model is worse than its own SFT model ({metric} {vs_sft['aligned']:.6g} vs "
                       f"SFT {vs_sft['sft']:.6g})")
        record = {
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model_name": r.model_name, "version": version, "decision": decision, "alias": decision, "reason": reason,
            "metric": metric, "value": value, "champion_version": None if champ_mv is None else str(champ_mv.version),
            "champion_value": champ_value, "margin": margin, "run_id": run_id, "model_uri": info.model_uri,
            "registered_uri": f"models:/{r.model_name}/{version}", "tracking_uri": uri, "git_commit": git_commit(),
            "base_model": base, "base_model_logged": BASE_MODEL_ARTIFACT in logged,
            "align_method": run.get("align_method", "none"), "aligned_vs_sft": vs_sft, "sft_scores": scores.get("sft"),
        }
        _record_decision(client, record, promotions_log)
    record["prefect_artifact"] = _prefect_artifact(record)
    log.info("registered %s v%s as %s: %s", r.model_name, version, decision, reason)
    return record
