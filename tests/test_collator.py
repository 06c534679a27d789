"""VisionDataCollator: same tensors as the model's own processor, exact labels, images, budget."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune import FastVisionModel, VisionDataCollator
from visiontune.collator import SampleTooLongError
from visiontune.images import load_image
from visiontune.testing import ARCHITECTURES


def _img(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))


def _multi(seed: int = 0) -> dict:
    """Two images, two user turns, two assistant answers."""
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": _img(90, 60, seed)},
                                     {"type": "image", "image": _img(60, 90, seed + 1)},
                                     {"type": "text", "text": "Compare the two."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "left 12"}]},
        {"role": "user", "content": [{"type": "text", "text": "And the second?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "right 7"}]},
    ]}


def _single(seed: int = 5, answer: str = "305") -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": _img(100, 40, seed)}, {"type": "text", "text": "Read."}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def loaded(request, tiny_model_dir):
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir(request.param), use_gradient_checkpointing=False)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8)
    return request.param, model, processor


def _answers_from_labels(batch, tok, row) -> str:
    return tok.decode([t for t in batch["labels"][row].tolist() if t != -100])


def _text_only(answer: str = "hi") -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Say hello to the whole world, please."}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}


def _processor_batch(processor, samples: list[dict]):
    """The model's own processor on ``samples`` (images unresized, right padding): the reference."""
    texts = [processor.apply_chat_template([
        {"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})}
                                         for p in m["content"]]} for m in s["messages"]], tokenize=False)
        for s in samples]
    images = [[p["image"] for m in s["messages"] for p in m["content"] if p["type"] == "image"] for s in samples]
    processor.tokenizer.padding_side = "right"
    return processor(text=texts, images=images if any(images) else None, return_tensors="pt", padding=True)


def test_matches_processor_output(loaded):
    arch, model, processor = loaded
    collator = VisionDataCollator(model, processor, resize=None)
    samples = [_multi(), _single()]
    batch = collator(samples)
    ref = _processor_batch(processor, samples)
    for key in ref:
        assert torch.equal(batch[key], ref[key]), f"{arch}: {key} differs from the processor's own output"


def test_labels_are_exactly_the_assistant_answers(loaded):
    arch, model, processor = loaded
    collator = VisionDataCollator(model, processor, resize="min", snap_to_patch_size=True)
    batch = collator([_multi(), _single()])
    tok = processor.tokenizer
    eot = {"qwen2_vl": "<|im_end|>\n", "qwen2_5_vl": "<|im_end|>\n", "qwen3_vl": "<|im_end|>\n",
           "mllama": "<|eot_id|>", "gemma3": "<end_of_turn>\n", "mistral3": "</s>"}[arch]
    assert _answers_from_labels(batch, tok, 0) == f"left 12{eot}right 7{eot}"
    assert _answers_from_labels(batch, tok, 1) == f"305{eot}"
    # padding and image tokens are never targets
    labels, att = batch["labels"], batch["attention_mask"]
    assert (labels[att == 0] == -100).all()
    for tid in collator.image_token_ids:
        assert not (labels == tid).any()


def test_train_on_responses_only_auto_and_explicit(loaded):
    arch, model, processor = loaded
    auto = VisionDataCollator(model, processor, train_on_responses_only=True, completion_only_loss=False)
    instr, resp = auto.detect_parts()
    explicit = VisionDataCollator(model, processor, instruction_part=instr, response_part=resp, completion_only_loss=False)
    a, b = auto([_multi(), _single()]), explicit([_multi(), _single()])
    assert torch.equal(a["labels"], b["labels"])
    text = _answers_from_labels(a, processor.tokenizer, 0)
    assert "left 12" in text and "right 7" in text and "Compare" not in text and "second" not in text
    nothing = VisionDataCollator(model, processor, completion_only_loss=False)
    everything = nothing([_single()])
    # without masking, prompt text is a target too (only padding and image tokens are masked)
    assert "Read" in _answers_from_labels(everything, processor.tokenizer, 0)


def test_loss_backpropagates_into_lora(loaded):
    arch, model, processor = loaded
    collator = VisionDataCollator(model, processor, resize="min", snap_to_patch_size=True)
    model.train()
    model.zero_grad()
    loss = model(**collator([_multi(), _single()])).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert torch.isfinite(loss)


