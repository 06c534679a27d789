"""Validation: raw rows -> GX-validated good records + quarantine, never touching the raw data.

Two metadata tables are built and judged by real Great Expectations 1.x expectation suites:

* ``images`` (one row per image reference): path inside the root, file exists, decodable, format, mode,
  width, height, aspect ratio, pixels, bytes, sha256 (facts from :mod:`visiontune.data.probe`);
* ``records`` (one row per annotation row): parsed, has an image, text present / UTF-8 / within length
  bounds, question and answer turns line up, not a duplicate of an earlier record that passes every
  other check.

Every expectation carries ``meta.reason`` (a short failure kind). Per-record reasons are read back from
GX's unexpected indexes (``result_format=COMPLETE`` with ``unexpected_index_column_names``), so the GX
result is the one source of the verdict. A record with any reason is quarantined; the stage fails only
when the quarantined share exceeds ``validate.max_failure_ratio``.

Outputs (``<work_dir>/validated/``): ``gx_result.json``, ``summary.json``, ``summary.md``,
``image_metadata.csv`` / ``record_metadata.csv`` (the tables the suites judged),
``records.jsonl`` (good records), ``quarantine.jsonl`` (bad records with reasons), ``embedded/`` (images
that came embedded in a dataset, extracted once by content hash); metrics in
``<work_dir>/metrics/validate.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

from visiontune.config import PipelineConfig, ValidateConfig
from visiontune.data.executor import DataExecutor
from visiontune.data.io import RawRow, dump_json, dump_jsonl, holds_work_dir, read_annotations, write_if_changed
from visiontune.data.probe import COLUMNS as PROBE_COLUMNS
from visiontune.data.probe import probe_images, probe_job

log = logging.getLogger(__name__)

REASONS = {
    "path_escapes_root": "image path resolves outside the data root (e.g. '../')",
    "missing_file": "referenced image file does not exist",
    "too_many_pixels": "more pixels than validate.max_pixels (decompression bomb guard); not decoded",
    "undecodable": "file cannot be decoded as an image (truncated, empty, or not an image)",
    "mode_not_allowed": "PIL mode not in validate.allowed_modes",
    "too_small": "shorter side below validate.accept_min_px",
    "too_large": "longer side above validate.accept_max_px",
    "extreme_aspect_ratio": "long/short side above validate.max_aspect_ratio",
    "unparsable_row": "annotation row could not be parsed",
    "no_image": "row references no image",
    "text_not_utf8": "text is not valid UTF-8",
    "missing_text": "text is missing (null)",
    "text_too_short": "text shorter than validate.min_text_chars after stripping (e.g. empty caption)",
    "text_too_long": "text longer than validate.max_text_chars",
    "question_missing": "a turn has an answer but an empty question",
    "turn_mismatch": "number of questions and answers differ",
    "duplicate": "same image(s) and question(s) as an earlier record",
}


def build_suites(rules: ValidateConfig) -> tuple[Any, Any]:
    """The two GX expectation suites (images, records) for ``rules``; each expectation's meta names its reason."""
    return _images_suite(rules), _records_suite(rules)


def _meta(code: str) -> dict:
    return {"reason": code, "description": REASONS[code]}


def _images_suite(rules: ValidateConfig) -> Any:
    import great_expectations as gx

    E, m = gx.expectations, _meta
    images = gx.ExpectationSuite(name="visiontune_images")
    for exp in (
        E.ExpectColumnValuesToBeInSet(column="within_root", value_set=[True], meta=m("path_escapes_root")),
        E.ExpectColumnValuesToBeInSet(column="exists", value_set=[True], meta=m("missing_file")),
        E.ExpectColumnValuesToBeBetween(column="pixels", min_value=1, max_value=rules.max_pixels, meta=m("too_many_pixels")),
        E.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True], meta=m("undecodable")),
        E.ExpectColumnValuesToBeInSet(column="mode", value_set=list(rules.allowed_modes), meta=m("mode_not_allowed")),
        E.ExpectColumnValuesToBeBetween(column="min_side", min_value=rules.accept_min_px, meta=m("too_small")),
        E.ExpectColumnValuesToBeBetween(column="max_side", max_value=rules.accept_max_px, meta=m("too_large")),
        E.ExpectColumnValuesToBeBetween(column="aspect_ratio", min_value=1.0, max_value=rules.max_aspect_ratio, meta=m("extreme_aspect_ratio")),
        E.ExpectColumnValuesToNotBeNull(column="sha256", mostly=0.0, meta={"reason": None, "description": "informational: bytes were read"}),
    ):
        images.add_expectation(exp)
    return images


