"""The demo's pretrained base: printed-page generator, the pretraining loop, its record, resume and MLflow log,
and the shipped weights' integrity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visiontune.config import PretrainConfig, load_params
from visiontune.data.printed import DIGITS, KINDS, KIND_P, available_fonts, printed_sample, uci_scan
from visiontune.images import ImageRule
from visiontune.pipeline.pretrain import RECORD, log_pretraining, pretrain, settings_of, verify_base

REPO = Path(__file__).resolve().parents[2]
RULE = ImageRule(resize=64, resize_dimension=1, snap_to_patch_size=True)


def test_printed_pages_are_deterministic_varied_and_drawn_from_bundled_fonts():
    fonts = available_fonts()
    assert len(fonts) >= 8 and all(set(DIGITS) <= f.charset for f in fonts)
    pages = [printed_sample(7, i) for i in range(40)]
    again = printed_sample(7, 3)
    assert again[1] == pages[3][1] and again[0].tobytes() == pages[3][0].tobytes()  # pure in (seed, index)
    assert printed_sample(8, 3)[1] != pages[3][1] or printed_sample(8, 3)[0].tobytes() != pages[3][0].tobytes()
    texts = [t for _, t in pages]
    assert all(t and t == t.strip() for t in texts)
    assert sum(t.isdigit() for t in texts) >= 15 and sum(any(c.isalpha() for c in t) for t in texts) >= 5
    assert {im.mode for im, _ in pages} == {"RGB", "L"}
    assert all(40 <= im.height <= 120 for im, _ in pages)


def test_scan_glyphs_are_stored_like_the_digit_datasets_scans_and_stay_print():
    """Printed digits as 8x8 block counts of a 32x32 bitmap (0-16, like scikit-learn's digits): a glyph fills its
    box, carries a pen's worth of ink, and differs between faces; scan lines are digit strings."""
    import numpy as np
    from sklearn.datasets import load_digits

    fonts = available_fonts()
    rng = np.random.default_rng(0)
    scans = np.stack([uci_scan(str(i % 10), fonts[i % len(fonts)], rng) for i in range(200)])
    assert scans.shape == (200, 8, 8) and scans.min() >= 0 and scans.max() <= 16
    assert np.allclose(scans, scans.round())  # counts of set pixels
    ink = scans.mean(axis=(1, 2)) / 16
    real = load_digits().images.mean(axis=(1, 2)) / 16
    assert ink.min() > 0.05 and abs(ink.mean() - real.mean()) < 0.1  # like a pen's stroke, not a hairline
    rows, cols = (scans > 0).any(axis=2), (scans > 0).any(axis=1)
    assert (rows[:, 0] | rows[:, -1] | cols[:, 0] | cols[:, -1]).mean() > 0.9  # scaled to fill the 32x32 box
    assert not np.array_equal(uci_scan("3", fonts[0], rng), uci_scan("3", fonts[-1], rng))
    assert KIND_P[KINDS.index("scan")] > 0
    scan_pages = [printed_sample(11, i) for i in range(60)]
    assert sum(t.isdigit() for _, t in scan_pages) >= 30


def _cfg(tmp_path: Path, **kw) -> PretrainConfig:
    values = dict(output_dir=str(tmp_path / "base"), architecture="qwen3_vl", size="test", steps=4, batch_size=3,
                  warmup_steps=1, eval_every=2, eval_samples=3, num_workers=2, device="cpu")
    values.update(kw)
    return PretrainConfig(**values)


def test_pretrain_writes_a_verified_base_and_an_interrupted_run_continues(tmp_path):
    import transformers

    p = _cfg(tmp_path)
    rec = pretrain(p, RULE, progress=False)
    out = Path(p.output_dir)
    assert rec["complete"] and rec["completed_steps"] == 4 and [e["step"] for e in rec["evals"]] == [2, 4]
    assert rec["settings"] == settings_of(p, RULE) and rec["loss"][0][0] == 0 and rec["loss"][-1][0] == 3
    assert not (out / "visiontune_tiny.json").exists() and (out / "pretrain_curve.png").stat().st_size > 5000
    assert verify_base(out)["files"] == rec["files"] and "model.safetensors" in rec["files"]
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)  # plain transformers loads it
    assert model.config.model_type == "qwen3_vl"

    # Tampering is caught, naming the file.
    (out / "config.json").write_text((out / "config.json").read_text() + " ")
    with pytest.raises(ValueError, match=r"config\.json: sha256 .* differs"):
        verify_base(out)

    # An interrupted run (its .partial folder) continues from its step with the same page stream.
    p2 = _cfg(tmp_path, output_dir=str(tmp_path / "cont"), steps=6, init_from=str(out), start_step=4)
    rec2 = pretrain(p2, RULE, progress=False)
    assert [(h["from_step"], h["to_step"]) for h in rec2["history"]] == [(0, 4), (4, 6)]
    assert [e["step"] for e in rec2["evals"]] == [2, 4, 6] and rec2["loss"][-1][0] == 5

    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        pretrain(_cfg(tmp_path, output_dir=str(tmp_path / "x"), init_from=str(tmp_path)), RULE, progress=False)


def test_pretraining_record_is_logged_to_mlflow_once(tmp_path):
    import mlflow

    p = _cfg(tmp_path, steps=2, eval_every=2)
    rec = pretrain(p, RULE, progress=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = log_pretraining(rec, p.output_dir, uri, "vt-pretrain")
    assert log_pretraining(rec, p.output_dir, uri, "vt-pretrain") == run_id  # idempotent
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(run_id, "pretrain_loss")
    assert [m.step for m in history] == [int(s) for s, _ in rec["loss"]]
    assert client.get_run(run_id).data.params["pretrain.steps"] == "2"
    assert {a.path for a in client.list_artifacts(run_id, "pretrain")} == {"pretrain/pretrain.json",
                                                                          "pretrain/pretrain_curve.png"}


def test_the_shipped_base_matches_its_record_and_params_yaml():
    """The committed weights are the ones pretrain.json lists, and params.yaml's pretrain settings are the ones
    they were trained with (so `visiontune pretrain` verifies instead of retraining)."""
    cfg = load_params(REPO / "params.yaml")
    base = REPO / cfg.pretrain.output_dir
    record = verify_base(base)
    assert record["settings"] == settings_of(cfg.pretrain, ImageRule.of(cfg.images))
    assert cfg.model.name_or_path == cfg.pretrain.output_dir  # the demo fine-tunes it
    assert (base / "model.safetensors").stat().st_size < 20 * 2**20
    assert record["history"] and record["completed_steps"] == cfg.pretrain.steps
    json.loads((base / RECORD).read_text())
