"""What the run report shows, computed from the facts :func:`visiontune.pipeline.report.collect` read
from MLflow: the metrics table, the charts (matplotlib, inlined as SVG data URIs), the error analysis of
text answers and the gallery cards. Pure functions of those facts; the template only lays them out."""

from __future__ import annotations

import base64
import io
import re
from collections import Counter
from typing import Any, Optional

from visiontune.pipeline.evaluate import LOWER_IS_BETTER
STATUSES = ("wrong", "fixed", "broken")  # the gallery's filters besides "all"
LINEAGE_TAGS = ("git_commit", "dvc_data_md5", "base_model", "train_samples", "registered_model", "promotion_decision",
                "eval_split", "select_best", "best_step", "selected_step")


def thumbnail_key(row: dict[str, Any]) -> str:
    """The name of a predictions row's thumbnail: its record id (so a thumbnail can never show another
    sample's image), else its position."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(row.get("record_id") or f"index-{row['index']}"))


# ------------------------------------------------------------------------------------------ text errors
def alignment(reference: str, answer: str) -> list[tuple[str, str, str]]:
    """Character alignment of ``answer`` to ``reference`` (both stripped), as the CER counts it (jiwer's
    Levenshtein alignment): ``(kind, reference chars, answer chars)`` with kind equal, substitute, insert or delete."""
    import jiwer

    ref, ans = reference.strip(), answer.strip()
    out = jiwer.process_characters(ref, ans)
    return [(c.type, ref[c.ref_start_idx:c.ref_end_idx], ans[c.hyp_start_idx:c.hyp_end_idx])
            for c in out.alignments[0]]


def segments(reference: str, answer: str) -> list[dict[str, str]]:
    """Pieces of ``answer`` for display: ok, sub (wrong characters, with the expected ones as ``want``),
    ins (extra characters) and del (missing reference characters, shown struck through)."""
    kinds = {"equal": "ok", "substitute": "sub", "insert": "ins", "delete": "del"}
    return [{"kind": kinds[kind], "text": ans if kind != "delete" else ref, "want": ref}
            for kind, ref, ans in alignment(reference, answer)]


def confusions(pairs: list[tuple[str, str]], top: int = 15) -> list[dict[str, Any]]:
    """The most frequent character errors over (reference, answer) pairs: substitutions ``a -> b``,
    deletions ``a -> ∅`` and insertions ``∅ -> b``, with their counts."""
    counts: Counter = Counter()
    for reference, answer in pairs:
        for kind, ref, ans in alignment(reference, answer):
            if kind == "substitute":
                counts.update(zip(ref, ans))
            elif kind == "delete":
                counts.update((c, "") for c in ref)
            elif kind == "insert":
                counts.update(("", c) for c in ans)
    return [{"want": _visible(a), "got": _visible(b), "count": n} for (a, b), n in counts.most_common(top)]


def _visible(char: str) -> str:
    """A character as the page shows it in a table: ∅ for none, ␣ for a space."""
    return {"": "∅", " ": "␣"}.get(char, char)


def _exact(answer: Optional[str], reference: str) -> Optional[bool]:
    return None if answer is None else answer.strip() == reference.strip()


def cards(rows: list[dict[str, str]], thumbnails: dict[str, str]) -> list[dict[str, Any]]:
    """One gallery card per predictions row: image, reference, both answers marked, CERs and statuses
    (wrong: the fine-tuned answer is wrong; fixed: base wrong, tuned right; broken: base right, tuned wrong)."""
    out = []
    for r in rows:
        ref, base = r["reference"], r.get("base_prediction")
        tuned_ok, base_ok = _exact(r["prediction"], ref), _exact(base, ref)
        status = [s for s, on in (("wrong", not tuned_ok), ("fixed", base_ok is False and tuned_ok),
                                  ("broken", base_ok and not tuned_ok)) if on]
        out.append({"index": r["index"], "record_id": r.get("record_id", ""), "thumb": thumbnails.get(thumbnail_key(r)),
                    "reference": ref, "tuned": segments(ref, r["prediction"]), "tuned_ok": tuned_ok,
                    "cer": float(r["cer"]), "base": None if base is None else segments(ref, base), "base_ok": base_ok,
                    "base_cer": float(r["base_cer"]) if r.get("base_cer") not in (None, "") else None,
                    "status": status})
    return out


# ------------------------------------------------------------------------------------------ charts
def _figure(width: float = 4.8, height: float = 3.2, columns: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width, height), dpi=100)


def _data_uri(fig: Any) -> str:
    """The figure as an SVG data URI (text kept as text; fixed hash salt and no date: same facts, same bytes)."""
    import matplotlib
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "visiontune-report"}):
        fig.tight_layout()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def curves_chart(curves: dict[str, list[tuple[int, float]]], metrics: Optional[dict[str, Any]]) -> Optional[str]:
    """Training loss (left) and the in-training evaluation (right: val CER and exact match, with the
    evaluate stage's scores as dotted lines) against the step."""
    if not curves.get("loss") and not curves.get("val_cer"):
        return None
    fig, (ax, bx) = _figure(11, 3.4, columns=2)
    if curves.get("loss"):
        ax.plot(*zip(*curves["loss"]), color="#1f77b4", lw=1.5, label="train loss")
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax.grid(alpha=0.3)
    final = (metrics or {}).get("finetuned", {})
    for metric, color in (("cer", "#d62728"), ("exact_match", "#2ca02c")):
        points = curves.get(f"val_{metric}")
        if points:
            bx.plot(*zip(*points), marker="o", ms=3, color=color, label=f"validation {metric}")
        if metric in final:
            bx.axhline(final[metric], color=color, ls=":", lw=1, label=f"{metrics.get('split', 'held-out')} {metric} (evaluate stage)")
    bx.set(xlabel="step", title="evaluation during training (validation subset)")
    for axis in (ax, bx):
        axis.xaxis.get_major_locator().set_params(integer=True)
    bx.grid(alpha=0.3)
    if bx.get_legend_handles_labels()[0]:
        bx.legend(fontsize=8)
    return _data_uri(fig)


def cer_histogram(rows: list[dict[str, str]]) -> Optional[str]:
    """Per-sample CER of the base and fine-tuned answers (values above 2 counted in the last bin)."""
    if not rows:
        return None
    fig, ax = _figure()
    bins = [i / 10 for i in range(21)]
    series = [("fine-tuned", [float(r["cer"]) for r in rows], "#1f77b4")]
    if rows[0].get("base_cer") not in (None, ""):
        series.insert(0, ("base", [float(r["base_cer"]) for r in rows], "#aaaaaa"))
    for label, values, color in series:
        ax.hist([min(v, 2.0) for v in values], bins=bins, alpha=0.7, color=color, label=label)
    ax.set(xlabel="character error rate of one sample (≥ 2 in the last bin)", ylabel="samples", title="CER per sample")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _data_uri(fig)


def length_chart(rows: list[dict[str, str]]) -> Optional[str]:
    """Exact match by reference length (characters), base vs fine-tuned, with the number of samples."""
    if not rows:
        return None
    by_len: dict[int, list[dict[str, str]]] = {}
    for r in rows:
        by_len.setdefault(len(r["reference"].strip()), []).append(r)
    lengths = sorted(by_len)
    fig, ax = _figure()
    x = range(len(lengths))
    tuned = [sum(bool(_exact(r["prediction"], r["reference"])) for r in by_len[n]) / len(by_len[n]) for n in lengths]
    if "base_prediction" in rows[0]:
        base = [sum(bool(_exact(r["base_prediction"], r["reference"])) for r in by_len[n]) / len(by_len[n]) for n in lengths]
        ax.bar([i - 0.2 for i in x], base, width=0.4, color="#aaaaaa", label="base")
    ax.bar([i + 0.2 for i in x], tuned, width=0.4, color="#1f77b4", label="fine-tuned")
    ax.set_xticks(list(x), [f"{n}\n(n={len(by_len[n])})" for n in lengths], fontsize=8)
    ax.set(xlabel="answer length (characters)", ylabel="exact match", ylim=(0, 1.05), title="exact match by answer length")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _data_uri(fig)


def sizes_chart(sizes: Optional[dict[str, Any]]) -> Optional[str]:
    """Image width x height before (source) and after normalization, log-log."""
    if not sizes or not sizes.get("source"):
        return None
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, ax = _figure()
    for key, color, label in (("source", "#ff7f0e", "before (source)"), ("normalized", "#1f77b4", "after normalization")):
        w, h = zip(*sizes[key])
        ax.scatter(w, h, s=6, alpha=0.4, color=color, label=label)
    ax.set(xscale="log", yscale="log", xlabel="width (px)", ylabel="height (px)",
           title=f"image sizes ({sizes['count']} images)")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers (50, 100, 200, 500 ...), not 2×10²
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=8, markerscale=3)
    ax.grid(alpha=0.3, which="both")
    return _data_uri(fig)