def _records_suite(rules: ValidateConfig, name: str = "visiontune_records") -> Any:
    import great_expectations as gx

    E, m = gx.expectations, _meta
    records = gx.ExpectationSuite(name=name)
    for exp in (
        E.ExpectTableRowCountToBeBetween(min_value=1, meta={"reason": None, "description": "the annotation source has rows"}),
        E.ExpectColumnValuesToBeInSet(column="parsed", value_set=[True], meta=m("unparsable_row")),
        E.ExpectColumnValuesToBeBetween(column="n_images", min_value=1, meta=m("no_image")),
        E.ExpectColumnValuesToBeInSet(column="text_utf8", value_set=[True], meta=m("text_not_utf8")),
        E.ExpectColumnValuesToBeInSet(column="text_present", value_set=[True], meta=m("missing_text")),
        E.ExpectColumnValuesToBeBetween(column="answer_min_chars", min_value=rules.min_text_chars, meta=m("text_too_short")),
        E.ExpectColumnValuesToBeBetween(column="answer_max_chars", max_value=rules.max_text_chars, meta=m("text_too_long")),
        E.ExpectColumnValuesToBeInSet(column="questions_ok", value_set=[True], meta=m("question_missing")),
        E.ExpectColumnValuesToBeInSet(column="turns_match", value_set=[True], meta=m("turn_mismatch")),
        E.ExpectColumnValuesToBeBetween(column="duplicate_rank", min_value=0, max_value=0, meta=m("duplicate")),
    ):
        records.add_expectation(exp)
    return records


def _gx_context() -> Any:
    """An ephemeral GX data context with its progress bars off."""
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # pragma: no cover - only cosmetic
        pass
    return ctx


def _run_suite(ctx: Any, name: str, suite: Any, df: Any, index_column: str) -> Any:
    import great_expectations as gx

    batch = ctx.data_sources.add_pandas(name).add_dataframe_asset(f"{name}_meta").add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(suite)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=f"{name}_validation"))
    return vd.run(
        batch_parameters={"dataframe": df},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [index_column]},
    )


def _failures(result: Any, index_column: str) -> dict[int, list[str]]:
    """``{row id: [reason, ...]}`` from a GX validation result's unexpected indexes."""
    out: dict[int, list[str]] = defaultdict(list)
    for er in result.results:
        reason = (er.expectation_config.meta or {}).get("reason")
        if er.exception_info and er.exception_info.get("raised_exception"):
            raise RuntimeError(f"GX expectation {er.expectation_config.type} raised: {er.exception_info.get('exception_message')}")
        if not reason or er.success:
            continue
        for item in er.result.get("unexpected_index_list") or []:
            out[int(item[index_column])].append(reason)
    return out


def _answer_lengths(row: RawRow) -> tuple[Optional[int], Optional[int]]:
    if not row.answers or any(a is None for a in row.answers):
        return None, None
    lengths = [len(a.strip()) for a in row.answers]
    return min(lengths), max(len(a) for a in row.answers)


def validate_rows(rows: list[RawRow], root: str | Path, rules: ValidateConfig,
                  executor: Optional[DataExecutor] = None) -> dict[str, Any]:
    """Probe every image of ``rows`` (on ``executor``: this machine's cores by default), run both suites and
    decide per record.

    Returns ``{"images": DataFrame, "records": DataFrame, "gx": {"images": result, "records": result},
    "reasons": {row: [(code, image ref or None), ...]}}``. Pure apart from reading the images.

    Duplicates are ranked among the records that pass every other check, so the copy kept is the first
    *valid* one (a record quarantined for, say, an empty caption does not make its valid twin a duplicate).
    That takes two runs of the records suite: one without ranks to find the records failing for other
    reasons, then the one that decides (its result is the one reported).
    """
    images, probed, owners = _image_table(rows, Path(root), rules.max_pixels, executor or DataExecutor())
    records = _record_table(rows, owners, probed)
    ctx = _gx_context()
    img_result = _run_suite(ctx, "images", _images_suite(rules), images, "image_id")
    reasons = _image_reasons(images, img_result)
    records["duplicate_rank"] = None
    unranked = _run_suite(ctx, "unranked_records", _records_suite(rules, "visiontune_records_unranked"), records, "row")
    records["duplicate_rank"] = _duplicate_ranks(records, set(reasons) | set(_failures(unranked, "row")))
    rec_result = _run_suite(ctx, "records", _records_suite(rules), records, "row")
    for row, codes in _failures(rec_result, "row").items():
        for code in codes:
            reasons[row].append((code, None))
    return {"images": images, "probed": probed, "owners": owners, "records": records, "gx": {"images": img_result, "records": rec_result}, "reasons": dict(reasons)}


