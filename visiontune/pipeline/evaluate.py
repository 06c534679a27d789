"""The evaluate stage: base vs fine-tuned model on the held-out split.

Both models answer the same prompts (each conversation up to its last assistant turn) by batched greedy
generation; the answers are scored against the reference answers with character error rate (the
primary metric for transcription), exact match, chrF and ROUGE-L. Outputs:

* ``eval.metrics_file``: DVC metrics JSON ``{"base": {...}, "finetuned": {...}, "delta": {...},
  "primary_metric": ..., "n_samples": ...}``. When the align stage's hand-off says the model was aligned
  (``align_method`` other than none), the SFT adapter it started from is scored on the same samples too:
  ``"sft": {...}`` and ``"delta_sft": {...}`` (aligned minus SFT), so the champion gate can tell whether
  alignment helped;
* ``eval.predictions_file``: one CSV row per sample (reference, both predictions, per-sample CER):
  DVC plots data, and an MLflow artifact;
* ``eval.grid_file``: a PNG grid of sample images with reference and prediction, also logged to MLflow;
* metrics ``eval_<metric>``, ``eval_base_<metric>`` (and ``eval_sft_<metric>``, ``eval_delta_sft_<metric>``
  for an aligned model) in the training run recorded in ``run.json``.

All metric code is local (jiwer, sacrebleu, rouge-score): nothing is downloaded at run time.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from visiontune.images import ImageRule, decode_image_value, load_image
from visiontune.inference import adapter_processor, chat_parts, generate_answers, require_adapter, split_conversation
from visiontune.pipeline.tracking import read_run_file, resolve_tracking_uri

log = logging.getLogger(__name__)

METRICS = ("exact_match", "cer", "chrf", "rougeL")
LOWER_IS_BETTER = frozenset({"cer"})


# ------------------------------------------------------------------------------------------ metrics
def _rouge_tokenize(text: str) -> list[str]:
    """Lower-cased Unicode word tokens. rouge-score's default tokenizer keeps only [a-z0-9], which
    would score every non-Latin answer (e.g. Japanese) as empty."""
    return re.findall(r"\w+", text.lower())


class _RougeTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return _rouge_tokenize(text)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    if len(predictions) == 0 or len(references) == 0:
        raise ValueError(
            f"compute_metrics got {len(predictions)} predictions and {len(references)} references: need at least one "
            "pair (is the evaluation split empty? check eval.split and eval.max_samples)"
        )
    if len(predictions) != len(references):
        raise ValueError(
            f"compute_metrics got {len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    preds, refs = [], []
    for i, (p, r) in enumerate(zip(predictions, references)):
        if not isinstance(p, str) or not isinstance(r, str):
            raise TypeError(f"pair {i}: prediction and reference must be str, got {type(p).__name__} and {type(r).__name__}")
        if not r.strip():
            raise ValueError(
                f"reference {i} is empty ({r!r}): CER is undefined for an empty reference; drop the sample or fix "
                "its answer (the data stage's min_text_chars should have rejected it)"
            )
        preds.append(p.strip())
        refs.append(r.strip())
    return preds, refs


def sample_cer(prediction: str, reference: str) -> float:
    """Character error rate of one pair (edits / reference characters, after stripping). Can exceed 1."""
    import jiwer

    preds, refs = _check_pairs([prediction], [reference])
    out = jiwer.process_characters(refs[0], preds[0])
    return (out.substitutions + out.deletions + out.insertions) / len(refs[0])


def compute_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Score predictions against references. Both are stripped first (generation often ends in whitespace).

    * ``exact_match``: share of predictions equal to their reference (0..1);
    * ``cer``: corpus character error rate, total character edits / total reference characters (jiwer;
      lower is better, can exceed 1 when predictions are much longer than references);
    * ``chrf``: sacrebleu corpus chrF (character n-gram F-score, 0..100). Chosen over BLEU, whose word
      4-grams do not exist in short answers: corpus BLEU was 0.0 for every demo model (e.g. ``53836`` for
      ``53336``: BLEU 0, chrF 26);
    * ``rougeL``: mean ROUGE-L F1 over samples (rouge-score, Unicode word tokens; 0..1).

    An empty prediction is valid (it scores as all deletions). Empty lists, unequal lengths and empty
    references raise ``ValueError``.
    """
    import jiwer
    import sacrebleu
    from rouge_score import rouge_scorer

    preds, refs = _check_pairs(predictions, references)
    edits = 0
    for p, r in zip(preds, refs):
        out = jiwer.process_characters(r, p)
        edits += out.substitutions + out.deletions + out.insertions
    cer = edits / sum(len(r) for r in refs)
    exact = sum(p == r for p, r in zip(preds, refs)) / len(refs)
    chrf = sacrebleu.corpus_chrf(preds, [refs]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())
    rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / len(refs)
    return {"exact_match": float(exact), "cer": float(cer), "chrf": float(chrf), "rougeL": float(rouge)}


