"""Reading annotation sources and small file helpers shared by the data stages.

The data stage accepts what users actually have: a folder of images plus a captions/QA table (JSONL, CSV
or Parquet) or a Hugging Face ``datasets`` dataset (saved with ``save_to_disk`` or exported as Parquet)
whose image column holds embedded bytes. :func:`read_annotations` turns all of them into one list of
:class:`RawRow` so validation never cares where a row came from. Reading never crashes on a bad row: a
line that is not JSON or not UTF-8 becomes a row with ``parse_error`` / ``text_utf8=False`` that
validation then quarantines with its reason.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".pq")


@dataclass
class ImageRef:
    """One image a row refers to: a path (relative to the data root, as written in the table) or bytes."""

    ref: str  # what the annotation said (path as written, or "<embedded row N>")
    data: Optional[bytes] = None  # embedded image bytes (datasets Image feature / Parquet struct)


@dataclass
class RawRow:
    """One annotation row, parsed as far as possible; problems are recorded, never raised."""

    row: int
    images: list[ImageRef] = field(default_factory=list)
    answers: Optional[list[Optional[str]]] = None  # one per turn; None when the text column is absent/null
    questions: Optional[list[Optional[str]]] = None  # one per turn, or None for caption data
    text_utf8: bool = True
    parse_error: Optional[str] = None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Content hash of one file (streamed; opened read-only)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def hash_tree(paths: Iterable[str | Path]) -> str:
    """One sha256 over the relative names and contents of every file under the given files/folders.

    Used as the content part of the Prefect cache keys: it changes exactly when an input file changes,
    is added or removed, and not when a file is merely touched.
    """
    h = hashlib.sha256()
    for base in paths:
        base = Path(base)
        if base.is_file():
            files = [base]
        elif base.is_dir():
            files = sorted(p for p in base.rglob("*") if p.is_file())
        else:
            h.update(f"missing:{base}\n".encode())
            continue
        for p in files:
            h.update(f"{p.relative_to(base) if p != base else p.name}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def write_if_changed(path: str | Path, data: bytes | str) -> bool:
    """Write ``data`` to ``path`` unless the file already holds exactly it; returns whether it wrote.

    Keeps re-runs with unchanged inputs from touching outputs (mtimes stay, downstream tools see nothing).
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write(path, data)
    return True


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota exceeded, file-size limit (RLIMIT_FSIZE)


class DiskFullError(OSError):
    """A write failed for want of space (or of quota, or under a file-size limit); nothing was replaced."""


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (parents created) through a temporary file and a rename, so a reader, a
    killed run or a full disk never leaves a half-written file where the old one was.

    A failed write removes its temporary file; for want of space it raises :class:`DiskFullError` (an
    ``OSError`` with the same errno) naming the file and saying that the old one is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in DISK_FULL:
            raise DiskFullError(
                e.errno, f"could not write {path} ({len(data)} bytes): {e.strerror} (the disk, a quota or a file-size "
                f"limit is full). {'The previous file is untouched' if path.exists() else 'Nothing was written'}: "
                "free some space and run the stage again") from e
        raise


# How libraries that hide the errno report a short write: torch.save's zip writer, safetensors (Rust io errors).
_SHORT_WRITE = ("unexpected pos", "file write failed", "iostream error", "os error 28", "os error 27", "os error 122",
                "No space left on device", "File too large", "Disk quota exceeded")


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in DISK_FULL
    return isinstance(error, (OSError, RuntimeError)) and any(s in str(error) for s in _SHORT_WRITE)


@contextlib.contextmanager
def disk_full_explained(folder: str | Path, advice: str) -> Iterator[None]:
    """Turn a failed write for want of space inside the body (an ``OSError`` with ENOSPC/EDQUOT/EFBIG, or the
    RuntimeError torch.save raises for a short write) into one :class:`DiskFullError` that says so and what
    to do (``advice``); other errors pass unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, DiskFullError) or not _is_disk_full(e):
            raise
        code = e.errno if isinstance(e, OSError) and e.errno in DISK_FULL else errno.ENOSPC
        raise DiskFullError(code, f"could not write under {folder}: the disk, a quota or a file-size limit is full "
                                  f"({type(e).__name__}: {e}). {advice}") from e


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path`` to write into; when the body succeeds it takes
    ``path``'s place (the old folder is removed only once the new one is there), when the body fails it
    is removed and ``path`` stays as it was: a full disk never leaves a half-written folder where a good
    one was."""
    path = Path(path)
    staging, old = (path.with_name(f".{path.name}.{kind}{os.getpid()}") for kind in ("tmp", "old"))
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


