"""Conversion: validated + normalized records -> a conversation ``DatasetDict`` (train/validation/test).

Each record becomes ``{"messages": [...]}`` (see :mod:`visiontune.data.conversation`) with the
instruction from ``convert.instruction``; multi-image and multi-turn records are kept as such. Images are
stored as **path strings relative to the repository root** (the working directory the stages run in,
e.g. ``data/normalized/images/ab/ab12....png``; absolute if ``data.work_dir`` is absolute), so Arrow keeps
them as plain strings and the dataset stays valid when the repository is cloned and ``dvc pull``-ed
elsewhere. Load it with ``datasets.load_from_disk("data/dataset")`` from the repository root.

The split is by hash: ``sha256(seed, first image content)`` picks the split, so it is reproducible for a
seed, a record never moves when other rows are added or removed, and every question about the same image
lands in the same split (no leakage between train and test).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from visiontune.config import PipelineConfig
from visiontune.data.conversation import to_conversation
from visiontune.data.io import dump_json, holds_work_dir, read_jsonl, write_if_changed

SPLITS = ("train", "validation", "test")
META_FILE = "visiontune_meta.json"  # inside the dataset folder: settings the model must carry along


def assign_split(key: str, seed: int, ratios: list[float]) -> str:
    """The split of a record whose grouping key is ``key`` (deterministic in ``seed``, independent of other rows)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"convert.split_ratios = {ratios!r}: use three non-negative shares [train, validation, test]")
    u = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
    total = float(sum(ratios))
    acc = 0.0
    for name, r in zip(SPLITS, ratios):
        acc += r / total
        if u < acc:
            return name
    return SPLITS[-1]


def features() -> Any:
    """Explicit Arrow schema: empty splits still have the right columns, images stay strings."""
    import datasets
    from datasets import List, Value

    part = {"type": Value("string"), "image": Value("string"), "text": Value("string")}
    return datasets.Features({
        "messages": List({"role": Value("string"), "content": List(part)}),
        "images": List(Value("string")),
        "answer": Value("string"),
        "record_id": Value("string"),
        "row": Value("int64"),
    })


def build_rows(records: list[dict], manifest: dict, instruction: str, seed: int, ratios: list[float]) -> dict[str, list[dict]]:
    """Rows per split (plain dicts) from validated records and the normalization manifest."""
    images_map = manifest["images"]
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for rec in records:
        try:
            paths = [images_map[i["sha256"]]["path"] for i in rec["images"]]
        except KeyError as e:
            raise ValueError(
                f"image {e.args[0]} of record row {rec['row']} is not in the normalization manifest: "
                f"re-run `visiontune normalize`"
            ) from None
        turns = rec["turns"]
        sample = {
            "image": paths,
            "text": [t["answer"] for t in turns] if len(turns) > 1 else turns[0]["answer"],
            "question": [t["question"] for t in turns] if len(turns) > 1 else turns[0]["question"],
        }
        conv = to_conversation(sample, instruction=instruction, image_key="image", text_key="text", question_key="question")
        split = assign_split(rec["images"][0]["sha256"], seed, ratios)
        out[split].append({
            "messages": conv["messages"], "images": paths, "answer": turns[-1]["answer"],
            "record_id": rec["record_id"], "row": rec["row"],
        })
    return out


def save_dataset(rows: dict[str, list[dict]], path: str | Path) -> None:
    """Write a DatasetDict with one split per key (replacing what was there)."""
    import datasets

    feats = features()
    for split_rows in rows.values():  # Arrow fills the missing struct fields; add them so the schema is exact
        for r in split_rows:
            for m in r["messages"]:
                for part in m["content"]:
                    part.setdefault("image", None)
                    part.setdefault("text", None)
    dd = datasets.DatasetDict({
        s: datasets.Dataset.from_list(r, features=feats) if r else datasets.Dataset.from_dict({k: [] for k in feats}, features=feats)
        for s, r in rows.items()
    })
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    dd.save_to_disk(str(tmp), num_shards={s: 1 for s in dd})  # one shard each: an empty split still gets its file
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def load_split(dataset_dir: str | Path, split: str, setting: str = "split") -> Any:
    """One split (a ``datasets.Dataset``) of the DatasetDict :func:`save_dataset` wrote to ``dataset_dir``.

    ``setting`` names where the split name came from (e.g. ``"eval.split"``), for the error message.
    """
    import datasets

    path = Path(dataset_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"dataset {path} not found: run the data stages first (`visiontune convert`, or `dvc repro convert`)"
        )
    dd = datasets.load_from_disk(str(path))
    if split not in dd:
        raise ValueError(f"{setting}={split!r} is not a split of {path}; available: {sorted(dd)}")
    return dd[split]


@holds_work_dir  # one run at a time per data.work_dir
def convert_stage(cfg: PipelineConfig) -> dict[str, Any]:
    """``visiontune convert``: write ``<work_dir>/dataset`` (DatasetDict) and ``<work_dir>/metrics/convert.json``."""
    c = cfg.convert
    work = Path(cfg.data.work_dir)
    records_path, manifest_path = work / "validated" / "records.jsonl", work / "normalized" / "manifest.json"
    for p, stage in ((records_path, "validate"), (manifest_path, "normalize")):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: run `visiontune {stage}` first")
    instruction, seed, ratios = c.instruction, c.seed, list(c.split_ratios)
    rows = build_rows(read_jsonl(records_path), json.loads(manifest_path.read_text()), instruction, seed, ratios)
    out = work / "dataset"
    fingerprint = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    stamp = out / "visiontune_fingerprint.txt"
    wrote = False
    if not (stamp.is_file() and stamp.read_text().strip() == fingerprint):
        save_dataset(rows, out)
        # The instruction travels with the data: train records it with the model, and the served model
        # uses it as the default prompt.
        (out / META_FILE).write_text(dump_json({"instruction": instruction}))
        stamp.write_text(fingerprint + "\n")
        wrote = True
    counts = {s: len(r) for s, r in rows.items()}
    metrics = {"rows": sum(counts.values()), **{f"{s}_rows": n for s, n in counts.items()},
               "multi_image_rows": sum(1 for r in rows.values() for x in r if len(x["images"]) > 1),
               "multi_turn_rows": sum(1 for r in rows.values() for x in r if len(x["messages"]) > 2)}
    write_if_changed(work / "metrics" / "convert.json", dump_json(metrics))
    return {**metrics, "dataset": str(out), "written": wrote}


def read_dataset_meta(dataset_dir: str | Path) -> dict[str, Any]:
    """The settings convert recorded with the dataset (``{"instruction": ...}``); {} for a dataset
    written by other means."""
    path = Path(dataset_dir) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