def test_mixed_batches_of_text_and_image_rows(loaded):
    """Text-only rows beside image rows, first and last. Where the processor encodes such a batch, the
    collator's batch is the processor's; Mllama's cannot (ArchSpec.mixed_batch), so there the image rows'
    inputs are the processor's batch of those rows. Either way every row's logits equal those of a batch of
    its own kind (cross-attention gates opened, so a text row that saw the empty image would differ), its
    labels are its answers, and the loss is finite and reaches the LoRA weights."""
    arch, model, processor = loaded
    collator = VisionDataCollator(model, processor, resize=None)
    samples = [_text_only(), _multi(), _single(), _text_only("bye")]
    batch = collator(samples)
    if collator.spec.mixed_batch is None:
        ref = _processor_batch(processor, samples)
        assert set(ref) <= set(batch)
        for key in ref:
            assert torch.equal(batch[key], ref[key]), f"{arch}: {key} differs from the processor's own output"
    else:
        ref = _processor_batch(processor, samples[1:3])
        for key in ref:  # rows 1-2, cut to the image rows' own (shorter) sequence length
            ours = batch[key][1:3][tuple(slice(0, d) for d in ref[key].shape)]
            assert torch.equal(ours, ref[key]), f"{arch}: {key} of the image rows differs from the processor's"
    gates = [p for n, p in model.named_parameters() if n.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate"))]
    saved = [g.detach().clone() for g in gates]
    model.eval()
    try:
        with torch.no_grad():
            for g in gates:
                g.fill_(0.7)
            logits = model(**batch).logits
            images_alone = model(**collator(samples[1:3])).logits
            text_alone = model(**collator([samples[0], samples[3]])).logits
    finally:
        with torch.no_grad():
            for g, old in zip(gates, saved):
                g.copy_(old)
        model.train()
    for row, (ref_logits, ref_row) in enumerate([(text_alone, 0), (images_alone, 0), (images_alone, 1), (text_alone, 1)]):
        n = int(batch["attention_mask"][row].sum())
        torch.testing.assert_close(logits[row, :n], ref_logits[ref_row, :n], atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"{arch}: row {row} of the mixed batch differs from its own kind: {m}")
    eot = _answers_from_labels(collator([_text_only("")]), processor.tokenizer, 0)
    assert _answers_from_labels(batch, processor.tokenizer, 0) == f"hi{eot}"
    assert _answers_from_labels(batch, processor.tokenizer, 3) == f"bye{eot}"
    assert _answers_from_labels(batch, processor.tokenizer, 2) == f"305{eot}"
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_images_from_paths_bytes_and_arrow_dicts(tmp_path, tiny_model_dir):
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    img = _img(70, 50, 3)
    path = tmp_path / "a.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    collator = VisionDataCollator(model, processor, resize=None)
    variants = [img, str(path), buf.getvalue(), {"bytes": buf.getvalue(), "path": None}, {"bytes": None, "path": str(path)}]
    batches = [collator([{"messages": [{"role": "user", "content": [{"type": "image", "image": v, "text": None},
                                                                     {"type": "text", "text": "x", "image": None}]},
                                        {"role": "assistant", "content": [{"type": "text", "text": "1"}]}]}])
               for v in variants]
    for b in batches[1:]:
        assert torch.equal(b["pixel_values"], batches[0]["pixel_values"])
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(str(tmp_path / "nope.png"))


def test_resize_and_snap_reach_the_processor(tiny_model_dir):
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    collator = VisionDataCollator(model, processor, resize=(112, 56), snap_to_patch_size=True)
    batch = collator([_single()])
    # Qwen grid (t, h, w) in 14-px patches: 56/14 = 4 rows, 112/14 = 8 columns
    assert batch["image_grid_thw"].tolist() == [[1, 4, 8]]


def test_token_budget_truncates_text_and_drops_image_overflow(tiny_model_dir):
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    long_answer = " ".join(["12345"] * 60)
    full = VisionDataCollator(model, processor, resize=(56, 56))([_single(answer=long_answer)])
    n_full = int(full["attention_mask"].sum())
    limit = n_full - 10
    collator = VisionDataCollator(model, processor, resize=(56, 56), max_seq_length=limit)
    cut = collator([_single(answer=long_answer)])
    assert cut["input_ids"].shape[1] == limit and collator.truncated == 1
    # the image survives truncation intact
    assert torch.equal(cut["pixel_values"], full["pixel_values"])
    tiny_budget = VisionDataCollator(model, processor, resize=(224, 224), max_seq_length=20)
    with pytest.warns(UserWarning, match="dropped a sample"):
        out = tiny_budget([_single(), {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                                     {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]}])
    assert out["input_ids"].shape[0] == 1 and tiny_budget.dropped == 1
    with pytest.raises(SampleTooLongError, match="max_seq_length=20"):
        with pytest.warns(UserWarning):
            tiny_budget([_single()])


def test_pad_to_multiple_of(tiny_model_dir):
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    batch = VisionDataCollator(model, processor, pad_to_multiple_of=64)([_single(), _multi()])
    assert batch["input_ids"].shape[1] % 64 == 0


def test_bad_sample_error_is_clear(tiny_model_dir):
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    with pytest.raises(ValueError, match="to_conversation"):
        VisionDataCollator(model, processor)([{"image": "x.png", "text": "3"}])


# ------------------------------------------------------------------------------------- padding-free packing

@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mistral3"])
def test_padding_free_gives_the_padded_loss_and_gradients(arch, tiny_model_dir):
    """One packed row (no pads) trains exactly like the padded batch: same loss, same LoRA gradients."""
    from visiontune.kernels import patch_model

    model, processor = FastVisionModel.from_pretrained(tiny_model_dir(arch), use_gradient_checkpointing=False)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, random_state=7)
    patch_model(model, enabled=True)  # CPU: the engine's varlen attention keeps packed samples apart
    FastVisionModel.for_training(model)
    samples = [_single(1, "4071"), _multi(2), _single(3, "9")]  # different lengths, 1 and 2 images
    padded = VisionDataCollator(model, processor, resize=None)(samples)
    packed = VisionDataCollator(model, processor, resize=None, padding_free=True)(samples)

    lengths = padded["attention_mask"].sum(1)
    assert packed["input_ids"].shape == (1, int(lengths.sum()))
    assert "attention_mask" not in packed
    assert packed["cu_seq_lens_q"].tolist() == [0, *lengths.cumsum(0).tolist()]
    keep = padded["attention_mask"].bool()
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][keep])  # the real tokens, pads gone
    # Same supervised tokens: the packed labels are the padded labels without the pads.
    assert torch.equal(packed["labels"][0], padded["labels"][keep])

    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    loss_p = model(**padded).loss
    grads_p = torch.autograd.grad(loss_p, lora)
    loss_k = model(**packed).loss
    grads_k = torch.autograd.grad(loss_k, lora)
    dtype, atol, rtol = torch.float32, 1e-5, 1e-4
    assert loss_k.dtype == dtype
    torch.testing.assert_close(loss_k, loss_p, atol=atol, rtol=rtol)
    for gk, gp in zip(grads_k, grads_p):
        torch.testing.assert_close(gk, gp, atol=atol, rtol=rtol)