class FolderBusyError(BlockingIOError):
    """A folder is in use by another visiontune process."""


@contextlib.contextmanager
def folder_lock(lock_file: str | Path, busy: str, error: type[BlockingIOError] = FolderBusyError,
                wait_s: float = 0) -> Iterator[None]:
    """Hold an OS file lock (flock) on ``lock_file`` for the body; if another process holds it for more than
    ``wait_s`` seconds (default: not at all), raise ``error(busy)``. The kernel drops the lock when its
    process dies, even by kill -9, so a crash leaves no stale lock."""
    from filelock import FileLock, Timeout

    Path(lock_file).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file, timeout=wait_s)
    try:
        lock.acquire()
    except Timeout:
        raise error(busy) from None
    try:
        yield
    finally:
        lock.release()


WORK_DIR_LOCK = ".visiontune.lock"  # inside data.work_dir: held while a stage writes or trains on its data


def work_dir_lock(work_dir: str | Path) -> contextlib.AbstractContextManager:
    """One stage at a time per ``data.work_dir`` (:func:`holds_work_dir`); fails at once when it is taken."""
    work = Path(work_dir)
    return folder_lock(work / WORK_DIR_LOCK, (
        f"{work} is in use by another visiontune run (it holds {work / WORK_DIR_LOCK}); wait for that run to finish, "
        "or give this one its own data folder: --set data.work_dir=<another folder>"))


_Stage = TypeVar("_Stage", bound=Callable[..., Any])


def holds_work_dir(stage: _Stage) -> _Stage:
    """Decorator of a stage function ``stage(cfg)`` that writes under ``data.work_dir``: it runs holding
    :func:`work_dir_lock`.

    The data stages rewrite files the next stages read, and training reads the dataset and its images for
    as long as it runs: a second run's stage on the same folder would mix two runs' files (normalize even
    deletes the images the other run's manifest names). The second one fails at once with
    :class:`FolderBusyError` instead (tests/reliability/test_concurrency.py).
    """

    @functools.wraps(stage)
    def locked(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        with work_dir_lock(cfg.data.work_dir):
            try:
                return stage(cfg, *args, **kwargs)
            except BaseException:
                _remove_temporaries(Path(cfg.data.work_dir))
                raise

    return locked  # type: ignore[return-value]


_TEMPORARY = re.compile(r"^\..+\.tmp\d+$")  # atomic_write's temporary files


def _remove_temporaries(folder: Path) -> None:
    """Delete what :func:`atomic_write` calls left half-written under ``folder``: a process pool stopped by a
    failed stage (a full disk) kills its other workers mid-write. Only with the folder's lock held: then no
    other process is writing there."""
    for p in folder.rglob(".*.tmp*"):
        if _TEMPORARY.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)


