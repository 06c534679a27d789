"""The tiny-model helper's size presets (visiontune.testing.TINY_SIZES)."""

from __future__ import annotations

import json

import pytest

from visiontune.testing import TINY_SIZES, build_tiny_model


def test_demo_size_widens_qwen3_vl_and_lowers_text_rope_theta(tmp_path):
    from transformers import AutoConfig

    out = build_tiny_model("qwen3_vl", tmp_path / "m", seed=1, size="demo")
    cfg = AutoConfig.from_pretrained(out)
    preset = TINY_SIZES["demo"]
    for key, value in preset["text"].items():
        assert getattr(cfg.text_config, key) == value, key
    for key, value in preset["vision"].items():
        assert getattr(cfg.vision_config, key) == value, key
    rope = cfg.text_config.rope_parameters
    assert rope["rope_theta"] == preset["text_rope_theta"] == 3.0
    assert rope["mrope_interleaved"] is True and rope["mrope_section"] == [2, 3, 3]  # the rest is kept
    assert json.loads((out / "visiontune_tiny.json").read_text()) == {"architecture": "qwen3_vl", "seed": 1, "size": "demo"}


def test_demo_size_model_runs_a_forward_pass(tmp_path):
    import torch
    from PIL import Image

    from visiontune.collator import VisionDataCollator
    from visiontune.models.fast_vision import FastVisionModel

    out = build_tiny_model("qwen3_vl", tmp_path / "m", size="demo")
    model, proc = FastVisionModel.from_pretrained(str(out), max_seq_length=256)
    sample = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (160, 32), "white")},
                                     {"type": "text", "text": "Transcribe the handwritten digits in this image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "307"}]}]}
    batch = VisionDataCollator(model, proc, max_seq_length=256, resize=32, resize_dimension=1)([sample])
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0


@pytest.mark.parametrize("arch,size,match", [("qwen3_vl", "huge", "unknown tiny model size"),
                                             ("gemma3", "demo", "defined for qwen")])
def test_bad_size_is_refused_with_the_choices(tmp_path, arch, size, match):
    with pytest.raises(ValueError, match=match):
        build_tiny_model(arch, tmp_path / "m", size=size)
