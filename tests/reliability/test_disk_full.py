"""The disk fills up while normalizing or checkpointing: a clear one-line error, no half-written file where
a good one was, and the next run (with room again) succeeds.

The full disk is a file-size limit (RLIMIT_FSIZE) on a real ``visiontune`` process (tests/reliability/
faults.py): any write past the limit fails (EFBIG), as on a full disk, and it works without root. The
limits are chosen from the sizes of the files the stage writes, so exactly the intended write fails.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from faults import crash_at, file_size_limit, run_cli, solid_colour_raw, tiny_train_settings
from visiontune.config import from_dict
from visiontune.data.normalize import normalize_stage
from visiontune.data.validate import validate_stage
from visiontune.pipeline import train as train_mod

N_IMAGES = 150  # small images (~2.3 KB normalized) and a large manifest (~50 KB): either can be the write that fails


def _cli_errors(stderr: str, command: str) -> list[str]:
    """The CLI's one-line error messages (a progress bar may precede one on its line: tqdm ends with a CR)."""
    tag = f"visiontune {command}:"
    return [line[line.index(tag):] for line in stderr.splitlines() if tag in line]


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def validated(tmp_path_factory) -> tuple[Path, Path]:
    """(raw folder, validated work folder) of N_IMAGES solid-colour images; copy the work folder before use."""
    root = tmp_path_factory.mktemp("disk-full")
    raw = solid_colour_raw(root / "raw", N_IMAGES)
    validate_stage(from_dict({"data": {"raw_dir": str(raw), "work_dir": str(root / "work")}}))
    return raw, root / "work"


def _normalize_settings(raw: Path, work: Path, min_px: int) -> dict:
    return {"data": {"raw_dir": str(raw), "work_dir": str(work)}, "normalize": {"min_px": min_px}}


@pytest.mark.parametrize("limit, fails_on", [(1024, "an image"), (8192, "the manifest")],
                         ids=["while-writing-images", "while-replacing-the-manifest"])
def test_a_full_disk_while_normalizing(validated, tmp_path, limit, fails_on):
    """A first normalize (min_px 300) succeeds; a second one with other settings (min_px 320) runs out of
    room on ``fails_on``. The first one's manifest and every image it names stay as they were (before the fix
    the images were deleted before the manifest was replaced: a good manifest naming 150 missing files), no
    temporary file is left, the error is one line that names the file; with room again the run succeeds."""
    raw, validated_work = validated
    work = tmp_path / "work"
    shutil.copytree(validated_work, work)
    normalize_stage(from_dict(_normalize_settings(raw, work, 300)))
    before = _snapshot(work / "normalized")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_normalize_settings(raw, work, 320)))

    proc = run_cli(["normalize", "--params", str(params)], tmp_path, limit=limit)
    errors = _cli_errors(proc.stderr, "normalize")
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "could not write" in errors[0] and "free some space" in errors[0]
    assert ("manifest.json" in errors[0]) == (fails_on == "the manifest"), errors[0]
    after = _snapshot(work / "normalized")
    assert {name: after.get(name) for name in before} == before  # the old manifest and all its images, unchanged
    assert not [p for p in work.rglob("*") if ".tmp" in p.name], "a temporary file was left behind"
    for name in after.keys() - before.keys():  # images of the new settings written before the failure: whole
        with Image.open(work / "normalized" / name) as im:
            im.load()

    result = normalize_stage(from_dict(_normalize_settings(raw, work, 320)))  # room again
    manifest = json.loads((work / "normalized" / "manifest.json").read_text())
    assert manifest["settings"]["min_px"] == 320 and result["images"] == N_IMAGES
    named = {Path(e["path"]).resolve() for e in manifest["images"].values()}
    on_disk = {p.resolve() for p in (work / "normalized" / "images").rglob("*") if p.is_file()}
    assert named == on_disk  # every image the manifest names is there, and nothing else is


def test_a_folder_replaced_atomically_survives_a_full_disk(tmp_path):
    """:func:`visiontune.data.io.atomic_dir` (the train stage writes its adapter through it): a write that
    runs out of room inside the body leaves the old folder whole and no staging folder."""
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"good" * 1000)
    script = ("import sys; from visiontune.data.io import atomic_dir\n"
              "with atomic_dir(sys.argv[1]) as d:\n    (d / 'weights.bin').write_bytes(b'new' * 100_000)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=120,
                          preexec_fn=file_size_limit(64 * 1024))
    assert proc.returncode == 1 and "File too large" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert (target / "weights.bin").read_bytes() == b"good" * 1000


def test_a_checkpoint_cut_short_by_a_full_disk_is_not_resumed_from(tmp_path):
    """A full disk can cut trainer_state.json (the file that marks a checkpoint complete) short; before the
    fix that checkpoint was taken as complete and every later run failed reading it."""
    for step, state in ((2, '{"global_step": 2, "num_input_tokens_seen": 10}'), (4, '{"global_step": 4, "num_inp')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert train_mod.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_keeps_the_good_checkpoint(tmp_path, small_dataset, tiny_model_dir,
                                                                   monkeypatch):
    """A training crashes after checkpoint-2; the next one resumes from it and runs out of room writing
    checkpoint-4 (its optimizer state is the largest file): one clear line, checkpoint-2 untouched and still
    the one to resume from, no adapter. With room again, the third run resumes from checkpoint-2 and finishes
    the same MLflow run."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    settings = tiny_train_settings(tmp_path, small_dataset, tiny_model_dir("qwen2_5_vl"))
    settings["lora"]["r"] = 128  # optimizer state ~3 MB, adapter ~1.5 MB, database ~1 MB: room for all but the first

    real_callbacks = train_mod._make_callbacks
    monkeypatch.setattr(train_mod, "_make_callbacks", lambda *a: real_callbacks(*a) + [crash_at(3)])
    with pytest.raises(RuntimeError, match="crash at step 3"):
        train_mod.train_stage(from_dict(settings))
    monkeypatch.setattr(train_mod, "_make_callbacks", real_callbacks)
    out = Path(settings["train"]["output_dir"])
    good = _snapshot(out / "checkpoint-2")
    sizes = {name: (out / "checkpoint-2" / name).stat().st_size
             for name in ("adapter_model.safetensors", "optimizer.pt")}
    limit = max(sizes["adapter_model.safetensors"], (tmp_path / "mlflow.db").stat().st_size) + 256 * 1024
    assert limit < sizes["optimizer.pt"], (limit, sizes)

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(settings))
    proc = run_cli(["train", "--params", str(params)], tmp_path, limit=limit)
    errors = _cli_errors(proc.stderr, "train")
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "could not write under" in errors[0] and "resumes from the newest complete checkpoint" in errors[0]
    assert _snapshot(out / "checkpoint-2") == good and train_mod.latest_checkpoint(out) == out / "checkpoint-2"
    assert (out / "checkpoint-4").is_dir() and not (out / "adapter").exists()  # the partial one, skipped

    record = train_mod.train_stage(from_dict(settings))
    assert record["resumed_from"] == str(out / "checkpoint-2") and record["global_step"] == 4
    client = mlflow.MlflowClient(tracking_uri=settings["tracking"]["uri"])
    runs = client.search_runs([record["experiment_id"]])
    assert [r.info.run_id for r in runs] == [record["mlflow_run_id"]] and runs[0].info.status == "FINISHED"
