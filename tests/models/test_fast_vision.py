"""FastVisionModel: loading, LoRA targets and counts, seeds, modes."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune import FastVisionModel, VisionDataCollator
from visiontune.models.state import vision_state
from visiontune.testing import ARCHITECTURES


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _lora_modules(model) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith(".lora_A")}


def _conv(seed: int, answer: str = "42") -> dict:
    rng = np.random.RandomState(seed)
    img = Image.fromarray((rng.rand(60, 90, 3) * 255).astype("uint8"))
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Read it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}


def test_from_pretrained_local_dir_cpu_defaults(tiny_model_dir):
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), max_seq_length=333)
    assert next(model.parameters()).dtype == torch.float32  # CPU: fp32
    assert model.max_seq_length == 333
    assert _trainable(model) == 0  # frozen until get_peft_model
    assert processor.tokenizer.padding_side == "right"
    full, _ = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), full_finetuning=True, dtype="bfloat16")
    assert _trainable(full) == sum(p.numel() for p in full.parameters())
    assert next(full.parameters()).dtype == torch.bfloat16


def test_from_pretrained_errors(tmp_path, tiny_model_dir, monkeypatch):
    with pytest.raises(FileNotFoundError, match="visiontune tiny-model"):
        FastVisionModel.from_pretrained(str(tmp_path / "nope"))
    with monkeypatch.context() as m:  # 4-bit runs on CUDA and on bitsandbytes' CPU backend (test_four_bit.py)
        m.setitem(sys.modules, "bitsandbytes", None)
        with pytest.raises(RuntimeError, match="needs bitsandbytes"):
            FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), load_in_4bit=True)
    with pytest.raises(ValueError, match="use_gradient_checkpointing"):
        FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing="sometimes")
    with pytest.raises(ValueError, match="not a torch dtype"):
        FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), dtype="float99")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_flags_change_trainable_counts_additively(tiny_model_dir, arch):
    counts = {}
    for flags in [(1, 1, 1, 1), (1, 0, 1, 1), (0, 1, 1, 1), (1, 1, 1, 0), (1, 1, 0, 1)]:
        model, _ = FastVisionModel.from_pretrained(tiny_model_dir(arch), use_gradient_checkpointing=False)
        peft = FastVisionModel.get_peft_model(model, *map(bool, flags), r=4, lora_alpha=4)
        counts[flags] = _trainable(peft)
        mods = _lora_modules(peft)
        assert not any("lm_head" in m or "merger" in m or "projector" in m for m in mods)
        if not flags[0]:
            assert not any("visual" in m or "vision" in m for m in mods)
        if not flags[1]:
            assert not any("language_model" in m for m in mods)
    assert counts[(1, 0, 1, 1)] + counts[(0, 1, 1, 1)] == counts[(1, 1, 1, 1)] > 0
    assert counts[(1, 1, 1, 0)] + counts[(1, 1, 0, 1)] == counts[(1, 1, 1, 1)]
    assert min(counts.values()) > 0


def test_all_off_and_unsupported_errors(tiny_model_dir):
    model, _ = FastVisionModel.from_pretrained(tiny_model_dir("gemma3"))
    with pytest.raises(ValueError, match="no LoRA targets selected"):
        FastVisionModel.get_peft_model(model, False, False, False, False)


def test_explicit_targets_override_flags_and_modules_to_save(tiny_model_dir):
    model, _ = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    peft = FastVisionModel.get_peft_model(model, finetune_vision_layers=False, target_modules=["q_proj", "v_proj"],
                                          modules_to_save=["lm_head", "embed_tokens"], r=4)
    mods = _lora_modules(peft)
    assert mods and all(m.endswith(("q_proj", "v_proj")) for m in mods)
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert any("lm_head" in n and "modules_to_save" in n for n in trainable)
    assert any("embed_tokens" in n and "modules_to_save" in n for n in trainable)
    model, _ = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    peft = FastVisionModel.get_peft_model(model, target_modules=r".*visual\.blocks\.\d+\.attn\.qkv", r=4)
    assert _lora_modules(peft) and all(m.endswith("attn.qkv") for m in _lora_modules(peft))
    model, _ = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    with pytest.raises(ValueError, match="does not compile"):
        FastVisionModel.get_peft_model(model, target_modules="(unclosed")


def test_random_state_makes_lora_init_reproducible(tiny_model_dir):
    def lora_a(seed):
        model, _ = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"))
        peft = FastVisionModel.get_peft_model(model, r=4, random_state=seed)
        return torch.cat([p.detach().flatten() for n, p in peft.named_parameters() if "lora_A" in n])

    a1, a2, b = lora_a(1), lora_a(1), lora_a(2)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, b)


@pytest.mark.parametrize("checkpointing", [True, False, "offload"])
def test_train_generate_train_cycle(tiny_model_dir, checkpointing):
    torch.manual_seed(0)
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing=checkpointing)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8)
    collator = VisionDataCollator(model, processor)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    FastVisionModel.for_training(model)
    assert model.training
    batch = collator([_conv(0), _conv(1, "7")])
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()

    FastVisionModel.for_inference(model)
    assert not model.training and processor.tokenizer.padding_side == "left"
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]}]
    text = processor.apply_chat_template(prompt, add_generation_prompt=True)
    img = _conv(2)["messages"][0]["content"][0]["image"]
    inputs = processor(text=[text, text], images=[[img], [img]], return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]

    FastVisionModel.for_training(model)
    assert model.training and processor.tokenizer.padding_side == "right"
    loss2 = model(**collator([_conv(0), _conv(1, "7")])).loss
    loss2.backward()
    assert torch.isfinite(loss2)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def _grads_and_calls(tiny_model_dir, checkpointing):
    """Loss, LoRA grads and per-layer forward-call counts of one fwd+bwd step on the tiny Qwen2.5-VL."""
    from visiontune.models.checkpointing import layer_stacks

    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing=checkpointing,
                                                       use_fused_kernels=False)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    with torch.no_grad():  # non-zero B so every LoRA factor gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    FastVisionModel.for_training(model)
    vision, lm = layer_stacks(model.get_base_model())
    calls = {id(m): 0 for m in vision + lm}
    # Count calls of each layer's MLP: the checkpoint wrapper re-runs the layer's own forward, which
    # bypasses hooks on the layer itself but calls its children through __call__.
    hooks = [m.mlp.register_forward_pre_hook(lambda mod, *_, key=id(m): calls.__setitem__(key, calls[key] + 1))
             for m in vision + lm]
    loss = model(**VisionDataCollator(model, processor)([_conv(0), _conv(1, "7")])).loss
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, loss.detach(), grads, [calls[id(m)] for m in vision], [calls[id(m)] for m in lm]


@pytest.mark.parametrize("mode, lm_calls", [(0.5, "first"), (True, "all"), ("offload", "all"), ("unsloth", "all")])
def test_checkpointing_recomputes_chosen_layers_with_same_grads(tiny_model_dir, mode, lm_calls):
    # dtype float32, atol 1e-6, rtol 1e-5: recomputation repeats the same fp32 ops on the same inputs.
    _, ref_loss, ref_grads, v0, l0 = _grads_and_calls(tiny_model_dir, False)
    model, loss, grads, v1, l1 = _grads_and_calls(tiny_model_dir, mode)
    assert v0 == [1] * len(v0) and l0 == [1] * len(l0)
    assert v1 == [2] * len(v1), "every vision block recomputes in backward"
    if lm_calls == "first":  # ceil(0.5 * 2 LM layers): the first recomputes, the other keeps activations
        assert l1 == [2] + [1] * (len(l1) - 1)
    else:
        assert l1 == [2] * len(l1)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=1e-5, msg=n)
        assert grads[n].abs().sum() > 0, n

    # for_inference: the wrappers stay but are inert without grad; for_training(False) removes them.
    FastVisionModel.for_inference(model)
    assert vision_state(model).checkpoint_handle is not None
    FastVisionModel.for_training(model, use_gradient_checkpointing=False)
    assert vision_state(model).checkpoint_handle is None


def test_for_training_mode_becomes_the_models(tiny_model_dir):
    """A mode given to for_training is the model's from then on (as in get_peft_model): a later
    for_training() keeps it, and "auto" given there is what the trainer plans from."""
    model, _ = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing=False)
    model = FastVisionModel.get_peft_model(model, r=4)
    FastVisionModel.for_training(model, use_gradient_checkpointing="auto")
    state = vision_state(model)
    assert state.checkpointing == "auto" and state.checkpoint_plan == (1.0, "recompute")
    FastVisionModel.for_inference(model)
    FastVisionModel.for_training(model)
    assert state.checkpointing == "auto" and state.checkpoint_handle is not None
    FastVisionModel.for_training(model, use_gradient_checkpointing=False)
    assert state.checkpointing is False and state.checkpoint_handle is None
    with pytest.raises(ValueError, match="use_gradient_checkpointing"):
        FastVisionModel.for_training(model, use_gradient_checkpointing="sometimes")
    assert state.checkpointing is False


def test_get_peft_model_checkpointing_argument_installs_it(tiny_model_dir):
    # Unsloth-style: checkpointing chosen in get_peft_model (from_pretrained had it off).
    model, _ = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing=False)
    assert vision_state(model).checkpoint_handle is None
    peft = FastVisionModel.get_peft_model(model, r=4, use_gradient_checkpointing="unsloth")
    state = vision_state(peft)
    assert state.checkpoint_plan == (1.0, "recompute_offload") and len(state.checkpoint_handle) > 0
    with pytest.raises(ValueError, match="use_gradient_checkpointing"):
        FastVisionModel.get_peft_model(FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"))[0],
                                       use_gradient_checkpointing="always")


def test_mlp_mode_checkpoints_no_layer_and_sets_the_kernel_patch(tiny_model_dir):
    """'mlp': no layer wrapper; the kernel patch (patched by hand here, on the CPU) recomputes MLPs."""
    from visiontune.kernels import patch_model

    model, _ = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing=False)
    handle = patch_model(model, enabled=True)
    assert handle.recompute_mlp is False
    peft = FastVisionModel.get_peft_model(model, r=4, use_gradient_checkpointing="mlp")
    assert vision_state(peft).checkpoint_handle is None
    assert handle.recompute_mlp is True
    FastVisionModel.for_training(peft, use_gradient_checkpointing=True)
    assert handle.recompute_mlp is False and vision_state(peft).checkpoint_handle is not None
    handle.unpatch()


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.2, "half"])
def test_selective_checkpointing_rejects_bad_fractions(tiny_model_dir, bad):
    with pytest.raises(ValueError, match="fraction strictly between 0 and 1"):
        FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing=bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", [0.5, True, "offload", "mlp"])
def test_checkpointing_modes_on_the_gpu_engine(tiny_model_dir, mode):
    """bf16 + Triton kernels on CUDA: every mode gives the loss and LoRA gradients of no checkpointing
    (loss rtol 1e-2; gradients ||diff|| / ||ref|| < 2e-2: recomputation may reorder bf16 reductions)."""
    _, ref_loss, ref_grads, _, _ = _grads_and_calls_gpu(tiny_model_dir, False)
    model, loss, grads, v1, l1 = _grads_and_calls_gpu(tiny_model_dir, mode)
    if mode == "mlp":  # no layer runs twice; the patched MLPs recompute inside their own backward
        assert v1 == [1] * len(v1) and l1 == [1] * len(l1)
        assert vision_state(model).kernel_handle.recompute_mlp is True
    else:
        assert v1 == [2] * len(v1) and l1[0] == 2
    torch.testing.assert_close(loss.float(), ref_loss.float(), atol=0, rtol=1e-2)
    for n, g in grads.items():
        ref = ref_grads[n].float()
        assert (g.float() - ref).norm() <= 2e-2 * ref.norm() + 1e-6, n


def _grads_and_calls_gpu(tiny_model_dir, checkpointing):
    from visiontune.models.checkpointing import layer_stacks

    model, processor = FastVisionModel.from_pretrained(tiny_model_dir("qwen2_5_vl"), use_gradient_checkpointing=checkpointing)
    assert next(model.parameters()).is_cuda
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator(device=p.device).manual_seed(len(n)))
    FastVisionModel.for_training(model)
    vision, lm = layer_stacks(model.get_base_model())
    calls = {id(m): 0 for m in vision + lm}
    hooks = [m.mlp.register_forward_pre_hook(lambda mod, *_, key=id(m): calls.__setitem__(key, calls[key] + 1))
             for m in vision + lm]
    batch = VisionDataCollator(model, processor)([_conv(0), _conv(1, "7")])
    batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items()}
    loss = model(**batch).loss
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, loss.detach(), grads, [calls[id(m)] for m in vision], [calls[id(m)] for m in lm]