def _image_table(rows: list[RawRow], root: Path, max_pixels: int, executor: DataExecutor) -> tuple[Any, list[dict], list[int]]:
    """Probe every image of ``rows``: (the table the images suite judges, the probe results, each image's row)."""
    import pandas as pd

    jobs, owners = [], []
    for r in rows:
        for img in r.images:
            jobs.append((img.ref, str(root), img.data, max_pixels))
            owners.append(r.row)
    probed = executor.map(probe_job, jobs, local=probe_images, groups=owners, name="validate")  # a record's images together
    images = pd.DataFrame(probed, columns=PROBE_COLUMNS)
    images.insert(0, "image_id", range(len(images)))
    images.insert(1, "row", owners)
    return images.astype(object).where(images.notna(), None), probed, owners


_RECORD_COLUMNS = ["row", "parsed", "parse_error", "n_images", "text_utf8", "text_present", "answer_min_chars",
                   "answer_max_chars", "n_turns", "questions_ok", "turns_match", "content_key"]


def _record_table(rows: list[RawRow], owners: list[int], probed: list[dict]) -> Any:
    """The table the records suite judges: one row of facts per annotation row (ranks are added later)."""
    import pandas as pd

    sha_by_row: dict[int, list] = defaultdict(list)
    for owner, p in zip(owners, probed):
        sha_by_row[owner].append(p["sha256"] or f"unreadable:{p['ref']}")
    records = pd.DataFrame([_record_facts(r, sha_by_row.get(r.row, [])) for r in rows], columns=_RECORD_COLUMNS)
    return records.astype(object).where(records.notna(), None)


def _record_facts(r: RawRow, shas: list[str]) -> dict[str, Any]:
    """One row of the records table (the columns of ``_RECORD_COLUMNS``); ``shas``: its images' content hashes."""
    amin, amax = _answer_lengths(r)
    n_q = len(r.questions) if r.questions is not None else None
    n_a = len(r.answers) if r.answers is not None else None
    key = hashlib.sha256(json.dumps([shas, r.questions], ensure_ascii=False).encode()).hexdigest()
    return {
        "row": r.row,
        "parsed": r.parse_error is None,
        "parse_error": r.parse_error,
        "n_images": len(r.images) if r.parse_error is None else None,
        "text_utf8": r.text_utf8,
        "text_present": None if r.parse_error else amin is not None,
        "answer_min_chars": amin if r.parse_error is None else None,
        "answer_max_chars": amax,
        "n_turns": n_a,
        "questions_ok": None if r.questions is None or r.parse_error else all(q is not None and q.strip() for q in r.questions),
        "turns_match": None if n_q is None or n_a is None else n_q == n_a,
        "content_key": key if r.images and r.parse_error is None else None,
    }


def _duplicate_ranks(records: Any, quarantined: set[int]) -> Any:
    """Rank of each record among the records with the same image content + questions that pass every other
    check (0 for the first one, which is kept); None for the others (no content key, or ``quarantined``)."""
    ranked = records["content_key"].notna() & ~records["row"].isin(quarantined)
    ranks = records[ranked].groupby("content_key").cumcount().reindex(records.index).astype(float)
    return ranks.astype(object).where(ranks.notna(), None)


def _image_reasons(images: Any, result: Any) -> defaultdict[int, list[tuple[str, Optional[str]]]]:
    """``{row: [(reason, image ref), ...]}`` for the images the images suite failed."""
    reasons: defaultdict[int, list[tuple[str, Optional[str]]]] = defaultdict(list)
    refs = images.set_index("image_id")["ref"].to_dict() if len(images) else {}
    owner_of = images.set_index("image_id")["row"].to_dict() if len(images) else {}
    for image_id, codes in _failures(result, "image_id").items():
        for code in codes:
            reasons[owner_of[image_id]].append((code, refs[image_id]))
    return reasons