def test_padding_free_refuses_what_would_mix_samples(tiny_model_dir):
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing=False)
    with pytest.raises(ValueError, match="flash_attention_2"):  # stock SDPA on the CPU: samples would mix
        VisionDataCollator(model, processor, padding_free=True)
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("mllama"), use_gradient_checkpointing=False)
    with pytest.raises(ValueError, match="not supported for model_type 'mllama'"):
        VisionDataCollator(model, processor, padding_free=True)


def test_padding_free_keeps_samples_apart_with_a_cache_or_refuses_a_4bit_base(tiny_model_dir):
    """Two ways the engine's packed attention fell back to transformers' (samples of the packed row then attend
    to each other, silently): a KV cache (use_cache stays on without checkpointing and for_training, e.g. an
    eval-mode forward), fixed by the packed batch's use_cache=False; and 4-bit base layers, refused."""
    from visiontune.kernels import patch_model

    pytest.importorskip("bitsandbytes")
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing=False)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, random_state=7)
    patch_model(model, enabled=True)
    model.eval()
    samples = [_single(1, "4071"), _multi(2)]
    with torch.no_grad():
        padded = model(**VisionDataCollator(model, processor, resize=None)(samples)).loss
        packed = model(**VisionDataCollator(model, processor, resize=None, padding_free=True)(samples)).loss
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-4)
    four_bit, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), load_in_4bit=True)
    patch_model(four_bit, enabled=True)
    with pytest.raises(ValueError, match="quantized base .* load_in_4bit"):
        VisionDataCollator(four_bit, processor, padding_free=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_padding_free_on_the_gpu_engine(arch, tiny_model_dir):
    """The default GPU path (bf16, Triton kernels, flash varlen attention) trains a packed row like the
    padded batch. bf16 at width 64: loss rtol 2e-2, gradients ||diff|| / ||ref|| < 5e-2."""
    from visiontune.models.state import vision_state

    model, processor = FastVisionModel.from_pretrained(tiny_model_dir(arch), use_gradient_checkpointing=False)
    assert next(model.parameters()).is_cuda and vision_state(model).kernel_handle is not None
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, random_state=7)
    FastVisionModel.for_training(model)
    samples = [_single(1, "4071"), _multi(2), _single(3, "9")]
    dev = torch.device("cuda")

    def to_dev(batch):
        return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}

    padded = to_dev(VisionDataCollator(model, processor, resize=None)(samples))
    packed = to_dev(VisionDataCollator(model, processor, resize=None, padding_free=True)(samples))
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    loss_p = model(**padded).loss
    grads_p = torch.autograd.grad(loss_p, lora)
    loss_k = model(**packed).loss
    grads_k = torch.autograd.grad(loss_k, lora)
    torch.testing.assert_close(loss_k.float(), loss_p.float(), atol=0, rtol=2e-2)
    for gk, gp in zip(grads_k, grads_p):
        assert torch.isfinite(gk).all()
        assert (gk.float() - gp.float()).norm() <= 5e-2 * gp.float().norm() + 1e-6


