"""Pre-flight token budget: every training sample's token count, measured once before training starts.

The collator's rule (:func:`visiontune.collator.budget_verdict`) cuts a sample longer than
``max_seq_length`` after its last image token and drops one whose image tokens end past it. Applied batch
by batch, that rule finds over-long samples only mid-training, one warning at a time. :func:`token_budget`
measures every sample once, exactly as the collator encodes it (text and image tokens, images resized by
its rule), and :func:`preflight` reports the distribution, leaves out the samples the collator would drop,
and logs the counts, the quantiles and a histogram to MLflow. The samples left to truncate are still cut
by the collator, batch by batch (the same cut). The pipeline's train stage calls :func:`preflight`;
:class:`visiontune.trainer.SFTTrainer` (Unsloth's training idiom) runs the same measurement on its own
``train_dataset`` with the pieces below.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from visiontune.collator import SampleTooLongError, budget_verdict

log = logging.getLogger(__name__)

HISTOGRAM_FILE = "token_budget.png"


@dataclass
class BudgetReport:
    """Token counts of a dataset and the budget's verdict on each sample."""

    lengths: list[int]
    """Tokens per sample, images included."""
    image_ends: list[int]
    """Tokens up to the end of each sample's last image token (0 without images)."""
    max_seq_length: Optional[int]
    verdicts: list[str] = field(init=False)
    """``"fit"``, ``"truncate"`` or ``"drop"`` per sample (:func:`visiontune.collator.budget_verdict`)."""

    def __post_init__(self) -> None:
        self.verdicts = [budget_verdict(n, end, self.max_seq_length) for n, end in zip(self.lengths, self.image_ends)]

    @property
    def kept(self) -> list[int]:
        """Indexes of the samples training sees (all but the dropped ones), in order."""
        return [i for i, v in enumerate(self.verdicts) if v != "drop"]

    def summary(self) -> dict[str, Any]:
        """Counts and the token distribution (min, quantiles, max, mean), JSON-ready."""
        counts = Counter(self.verdicts)
        ordered = sorted(self.lengths)

        def quantile(q: float) -> int:
            return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else 0

        return {"samples": len(self.lengths), "max_seq_length": self.max_seq_length, "fit": counts["fit"],
                "truncated": counts["truncate"], "dropped": counts["drop"], "tokens_min": ordered[0] if ordered else 0,
                "tokens_p50": quantile(0.5), "tokens_p95": quantile(0.95), "tokens_max": ordered[-1] if ordered else 0,
                "tokens_mean": round(sum(ordered) / len(ordered), 1) if ordered else 0.0}


def token_budget(collator: Any, samples: Sequence[Any], chunk_size: int = 32,
                 progress: Union[bool, float] = True) -> BudgetReport:
    """Measure every sample of ``samples`` (a list or a ``datasets.Dataset`` of conversations) once with
    ``collator`` (a :class:`~visiontune.collator.VisionDataCollator`), ``chunk_size`` samples per processor
    call. ``progress``: True shows a progress bar, False none, a number of seconds shows it only once
    measuring has taken that long (quiet on small datasets)."""
    from tqdm.auto import tqdm

    lengths: list[int] = []
    image_ends: list[int] = []
    delay = 0.0 if isinstance(progress, bool) else float(progress)
    with tqdm(total=len(samples), desc="token budget", unit="sample", disable=progress is False, delay=delay) as bar:
        for start in range(0, len(samples), chunk_size):
            chunk = [samples[i] for i in range(start, min(start + chunk_size, len(samples)))]
            for n, end in collator.measure(chunk):
                lengths.append(n)
                image_ends.append(end)
            bar.update(len(chunk))
    return BudgetReport(lengths, image_ends, collator.max_seq_length)


