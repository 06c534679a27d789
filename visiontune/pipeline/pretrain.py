"""Pretrain the demo's base VLM on printed text visiontune renders itself (``visiontune pretrain``).

Real users fine-tune a pretrained base; the demo does too, on a base this stage builds offline: a small
Qwen3-VL-shaped model (``pretrain.size``), randomly initialized, trained on every parameter to transcribe
printed pages (:mod:`visiontune.data.printed`). The pages come in the same conversation format, through the
same collator and image rule, as the demo's fine-tuning data, so the base knows the chat format and the image
size it will see; it has never seen handwriting.

A plain loop (AdamW, warmup + cosine, bf16 autocast on CUDA), nothing more: there is no adapter, no
checkpoint resume worth the complexity (a run is minutes on a GPU) and no dataset to index. The page stream
is a pure function of (seed, index), so the same settings give the same data on any number of workers.

Outputs in ``pretrain.output_dir``: the model and processor (safetensors), ``pretrain.json`` (settings,
figures, each weight file's sha256) and ``pretrain_curve.png``. MLflow gets the loss curve and evaluations
when it is installed (the GPU machines that make the shipped weights have no MLflow: then
:func:`log_pretraining` logs the recorded run later, from ``pretrain.json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from visiontune.data.io import sha256_file

log = logging.getLogger(__name__)

RECORD = "pretrain.json"
CURVE = "pretrain_curve.png"


def page_sample(seed: int, index: int, instruction: str) -> dict[str, Any]:
    """Printed page ``index`` of stream ``seed`` as a conversation sample (the collator's input format)."""
    from visiontune.data.printed import printed_sample

    image, text = printed_sample(seed, index)
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": instruction}]},
        {"role": "assistant", "content": [{"type": "text", "text": text}]},
    ]}


class _Pages:
    """An iterable of collated batches: batch ``b`` holds pages ``b*batch_size ...`` of the stream; worker ``w``
    of ``n`` makes the batches ``b % n == w`` (DataLoader keeps their order), so the data do not depend on ``n``."""

    def __init__(self, collator: Any, seed: int, batch_size: int, steps: int, instruction: str, start: int = 0):
        self.collator, self.seed, self.batch_size, self.steps, self.instruction = collator, seed, batch_size, steps, instruction
        self.start = start

    def __iter__(self) -> Iterator[dict]:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for b in range(self.start + worker, self.steps, workers):
            start = b * self.batch_size
            yield self.collator([page_sample(self.seed, start + i, self.instruction) for i in range(self.batch_size)])


def _pages_dataset(collator: Any, seed: int, batch_size: int, steps: int, instruction: str, start: int) -> Any:
    import torch.utils.data

    class Pages(_Pages, torch.utils.data.IterableDataset):
        pass

    return Pages(collator, seed, batch_size, steps, instruction, start)