# ------------------------------------------------------------------------------------------- outputs
def write_predictions_csv(path: Union[str, Path], rows: list[dict[str, Any]]) -> Path:
    """Per-sample rows as CSV (DVC plots data: x=index, y=cer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0]) if rows else ["index"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def prediction_grid(images: Sequence[Any], references: Sequence[str], predictions: Sequence[str],
                    base_predictions: Optional[Sequence[str]] = None, columns: int = 4) -> Any:
    """A matplotlib figure: each sample's (first) image titled with its reference and prediction(s)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0:
        raise ValueError("prediction_grid needs at least one sample (eval.grid_samples > 0 and a non-empty split)")
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        if images[k] is not None:
            ax.imshow(images[k])
        lines = [f"ref:  {references[k][:40]}", f"pred: {predictions[k][:40]}"]
        if base_predictions is not None:
            lines.append(f"base: {base_predictions[k][:40]}")
        ax.set_title("\n".join(lines), fontsize=8, loc="left", family="monospace")
    with warnings.catch_warnings():  # answers may hold glyphs the default font lacks (CJK): boxes are fine
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
    return fig


def _first_image(messages: list[dict]) -> Any:
    """The prompt's first image as a 256 px thumbnail for the grid; None if it has none or it cannot be read."""
    _, values = chat_parts(split_conversation(messages)[0])
    if not values:
        return None
    try:
        img = load_image(decode_image_value(values[0]))
    except (FileNotFoundError, OSError):
        return None
    img.thumbnail((256, 256))
    return img


# --------------------------------------------------------------------------------------------- stage
def load_eval_samples(dataset_dir: Union[str, Path], split: str, max_samples: int) -> list[dict]:
    """The first ``max_samples`` rows (0 = all) of ``split`` in the saved DatasetDict, as plain dicts."""
    from visiontune.data.convert import load_split

    ds = load_split(dataset_dir, split, setting="eval.split")
    if max_samples < 0:
        raise ValueError(f"eval.max_samples={max_samples}: use 0 (all) or a positive number")
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    if len(ds) == 0:
        raise ValueError(
            f"split {split!r} of {dataset_dir} is empty: nothing to evaluate. Add data or change convert.split_ratios / "
            "eval.split"
        )
    return [ds[i] for i in range(len(ds))]