def plot_histogram(report: BudgetReport, out: Path) -> Path:
    """Histogram of the tokens per sample with ``max_seq_length`` marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.hist(report.lengths, bins=min(50, max(1, len(set(report.lengths)))), color="tab:blue")
    if report.max_seq_length:
        ax.axvline(report.max_seq_length, color="tab:red", linestyle="--", label=f"max_seq_length {report.max_seq_length}")
        ax.legend()
    s = report.summary()
    ax.set_title(f"tokens per sample: {s['samples']} samples, {s['truncated']} truncated, {s['dropped']} dropped")
    ax.set_xlabel("tokens (text + image)")
    ax.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def summary_line(summary: dict[str, Any]) -> str:
    """``summary`` (:meth:`BudgetReport.summary`) as one line for people."""
    limit = summary["max_seq_length"] or "none"
    return (f"token budget: {summary['samples']} samples, max_seq_length {limit}: {summary['fit']} fit, "
            f"{summary['truncated']} truncated after their last image, {summary['dropped']} dropped; tokens per "
            f"sample p50 {summary['tokens_p50']}, p95 {summary['tokens_p95']}, max {summary['tokens_max']}")


def log_to_mlflow(report: BudgetReport, plot_dir: Path) -> None:
    """Log ``report`` to the active MLflow run: its summary's numbers as ``budget/*`` metrics, the summary as
    ``token_budget.json`` and the histogram (written into ``plot_dir`` first) as ``token_budget.png``."""
    import mlflow

    summary = report.summary()
    plot = plot_histogram(report, plot_dir / HISTOGRAM_FILE)
    mlflow.log_metrics({f"budget/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))})
    mlflow.log_artifact(str(plot))
    mlflow.log_dict(summary, "token_budget.json")


def without_dropped(report: BudgetReport, samples: Any, advice: str) -> Any:
    """``samples`` less those ``report`` drops (the same type: a list, or a ``datasets.Dataset`` through
    ``select``). SampleTooLongError, ending with ``advice`` (what to change), when no sample is left."""
    kept = report.kept
    if not kept:
        raise SampleTooLongError(
            f"token budget: all {len(samples)} training samples need more than max_seq_length={report.max_seq_length} "
            f"tokens before their last image ends (fewest: {min(report.image_ends)}); {advice}")
    if len(kept) < len(samples):
        samples = samples.select(kept) if hasattr(samples, "select") else [samples[i] for i in kept]
    return samples


def preflight(collator: Any, samples: Sequence[Any], output_dir: Path,
              mlflow_active: bool = True, report: bool = True) -> tuple[Any, dict[str, Any]]:
    """Before training: measure ``samples`` (:func:`token_budget`), log the report, and return the samples
    the collator would not drop (the same type: a list, or a ``datasets.Dataset`` through ``select``) and
    the report's summary.

    Writes ``token_budget.json`` and the histogram into ``output_dir`` and, with ``mlflow_active``, logs
    them and the counts (``budget/*`` metrics) to the active MLflow run. SampleTooLongError when no sample
    fits, before any training step. ``report=False`` (the ranks but rank 0 of a multi-process run): measure
    and select only, with no progress bar, files, MLflow entries or warning.
    """
    measured = token_budget(collator, samples, progress=report)
    summary = measured.summary()
    if report:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "token_budget.json").write_text(json.dumps(summary, indent=1))
    if report and mlflow_active:
        log_to_mlflow(measured, output_dir)
    elif report:
        plot_histogram(measured, output_dir / HISTOGRAM_FILE)
    if report and (summary["dropped"] or summary["truncated"]):
        log.warning("token budget: %(dropped)d of %(samples)d samples dropped (image tokens end past "
                    "max_seq_length=%(max_seq_length)s), %(truncated)d will be truncated after their last image; "
                    "tokens per sample p50 %(tokens_p50)d, p95 %(tokens_p95)d, max %(tokens_max)d", summary)
    samples = without_dropped(measured, samples, "raise model.max_seq_length or make the images smaller (images.resize)")
    return samples, summary