def _lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup to ``peak``, then cosine decay to a tenth of it at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("pretrain.device='cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    return name


def _evaluate(model: Any, processor: Any, samples: list[dict], rule: Any) -> dict[str, float]:
    """Greedy exact match and CER of ``model`` on the printed validation ``samples``."""
    from visiontune.inference import generate_answers

    refs = [s["messages"][1]["content"][0]["text"] for s in samples]
    preds = generate_answers(model, processor, samples, max_new_tokens=16, batch_size=64, rule=rule,
                             desc="pretrain eval", progress=False)
    model.train()
    # Local edit distance, not jiwer: the GPU machines that make the shipped base do not have it.
    errors = sum(_edits(pr.strip(), rf) for pr, rf in zip(preds, refs))
    return {"exact_match": sum(pr.strip() == rf for pr, rf in zip(preds, refs)) / len(refs),
            "cer": errors / max(1, sum(len(rf) for rf in refs))}


def _edits(a: str, b: str) -> int:
    """Levenshtein distance (characters)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _plot(curve: list[list[float]], evals: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot([c[0] for c in curve], [c[1] for c in curve], lw=1, label="train loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss (nats/token)"), ax.set_yscale("log")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in evals], [e["exact_match"] for e in evals], "o-", color="tab:green",
                 label="printed val exact match")
        ax2.set_ylim(0, 1), ax2.set_ylabel("exact match")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("visiontune pretrain: printed-text reading base")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def settings_of(p: Any, rule: Any) -> dict[str, Any]:
    """The settings that determine the weights (recorded; a change means the shipped base is stale)."""
    return {k: getattr(p, k) for k in ("architecture", "size", "seed", "steps", "batch_size", "learning_rate",
                                        "warmup_steps", "weight_decay", "instruction")} | {
        "images": {"resize": rule.resize, "resize_dimension": rule.resize_dimension,
                   "snap_to_patch_size": rule.snap_to_patch_size}}


def pretrain(p: Any, rule: Any, progress: bool = True) -> dict[str, Any]:
    """Build a random ``p.architecture``/``p.size`` model and train every parameter on printed pages.

    ``p`` is the config's ``pretrain`` section, ``rule`` the images section's :class:`ImageRule` (the same
    rule the fine-tuning uses). Writes the model, processor, ``pretrain.json`` and the curve into
    ``p.output_dir`` (atomically: a temporary folder renamed at the end). Returns the record.
    """
    import torch
    import transformers
    from tqdm.auto import tqdm

    from visiontune.collator import VisionDataCollator
    from visiontune.testing import build_tiny_model

    device = _device(p.device)
    out = Path(p.output_dir)
    tmp = out.with_name(out.name + ".partial")
    history: list[dict] = []
    if p.init_from:  # continue an interrupted run (its .partial folder) from p.start_step
        src = Path(p.init_from)
        if not (src / "model.safetensors").exists():
            raise FileNotFoundError(f"pretrain.init_from={p.init_from!r} holds no model.safetensors: point it at an "
                                    "interrupted run's .partial folder")
        if src.resolve() != tmp.resolve():
            if tmp.exists():
                shutil.rmtree(tmp)
            shutil.copytree(src, tmp)
        if (tmp / RECORD).exists():
            history = json.loads((tmp / RECORD).read_text()).get("history", [])
    else:
        if tmp.exists():
            shutil.rmtree(tmp)
        build_tiny_model(p.architecture, tmp, seed=p.seed, size=p.size)
    processor = transformers.AutoProcessor.from_pretrained(tmp)
    model = transformers.AutoModelForImageTextToText.from_pretrained(tmp, dtype=torch.float32).to(device)
    model.train()
    collator = VisionDataCollator(model, processor, resize=rule.resize, resize_dimension=rule.resize_dimension,
                                  snap_to_patch_size=rule.snap_to_patch_size, train_on_responses_only=True)
    workers = p.num_workers or min(16, os.cpu_count() or 1)
    start_step = p.start_step
    start = start_step if p.init_from else 0
    loader = torch.utils.data.DataLoader(_pages_dataset(collator, p.seed, p.batch_size, p.steps, p.instruction, start),
                                         batch_size=None, num_workers=workers, prefetch_factor=4,
                                         persistent_workers=False, multiprocessing_context="fork")
    val = [page_sample(p.seed + 1_000_003, i, p.instruction) for i in range(p.eval_samples)]
    decay = [w for n, w in model.named_parameters() if w.ndim >= 2]
    no_decay = [w for n, w in model.named_parameters() if w.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=p.learning_rate, betas=(0.9, 0.98),
                            fused=device == "cuda")
    n_params = sum(w.numel() for w in model.parameters())
    curve: list[list[float]] = []
    evals: list[dict[str, float]] = []
    t0 = time.time()
    bar = tqdm(total=p.steps, initial=start, desc="pretrain", unit="step", disable=not progress)
    running = None
    phase = {"from_step": start, "to_step": start, "schedule_steps": p.steps, "learning_rate": p.learning_rate,
             "batch_size": p.batch_size, "device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}
    history.append(phase)

    def record(final: bool) -> dict[str, Any]:
        rec = {"settings": settings_of(p, rule), "parameters": n_params, "device": device, "gpu": phase["gpu"],
               "torch": torch.__version__, "transformers": transformers.__version__,
               "seconds": round(time.time() - t0, 1), "completed_steps": phase["to_step"], "complete": final,
               "pages_seen": sum((h["to_step"] - h["from_step"]) * h.get("batch_size", p.batch_size) for h in history),
               "history": history,
               "final": evals[-1] if evals else None, "evals": evals, "loss": curve}
        (tmp / RECORD).write_text(json.dumps(rec, indent=1) + "\n")
        return rec

    if p.init_from and (tmp / RECORD).exists():  # keep the interrupted run's curve and evaluations
        old = json.loads((tmp / RECORD).read_text())
        curve, evals = [c for c in old["loss"] if c[0] < start], [e for e in old["evals"] if e["step"] <= start]
    for step, batch in enumerate(loader, start=start):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, p.learning_rate, p.warmup_steps, p.steps)
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == p.steps - 1:  # one host sync per 25 steps, not per step
            value = float(loss.detach())
            running = value if running is None else 0.8 * running + 0.2 * value
            curve.append([step, round(value, 5)])
            bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % p.eval_every == 0 or step == p.steps - 1:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                m = _evaluate(model, processor, val, rule)
            evals.append({"step": step + 1, **m})
            model.save_pretrained(tmp)  # a run killed later leaves its latest weights and record in .partial
            phase["to_step"] = step + 1
            record(final=False)
            bar.write(f"pretrain step {step + 1}: printed val exact match {m['exact_match']:.3f}, CER {m['cer']:.3f}")
        bar.update()
    bar.close()
    seconds = time.time() - t0
    model.to("cpu").save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "visiontune_tiny.json").unlink(missing_ok=True)  # a pretrained base, not a random tiny model
    _plot(curve, evals, tmp / CURVE)
    phase["to_step"] = p.steps
    rec = record(final=True)
    rec["seconds"] = round(seconds, 1)
    rec["files"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.suffix in (".safetensors", ".json") and f.name != RECORD}
    (tmp / RECORD).write_text(json.dumps(rec, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return rec


def verify_base(out_dir: str | Path) -> dict[str, Any]:
    """Check the shipped base against the sha256 list in its record; raise naming the file that differs."""
    out = Path(out_dir)
    rec_path = out / RECORD
    if not rec_path.exists():
        raise FileNotFoundError(f"{rec_path} is missing: {out} is not a pretrained base made by `visiontune pretrain`"
                                " (run it, or restore the folder with `git checkout -- models/`)")
    record = json.loads(rec_path.read_text())
    for name, digest in record["files"].items():
        got = sha256_file(out / name) if (out / name).exists() else "missing"
        if got != digest:
            raise ValueError(f"{out / name}: sha256 {got} differs from the {digest} recorded in {rec_path}; the base's "
                             "files were changed: restore them (`git checkout -- models/`) or re-run `visiontune pretrain`")
    return record


def log_pretraining(record: dict[str, Any], out_dir: str | Path, tracking_uri: Optional[str], experiment: str) -> Optional[str]:
    """Log a pretraining record (params, loss curve, evaluations, curve plot) as an MLflow run; returns its id.

    Idempotent per store: a run tagged with the same weights' sha256 is reused, not logged twice."""
    import mlflow

    from visiontune.pipeline.tracking import setup_mlflow

    exp_id = setup_mlflow(tracking_uri, experiment)
    weights = record["files"].get("model.safetensors", "")
    found = mlflow.search_runs([exp_id], filter_string=f"tags.visiontune_pretrain_sha256 = '{weights}'",
                               output_format="list")
    if found:
        return found[0].info.run_id
    with mlflow.start_run(experiment_id=exp_id, run_name="pretrain-base") as run:
        flat = {f"pretrain.{k}": v for k, v in record["settings"].items() if k != "images"}
        mlflow.log_params(flat | {"pretrain.parameters": record["parameters"], "pretrain.device": record["device"]})
        mlflow.set_tags({"visiontune_stage": "pretrain", "visiontune_pretrain_sha256": weights,
                         "gpu": str(record.get("gpu")), "seconds": str(record["seconds"])})
        for step, value in record["loss"]:
            mlflow.log_metric("pretrain_loss", value, step=int(step))
        for e in record["evals"]:
            mlflow.log_metric("pretrain_val_exact_match", e["exact_match"], step=int(e["step"]))
            mlflow.log_metric("pretrain_val_cer", e["cer"], step=int(e["step"]))
        for name in (RECORD, CURVE):
            if (Path(out_dir) / name).exists():
                mlflow.log_artifact(str(Path(out_dir) / name), artifact_path="pretrain")
        return run.info.run_id


def pretrain_stage(cfg: Any) -> dict[str, Any]:
    """``visiontune pretrain``: (re)build the base when its recorded settings differ from ``pretrain``'s; log it.

    The shipped base is committed: with unchanged settings this only verifies its sha256 list and makes sure
    the run is in MLflow. Changing a setting retrains it (minutes on a GPU, hours on 2 CPU cores)."""
    from visiontune.images import ImageRule

    p, im = cfg.pretrain, cfg.images
    # The base reads whole printed pages: `images.trim` is the fine-tuning's choice, not the pretraining's
    # (the shipped weights were made without it), so it is not read here.
    rule = ImageRule(resize=im.resize, resize_dimension=im.resize_dimension, snap_to_patch_size=im.snap_to_patch_size)
    out = Path(p.output_dir)
    wanted = settings_of(p, rule)
    record = None
    if (out / RECORD).exists():
        record = verify_base(out)
        if record["settings"] != wanted:
            changed = sorted(k for k in wanted if record["settings"].get(k) != wanted[k])
            log.warning("pretrain settings changed (%s): retraining the base in %s", ", ".join(changed), out)
            record = None
    built = record is None
    if built:
        record = pretrain(p, rule)
    try:
        run_id = log_pretraining(record, out, cfg.tracking.uri, cfg.tracking.experiment)
    except ImportError:
        run_id = None
    return {"model": str(out), "built": built, "parameters": record["parameters"], "run_id": run_id,
            "printed_val_exact_match": (record.get("final") or {}).get("exact_match")}