def _image_path(raw_dir: Path, ref: str) -> str:
    """Path of a raw image as the later stages open it: relative to the working directory, posix style."""
    p = Path(ref)
    return Path(os.path.normpath(p if p.is_absolute() else raw_dir / p)).as_posix()


def _good_record(row: RawRow, probed: list[dict], raw_dir: Path, embedded_dir: Path) -> dict:
    imgs = []
    for meta, ref in zip(probed, row.images):
        if ref.data is not None:  # extract once, by content hash, so later stages only deal with paths
            ext = (meta["format"] or "img").lower().replace("jpeg", "jpg")
            path = embedded_dir / f"{meta['sha256']}.{ext}"
            if not path.exists():
                write_if_changed(path, ref.data)
            src = path.as_posix()
        else:
            src = _image_path(raw_dir, ref.ref)
        imgs.append({"ref": ref.ref, "path": src, "sha256": meta["sha256"], "width": meta["width"],
                     "height": meta["height"], "mode": meta["mode"], "exif_orientation": meta["exif_orientation"]})
    questions = row.questions or [None] * len(row.answers or [])
    return {
        "row": row.row,
        "record_id": hashlib.sha256(json.dumps([[i["sha256"] for i in imgs], row.questions, row.answers], ensure_ascii=False).encode()).hexdigest()[:16],
        "images": imgs,
        "turns": [{"question": q, "answer": a} for q, a in zip(questions, row.answers or [])],
    }


