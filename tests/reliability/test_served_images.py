"""The served model reads no file it was not told to, says nothing about which files exist, and refuses
decompression bombs before decoding them.

The model is the real pyfunc (``VisionLoraModel.load_context`` + ``predict``) on a tiny base model and a
LoRA adapter, as MLflow runs it behind ``mlflow models serve``.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image, ImageFile

from bombs import png_bomb
from visiontune.images import REFUSED_IMAGE, ImageRefusedError, ImageTooLargeError
from visiontune.pipeline.pyfunc import VisionLoraModel


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """``served(**model_config)`` -> a loaded VisionLoraModel (base model + a saved LoRA adapter)."""
    from visiontune.models.fast_vision import FastVisionModel

    base = tiny_model_dir("qwen2_5_vl")
    adapter = tmp_path_factory.mktemp("served") / "adapter"
    model, processor = FastVisionModel.from_pretrained(base, use_gradient_checkpointing=False, use_fused_kernels=False)
    FastVisionModel.get_peft_model(model, r=2, lora_alpha=4, finetune_vision_layers=False).save_pretrained(adapter)
    processor.save_pretrained(adapter)

    def make(**model_config) -> VisionLoraModel:
        served_model = VisionLoraModel()
        served_model.load_context(SimpleNamespace(
            model_config={"max_new_tokens": 2, "batch_size": 2, "resize": [56, 56], **model_config},
            artifacts={"base_model": base, "adapter": str(adapter)}))
        return served_model

    return make


def _answer(model: VisionLoraModel, image) -> str:
    return model.predict(None, [{"image": image, "prompt": "Read."}])[0]


def _refusal(model: VisionLoraModel, image) -> str:
    with pytest.raises(ImageRefusedError) as e:
        _answer(model, image)
    return str(e.value)


def test_by_default_only_image_bytes_are_served_and_no_path_is_read(served, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png((200, 10, 10)))
    model = served()
    refusals = {value if isinstance(value, str) else repr(value): _refusal(model, value) for value in (
        str(secret), str(tmp_path / "missing.png"), "/etc/passwd", "/etc/no-such-file", "../../etc/passwd",
        {"bytes": None, "path": str(secret)}, secret, "not base64 at all!")}
    # One message whatever the reason: an existing and a missing file cannot be told apart.
    assert set(refusals.values()) == {REFUSED_IMAGE}, refusals
    assert str(secret) not in REFUSED_IMAGE and "exist" not in REFUSED_IMAGE
    data = secret.read_bytes()
    assert _answer(model, _b64(data)) == _answer(model, data)  # base64 text and raw bytes: the same input
    assert model.predict(None, [{"image": None, "prompt": "Hi."}])  # a text-only row needs no image


def test_paths_are_read_only_under_the_configured_image_root(served, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside.png"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(_png((10, 200, 10)))
    (root / "notes.txt").write_text("not an image")
    outside.write_bytes(_png((10, 10, 200)))
    (root / "link.png").symlink_to(outside)  # a link inside the root that points out of it
    model = served(image_root=str(root))

    expected = _answer(model, _b64((root / "sub" / "a.png").read_bytes()))
    assert _answer(model, str(root / "sub" / "a.png")) == expected
    assert _answer(model, "sub/a.png") == expected  # relative to the root
    refused = [str(outside), str(root / "sub" / ".." / ".." / "outside.png"), "../outside.png", str(root / "link.png"),
               str(root / "missing.png"), str(root / "sub"), str(root / "notes.txt"), {"path": str(outside)}]
    assert {_refusal(model, v) for v in refused} == {REFUSED_IMAGE}


def test_a_bomb_sent_to_the_served_model_is_refused_before_decoding(served, tmp_path, monkeypatch):
    """10000 x 10000 RGBA: 0.4 MB sent, 400 MB (then 2.3 GB of peak RSS) if decoded; PIL's own guard only warns."""
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy_load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    bomb = png_bomb(10000, 10000, "RGBA")
    (tmp_path / "bomb.png").write_bytes(bomb)
    model = served(image_root=str(tmp_path))
    for value in (_b64(bomb), bomb, "bomb.png"):
        with pytest.raises(ImageTooLargeError, match="10000x10000 = 100,000,000 pixels.*refused before decoding"):
            _answer(model, value)
    assert (10000, 10000) not in decoded
    assert _answer(model, _png((1, 2, 3))) is not None and decoded  # the spy does see a real decode
    small = served(image_root=str(tmp_path), max_pixels=1000)  # register.max_pixels reaches the served model
    with pytest.raises(ImageTooLargeError, match="40x32 = 1,280 pixels, over the limit of 1,000"):
        _answer(small, _png((1, 2, 3)))