def load_extra_set(name: str, path: Union[str, Path], like: dict, max_samples: int) -> list[dict]:
    """The rows of an ``eval.extra_sets`` annotations file as conversations asking ``like``'s question (the
    split's first sample: the instruction the model was trained with), images as absolute paths."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval.extra_sets[{name!r}] = {str(path)!r} does not exist: point it at an annotations "
                                "JSON-lines file of {image, text} rows, or remove the entry (the demo writes its "
                                "held-out set with `visiontune demo-data`)")
    user = split_conversation(like["messages"])[0]
    instruction = next((c["text"] for m in user for c in (m["content"] if isinstance(m["content"], list) else [])
                        if c.get("type") == "text"), "")
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, text = path.parent / row["image"], str(row["text"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: expected a JSON object with 'image' and 'text' ({exc})") from exc
        samples.append({"record_id": f"{name}:{n}", "messages": [
            {"role": "user", "content": [{"type": "image", "image": str(image.resolve())},
                                         {"type": "text", "text": instruction}]},
            {"role": "assistant", "content": [{"type": "text", "text": text}]}]})
        if max_samples and len(samples) >= max_samples:
            break
    if not samples:
        raise ValueError(f"eval.extra_sets[{name!r}]: {path} has no rows")
    return samples


def trained_adapter(run: dict[str, Any], output_dir: Union[str, Path]) -> Path:
    """The adapter folder recorded in ``run.json`` (train's, or the align stage's hand-off; else
    ``<output_dir>/adapter``), checked to hold a PEFT adapter."""
    return require_adapter(run.get("adapter_dir") or Path(output_dir) / "adapter",
                           "re-run `visiontune train` and `visiontune align`")


def _references(samples: list[dict], split: str) -> list[str]:
    references = []
    for i, s in enumerate(samples):
        _, ref = split_conversation(s["messages"])
        if ref is None:
            raise ValueError(f"sample {i} of split {split!r} has no assistant turn: nothing to compare against")
        references.append(ref)
    return references


def sft_adapter(run: dict[str, Any]) -> Optional[Path]:
    """The SFT adapter an aligned model started from (the align hand-off's ``sft_adapter_dir``), or None when
    the hand-off is the SFT model itself (``align_method`` none or absent)."""
    if run.get("align_method", "none") == "none":
        return None
    if not run.get("sft_adapter_dir"):
        raise ValueError(f"run.json says align_method={run['align_method']!r} but names no sft_adapter_dir: "
                         "re-run `visiontune align` to rewrite the hand-off")
    return require_adapter(run["sft_adapter_dir"], "re-run `visiontune train` and `visiontune align`")


def _predict(cfg: Any, adapter_dir: Path, samples: list[dict], sft_dir: Optional[Path] = None,
             n_sft: int = 0) -> tuple[list[str], Optional[list[str]], Optional[list[str]]]:
    """(fine-tuned answers, base answers or None, SFT answers or None) from one load of the base model: the
    base first, then with the adapter on, then (``sft_dir``) the SFT adapter loaded beside it and switched
    to, on the first ``n_sft`` samples."""
    from peft import PeftModel

    from visiontune.models.fast_vision import FastVisionModel

    e, m, im = cfg.eval, cfg.model, cfg.images
    rule = ImageRule.of(im)
    gen_kwargs = dict(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, rule=rule)
    model, processor = FastVisionModel.from_pretrained(
        m.name_or_path, max_seq_length=m.max_seq_length, dtype=m.dtype, load_in_4bit=m.load_in_4bit,
        use_gradient_checkpointing=False, use_fused_kernels=m.use_fused_kernels,
    )
    processor = adapter_processor(adapter_dir, processor)
    base_preds = generate_answers(model, processor, samples, desc="base model", **gen_kwargs) if e.compare_base else None
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    preds = generate_answers(model, processor, samples, desc="fine-tuned", **gen_kwargs)
    sft_preds = None
    if sft_dir is not None:
        model.load_adapter(str(sft_dir), adapter_name="sft")
        model.set_adapter("sft")
        sft_preds = generate_answers(model, processor, samples[:n_sft], desc="SFT model", **gen_kwargs)
    return preds, base_preds, sft_preds


def _prediction_rows(samples: list[dict], references: list[str], preds: list[str],
                     base_preds: Optional[list[str]], sft_preds: Optional[list[str]] = None) -> list[dict[str, Any]]:
    rows = []
    for i, (s, ref, pred) in enumerate(zip(samples, references, preds)):
        row: dict[str, Any] = {"index": i, "record_id": s.get("record_id", ""), "reference": ref, "prediction": pred,
                               "cer": round(sample_cer(pred, ref), 6), "exact_match": int(pred.strip() == ref.strip())}
        if base_preds is not None:
            row["base_prediction"] = base_preds[i]
            row["base_cer"] = round(sample_cer(base_preds[i], ref), 6)
        if sft_preds is not None:
            row["sft_prediction"] = sft_preds[i]
            row["sft_cer"] = round(sample_cer(sft_preds[i], ref), 6)
        rows.append(row)
    return rows


def _save_grid(path: Path, samples: list[dict], references: list[str], preds: list[str],
               base_preds: Optional[list[str]], k: int) -> Path:
    import matplotlib.pyplot as plt

    k = min(k, len(samples))
    fig = prediction_grid([_first_image(s["messages"]) for s in samples[:k]], references[:k], preds[:k],
                          base_preds[:k] if base_preds is not None else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _log_to_run(uri: str, run_id: str, metrics: dict[str, Any], files: list[Path]) -> None:
    """Metrics (eval_*, eval_base_*, eval_delta_*, eval_sft_*, eval_delta_sft_*) and the output files into
    the training run."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    logged = {f"eval_{k}": v for k, v in metrics["finetuned"].items()}
    if "base" in metrics:
        logged.update({f"eval_base_{k}": v for k, v in metrics["base"].items()})
        logged.update({f"eval_delta_{k}": v for k, v in metrics["delta"].items()})
    if "sft" in metrics:
        logged.update({f"eval_sft_{k}": v for k, v in metrics["sft"].items()})
        logged.update({f"eval_delta_sft_{k}": v for k, v in metrics["delta_sft"].items()})
    logged["eval_n_samples"] = float(metrics["n_samples"])
    for name, one in metrics.get("sets", {}).items():
        logged.update({f"eval_{name}_{k}": v for k, v in one["finetuned"].items()})
        logged.update({f"eval_{name}_base_{k}": v for k, v in one.get("base", {}).items()})
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(logged)
        mlflow.set_tags({"eval_split": metrics["split"], "eval_primary_metric": metrics["primary_metric"]})
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="eval")


