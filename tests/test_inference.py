"""Inference: conversations -> prompts, the adapter helpers, and batched greedy generation on every architecture."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from visiontune.images import ImageRule
from visiontune.inference import chat_parts, generate_answers, require_adapter, split_conversation
from visiontune.testing import ARCHITECTURES

INSTRUCTIONS = ["Read.", "Transcribe the handwritten digits in this image.", "What number is shown here, exactly?"]
ANSWERS = ["12", "345", "6789", "0", "42"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[dict]:
    """Five conversations as they come back from Arrow (None keys, image paths): prompts of different
    lengths and images of different sizes, so batches need padding."""
    import datasets

    root = tmp_path_factory.mktemp("inference-images")
    rng = np.random.RandomState(0)
    rows = []
    for i, answer in enumerate(ANSWERS):
        path = root / f"img{i}.png"
        Image.fromarray((rng.rand(40 + 8 * i, 56, 3) * 255).astype("uint8")).save(path)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": str(path)},
                                         {"type": "text", "text": INSTRUCTIONS[i % len(INSTRUCTIONS)]}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]})
    return list(datasets.Dataset.from_list(rows))


def test_split_conversation():
    conv = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "q1", "image": None}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a1", "image": None}]},
        {"role": "user", "content": [{"type": "text", "text": "q2", "image": None}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a2", "image": None}]},
    ]}
    prompt, ref = split_conversation(conv["messages"])
    assert ref == "a2" and len(prompt) == 3  # multi-turn: earlier turns stay in the prompt
    assert split_conversation(conv["messages"][:1]) == (conv["messages"][:1], None)


def test_chat_parts_drops_arrow_keys_and_collects_images_in_order(samples):
    clean, values = chat_parts(samples[1]["messages"])
    assert clean == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTIONS[1]}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "345"}]}]
    assert values == [samples[1]["messages"][0]["content"][0]["image"]]
    assert chat_parts([{"role": "user", "content": "plain text"}]) == ([{"role": "user", "content": "plain text"}], [])


def test_require_adapter_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json missing.*re-run training"):
        require_adapter(tmp_path, "re-run training")
    with pytest.raises(FileNotFoundError, match="no PEFT adapter in None"):
        require_adapter(None, "log it")
    (tmp_path / "adapter_config.json").write_text("{}")
    assert require_adapter(str(tmp_path), "unused") == tmp_path


def test_batched_generation_matches_one_by_one(samples, tiny_model_dir):
    """Left padding done right: a sample's greedy answer does not depend on its batch neighbours."""
    from visiontune.models.fast_vision import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing=False,
                                                       use_fused_kernels=False)
    kw = dict(max_new_tokens=4, rule=ImageRule(resize="min", snap_to_patch_size=True), progress=False)
    batched = generate_answers(model, processor, samples, batch_size=5, **kw)
    single = generate_answers(model, processor, samples, batch_size=1, **kw)
    assert batched == single
    assert len(batched) == len(samples) and all(isinstance(a, str) for a in batched)
    assert processor.tokenizer.padding_side == "right"  # restored for training
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate_answers(model, processor, samples, max_new_tokens=0, batch_size=1, rule=ImageRule())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_on_every_architecture(tiny_model_dir, arch):
    """Every supported architecture's processor/chat template goes through the same generation path, and
    batching (left padding, different prompt and image sizes) does not change the greedy answers."""
    from visiontune.models.fast_vision import FastVisionModel

    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(40 + 8 * i, 56, 3) * 255).astype("uint8")) for i in range(3)]
    samples = [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": images[i]}, {"type": "text", "text": "Read" + " it" * i}]},
        {"role": "assistant", "content": [{"type": "text", "text": "1"}]},
    ]} for i in range(3)]
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir(arch), use_gradient_checkpointing=False,
                                                       use_fused_kernels=False)
    kw = dict(max_new_tokens=3, rule=ImageRule(resize="min", snap_to_patch_size=True), progress=False)
    batched = generate_answers(model, processor, samples, batch_size=3, **kw)
    assert batched == generate_answers(model, processor, samples, batch_size=1, **kw)
    assert len(batched) == 3 and all(isinstance(a, str) for a in batched)
