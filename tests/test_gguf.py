"""GGUF export: the files read back with ``gguf``'s reader carry llama.cpp's names, shapes, types and
metadata and the merged weights; llama.cpp itself (llama-cpp-python, slow) loads them and its greedy
tokens equal transformers' on the merged model; its mtmd loads the mmproj and encodes an image."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from visiontune.gguf import GGUFExportError, write_gguf
from visiontune.models.fast_vision import FastVisionModel
from visiontune.models.merge import merged_model, merged_tensors

GGUF_ARCHS = ["qwen2_vl", "qwen2_5_vl", "gemma3"]
TEXT = "Transcribe the handwritten digits 0123 in this image, please."


def lora_model(path: str):
    model, processor = FastVisionModel.from_pretrained(path, use_gradient_checkpointing=False, use_fused_kernels=False)
    peft = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, modules_to_save=["lm_head"], random_state=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return peft, processor


def fields(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (shape as torch orders it, type name, float32 data))."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name,
                        gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape))))
               for t in reader.tensors}
    return meta, tensors


def expected_text_names(arch: str, layers: int) -> set[str]:
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    biases = [f"blk.{i}.attn_{p}.bias" for i in range(layers) for p in "qkv"] if arch != "gemma3" else []
    per_layer += ["ffn_norm"] + (["attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"]
                                 if arch == "gemma3" else [])
    return ({"token_embd.weight", "output_norm.weight", "output.weight"} | set(biases)
            | {f"blk.{i}.{p}.weight" for i in range(layers) for p in per_layer})


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """arch -> (LoRA model, processor, merged HF tensors, [f16, q8_0, mmproj] paths)."""
    out = {}
    for arch in GGUF_ARCHS:
        peft, processor = lora_model(tiny_model_dir(arch))
        paths = write_gguf(peft, processor, tmp_path_factory.mktemp(arch), ["f16", "q8_0"])
        out[arch] = (peft, processor, merged_tensors(peft), paths)
    return out


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_language_model_files_read_back(arch, exported):
    peft, processor, hf, (f16, q8, _) = exported[arch]
    text = peft.get_base_model().config.get_text_config()
    assert (f16.name, q8.name) == ("model-F16.gguf", "model-Q8_0.gguf")
    name = {"gemma3": "gemma3"}.get(arch, "qwen2vl")
    meta16, t16 = fields(f16)
    meta8, t8 = fields(q8)
    assert meta16["general.architecture"] == name and meta16["general.type"] == "model"
    assert meta16[f"{name}.block_count"] == text.num_hidden_layers
    assert meta16[f"{name}.embedding_length"] == text.hidden_size
    assert meta16[f"{name}.attention.head_count_kv"] == text.num_key_value_heads
    assert meta16["tokenizer.ggml.model"] == "gpt2" and meta16["tokenizer.ggml.pre"] == "starcoder"
    assert len(meta16["tokenizer.ggml.tokens"]) == text.vocab_size
    assert meta16["tokenizer.ggml.eos_token_id"] == processor.tokenizer.eos_token_id
    assert meta16["tokenizer.chat_template"] == processor.chat_template
    if name == "qwen2vl":
        assert meta16["qwen2vl.rope.dimension_sections"] == [2, 3, 3, 0]
    else:  # per-layer sliding window pattern and both RoPE bases
        assert meta16["gemma3.attention.sliding_window_pattern"] == [True, False]
        assert (meta16["gemma3.rope.freq_base"], meta16["gemma3.rope.freq_base_swa"]) == (1e6, 1e4)
    assert set(t16) == set(t8) == expected_text_names(arch, text.num_hidden_layers)
    assert {t for _, t, _ in t16.values()} == {"F16", "F32"} and t16["blk.0.attn_norm.weight"][1] == "F32"
    assert t8["blk.0.attn_q.weight"][1] == "Q8_0" and t8["token_embd.weight"][1] == "Q8_0"
    # The merged weights (LoRA folded in, the trained lm_head), within each type's precision.
    pairs = {"token_embd.weight": "model.language_model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "blk.1.attn_v.weight": "model.language_model.layers.1.self_attn.v_proj.weight"}
    for gguf_name, hf_name in pairs.items():
        ref = hf[hf_name].float().numpy()
        assert t16[gguf_name][0] == ref.shape
        np.testing.assert_allclose(t16[gguf_name][2], ref, atol=2e-3, rtol=1e-3)
        np.testing.assert_allclose(t8[gguf_name][2], ref, atol=0.02 * np.abs(ref).max())


def test_gemma_norms_are_stored_as_one_plus_w_and_the_query_scale_is_folded_in(exported):
    peft, _, hf, (f16, _, _) = exported["gemma3"]
    text = peft.get_base_model().config.get_text_config()
    _, t16 = fields(f16)
    norm = hf["model.language_model.layers.0.post_attention_layernorm.weight"].numpy()
    np.testing.assert_allclose(t16["blk.0.post_attention_norm.weight"][2], norm + 1, rtol=1e-6)
    q_norm = hf["model.language_model.layers.0.self_attn.q_norm.weight"].numpy()
    factor = (text.query_pre_attn_scalar / text.head_dim) ** -0.5  # transformers' 1/sqrt(256) over llama.cpp's 1/sqrt(16)
    np.testing.assert_allclose(t16["blk.0.attn_q_norm.weight"][2], (q_norm + 1) * factor, rtol=1e-6)


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_projector_files_read_back(arch, exported):
    peft, processor, hf, (_, _, mmproj) = exported[arch]
    config = peft.get_base_model().config
    meta, tensors = fields(mmproj)
    assert mmproj.name == "mmproj-model-F16.gguf"
    assert meta["general.architecture"] == "clip" and meta["general.type"] == "mmproj"
    assert meta["clip.has_vision_encoder"] is True
    assert meta["clip.vision.projection_dim"] == config.get_text_config().hidden_size
    assert meta["clip.vision.image_mean"] == pytest.approx(list(processor.image_processor.image_mean))
    assert meta["clip.vision.block_count"] == 2
    if arch == "gemma3":
        assert meta["clip.projector_type"] == "gemma3" and meta["clip.vision.projector.scale_factor"] == 2
        assert {"mm.input_projection.weight", "mm.soft_emb_norm.weight", "v.position_embd.weight", "v.post_ln.weight",
                "v.blk.1.attn_q.weight", "v.blk.1.ffn_down.weight"} <= set(tensors)
        proj = hf["model.multi_modal_projector.mm_input_projection_weight"].numpy()
        np.testing.assert_allclose(tensors["mm.input_projection.weight"][2], proj, atol=1e-3)
        assert tensors["v.position_embd.weight"][1] == "F32"
        return
    projector = {"qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger"}[arch]
    assert meta["clip.projector_type"] == projector and meta["clip.vision.spatial_merge_size"] == 2
    if arch == "qwen2_5_vl":
        assert meta["clip.use_silu"] is True and meta["clip.vision.n_wa_pattern"] == 2
    assert {"v.patch_embd.weight", "v.patch_embd.weight.1", "v.post_ln.weight", "mm.0.weight", "mm.2.bias",
            "v.blk.0.attn_q.bias", "v.blk.0.attn_out.weight"} <= set(tensors)
    qkv = hf["model.visual.blocks.0.attn.qkv.weight"].numpy()  # LoRA merged into the fused projection, then split
    third = qkv.shape[0] // 3
    np.testing.assert_allclose(tensors["v.blk.0.attn_k.weight"][2], qkv[third:2 * third], atol=1e-3)
    conv = hf["model.visual.patch_embed.proj.weight"].numpy()
    np.testing.assert_allclose(tensors["v.patch_embd.weight.1"][2], conv[:, :, 1], atol=1e-3)


def test_unsloth_call_and_errors(tiny_model_dir, tmp_path):
    peft, processor = lora_model(tiny_model_dir("qwen2_vl"))
    paths = peft.save_pretrained_gguf(tmp_path, processor, quantization_method=["not_quantized", "fast_quantized"])
    assert [p.name for p in paths] == ["model-F16.gguf", "model-Q8_0.gguf", "mmproj-model-F16.gguf"]
    with pytest.raises(GGUFExportError, match="llama-quantize"):
        peft.save_pretrained_gguf(tmp_path, processor, quantization_method="q4_k_m")
    mllama, mllama_processor = lora_model(tiny_model_dir("mllama"))
    with pytest.raises(GGUFExportError, match="supports qwen2_vl, qwen2_5_vl, gemma3, not 'mllama'.*convert_hf_to_gguf"):
        write_gguf(mllama, mllama_processor, tmp_path / "m")


# ------------------------------------------------------------------------------------------ llama.cpp
def llama_cpp_model(tiny_model_dir, arch: str, tmp_path: Path) -> str:
    """The tiny model, for Qwen with rms_norm_eps 1e-12: llama.cpp 0.3.36's qwen2vl loader ignores
    qwen2vl.attention.layer_norm_rms_epsilon (it runs with eps 0), which on a 64-wide random model moves
    logits by ~0.3; at 1e-12 both sides compute the same norm."""
    if arch == "gemma3":
        return tiny_model_dir(arch)
    path = Path(shutil.copytree(tiny_model_dir(arch), tmp_path / f"{arch}-base"))
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-12
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n:
            return out
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_llama_cpp_loads_the_files_and_generates_transformers_tokens(arch, tiny_model_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import MTMDChatHandler
    from PIL import Image

    peft, processor = lora_model(llama_cpp_model(tiny_model_dir, arch, tmp_path))
    paths = write_gguf(peft, processor, tmp_path / "gguf", ["f32", "f16", "q8_0"])
    merged = merged_model(peft)
    ids = processor.tokenizer(TEXT).input_ids
    with torch.no_grad():
        hf_tokens = merged.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12,
                                    do_sample=False)[0, len(ids):].tolist()
        hf_logits = merged(input_ids=torch.tensor([ids + hf_tokens])).logits[0].numpy()
    # f32: the same 12 greedy tokens. f16 / q8_0 weights round the logits of this random model, whose top
    # two candidates are often within 1e-2: their logits stay within 1% / 10% of the logit range (measured:
    # <= 0.3% / 5.7%, llama.cpp's f16 KV cache included) and pick the same next token at >= 90% / 80% of
    # the positions (measured: >= 97% / 94%).
    for path, tolerance, agree in zip(paths, (0.01, 0.01, 0.1), (1.0, 0.9, 0.8)):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
        add_bos = ids[:1] == [processor.tokenizer.bos_token_id]
        assert llm.tokenize(TEXT.encode(), add_bos=add_bos, special=True) == ids  # the same tokenizer
        if path.name == "model-F32.gguf":
            assert llama_greedy(llm, ids, 12) == hf_tokens
        llm.reset()
        llm.eval(ids + hf_tokens)
        logits = np.array(llm.scores[:len(ids) + 12])
        assert np.abs(logits - hf_logits).max() < tolerance * np.abs(hf_logits).max(), path.name
        assert (logits.argmax(-1) == hf_logits.argmax(-1)).mean() >= agree, path.name
        llm.close()
    # mtmd loads the projector beside the f16 model and turns an image into embeddings the model decodes.
    image = Image.fromarray((np.random.RandomState(0).rand(56, 56, 3) * 255).astype("uint8"))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    llm = llama_cpp.Llama(model_path=str(paths[1]), n_ctx=512, n_threads=2, verbose=False,
                          chat_handler=MTMDChatHandler(clip_model_path=str(paths[-1]), verbose=False, use_gpu=False))
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "Read the digits."}]}],
        max_tokens=4, temperature=0.0)
    text_only = len(processor.tokenizer(processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Read the digits."}]}], add_generation_prompt=True)).input_ids)
    assert reply["usage"]["prompt_tokens"] > text_only and reply["usage"]["completion_tokens"] >= 1
    llm.close()