# ------------------------------------------------------------------------------------------ the page
def metrics_table(metrics: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows metric / base / fine-tuned / delta of the evaluate stage's metrics file, with the better side."""
    if not metrics:
        return []
    tuned, base = metrics.get("finetuned", {}), metrics.get("base")
    rows = []
    for name, value in tuned.items():
        b = base.get(name) if base else None
        improved = None if b is None or value == b else (value < b if name in LOWER_IS_BETTER else value > b)
        rows.append({"name": name, "finetuned": value, "base": b, "delta": None if b is None else value - b,
                     "improved": improved, "primary": name == metrics.get("primary_metric"),
                     "direction": "lower is better" if name in LOWER_IS_BETTER else "higher is better"})
    return rows


def eval_overhead(curves: dict[str, list[tuple[int, float]]], run_metrics: dict[str, float]) -> Optional[dict[str, Any]]:
    """How many in-training evaluations ran and their share of the training time."""
    seconds = [v for _, v in curves.get("val_seconds", [])]
    runtime = run_metrics.get("train/runtime") or run_metrics.get("train_runtime")
    if not seconds:
        return None
    return {"count": len(seconds), "seconds": sum(seconds), "runtime": runtime,
            "share": sum(seconds) / runtime if runtime else None}


def page_context(facts: dict[str, Any]) -> dict[str, Any]:
    """Everything the template needs, from :func:`visiontune.pipeline.report.collect`'s facts."""
    rows, metrics = facts["rows"], facts["metrics"]
    data = {"validate": None, "reasons": {}, "normalize": None, "normalize_settings": None, "convert": None,
            "sizes": None, **(facts["data"] or {})}
    gallery = cards(facts["gallery"], facts["thumbnails"])
    counts = {s: sum(s in c["status"] for c in gallery) for s in STATUSES}
    return {
        "run": facts["run"], "decision": facts["decision"], "metrics": metrics, "table": metrics_table(metrics),
        "has_base": bool(rows and "base_prediction" in rows[0]), "cards": gallery, "counts": counts,
        "n_rows": len(rows),
        "charts": {"curves": curves_chart(facts["curves"], metrics),
                   "cer": cer_histogram(rows), "length": length_chart(rows), "sizes": sizes_chart(data.get("sizes"))},
        "confusions": confusions([(r["reference"], r["prediction"]) for r in rows]),
        "base_confusions": confusions([(r["reference"], r["base_prediction"]) for r in rows if "base_prediction" in r]),
        "data": data, "overhead": eval_overhead(facts["curves"], facts["run_metrics"]),
        "lineage": {k: facts["tags"][k] for k in LINEAGE_TAGS if k in facts["tags"]},
        "params": sorted(facts["params"].items()),
    }