# ------------------------------------------------------------------------------------- vision metadata

@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mllama"])
def test_vision_metadata_comes_with_the_batch(arch, tiny_model_dir, monkeypatch):
    """Qwen-VL towers get their attention metadata from the collator (computed on the CPU batch): the tower
    uses the batch's own tensors instead of reading the grid back from the GPU, and the logits are the same
    bit for bit, padded and packed. Towers with nothing to take get no extra keys."""
    import sys

    model, processor = FastVisionModel.from_pretrained(tiny_model_dir(arch), use_gradient_checkpointing=False)
    examples = [_single(1, "4071"), _multi(2), _single(3, "9")]
    batch = VisionDataCollator(model, processor, resize=None)(examples)
    keys = [k for k in batch if k.startswith("image_") and k != "image_grid_thw"]
    if not arch.startswith("qwen"):
        assert keys == []
        return
    expected = {"image_position_ids", "image_cu_seqlens", "image_max_seqlen"}
    expected |= {"qwen2_5_vl": {"image_window_index", "image_cu_window_seqlens", "image_max_window_seqlen"},
                 "qwen3_vl": {"image_interp_indices", "image_interp_weights"}}.get(arch, set())
    assert set(keys) == expected
    cu = batch["image_cu_seqlens"]
    assert batch["image_max_seqlen"] == int((cu[1:] - cu[:-1]).max()) and isinstance(batch["image_max_seqlen"], int)

    module = sys.modules[type(model.model.visual).__module__]
    returned: list = []
    for name in [n for n in dir(module) if n.startswith("get_vision_")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, **k: returned.append(_real(*a, **k)) or returned[-1])
    without = {k: v for k, v in batch.items() if k not in keys}
    with torch.no_grad():
        want = model(**without).logits
        computed = [t for r in returned for t in (r if isinstance(r, tuple) else (r,)) if torch.is_tensor(t)]
        returned.clear()
        got = model(**batch).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    used = [t for r in returned for t in (r if isinstance(r, tuple) else (r,)) if torch.is_tensor(t)]
    given = [batch[k] for k in keys if torch.is_tensor(batch[k])]
    assert len(used) == len(given) and all(any(u is g for g in given) for u in used)
    for mine, theirs in zip(used, computed):  # the same values the tower computes for itself
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)

    from visiontune.kernels import patch_model

    monkeypatch.undo()  # the real functions again: the collator checks that the tower calls transformers' own
    patch_model(model, enabled=True)  # packed rows need the engine's varlen attention (CPU: torch references)
    packed = VisionDataCollator(model, processor, resize=None, padding_free=True)(examples)
    assert set(keys) <= set(packed)
    torch.testing.assert_close(packed["image_cu_seqlens"], batch["image_cu_seqlens"], atol=0, rtol=0)


# ------------------------------------------------------------------------------------- M-RoPE positions

@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mllama"])
def test_mrope_positions_come_with_the_batch(arch, tiny_model_dir, monkeypatch):
    """M-RoPE models get their 3-D positions from the collator (computed on the CPU batch), so the forward does
    not compute them from GPU tensors value by value; the logits are the model's own, bit for bit. Models with
    1-D positions get none."""
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir(arch), use_gradient_checkpointing=False)
    batch = VisionDataCollator(model, processor, resize=None)([_single(1, "4071"), _multi(2), _single(3, "9")])
    if arch == "mllama":
        assert "position_ids" not in batch
        return
    ids = batch["input_ids"]
    assert batch["position_ids"].shape == (3, *ids.shape) and batch["position_ids"].device == ids.device
    without = {k: v for k, v in batch.items() if k != "position_ids"}
    inner = model.model
    calls = []
    real = type(inner).get_rope_index
    monkeypatch.setattr(type(inner), "get_rope_index", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    with torch.no_grad():
        want = model(**without).logits
        assert calls, "the model computes the positions itself without them"
        calls.clear()
        got = model(**batch).logits
    assert not calls
    torch.testing.assert_close(got, want, atol=0, rtol=0)