def dump_json(obj: Any) -> str:
    """Stable JSON text (sorted keys, trailing newline) so identical content gives identical bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=_json_default) + "\n"


def dump_jsonl(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False, default=_json_default) + "\n" for r in rows)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, bytes):
        return f"<{len(o)} bytes>"
    return str(o)


# --------------------------------------------------------------------------------------------- reading


def annotations_path(raw_dir: str | Path, annotations: str) -> Path:
    """Where the annotation source lives: ``annotations`` is relative to ``raw_dir`` unless absolute."""
    p = Path(annotations)
    return p if p.is_absolute() else Path(raw_dir) / p


def _not_found(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{path} not found: point data.annotations (relative to data.raw_dir) at your captions file "
        f"(JSONL, CSV or Parquet) or a `datasets` dataset saved with save_to_disk, or run `visiontune demo-data` "
        f"to write the bundled demo there"
    )


def read_annotations(
    raw_dir: str | Path,
    annotations: str,
    image_column: str,
    text_column: str,
    question_column: Optional[str] = None,
    extra_images_column: Optional[str] = None,
) -> list[RawRow]:
    """Read the annotation source into :class:`RawRow` objects (one per table row, in file order).

    Raises FileNotFoundError when the source is missing and ValueError when it has the wrong format or
    lacks the configured columns (a configuration mistake, not a bad record).
    """
    path = annotations_path(raw_dir, annotations)
    if not path.exists():
        raise _not_found(path)
    records, utf8 = _read_records(path)
    _check_columns(path, records, [c for c in (image_column, text_column, question_column, extra_images_column) if c])
    rows = []
    for i, rec in enumerate(records):
        row = RawRow(row=i)
        if utf8 is not None and not utf8[i]:
            row.text_utf8 = False
        if not isinstance(rec, dict):
            row.parse_error = str(rec)
        else:
            _parse_row(row, rec, image_column, text_column, question_column, extra_images_column)
        rows.append(row)
    return rows


def _read_records(path: Path) -> tuple[list, Optional[list[bool]]]:
    """(records, per-record "text was valid UTF-8" or None when the reader cannot tell) of any supported source."""
    if path.is_dir():
        return _read_datasets_dir(path), None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl_rows(path)
    if suffix == ".csv":
        return _read_csv_rows(path)
    if suffix in (".parquet", ".pq"):
        import pandas as pd

        try:
            return pd.read_parquet(path).to_dict("records"), None
        except Exception as e:  # pyarrow raises several types for a broken file
            raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}); re-export it") from e
    raise ValueError(
        f"{path}: unsupported annotation format {suffix!r}; use .jsonl, .csv, .parquet or a folder "
        f"written by datasets' save_to_disk"
    )


def _check_columns(path: Path, records: list, needed: list[str]) -> None:
    """A configured column that no record has is a configuration mistake: say which names the file uses."""
    columns: set[str] = set()
    for rec in records:
        if isinstance(rec, dict):
            columns.update(rec)
    missing = [c for c in needed if c not in columns]
    if records and missing:
        raise ValueError(
            f"{path}: column(s) {missing} not found (columns present: {sorted(columns)}); set "
            f"data.image_column / data.text_column / data.question_column / data.extra_images_column in "
            f"params.yaml to the names your file uses"
        )


def _parse_row(row: RawRow, rec: dict, image_column: str, text_column: str, question_column: Optional[str],
               extra_images_column: Optional[str]) -> None:
    """Fill ``row`` from one record; a value that cannot be read becomes ``row.parse_error``, never an exception."""
    i = row.row
    try:
        row.images = _image_refs(rec.get(image_column), i) + _image_refs(
            rec.get(extra_images_column) if extra_images_column else None, i
        )
        row.answers = _turns(rec.get(text_column))
        row.questions = _turns(rec.get(question_column)) if question_column else None
        for value in (row.answers or []) + (row.questions or []):
            if value is not None and _has_surrogates(value):
                row.text_utf8 = False
        row.answers = _clean(row.answers)
        row.questions = _clean(row.questions)
    except ValueError as e:
        row.parse_error = str(e)


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _clean(values: Optional[list[Optional[str]]]) -> Optional[list[Optional[str]]]:
    """Replace undecodable bytes (kept as surrogates while reading) by U+FFFD so outputs stay valid JSON."""
    if values is None:
        return None
    return [v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(v, str) else v for v in values]


def _is_null(v: Any) -> bool:
    if v is None:
        return True
    try:
        import math

        return isinstance(v, float) and math.isnan(v)
    except TypeError:  # pragma: no cover
        return False


def _as_list(v: Any) -> Optional[list]:
    """Lists stay lists (numpy arrays from Parquet included); a JSON list in a CSV cell is parsed."""
    if _is_null(v):
        return None
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, str) and v.strip().startswith("[") and v.strip().endswith("]"):
        try:
            parsed = json.loads(v)
        except json.JSONDecodeError:
            return [v]
        if isinstance(parsed, list):
            return parsed
    return [v]


def _turns(v: Any) -> Optional[list[Optional[str]]]:
    items = _as_list(v)
    if items is None:
        return None
    out: list[Optional[str]] = []
    for item in items:
        if _is_null(item):
            out.append(None)
        elif isinstance(item, bytes):
            out.append(item.decode("utf-8", "surrogateescape"))
        elif isinstance(item, (str, int, float)):
            out.append(str(item))
        else:
            raise ValueError(f"text value {item!r} is neither a string nor a list of strings")
    return out


def _utf8_path(ref: str) -> str:
    """``ref``, unless it holds bytes that are not UTF-8 (kept as surrogates while reading): then a ValueError,
    which makes the row unparsable (no file of the folder is named so that the table could say it)."""
    if _has_surrogates(ref):
        shown = ref.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        raise ValueError(f"image path {shown!r} is not valid UTF-8")
    return ref


def _image_refs(v: Any, row: int) -> list[ImageRef]:
    if _is_null(v) or (isinstance(v, str) and not v.strip()):
        return []
    if isinstance(v, dict) or isinstance(v, (bytes, bytearray)):
        items = [v]
    else:
        items = _as_list(v) or []
    refs = []
    for k, item in enumerate(items):
        if isinstance(item, (bytes, bytearray)):
            refs.append(ImageRef(ref=f"<embedded image {k} of row {row}>", data=bytes(item)))
        elif isinstance(item, dict):  # datasets Image feature / Parquet struct {"bytes", "path"}
            if item.get("bytes") is not None:
                name = item.get("path") or f"image {k}"
                refs.append(ImageRef(ref=f"<embedded {name} of row {row}>", data=bytes(item["bytes"])))
            elif item.get("path"):
                refs.append(ImageRef(ref=_utf8_path(str(item["path"]))))
            else:
                raise ValueError(f"image value {sorted(item)} has neither bytes nor path")
        elif isinstance(item, str) and item.strip():
            refs.append(ImageRef(ref=_utf8_path(item.strip())))
        elif not _is_null(item):
            raise ValueError(f"image value of type {type(item).__name__} is neither a path nor image bytes")
    return refs


def _read_jsonl_rows(path: Path) -> tuple[list, list[bool]]:
    """JSON Lines (or a JSON array when the file starts with ``[``), line by line so one bad line is one bad row."""
    raw = path.read_bytes()
    if raw.lstrip().startswith(b"["):
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if not _parses(raw.lstrip().split(b"\n", 1)[0]):  # else JSON Lines whose first row is an array: one bad row
                raise ValueError(f"{path}: not a valid JSON array ({e}); write one JSON object per line instead") from e
        else:
            rows = data if isinstance(data, list) else [data]
            return ([d if isinstance(d, dict) else f"row is {type(d).__name__}, not an object" for d in rows],
                    [True] * len(rows))
    records: list = []
    utf8: list[bool] = []
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text, ok = line.decode("utf-8"), True
        except UnicodeDecodeError:
            text, ok = line.decode("utf-8", "surrogateescape"), False
        try:
            obj = json.loads(text)
            records.append(obj if isinstance(obj, dict) else f"line {n} is a JSON {type(obj).__name__}, not an object")
        except json.JSONDecodeError as e:
            records.append(f"line {n} is not valid JSON: {e.msg} at column {e.colno}")
        utf8.append(ok)
    return records, utf8


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def _read_csv_rows(path: Path) -> tuple[list, list[bool]]:
    """CSV with a header row; undecodable bytes are kept (as surrogates) so only their row is flagged."""
    import csv

    text = path.read_bytes().decode("utf-8", "surrogateescape")
    try:
        records = [dict(r) for r in csv.DictReader(io.StringIO(text, newline=""))]
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable CSV file ({e}); check quoting and the header row") from e
    for r in records:
        r.pop(None, None)  # cells beyond the header
    utf8 = [not any(isinstance(v, str) and _has_surrogates(v) for v in r.values()) for r in records]
    return records, utf8


def _read_datasets_dir(path: Path) -> list[dict]:
    """A dataset written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (all splits, in order)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError for a plain folder, others for damaged files
        raise ValueError(
            f"{path}: is a folder but not a dataset saved with datasets' save_to_disk ({e}); point "
            f"data.annotations at a JSONL/CSV/Parquet file or at the saved dataset folder"
        ) from e
    parts = list(ds.values()) if isinstance(ds, datasets.DatasetDict) else [ds]
    records: list[dict] = []
    for part in parts:
        for name, feat in part.features.items():
            if isinstance(feat, datasets.Image):
                part = part.cast_column(name, datasets.Image(decode=False))
            elif isinstance(feat, (datasets.List, datasets.Sequence)) and isinstance(getattr(feat, "feature", None), datasets.Image):
                part = part.cast_column(name, datasets.List(datasets.Image(decode=False)))
        records.extend(part.to_list())
    return records
