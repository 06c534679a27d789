"""The engine's per-token log-probs (policy and reference) equal the stock path's: a full-logits
log-softmax, and TRL's own fused head, on tiny Qwen2.5-VL and Mllama; so do their LoRA gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

ARCHS = ["qwen2_5_vl", "mllama"]


def _conv(seed: int, answer: str) -> dict:
    img = Image.fromarray((np.random.RandomState(seed).rand(56, 84, 3) * 255).astype("uint8"))
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Read it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}


def _model_and_batch(tiny_model_dir, arch):
    from visiontune import FastVisionModel, VisionDataCollator

    torch.manual_seed(0)
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir(arch), use_gradient_checkpointing=False)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8)
    with torch.no_grad():  # non-zero B: the adapter changes the outputs, so policy != reference
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    model.eval()
    batch = VisionDataCollator(model, processor)([_conv(0, "42"), _conv(1, "7 and 301")])
    return model, batch


def _stock_log_probs(model, batch):
    """Full logits -> log_softmax -> the label's entry (what TRL computed before its fused head)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * (labels != -100)


def _fused_log_probs(model, batch):
    return model(**batch, fused_lm_head=True).log_probs


def _grads(model, log_probs):
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.linspace(-1.0, 2.0, log_probs.numel()).view_as(log_probs)  # a per-token weight, like advantages
    return torch.autograd.grad((log_probs * weights).sum(), params)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_log_probs_equal_stock_for_policy_and_reference(tiny_model_dir, arch):
    from trl.trainer.utils import add_fused_lm_head

    from visiontune.align import engine_installed, install_engine
    from visiontune.kernels._common import HAS_TRITON, force_triton, interpret_mode

    model, batch = _model_and_batch(tiny_model_dir, arch)
    stock = _stock_log_probs(model, batch)
    with model.disable_adapter():
        stock_ref = _stock_log_probs(model, batch)
    assert (stock - stock_ref).abs().max() > 1e-3  # the adapter matters: the check below can tell them apart

    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy"))
    trl_logp = _fused_log_probs(model, batch)
    trl_grads = _grads(model, trl_logp)
    assert install_engine(model.get_base_model()) and engine_installed(model)
    assert not install_engine(model.get_base_model())  # idempotent

    paths = [False] + ([True] if HAS_TRITON and interpret_mode() else [])  # torch reference, Triton interpreter
    for triton in paths:
        with force_triton(triton):
            out = model(**batch, fused_lm_head=True)
            with model.disable_adapter(), torch.no_grad():
                ref = _fused_log_probs(model, batch)
            grads = _grads(model, out.log_probs)
        torch.testing.assert_close(out.log_probs, stock, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.log_probs, trl_logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref, stock_ref, atol=1e-5, rtol=1e-5)
        for g, want in zip(grads, trl_grads):
            torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-4)
        mask = batch["labels"][:, 1:] != -100
        assert torch.equal(out.label_mask, mask) and (out.entropy[mask] > 0).all()
