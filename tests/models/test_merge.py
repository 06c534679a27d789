"""Merged exports: the merged folder loads with plain transformers and generates exactly what the LoRA
model generates (fp32, CPU, greedy) on every architecture, with rsLoRA, LoRA on the vision tower and a
``modules_to_save`` lm_head; 4-bit bases are refused unless dequantized; the vLLM-style folder check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.models.fast_vision import FastVisionModel
from visiontune.models.merge import QuantizedMergeError, merged_model, save_pretrained_merged
from visiontune.testing import ARCHITECTURES

PROMPTS = ["Read the digits.", "What colour is the square on the left?"]


def images() -> list[Image.Image]:
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(56, 56 + 28 * i, 3) * 255).astype("uint8")) for i in range(len(PROMPTS))]


def lora_model(path: str, seed: int = 0, **peft_kwargs):
    """A LoRA model (vision and language layers, rsLoRA, lm_head trained in full) whose adapter changes outputs."""
    model, processor = FastVisionModel.from_pretrained(path, use_gradient_checkpointing=False, use_fused_kernels=False)
    kwargs = dict(r=4, lora_alpha=8, use_rslora=True, modules_to_save=["lm_head"], random_state=seed)
    peft = FastVisionModel.get_peft_model(model, **{**kwargs, **peft_kwargs})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA B starts at zero; the trained lm_head copy starts equal to the original
        for name, p in peft.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return FastVisionModel.for_inference(peft), processor


def greedy(model, processor, max_new_tokens: int = 8) -> list[list[int]]:
    out = []
    for prompt, image in zip(PROMPTS, images()):
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}], add_generation_prompt=True)
        inputs = processor(text=[text], images=[[image]], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return out


def load_plain(folder: Path, dtype=torch.float32):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).eval(), AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merged_folder_generates_the_adapter_models_tokens(arch, tiny_model_dir, tmp_path):
    peft, processor = lora_model(tiny_model_dir(arch))
    assert any(".visual." in n or "vision" in n for n, _ in peft.named_parameters() if "lora_A" in n)
    expected = greedy(peft, processor)
    with peft.disable_adapter():  # the adapter matters: without it the answers differ
        assert greedy(peft, processor) != expected
    folder = peft.save_pretrained_merged(tmp_path / "merged", processor)  # bound by get_peft_model, as in Unsloth
    assert greedy(*load_plain(folder)) == expected
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"]


def test_the_merged_folder_needs_no_visiontune(tiny_model_dir, tmp_path):
    """A fresh interpreter with only transformers imported loads the folder and generates the same tokens."""
    peft, processor = lora_model(tiny_model_dir("qwen2_5_vl"))
    expected = greedy(peft, processor)
    folder = save_pretrained_merged(peft, tmp_path / "merged", processor)
    image = tmp_path / "img.png"
    images()[0].save(image)
    script = f"""
import sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
m = AutoModelForImageTextToText.from_pretrained({str(folder)!r}, dtype=torch.float32)
p = AutoProcessor.from_pretrained({str(folder)!r})
text = p.apply_chat_template([{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {PROMPTS[0]!r}}}]}}],
                             add_generation_prompt=True)
x = p(text=[text], images=[[Image.open({str(image)!r})]], return_tensors="pt")
ids = m.generate(**x, max_new_tokens=8, do_sample=False)[0, x["input_ids"].shape[1]:].tolist()
assert not any(name.startswith("visiontune") for name in sys.modules)
print(ids)
"""
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(expected[0])


def test_the_model_is_unchanged_and_bf16_stays_close(tiny_model_dir, tmp_path):
    """Merging leaves the LoRA model as it was; a bf16 merge (the GPU default) agrees with the fp32 adapter
    model on most greedy tokens (bf16 keeps ~3 significant digits: not exact, measured here)."""
    peft, processor = lora_model(tiny_model_dir("qwen2_vl"))
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    expected = greedy(peft, processor)
    merged = merged_model(peft, dtype=torch.bfloat16)
    assert all(torch.equal(before[k], v) for k, v in peft.state_dict().items())
    assert merged.dtype == torch.bfloat16 and not hasattr(merged, "peft_config")
    got = greedy(merged.float(), processor)
    same = sum(a == b for e, g in zip(expected, got) for a, b in zip(e, g))
    assert same >= 0.75 * sum(map(len, expected)), (expected, got)


def test_lora_method_saves_the_adapter_and_processor(tiny_model_dir, tmp_path):
    peft, processor = lora_model(tiny_model_dir("qwen2_vl"))
    folder = save_pretrained_merged(peft, tmp_path / "lora", processor, save_method="lora")
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file() and not (folder / "model.safetensors").exists()


def test_bad_arguments_are_clear(tiny_model_dir, tmp_path):
    peft, processor = lora_model(tiny_model_dir("qwen2_vl"))
    with pytest.raises(ValueError, match="save_method='merged_8bit': choose one of merged_16bit, merged_4bit, lora"):
        save_pretrained_merged(peft, tmp_path, processor, save_method="merged_8bit")
    with pytest.raises(NotImplementedError, match="upload_folder"):
        save_pretrained_merged(peft, tmp_path, processor, push_to_hub=True)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        save_pretrained_merged(peft, tmp_path, processor, colour="red")
    save_pretrained_merged(peft, tmp_path / "ok", processor, maximum_memory_usage=0.5)  # Unsloth's option: accepted


# ------------------------------------------------------------------------------------------ 4-bit
def four_bit_lora_model(path: str, bits: int = 4):
    """A QLoRA model as transformers + bitsandbytes build it (bitsandbytes' CPU backend: Linear4bit layers)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    skip = ["lm_head", r".*visual"]  # the language model in 4-bit (or 8-bit)
    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=skip) if bits == 4
             else BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip))
    base = AutoModelForImageTextToText.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return peft.eval()


