"""load_in_4bit=True and loftq_config: QLoRA on bitsandbytes' CPU backend (0.50), LoftQ's preconditions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune import FastVisionModel, VisionDataCollator

bnb = pytest.importorskip("bitsandbytes", reason="load_in_4bit needs bitsandbytes (a Linux dependency of visiontune)")


def _sample(seed: int) -> dict:
    image = Image.fromarray((np.random.RandomState(seed).rand(60, 60, 3) * 255).astype("uint8"))
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Read."}]},
        {"role": "assistant", "content": [{"type": "text", "text": str(10 + seed)}]},
    ]}


def _train_steps(model: torch.nn.Module, batch: dict, steps: int = 4) -> list[float]:
    """``steps`` AdamW steps on ``batch``; the losses. The last step's gradients are left in place."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for step in range(steps):
        loss = model(**batch).loss
        loss.backward()
        losses.append(float(loss))
        if step < steps - 1:
            optimizer.step()
            optimizer.zero_grad()
    return losses


def _reached(model: torch.nn.Module) -> set[str]:
    """Names of the LoRA A matrices the last backward gave a non-zero gradient."""
    return {n for n, p in model.named_parameters() if "lora_A" in n and p.grad is not None and bool(p.grad.abs().sum())}


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "mllama"])
def test_qlora_loads_trains_generates_and_trains_again_on_the_cpu(arch, tiny_model_dir):
    """The seed page's QLoRA cycle on the CPU: the base in NF4 (projector and lm_head in full precision), LoRA
    on the 4-bit layers, the loss falls, generation works, and training afterwards still sends gradients
    through the 4-bit layers (bitsandbytes' CPU inference repacking would stop them: see
    bnb_cpu.keep_cpu_4bit_differentiable)."""
    from visiontune.kernels.patch import lora_params

    model, processor = FastVisionModel.from_pretrained(tiny_model_dir(arch), load_in_4bit=True,
                                                       use_gradient_checkpointing=True)
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert any("language_model" in n for n in four_bit) and any("vision" in n or "visual" in n for n in four_bit)
    assert type(model.lm_head) is torch.nn.Linear and not any("projector" in n or "merger" in n for n in four_bit)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    lora_on_4bit = [m for m in model.modules() if hasattr(m, "lora_A") and isinstance(m.get_base_layer(), bnb.nn.Linear4bit)]
    assert lora_on_4bit and type(lora_on_4bit[0]).__module__ == "peft.tuners.lora.bnb"
    # Off the engine (a CPU model, no force_triton) 4-bit layers keep PEFT's path; on CUDA the NF4 ones take
    # kernels/nf4_lora.py (tests/kernels/test_nf4.py).
    assert lora_params(lora_on_4bit[0], torch.zeros(1, lora_on_4bit[0].in_features)) is None

    batch = {k: v.to(model.device) if torch.is_tensor(v) else v  # on a CUDA machine the model is on the GPU
             for k, v in VisionDataCollator(model, processor)([_sample(0), _sample(1)]).items()}
    losses = _train_steps(model, batch)
    reached = _reached(model)  # (tiny Mllama's zero cross-attention gates keep its vision tower at zero)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses
    model.zero_grad()

    FastVisionModel.for_inference(model)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read."}]}],
                                           add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[[_sample(0)["messages"][0]["content"][0]["image"]]],
                       return_tensors="pt").to(model.device)
    out = model.generate(**inputs, min_new_tokens=3, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3

    FastVisionModel.for_training(model)
    model(**batch).loss.backward()
    lost = reached - _reached(model)
    assert any("language_model" in n for n in reached) and not lost, f"after generation, no gradient reached {sorted(lost)[:3]}"


def test_loftq_preconditions(tiny_model_dir):
    """LoftQ quantizes the base itself (PEFT's loftq_init, CUDA/XPU only): a 4-bit base is refused, and so is a
    machine without such a device, each before PEFT would fail or silently use packed bytes as weights."""
    from peft import LoftQConfig

    quantized, _ = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), load_in_4bit=True)
    with pytest.raises(ValueError, match="already quantized.*load_in_4bit=False"):
        FastVisionModel.get_peft_model(quantized, r=4, loftq_config=LoftQConfig(loftq_bits=4))
    if not torch.cuda.is_available():
        full, _ = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"))
        with pytest.raises(RuntimeError, match="CUDA \\(or XPU\\)"):
            FastVisionModel.get_peft_model(full, r=4, loftq_config=LoftQConfig(loftq_bits=4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="PEFT 0.21's LoftQ initialisation (peft.utils.loftq_utils.loftq_init) moves the weights to "
                           "'cuda' or 'xpu'; bitsandbytes' CPU backend cannot serve it")
def test_loftq_initialises_and_trains_on_the_gpu(tiny_model_dir):
    """LoftQ: base weights become their NF4 reconstruction, the adapters start from the SVD of the residual
    (lora_B is not zero), and a few steps lower the loss."""
    from peft import LoftQConfig

    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), dtype="float32",
                                                       use_fused_kernels=False)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, loftq_config=LoftQConfig(loftq_bits=4))
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    batch = {k: v.to("cuda") if torch.is_tensor(v) else v
             for k, v in VisionDataCollator(model, processor)([_sample(0), _sample(1)]).items()}
    losses = _train_steps(model, batch)
    assert losses[-1] < losses[0], losses


def test_cpu_4bit_layers_stay_differentiable_after_an_inference_forward():
    """bitsandbytes 0.50 repacks a CPU Linear4bit for a bf16 kernel without backward at its first eval-mode
    forward (CPUs with AVX512-BF16): gradients then stopped at the layer. FastVisionModel keeps the path."""
    from visiontune.models.bnb_cpu import keep_cpu_4bit_differentiable

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    keep_cpu_4bit_differentiable(layer)
    x = torch.randn(3, 128)
    before = layer.train()(x)
    with torch.no_grad():
        layer.eval()(x)
    x_again = x.clone().requires_grad_(True)
    after = layer.train()(x_again)
    after.sum().backward()
    assert x_again.grad is not None and torch.equal(after.detach(), before.detach())
