"""Which held-out layout factor does a fine-tuned demo model fail on?

The demo's held-out pages (``visiontune.data.demo.HELDOUT_LAYOUT``) differ from the training pages in several
ways at once: unseen writers (the second half of scikit-learn's digits), colours, blur and geometry. This
probe renders fresh pages from the held-out half of the digits in variants of that layout, each with some
fields swapped back to ``TRAIN_LAYOUT``'s, and scores the adapter on each, so the factor that costs accuracy
shows as the variant that recovers it. The last variant is the training layout itself on unseen writers.

    python benchmarks/probe_heldout.py outputs/train/adapter --n 100 --json probe.json
    python benchmarks/probe_heldout.py outputs/train/adapter --n 200 --only "held-out layout" --confusions

It reads ``params.yaml`` (model, image rule, eval settings) from the working directory, and the instruction
from the converted dataset's test split (``data/dataset``), as the evaluate stage does.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
from pathlib import Path

import numpy as np


def variants() -> dict:
    """Name -> Layout: the held-out layout, one factor (or group) at a time set to the training one."""
    from visiontune.data.demo import HELDOUT_LAYOUT as H, TRAIN_LAYOUT as T

    geometry = {k: getattr(T, k) for k in ("glyph", "gap", "jitter", "tilt")}
    return {
        "held-out layout": H,
        "colours as in training": dataclasses.replace(H, paper=T.paper, pen=T.pen, rgb=T.rgb),
        "blur as in training": dataclasses.replace(H, blur=T.blur),
        "glyph size as in training": dataclasses.replace(H, glyph=T.glyph),
        "gaps as in training": dataclasses.replace(H, gap=T.gap),
        "tilt + jitter as in training": dataclasses.replace(H, tilt=T.tilt, jitter=T.jitter),
        "all geometry as in training": dataclasses.replace(H, **geometry),
        "training layout, 3-7 digits": dataclasses.replace(T, n_digits=(3, 7)),
    }


def render(layout, n: int, instruction: str, seed: int = 7) -> tuple[list[dict], list[str]]:
    """``n`` conversations of pages from the held-out half of the digits drawn with ``layout`` (own seed stream,
    so the pages differ from the stored held-out set), and their digit strings."""
    from sklearn.datasets import load_digits

    import visiontune.data.demo as demo

    d = load_digits()
    demo._DIGITS = (d.images, d.target)
    _, held = demo.digit_halves(len(d.images))
    samples, refs = [], []
    for k in range(n):
        rng = np.random.default_rng([seed, k, 9])
        count = int(rng.integers(layout.n_digits[0], layout.n_digits[1] + 1))
        idx = [int(held[int(i)]) for i in rng.integers(0, len(held), size=count)]
        image = demo.render_line(d.images, idx, demo._size("in_range", count, rng), layout, rng)
        ref = "".join(str(int(d.target[i])) for i in idx)
        samples.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": instruction}]},
            {"role": "assistant", "content": [{"type": "text", "text": ref}]}]})
        refs.append(ref)
    return samples, refs


def confusions(preds: list[str], refs: list[str]) -> dict:
    """Per-digit accuracy over the answers of the right length, and the commonest (reference, prediction) digit
    swaps: which shapes the model mixes up."""
    swaps: collections.Counter = collections.Counter()
    right = total = same_length = 0
    for ref, pred in zip(refs, preds):
        pred = pred.strip()
        if len(pred) != len(ref):
            continue
        same_length += 1
        for a, b in zip(ref, pred):
            total += 1
            right += a == b
            if a != b:
                swaps[f"{a}->{b}"] += 1
    return {"length_right": same_length / max(1, len(refs)), "digit_accuracy": right / max(1, total),
            "swaps": dict(swaps.most_common(12))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter", type=Path, help="a trained adapter folder (e.g. outputs/train/adapter)")
    ap.add_argument("--n", type=int, default=100, help="pages per variant")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--json", type=Path, help="write the metrics of every variant here")
    ap.add_argument("--only", action="append", default=[], metavar="VARIANT", help="score only these variants")
    ap.add_argument("--confusions", action="store_true", help="also per-digit accuracy and the commonest swaps")
    args = ap.parse_args()

    from visiontune.config import load_params
    from visiontune.inference import split_conversation
    from visiontune.pipeline.evaluate import _predict, compute_metrics, load_eval_samples

    cfg = load_params(args.params, args.overrides)
    cfg.eval.compare_base = False
    like = load_eval_samples(Path(cfg.data.work_dir) / "dataset", cfg.eval.split, 1)[0]
    user = split_conversation(like["messages"])[0]
    instruction = next(c["text"] for m in user for c in m["content"] if isinstance(c, dict) and c.get("type") == "text")
    results = {}
    chosen = {k: v for k, v in variants().items() if not args.only or k in args.only}
    if not chosen:
        raise SystemExit(f"--only {args.only}: no such variant; the variants are {list(variants())}")
    for name, layout in chosen.items():
        samples, refs = render(layout, args.n, instruction)
        preds, _, _ = _predict(cfg, args.adapter, samples)
        results[name] = compute_metrics(preds, refs)
        print(f"{name:30s} exact match {results[name]['exact_match']:.3f}  CER {results[name]['cer']:.3f}", flush=True)
        if args.confusions:
            results[name]["confusions"] = confusions(preds, refs)
            print(f"{'':30s} {results[name]['confusions']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"adapter": str(args.adapter), "n": args.n, "variants": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
