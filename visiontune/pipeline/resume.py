"""Checkpoints a killed training resumes from: shared by the train and the align stage.

Both stages let the transformers Trainer write ``checkpoint-N`` folders every ``save_steps`` and, when run
again with the same settings, resume from the newest *complete* one (:func:`latest_checkpoint`), so a run
killed even by kill -9 continues where it stopped and ends where an uninterrupted run would.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Optional


def _complete(checkpoint: Path) -> bool:
    """Its trainer_state.json (the Trainer writes it last) is there and whole: a full disk can cut it short. With
    several processes each rank writes its RNG state beside it, maybe after rank 0 wrote trainer_state.json: one
    cut short there (kill -9 at that moment) makes the checkpoint incomplete too."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return all(zipfile.is_zipfile(p) for p in checkpoint.glob("rng_state*.pth"))  # torch.save writes zip files


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest *complete* ``checkpoint-N`` folder (one whose trainer_state.json was written), or None.

    A run killed while saving, or stopped by a full disk, leaves a partial folder; it is skipped, not resumed from.
    """
    if not output_dir.exists():
        return None
    done = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and _complete(p)]
    return max(done, key=lambda p: int(p.name.split("-")[-1])) if done else None


def resumable_checkpoint(output_dir: Path, old: dict, fingerprint: str) -> Optional[Path]:
    """The checkpoint a stage resumes from: the newest complete one in ``output_dir`` when ``old`` (the stage's
    record of its previous run there) is an unfinished run (``status: running``) with the same ``fingerprint``
    (:func:`visiontune.stages.fingerprint`: code, settings, inputs); else None, and any checkpoints there are
    stale."""
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None and old.get("status") == "running" and old.get("fingerprint") == fingerprint:
        return checkpoint
    return None