def dequantized_copy(peft):
    """The QLoRA model with every bitsandbytes Linear4bit swapped for an fp32 Linear holding its dequantized
    weight (LoRA wrappers kept): what the adapter computes, without bitsandbytes' CPU kernels (which round
    differently, ~1% of the logit range on this model)."""
    import copy

    import bitsandbytes as bnb

    reference = copy.deepcopy(peft)
    for name, module in list(reference.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            if module.bias is not None:
                dense.bias.data = module.bias.data.clone()
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, dense)
    return reference


@pytest.mark.slow
def test_merging_into_4bit_weights_is_refused_and_dequantize_merges_exactly(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoProcessor

    path = tiny_model_dir("qwen2_5_vl")
    peft = four_bit_lora_model(path)
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(peft.base_model.model.model.language_model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    with pytest.raises(QuantizedMergeError, match=r"loaded in 4-bit .*Linear4bit.*dequantize=True"):
        save_pretrained_merged(peft, tmp_path / "refused", processor)
    assert not (tmp_path / "refused" / "model.safetensors").exists()
    reference = dequantized_copy(peft)  # before any forward pass: bitsandbytes' CPU kernels repack on first use
    folder = save_pretrained_merged(peft, tmp_path / "merged", processor, dequantize=True)
    assert greedy(*load_plain(folder)) == greedy(reference, processor)  # merged into the NF4 weights the adapter saw
    quantized = save_pretrained_merged(peft, tmp_path / "nf4", processor, save_method="merged_4bit", dequantize=True)
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert all(1 <= len(ids) <= 8 for ids in greedy(*load_plain(quantized)))  # it loads and generates (lossy)
    greedy(peft, processor)  # runs on CPU: on CPUs with AVX512-BF16 bitsandbytes repacks its weights, lossy to undo
    states = [p.quant_state for p in peft.parameters() if getattr(p, "quant_state", None) is not None]
    if not any(getattr(q, "packing_format_for_cpu", False) for q in states):
        # This CPU has no AVX512-BF16, so bitsandbytes kept its layout: the weights still dequantize exactly.
        # Mark one weight as bitsandbytes' repacking does, to check the refusal on every machine.
        assert len(merged_model(peft, dequantize=True).state_dict()) > 0
        states[0].packing_format_for_cpu = True
    with pytest.raises(QuantizedMergeError, match="repacked .* Merge before running the model on CPU"):
        merged_model(peft, dequantize=True)
    with pytest.raises(QuantizedMergeError, match="8-bit bitsandbytes weights .* not supported"):
        merged_model(four_bit_lora_model(path, bits=8), dequantize=True)


# ------------------------------------------------------------------------------------------ serving check
def check_servable(folder: Path) -> list[str]:
    """The checks vLLM applies to a model folder before serving it (architectures, processor, chat template):
    the list of problems, empty when it would be accepted."""
    problems = []
    config = json.loads((folder / "config.json").read_text())
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    known = set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
    if not config.get("architectures") or not set(config["architectures"]) <= known:
        problems.append(f"architectures {config.get('architectures')} is not an image-text-to-text class")
    if AutoConfig.from_pretrained(folder).model_type != config.get("model_type"):
        problems.append("model_type does not round-trip")
    if not list(folder.glob("*.safetensors")):
        problems.append("no safetensors weights")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        problems += [f"missing shard {s}" for s in shards if not (folder / s).exists()]
    if not ((folder / "processor_config.json").exists() or (folder / "preprocessor_config.json").exists()):
        problems.append("no processor / image processor config")
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer.model").exists():
        problems.append("no tokenizer")
    processor = AutoProcessor.from_pretrained(folder)
    if not getattr(processor, "chat_template", None):
        problems.append("no chat template (vLLM's chat endpoint needs one)")
    return problems


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "gemma3"])
def test_merged_folder_passes_the_serving_checks(arch, tiny_model_dir, tmp_path):
    peft, processor = lora_model(tiny_model_dir(arch))
    folder = save_pretrained_merged(peft, tmp_path / "merged", processor, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1  # sharded, with an index
    assert check_servable(folder) == []
    (folder / "chat_template.jinja").unlink()
    assert check_servable(folder) == ["no chat template (vLLM's chat endpoint needs one)"]
