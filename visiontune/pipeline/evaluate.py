"""The evaluate stage: base vs fine-tuned model on the held-out split.

Both models answer the same prompts (each conversation up to its last assistant turn) by batched greedy
generation; the answers are scored against the reference answers with character error rate (the
primary metric for transcription), exact match, corpus BLEU and ROUGE-L. Outputs:

* ``eval.metrics_file``: DVC metrics JSON ``{"base": {...}, "finetuned": {...}, "delta": {...},
  "primary_metric": ..., "n_samples": ...}``;
* ``eval.predictions_file``: one CSV row per sample (reference, both predictions, per-sample CER):
  DVC plots data, and an MLflow artifact;
* ``eval.grid_file``: a PNG grid of sample images with reference and prediction, also logged to MLflow;
* metrics ``eval_<metric>`` and ``eval_base_<metric>`` in the training run recorded in ``run.json``.

All metric code is local (jiwer, sacrebleu, rouge-score): nothing is downloaded at run time.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from visiontune.pipeline.tracking import read_run_file, resolve_tracking_uri

log = logging.getLogger(__name__)

# Settings this stage reads (dvc.yaml's `params` for the evaluate stage must list exactly these).
PARAMS = (
    "data.work_dir", "model.name_or_path", "model.max_seq_length", "model.dtype", "model.load_in_4bit",
    "model.use_fused_kernels",
    "collator.resize", "collator.resize_dimension", "collator.snap_to_patch_size", "train.output_dir",
    "eval.split", "eval.max_samples", "eval.max_new_tokens", "eval.batch_size", "eval.primary_metric",
    "eval.metrics_file", "eval.predictions_file", "eval.grid_file", "eval.grid_samples", "eval.compare_base",
    "register.tracking_uri",
)

METRICS = ("exact_match", "cer", "bleu", "rougeL")
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
    * ``bleu``: sacrebleu corpus BLEU (0..100, default 13a tokenization);
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
    bleu = sacrebleu.corpus_bleu(preds, [refs]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())
    rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / len(refs)
    return {"exact_match": float(exact), "cer": float(cer), "bleu": float(bleu), "rougeL": float(rouge)}


# --------------------------------------------------------------------------------------- generation
def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content or [] if isinstance(p, dict) and p.get("type") == "text")


def split_conversation(messages: list[dict]) -> tuple[list[dict], Optional[str]]:
    """(prompt messages, reference answer): the conversation up to its last assistant turn, and that turn's text.

    A conversation without an assistant turn is all prompt (reference None), as at serving time.
    """
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        return list(messages), None
    return list(messages[:last]), _text_of(messages[last]["content"])


def _prompt_parts(messages: list[dict]) -> tuple[list[dict], list[Any]]:
    """Messages for the chat template (image parts become ``{"type": "image"}``; Arrow's None keys go) and
    the image values in order."""
    clean, images = [], []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image":
                    parts.append({"type": "image"})
                    images.append(p.get("image"))
                elif p.get("type") == "text":
                    parts.append({"type": "text", "text": p.get("text") or ""})
            content = parts
        clean.append({"role": m["role"], "content": content})
    return clean, images


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except (OSError, ValueError):  # e.g. a base64 string longer than the file-name limit
        return False


def decode_image_value(value: Any) -> Any:
    """An image value as :func:`visiontune.collator.load_image` takes it; a str that is not an existing
    file is decoded as base64 (how images travel in JSON serving requests)."""
    if isinstance(value, str) and not _is_file(value):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise FileNotFoundError(
                f"image {value[:80]!r} is neither an existing file nor base64-encoded image bytes; pass a path "
                "that exists where the model runs, or base64.b64encode(open(path, 'rb').read()).decode()"
            ) from None
    return value


def _image_resizer(model: Any, processor: Any, resize: Any, resize_dimension: Union[int, str],
                   snap_to_patch_size: bool) -> Any:
    """A function PIL image -> PIL image applying the training collator's resize rule (same sizes as in training)."""
    from PIL import Image

    from visiontune.collator import target_size
    from visiontune.models.archs import get_spec, image_size_bounds

    if resize is None:
        return lambda img: img
    config = getattr(model, "get_base_model", lambda: model)().config
    try:
        spec = get_spec(config)
        bounds = image_size_bounds(spec, config, processor)
        multiple = spec.patch_multiple(config) if snap_to_patch_size else None
    except ValueError:  # architecture without a module map: the collator's fallback bounds
        bounds, multiple = (448, 1024), None
    resize = tuple(resize) if isinstance(resize, list) else resize

    def apply(img: Any) -> Any:
        size = target_size(img.width, img.height, resize, resize_dimension, bounds, multiple)
        return img if size == img.size else img.resize(size, Image.Resampling.BICUBIC)

    return apply


def generate_answers(
    model: Any,
    processor: Any,
    samples: Sequence[Any],
    max_new_tokens: int,
    batch_size: int,
    *,
    resize: Any = None,
    resize_dimension: Union[int, str] = 0,
    snap_to_patch_size: bool = False,
    image_root: Optional[Union[str, Path]] = None,
    desc: str = "generate",
    progress: bool = True,
) -> list[str]:
    """Greedy answers of ``model`` to each sample's conversation (up to its last assistant turn).

    ``samples`` are ``{"messages": [...]}`` dicts (or message lists) in visiontune's conversation format;
    images may be paths, PIL images, bytes, Arrow ``{"bytes", "path"}`` dicts or base64 strings. The
    prompt is rendered with the processor's chat template plus the generation prompt; prompts are
    left-padded in batches of ``batch_size``; only the new tokens are decoded, without special tokens.
    ``resize``/``resize_dimension``/``snap_to_patch_size`` are the collator settings used in training,
    so the model sees images of the same size as it was trained on.
    """
    import torch
    from tqdm.auto import tqdm

    from visiontune.collator import load_image
    from visiontune.models.fast_vision import FastVisionModel

    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be a positive integer (eval.max_new_tokens)")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: must be a positive integer (eval.batch_size)")
    if not samples:
        return []
    tokenizer = getattr(processor, "tokenizer", processor)
    old_side = tokenizer.padding_side  # restored on return: the caller's processor may be training's
    FastVisionModel.for_inference(model)
    resizer = _image_resizer(model, processor, resize, resize_dimension, snap_to_patch_size)
    root = Path(image_root) if image_root else None
    try:
        device = next(model.parameters()).device
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32

    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    answers: list[str] = []
    try:
        starts = range(0, len(samples), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            texts, images = [], []
            for sample in samples[start:start + batch_size]:
                messages = sample["messages"] if isinstance(sample, dict) else sample
                prompt, _ = split_conversation(list(messages))
                clean, values = _prompt_parts(prompt)
                texts.append(processor.apply_chat_template(clean, tokenize=False, add_generation_prompt=True))
                images.append([resizer(load_image(decode_image_value(v), root)) for v in values])
            kwargs: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True)
            if any(images):
                kwargs["images"] = images
            batch = processor(**kwargs)
            batch = {k: (v.to(device, dtype) if k == "pixel_values" or (torch.is_tensor(v) and v.is_floating_point())
                         else v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return answers


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


def _first_image(messages: list[dict], root: Optional[Path]) -> Any:
    from visiontune.collator import load_image

    _, values = _prompt_parts(split_conversation(messages)[0])
    if not values:
        return None
    try:
        img = load_image(decode_image_value(values[0]), root)
    except (FileNotFoundError, OSError):
        return None
    img.thumbnail((256, 256))
    return img


# --------------------------------------------------------------------------------------------- stage
def load_eval_samples(dataset_dir: Union[str, Path], split: str, max_samples: int) -> list[dict]:
    """The first ``max_samples`` rows (0 = all) of ``split`` in the saved DatasetDict, as plain dicts."""
    import datasets

    path = Path(dataset_dir)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} not found: run the data stages first (`visiontune convert`)")
    dd = datasets.load_from_disk(str(path))
    if split not in dd:
        raise ValueError(f"eval.split={split!r} is not a split of {path}; available: {sorted(dd)}")
    ds = dd[split]
    if max_samples < 0:
        raise ValueError(f"eval.max_samples={max_samples}: use 0 (all) or a positive number")
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    if len(ds) == 0:
        raise ValueError(
            f"split {split!r} of {path} is empty: nothing to evaluate. Add data or change data.split_ratios / eval.split"
        )
    return [ds[i] for i in range(len(ds))]


def _adapter_processor(adapter_dir: Path, fallback: Any) -> Any:
    """The processor saved next to the adapter (what training used), else ``fallback``."""
    from transformers import AutoProcessor

    if (adapter_dir / "processor_config.json").exists() or (adapter_dir / "tokenizer_config.json").exists():
        return AutoProcessor.from_pretrained(str(adapter_dir), local_files_only=True)
    return fallback


def evaluate_stage(cfg: Any) -> dict[str, Any]:
    """``visiontune evaluate``: score the base and the fine-tuned model on ``eval.split``; write the DVC
    metrics and plots files; log metrics and artifacts into the training run. Returns a summary."""
    import mlflow
    from peft import PeftModel

    from visiontune.models.fast_vision import FastVisionModel

    e, m, c = cfg.eval, cfg.model, cfg.collator
    primary = e.primary_metric
    grid_samples, grid_file = e.grid_samples, e.grid_file  # read always: DVC's params must not depend on the path
    if primary not in METRICS:
        raise ValueError(f"eval.primary_metric={primary!r}: choose one of {', '.join(METRICS)}")
    run = read_run_file(cfg.train.output_dir)
    adapter_dir = Path(run.get("adapter_dir") or Path(cfg.train.output_dir) / "adapter")
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"no PEFT adapter in {adapter_dir} (adapter_config.json missing): re-run `visiontune train`")
    base_name = m.name_or_path
    if run.get("base_model") and str(run["base_model"]) != str(base_name):
        log.warning("run.json says the adapter was trained on %s but model.name_or_path is %s; evaluating on %s",
                    run["base_model"], base_name, base_name)

    samples = load_eval_samples(Path(cfg.data.work_dir) / "dataset", e.split, e.max_samples)
    references = []
    for i, s in enumerate(samples):
        _, ref = split_conversation(s["messages"])
        if ref is None:
            raise ValueError(f"sample {i} of split {e.split!r} has no assistant turn: nothing to compare against")
        references.append(ref)

    gen_kwargs = dict(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, resize=c.resize,
                      resize_dimension=c.resize_dimension, snap_to_patch_size=c.snap_to_patch_size)
    model, processor = FastVisionModel.from_pretrained(
        base_name, max_seq_length=m.max_seq_length, dtype=m.dtype, load_in_4bit=m.load_in_4bit,
        use_gradient_checkpointing=False, use_fused_kernels=m.use_fused_kernels,
    )
    processor = _adapter_processor(adapter_dir, processor)
    results: dict[str, dict[str, float]] = {}
    base_preds: Optional[list[str]] = None
    if e.compare_base:
        base_preds = generate_answers(model, processor, samples, desc="base model", **gen_kwargs)
        results["base"] = compute_metrics(base_preds, references)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    preds = generate_answers(model, processor, samples, desc="fine-tuned", **gen_kwargs)
    results["finetuned"] = compute_metrics(preds, references)

    metrics: dict[str, Any] = {**results, "primary_metric": primary, "n_samples": len(samples), "split": e.split}
    if base_preds is not None:
        metrics["delta"] = {k: results["finetuned"][k] - results["base"][k] for k in METRICS}
    metrics_path = Path(e.metrics_file)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")

    rows = []
    for i, (s, ref, pred) in enumerate(zip(samples, references, preds)):
        row: dict[str, Any] = {"index": i, "record_id": s.get("record_id", ""), "reference": ref, "prediction": pred,
                               "cer": round(sample_cer(pred, ref), 6), "exact_match": int(pred.strip() == ref.strip())}
        if base_preds is not None:
            row["base_prediction"] = base_preds[i]
            row["base_cer"] = round(sample_cer(base_preds[i], ref), 6)
        rows.append(row)
    csv_path = write_predictions_csv(e.predictions_file, rows)

    grid_path: Optional[Path] = None
    if grid_samples > 0:
        import matplotlib.pyplot as plt

        k = min(grid_samples, len(samples))
        fig = prediction_grid([_first_image(s["messages"], None) for s in samples[:k]], references[:k], preds[:k],
                              base_preds[:k] if base_preds is not None else None)
        grid_path = Path(grid_file)
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.savefig(grid_path, dpi=100)
        plt.close(fig)

    configured_uri = cfg.register.tracking_uri
    uri = run.get("tracking_uri") or resolve_tracking_uri(configured_uri)  # the store the training run lives in
    mlflow.set_tracking_uri(uri)
    run_id = run["mlflow_run_id"]
    logged = {f"eval_{k}": v for k, v in results["finetuned"].items()}
    if "base" in results:
        logged.update({f"eval_base_{k}": v for k, v in results["base"].items()})
        logged.update({f"eval_delta_{k}": v for k, v in metrics["delta"].items()})
    logged["eval_n_samples"] = float(len(samples))
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(logged)
        mlflow.set_tags({"eval_split": e.split, "eval_primary_metric": primary})
        mlflow.log_artifact(str(metrics_path), artifact_path="eval")
        mlflow.log_artifact(str(csv_path), artifact_path="eval")
        if grid_path is not None:
            mlflow.log_artifact(str(grid_path), artifact_path="eval")
    return {
        "n_samples": len(samples), "primary_metric": primary,
        primary: results["finetuned"][primary],
        f"base_{primary}": results["base"][primary] if "base" in results else None,
        "metrics_file": str(metrics_path), "predictions_file": str(csv_path),
        "grid_file": str(grid_path) if grid_path else None, "mlflow_run_id": run_id,
    }