def _summary_markdown(s: dict) -> str:
    lines = [
        "# Validation summary", "",
        f"- records: {s['records']} ({s['valid']} valid, {s['quarantined']} quarantined, failure ratio "
        f"{s['failure_ratio']:.4f}, limit {s['max_failure_ratio']})",
        f"- images probed: {s['images']}",
        f"- GX suites: images {'passed' if s['gx_success']['images'] else 'had failures'}, records "
        f"{'passed' if s['gx_success']['records'] else 'had failures'}",
        f"- decision: {'PASS' if s['passed'] else 'FAIL'}", "",
        "## Failures per kind", "", "| reason | records | meaning |", "|---|---|---|",
    ]
    for code, n in s["failures_by_reason"].items():
        lines.append(f"| {code} | {n} | {REASONS.get(code, '')} |")
    lines += ["", "## Worst offenders", "", "| row | reasons | image | detail |", "|---|---|---|---|"]
    for w in s["worst_offenders"]:
        lines.append(f"| {w['row']} | {', '.join(w['reasons'])} | {w['image'] or ''} | {(w['detail'] or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _sort_rows(rows: list[RawRow], res: dict[str, Any], raw_dir: Path, embedded_dir: Path) -> tuple[list, list]:
    """(good records, quarantined records with their reasons), in row order."""
    by_row: dict[int, list[dict]] = defaultdict(list)
    for owner, p in zip(res["owners"], res["probed"]):
        by_row[owner].append(p)
    good, bad = [], []
    for r in rows:
        rs = res["reasons"].get(r.row)
        if not rs:
            good.append(_good_record(r, by_row[r.row], raw_dir, embedded_dir))
            continue
        details = [p["error"] for p in by_row.get(r.row, []) if p["error"]]
        if r.parse_error:
            details.insert(0, r.parse_error)
        bad.append({
            "row": r.row,
            "reasons": sorted({c for c, _ in rs}),
            "messages": sorted({REASONS[c] for c, _ in rs}),
            "images": [i.ref for i in r.images],
            "failed_images": sorted({ref for _, ref in rs if ref}),
            "detail": "; ".join(details) or None,
            "answers": r.answers,
            "questions": r.questions,
        })
    return good, bad


def _summary(n: int, good: list, bad: list, res: dict[str, Any], max_failure_ratio: float, out: Path) -> dict[str, Any]:
    counts = Counter(c for b in bad for c in b["reasons"])
    ratio = len(bad) / n if n else 1.0
    worst = sorted(bad, key=lambda b: (-len(b["reasons"]), b["row"]))[:10]
    return {
        "records": n,
        "valid": len(good),
        "quarantined": len(bad),
        "failure_ratio": round(ratio, 6),
        "max_failure_ratio": max_failure_ratio,
        "images": int(len(res["images"])),
        "passed": bool(n) and ratio <= max_failure_ratio,
        "failures_by_reason": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "gx_success": {k: bool(v.success) for k, v in res["gx"].items()},
        "worst_offenders": [
            {"row": b["row"], "reasons": b["reasons"], "image": (b["failed_images"] or b["images"] or [None])[0], "detail": b["detail"]}
            for b in worst
        ],
        "outputs": {
            "records": str(out / "records.jsonl"),
            "quarantine": str(out / "quarantine.jsonl"),
            "gx_result": str(out / "gx_result.json"),
            "summary": str(out / "summary.md"),
            "image_metadata": str(out / "image_metadata.csv"),
        },
    }


def _write_outputs(out: Path, metrics_path: Path, res: dict[str, Any], good: list, bad: list, summary: dict) -> None:
    gx_json = {k: v.to_json_dict() for k, v in res["gx"].items()}
    for k in gx_json:  # run ids and timestamps differ per run; keep the file's content a function of the data
        gx_json[k].pop("meta", None)
        gx_json[k].pop("id", None)
        for er in gx_json[k].get("results", []):
            er.get("expectation_config", {}).pop("id", None)
    write_if_changed(out / "gx_result.json", dump_json(gx_json))
    # The two metadata tables the suites judged, for inspection (e.g. sort by width in a spreadsheet).
    write_if_changed(out / "image_metadata.csv", res["images"].to_csv(index=False, lineterminator="\n"))
    write_if_changed(out / "record_metadata.csv", res["records"].to_csv(index=False, lineterminator="\n"))
    write_if_changed(out / "records.jsonl", dump_jsonl(good))
    write_if_changed(out / "quarantine.jsonl", dump_jsonl(bad))
    write_if_changed(out / "summary.json", dump_json(summary))
    write_if_changed(out / "summary.md", _summary_markdown(summary))
    metrics = {k: summary[k] for k in ("records", "valid", "quarantined", "failure_ratio", "images")}
    metrics["failures_by_reason"] = summary["failures_by_reason"]
    write_if_changed(metrics_path, dump_json(metrics))


@holds_work_dir  # one run at a time per data.work_dir
def validate_stage(cfg: PipelineConfig) -> dict[str, Any]:
    """``visiontune validate``: read ``data.annotations`` under ``data.raw_dir``, validate, write outputs.

    Raises FileNotFoundError for a missing raw folder/annotation file, ValueError for a bad annotation
    format and when the quarantined share exceeds ``validate.max_failure_ratio`` (outputs are written
    first, so the quarantine file can be inspected).
    """
    d, rules = cfg.data, cfg.validate
    raw_dir = Path(d.raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(
            f"{raw_dir} not found: set data.raw_dir to your folder of images and captions file, or run "
            f"`visiontune demo-data` to write the bundled demo there"
        )
    rows = read_annotations(raw_dir, d.annotations, d.image_column, d.text_column, d.question_column, d.extra_images_column)
    max_failure_ratio = rules.max_failure_ratio
    out = Path(d.work_dir) / "validated"
    res = validate_rows(rows, raw_dir, rules, DataExecutor.of(d))
    good, bad = _sort_rows(rows, res, raw_dir, out / "embedded")
    summary = _summary(len(rows), good, bad, res, max_failure_ratio, out)
    _write_outputs(out, Path(d.work_dir) / "metrics" / "validate.json", res, good, bad, summary)
    if not rows:
        raise ValueError(f"{raw_dir / d.annotations}: no rows; add records (image path + text) to it")
    if not summary["passed"]:
        raise ValueError(
            f"validation failed: {len(bad)} of {len(rows)} records quarantined (ratio {summary['failure_ratio']:.3f} > "
            f"validate.max_failure_ratio {max_failure_ratio}); by reason: {summary['failures_by_reason']}. See "
            f"{out / 'quarantine.jsonl'} and {out / 'summary.md'}; fix the data or raise validate.max_failure_ratio in params.yaml"
        )
    log.info("validated %d records: %d valid, %d quarantined", len(rows), len(good), len(bad))
    return {k: summary[k] for k in ("records", "valid", "quarantined", "failure_ratio", "failures_by_reason", "outputs")}


def prefect_report(result: dict[str, Any], cfg: PipelineConfig) -> None:
    """Publish the validation summary (``<work_dir>/validated/summary.md``) as a Prefect markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    summary = Path(result["outputs"]["summary"])
    create_markdown_artifact(key="validation-summary", markdown=summary.read_text(),
                             description="Records validated and quarantined, by reason")