def evaluate_stage(cfg: Any) -> dict[str, Any]:
    """``visiontune evaluate``: score the base and the fine-tuned model on ``eval.split``; write the DVC
    metrics and plots files; log metrics and artifacts into the training run. Returns a summary.

    The metrics file names the training run and the adapter's content hash it scored, so the register
    stage can refuse to register one model with another's scores.
    """
    from visiontune.data.io import hash_tree

    e, configured_uri = cfg.eval, cfg.tracking.uri
    primary = e.primary_metric
    grid_samples, grid_file = e.grid_samples, e.grid_file  # read always: DVC's params must not depend on the path
    if primary not in METRICS:
        raise ValueError(f"eval.primary_metric={primary!r}: choose one of {', '.join(METRICS)}")
    run = read_run_file(cfg.align.output_dir)  # the align stage's hand-off: the SFT or the aligned adapter
    adapter_dir = trained_adapter(run, cfg.align.output_dir)
    sft_dir = sft_adapter(run)  # aligned: its SFT model is scored on the same samples too
    if run.get("base_model") and str(run["base_model"]) != str(cfg.model.name_or_path):
        log.warning("run.json says the adapter was trained on %s but model.name_or_path is %s; evaluating on %s",
                    run["base_model"], cfg.model.name_or_path, cfg.model.name_or_path)
    samples = load_eval_samples(Path(cfg.data.work_dir) / "dataset", e.split, e.max_samples)
    references = _references(samples, e.split)
    extra = {name: load_extra_set(name, path, samples[0], e.max_samples) for name, path in (e.extra_sets or {}).items()}
    everything = samples + [s for rows in extra.values() for s in rows]  # one model load for all sets
    all_preds, all_base, sft_preds = _predict(cfg, adapter_dir, everything, sft_dir, len(samples))
    preds, base_preds = all_preds[:len(samples)], all_base[:len(samples)] if all_base is not None else None

    metrics: dict[str, Any] = {"finetuned": compute_metrics(preds, references)}
    if base_preds is not None:
        metrics["base"] = compute_metrics(base_preds, references)
        metrics["delta"] = {k: metrics["finetuned"][k] - metrics["base"][k] for k in METRICS}
    if sft_preds is not None:
        metrics["sft"] = compute_metrics(sft_preds, references)
        metrics["delta_sft"] = {k: metrics["finetuned"][k] - metrics["sft"][k] for k in METRICS}
        metrics["sft_adapter_sha256"] = hash_tree([sft_dir])
    start = len(samples)
    for name, rows in extra.items():
        refs, end = _references(rows, name), start + len(rows)
        one: dict[str, Any] = {"finetuned": compute_metrics(all_preds[start:end], refs), "n_samples": len(rows)}
        if all_base is not None:
            one["base"] = compute_metrics(all_base[start:end], refs)
        metrics.setdefault("sets", {})[name] = one
        start = end
    metrics.update({"primary_metric": primary, "n_samples": len(samples), "split": e.split,
                    "mlflow_run_id": run["mlflow_run_id"], "adapter_sha256": hash_tree([adapter_dir])})
    metrics_path = Path(e.metrics_file)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    pred_rows = _prediction_rows(samples, references, preds, base_preds, sft_preds)
    files = [metrics_path, write_predictions_csv(e.predictions_file, pred_rows)]
    if grid_samples > 0:
        files.append(_save_grid(Path(grid_file), samples, references, preds, base_preds, grid_samples))

    uri = run.get("tracking_uri") or resolve_tracking_uri(configured_uri)  # the store the training run lives in
    _log_to_run(uri, run["mlflow_run_id"], metrics, files)
    return {
        "n_samples": len(samples), "primary_metric": primary, primary: metrics["finetuned"][primary],
        **{f"{name}_{primary}": one["finetuned"][primary] for name, one in metrics.get("sets", {}).items()},
        f"base_{primary}": metrics["base"][primary] if "base" in metrics else None,
        f"sft_{primary}": metrics["sft"][primary] if "sft" in metrics else None,
        "metrics_file": str(metrics_path), "predictions_file": str(files[1]),
        "grid_file": str(files[2]) if len(files) > 2 else None, "mlflow_run_id": run["mlflow_run_id"],
    }


def prefect_report(result: dict[str, Any], cfg: Any) -> None:
    """Publish base vs fine-tuned metrics (the stage's metrics file) as a Prefect table artifact."""
    from prefect.artifacts import create_table_artifact

    metrics = json.loads(Path(result["metrics_file"]).read_text())
    rows = [{"model": name, **{k: round(float(v), 4) for k, v in values.items() if isinstance(v, (int, float))}}
            for name, values in metrics.items() if isinstance(values, dict)]
    if rows:
        create_table_artifact(key="evaluation-metrics", table=rows,
                              description=f"Held-out metrics ({metrics['split']}); primary: {metrics['primary_metric']}")
