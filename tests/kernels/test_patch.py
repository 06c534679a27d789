"""patch_model on all six architectures: same loss and grads as stock, reversible, safe no-op on CPU."""

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.kernels import patch_model, unpatch_model
from visiontune.models.archs import REGISTRY
from visiontune.testing import ARCHITECTURES


def _conv(seed: int, answer: str) -> dict:
    rng = np.random.RandomState(seed)
    img = Image.fromarray((rng.rand(60, 90, 3) * 255).astype("uint8"))
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Read it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}


def _lora_model(tiny_model_dir, arch):
    from visiontune import FastVisionModel, VisionDataCollator

    torch.manual_seed(0)
    # Checkpointing off: these tests check that patching leaves no forward override behind.
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir(arch), use_fused_kernels=False,
                                                       use_gradient_checkpointing=False)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8)
    with torch.no_grad():  # non-zero B so that every LoRA branch contributes to outputs and grads
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    FastVisionModel.for_training(model)
    batch = VisionDataCollator(model, processor)([_conv(0, "42"), _conv(1, "7 and some more words")])
    return model, batch


def _loss_and_grads(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(**batch, use_cache=False)
    return out.loss.detach(), torch.autograd.grad(out.loss, params), out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_patch_matches_stock_and_unpatches(triton_cpu, tiny_model_dir, arch):
    assert arch in REGISTRY  # its entry holds the kernel map
    model, batch = _lora_model(tiny_model_dir, arch)
    with torch.no_grad():
        stock_logits = model(**batch, use_cache=False).logits
    with torch.enable_grad():
        loss0, g0, _ = _loss_and_grads(model, batch)
    handle = patch_model(model, enabled=True)
    counts = handle.counts
    assert counts.get("rms_norm", 0) > 0 and counts.get("gated_mlp", 0) > 0 and counts.get("fused_cross_entropy") == 1
    if arch.startswith("qwen"):  # the Qwen family also gets packed attention and M-RoPE
        assert counts.get("text_attention", 0) > 0 and counts.get("vision_attention", 0) > 0 and counts.get("mrope") == 1
    loss1, g1, out1 = _loss_and_grads(model, batch)
    assert out1.logits is None  # fused CE: logits never built
    torch.testing.assert_close(loss1, loss0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the model's loss chunk (what "auto" lowers at its floor): two rows of logits per chunk, same loss
    from visiontune.models.state import vision_state

    vision_state(model).loss_chunk_bytes = 2 * 4 * model.get_output_embeddings().weight.shape[0]
    try:
        loss_small, _, _ = _loss_and_grads(model, batch)
    finally:
        vision_state(model).loss_chunk_bytes = None
    torch.testing.assert_close(loss_small, loss0, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # without labels the patched model still returns (the same) logits
        torch.testing.assert_close(model(**{k: v for k, v in batch.items() if k != "labels"},
                                         use_cache=False).logits, stock_logits, atol=1e-5, rtol=1e-4)
    assert patch_model(model, enabled=True) is handle  # idempotent
    unpatch_model(model)
    assert not handle.active
    assert all("forward" not in m.__dict__ for m in model.modules())
    loss2, g2, _ = _loss_and_grads(model, batch)
    assert torch.equal(loss2, loss0)
    assert all(torch.equal(a, b) for a, b in zip(g2, g0))


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "gemma3"])
def test_patched_model_generates_from_images(triton_cpu, tiny_model_dir, arch):
    """generate() checks its model kwargs against ``inspect.signature(model.forward)``: the patched forwards
    must report the original parameters, or pixel_values and friends are refused (found on the GPU, where
    the engine is on by default)."""
    import inspect

    from visiontune import FastVisionModel

    model, batch = _lora_model(tiny_model_dir, arch)
    processor = FastVisionModel.from_pretrained(tiny_model_dir(arch), use_fused_kernels=False)[1]
    patch_model(model, enabled=True)
    inner = model.get_base_model()
    assert "pixel_values" in inspect.signature(inner.forward).parameters
    FastVisionModel.for_inference(model)
    conv = _conv(0, "42")
    prompt = processor.apply_chat_template([conv["messages"][0]], add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[[conv["messages"][0]["content"][0]["image"]]], return_tensors="pt")
    out = model.generate(**inputs, min_new_tokens=2, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    unpatch_model(model)


def test_patch_is_noop_on_cpu_by_default(tiny_model_dir):
    model, _ = _lora_model(tiny_model_dir, "qwen2_5_vl")
    handle = patch_model(model)  # enabled=None: CPU model -> nothing patched
    assert not handle.active and handle.counts == {}
    assert all("forward" not in m.__dict__ for m in model.modules())
    handle.unpatch()  # harmless


def test_patch_unsupported_architecture_warns_and_noops():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=50))
    with pytest.warns(UserWarning, match="no kernel map"):
        handle = patch_model(model, enabled=True)
    assert not handle.active
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_patch_before_peft_wrapping_still_fuses_lora(triton_cpu, tiny_model_dir):
    """FastVisionModel patches at load time, get_peft_model wraps the Linears later: the patched
    forwards look children up at call time, so the LoRA layers added afterwards are fused too."""
    from visiontune import FastVisionModel, VisionDataCollator

    torch.manual_seed(0)
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_fused_kernels=False)
    handle = patch_model(model, enabled=True)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    FastVisionModel.for_training(model)
    batch = VisionDataCollator(model, processor)([_conv(0, "42"), _conv(1, "7 and some more words")])
    calls = {"n": 0}
    import visiontune.kernels.lora as lora_mod

    orig = lora_mod.LoRAGatedMLPFunction.apply

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    lora_mod.LoRAGatedMLPFunction.apply = counting
    try:
        loss1, g1, _ = _loss_and_grads(model, batch)
    finally:
        lora_mod.LoRAGatedMLPFunction.apply = orig
    assert calls["n"] > 0  # the fused LoRA MLP ran on the PEFT-wrapped projections
    handle.unpatch()
    loss0, g0, _ = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss1, loss0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_max_seqlen_is_read_once_per_cu_seqlens_tensor():
    from visiontune.kernels.patch import max_seqlen_of

    cu = torch.tensor([0, 3, 10, 12], dtype=torch.int32)
    assert max_seqlen_of(cu) == 7
    assert max_seqlen_of(cu) == 7
    cu[3] = 30  # an in-place change bumps the version: recomputed, never a stale value
    assert max_seqlen_of(cu) == 20
    assert max_seqlen_of(torch.tensor([0, 5], dtype=torch.int32)) == 5
    assert max_seqlen_of(torch.tensor([0], dtype=torch.int32)) == 0
