"""GGUF export for llama.cpp / Ollama: the merged language model plus its vision projector (mmproj).

llama.cpp runs a vision-language model as two files: the language model (``model-Q8_0.gguf``) and the
vision encoder with its projector (``mmproj-model-F16.gguf``, loaded by llama.cpp's ``mtmd``/``clip``).
This module writes both with the ``gguf`` package from the merged weights of a LoRA model
(:func:`visiontune.models.merge.merged_tensors`) or of a plain transformers model, following llama.cpp's
conventions (tensor names through ``gguf``'s own name map, metadata keys of ``gguf``'s writer):

* Qwen2-VL and Qwen2.5-VL: text architecture ``qwen2vl`` (M-RoPE sections), projector
  ``qwen2vl_merger`` / ``qwen2.5vl_merger`` (fused qkv split into q, k, v; the two-frame patch
  convolution split into two 2-D convolutions);
* Qwen3-VL: text architecture ``qwen3vl`` (query/key norms; interleaved M-RoPE, its sections written so that
  llama.cpp rotates every pair as transformers does: :func:`_interleaved_sections`; DeepStack layer count),
  projector ``qwen3vl_merger`` (fused qkv, learned position grid, GELU-tanh, the DeepStack mergers named by
  the vision block they read);
* Gemma 3: text architecture ``gemma3`` (RMSNorm weights stored as ``1 + w``, per-layer sliding-window
  pattern, local and global RoPE bases), projector ``gemma3``;
* Mistral 3 (Mistral Small 3.x: plain RoPE, full attention): text architecture ``mistral3`` (query/key rows
  reordered for llama.cpp's interleaved RoPE), projector ``pixtral`` (the same reordering for the tower's
  2-D RoPE; Mistral 3's patch merger; the ``[IMG_BREAK]`` embedding taken from the language model).

Language-model types: ``f32``, ``f16`` and ``q8_0`` (Unsloth's ``"not_quantized"`` is f16, ``"fast_quantized"``
is q8_0); the projector is always f16 (f32 for norms, biases and embeddings), as llama.cpp ships it. Other
quantizations (Q4_K_M ...) are made from the f16 file by llama.cpp's ``llama-quantize``.

Tokenizers: byte-level BPE (Qwen's, the tiny test models') is written as llama.cpp's ``gpt2`` tokenizer model
with its merges; SentencePiece-style BPE with byte fallback (Gemma 3's ``tokenizer.json``: spaces normalized
to "▁", ``<0xNN>`` byte tokens) as llama.cpp's ``llama`` (SentencePiece) model with token scores and types
(:func:`spm_vocab`). Other tokenizers are refused with the way out (llama.cpp's ``convert_hf_to_gguf.py``
on the merged folder).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

LANGUAGE_TYPES = ("f32", "f16", "q8_0")
UNSLOTH_METHODS = {"not_quantized": "f16", "fast_quantized": "q8_0", "f32": "f32", "f16": "f16", "q8_0": "q8_0"}
_TEXT_PREFIX, _VISION_PREFIXES = "model.language_model.", ("model.visual.", "model.vision_tower.",
                                                           "model.multi_modal_projector.")


class GGUFExportError(ValueError):
    """The model cannot be written as GGUF by this exporter (architecture, tokenizer or type)."""


# ------------------------------------------------------------------------------------------ per architecture
@dataclass(frozen=True)
class GGUFArch:
    """How one architecture maps onto llama.cpp's text architecture and vision projector."""

    text_arch: str
    """``gguf.MODEL_ARCH`` member name of the language model (e.g. ``"QWEN2VL"``)."""
    text_params: Callable[[Any, Any], None]
    """(writer, model config) -> writes the architecture's own text metadata."""
    text_tensor: Callable[[str, np.ndarray, Any], np.ndarray]
    """(gguf name, float32 array, text config) -> the array as llama.cpp expects it."""
    projector: Callable[[Any], str]
    """model config -> ``clip.projector_type``."""
    vision_params: Callable[[Any, Any, Any], None]
    """(writer, model config, image processor) -> writes the projector's own metadata."""
    vision_tensors: Callable[[str, np.ndarray, Any], Iterable[tuple[str, np.ndarray]]]
    """(HF name without the ``model.`` prefix, array, model config) -> (name for the gguf map or final gguf
    name, array)."""
    f32_vision: tuple[str, ...] = ()
    """Substrings of projector tensor names kept in float32 (besides 1-D tensors)."""
    text_to_vision: Optional[Callable[[Any, Any, dict], Iterable[tuple[str, np.ndarray]]]] = None
    """(model config, processor, merged language-model arrays) -> projector tensors that llama.cpp takes from
    the language model (Pixtral's ``[IMG_BREAK]`` embedding)."""


def _rope_theta(text: Any, layer_type: str = "full_attention") -> float:
    """RoPE base of ``layer_type`` layers (transformers 5 nests rope_parameters by layer type where they differ)."""
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    return float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0)))


def _interleaved_sections(text: Any) -> list[int]:
    """M-RoPE sections for llama.cpp's interleaved M-RoPE (``qwen3vl``) that rotate as transformers' Qwen3-VL.

    transformers rotates pair k of a head by the height position when k % 3 == 1 and k < 3 * mrope_section[1],
    by the width position when k % 3 == 2 and k < 3 * mrope_section[2], else by the temporal one. llama.cpp
    rotates it by axis k % 3 only while k < 3 * sections[k % 3], else by a fourth position (not the token's
    position in text: measured, the tiny Qwen3-VL's [2, 3, 3] moves its f32 logits by 0.27% of their range, and
    the demo base model's [4, 6, 6] at rope_theta 10 by 91%). Written: the number of pairs of each residue,
    which covers every pair: the same rotation as transformers for text (its three positions are equal), and
    for images wherever mrope_section covers its residues (the tiny and demo models); Qwen3-VL's [24, 20, 20]
    leaves pairs 61 and 62 of 64 (frequencies ~1e-6 per position) on the temporal position, which llama.cpp
    rotates by height and width instead (by the fourth position with the sections written as they are)."""
    pairs = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads) // 2
    return [len(range(r, pairs, 3)) for r in range(3)] + [0]


def _qwen_text_params(w: Any, config: Any) -> None:
    sections = list((getattr(config.get_text_config(), "rope_parameters", None) or {}).get("mrope_section") or [])
    if not sections:
        raise GGUFExportError("Qwen-VL text config has no rope_parameters.mrope_section: not a Qwen-VL checkpoint?")
    if config.model_type == "qwen3_vl":
        w.add_rope_dimension_sections(_interleaved_sections(config.get_text_config()))
        # DeepStack: each of the first n language layers adds one vision block's merged features
        w.add_num_deepstack_layers(len(config.vision_config.deepstack_visual_indexes or []))
        return
    w.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))


def _unchanged(name: str, array: np.ndarray, text: Any) -> np.ndarray:
    return array


def _qwen_projector(config: Any) -> str:
    return {"qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger", "qwen3_vl": "qwen3vl_merger"}[
        config.model_type]


def _qwen_vision_params(w: Any, config: Any, image_processor: Any) -> None:
    v = config.vision_config
    if config.model_type == "qwen3_vl":  # the learned position grid's side (llama.cpp interpolates it per image)
        w.add_vision_image_size(math.isqrt(int(v.num_position_embeddings)) * int(v.patch_size))
    else:
        w.add_vision_image_size(560)  # llama.cpp's default for Qwen-VL (dynamic resolution: a warm-up size)
    w.add_uint32("clip.vision.spatial_merge_size", int(v.spatial_merge_size))
    w.add_vision_attention_layernorm_eps(1e-6)  # the vision LayerNorms' fixed eps in transformers
    if config.model_type == "qwen2_vl":
        w.add_vision_embedding_length(int(v.embed_dim))
        w.add_vision_feed_forward_length(int(v.embed_dim * v.mlp_ratio))
        return  # quick-GELU MLP: llama.cpp's default when neither use_gelu nor use_silu is set
    w.add_vision_embedding_length(int(v.hidden_size))
    w.add_vision_feed_forward_length(int(v.intermediate_size))
    if config.model_type == "qwen3_vl":
        if v.hidden_act != "gelu_pytorch_tanh":  # ggml's GELU is the tanh approximation
            raise GGUFExportError(f"Qwen3-VL vision hidden_act {v.hidden_act!r}: llama.cpp runs gelu_pytorch_tanh")
        w.add_vision_use_gelu(True)
        deepstack = set(v.deepstack_visual_indexes or [])
        w.add_vision_is_deepstack_layers([i in deepstack for i in range(int(v.depth))])
        return
    w.add_vision_use_silu(True)
    full = list(v.fullatt_block_indexes)
    period = full[0] + 1  # window attention everywhere except every period-th block
    if any(b - a != period for a, b in zip(full, full[1:])):
        raise GGUFExportError(f"fullatt_block_indexes={full} is not periodic; llama.cpp needs a period (n_wa_pattern)")
    w.add_vision_n_wa_pattern(period)


# Qwen3-VL's patch mergers: the final one (its norm before the 2x2 merge: llama.cpp's post-LN, its MLP as
# mm.0 / mm.2, as Qwen2-VL's) and the DeepStack ones (norm after the merge), named by the block they read.
_QWEN3_MERGER = {"norm": "v.post_ln", "linear_fc1": "mm.0", "linear_fc2": "mm.2"}
_QWEN3_DEEPSTACK = {"norm": "norm", "linear_fc1": "fc1", "linear_fc2": "fc2"}


def _qwen_vision_tensors(name: str, array: np.ndarray, config: Any) -> Iterator[tuple[str, np.ndarray]]:
    parts = name.split(".")
    if ".attn.qkv." in name and config.model_type != "qwen3_vl":  # fused [q; k; v] rows (qwen3vl reads them fused)
        for part, chunk in zip(("q", "k", "v"), np.split(array, 3, axis=0)):
            yield name.replace(".qkv.", f".{part}."), chunk
    elif name == "visual.patch_embed.proj.weight":  # Conv3d over 2 frames -> two Conv2d kernels
        if array.shape[2] != 2:
            raise GGUFExportError(f"patch embedding has temporal size {array.shape[2]}; llama.cpp supports 2")
        yield "v.patch_embd.weight", np.ascontiguousarray(array[:, :, 0])
        yield "v.patch_embd.weight.1", np.ascontiguousarray(array[:, :, 1])
    elif config.model_type == "qwen3_vl" and parts[1] == "merger" and parts[2] in _QWEN3_MERGER:
        yield f"{_QWEN3_MERGER[parts[2]]}.{parts[3]}", array
    elif parts[1] == "deepstack_merger_list" and parts[3] in _QWEN3_DEEPSTACK:
        block = config.vision_config.deepstack_visual_indexes[int(parts[2])]
        yield f"v.deepstack.{block}.{_QWEN3_DEEPSTACK[parts[3]]}.{parts[4]}", array
    else:
        yield name, array


def _gemma_text_params(w: Any, config: Any) -> None:
    text = config.get_text_config()
    layer_types = list(getattr(text, "layer_types", None) or [])
    if getattr(text, "sliding_window", None) and "sliding_attention" in layer_types:
        w.add_sliding_window(int(text.sliding_window))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        w.add_rope_freq_base_swa(_rope_theta(text, "sliding_attention"))
    if getattr(text, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(text.final_logit_softcapping))


def _gemma_query_factor(text: Any) -> float:
    """llama.cpp scales Gemma 3 attention by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B);
    transformers by 1/sqrt(query_pre_attn_scalar). The ratio is folded into the query norm's weight (Q is
    normalized, then scaled by it; RoPE is linear), so both compute the same logits."""
    heads = text.num_attention_heads
    llama_scale = (text.hidden_size / heads) ** -0.5 if text.num_hidden_layers == 62 else text.head_dim ** -0.5
    return float(text.query_pre_attn_scalar) ** -0.5 / llama_scale


def _gemma_text_tensor(name: str, array: np.ndarray, text: Any) -> np.ndarray:
    if name.endswith("norm.weight"):  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp by w
        array = array + 1.0
        if name.endswith("attn_q_norm.weight"):
            array = array * _gemma_query_factor(text)
    return array


def _gemma_vision_params(w: Any, config: Any, image_processor: Any) -> None:
    v = config.vision_config
    w.add_vision_image_size(int(v.image_size))
    w.add_vision_embedding_length(int(v.hidden_size))
    w.add_vision_feed_forward_length(int(v.intermediate_size))
    w.add_vision_attention_layernorm_eps(float(getattr(v, "layer_norm_eps", 1e-6)))
    w.add_vision_use_gelu(True)
    per_side = int(math.isqrt(int(config.mm_tokens_per_image)))
    factor = (v.image_size // v.patch_size) // per_side
    if factor != 4:  # llama.cpp assumes 4 (every released Gemma 3); the tiny models pool less
        w.add_vision_projector_scale_factor(int(factor))


def _gemma_vision_tensors(name: str, array: np.ndarray, config: Any) -> Iterator[tuple[str, np.ndarray]]:
    if name == "multi_modal_projector.mm_input_projection_weight":  # a bare parameter, stored as it is
        yield "multi_modal_projector.mm_input_projection.weight", array
    elif name == "multi_modal_projector.mm_soft_emb_norm.weight":
        yield name, array + 1.0  # Gemma RMSNorm (1 + w)
    elif name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        yield "vision_tower.vision_model." + name[len("vision_tower."):], array  # transformers 5 dropped a level
    else:
        yield name, array


def _rope_pairs(array: np.ndarray, heads: int) -> np.ndarray:
    """Query/key rows from transformers' rotate-half RoPE layout (per head: the first halves of the rotated
    pairs, then the second halves) to llama.cpp's interleaved pairs (rows 2i and 2i+1 rotate together), as
    its llama-style ("norm") RoPE wants them; the same rotation frequencies pair by pair."""
    return array.reshape(heads, 2, array.shape[0] // heads // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def _mistral_text_params(w: Any, config: Any) -> None:
    text = config.get_text_config()
    rope_type = (getattr(text, "rope_parameters", None) or {}).get("rope_type", "default")
    window = getattr(text, "sliding_window", None)
    if rope_type != "default" or (window and window < text.max_position_embeddings):
        raise GGUFExportError(
            f"Mistral 3 language model with rope_type {rope_type!r} and sliding_window {window}: this exporter writes "
            "plain RoPE and full attention (Mistral Small 3.x); convert the merged folder with llama.cpp's "
            "convert_hf_to_gguf.py (Ministral 3's YaRN and attention-temperature metadata).")


def _mistral_text_tensor(name: str, array: np.ndarray, text: Any) -> np.ndarray:
    if name.endswith("attn_q.weight"):
        return _rope_pairs(array, int(text.num_attention_heads))
    if name.endswith("attn_k.weight"):
        return _rope_pairs(array, int(text.num_key_value_heads))
    return array


def _pixtral_vision_params(w: Any, config: Any, image_processor: Any) -> None:
    v = config.vision_config
    rope_theta = _rope_theta(v)
    problems = ([f"vision_feature_layer {config.vision_feature_layer} (llama.cpp uses the last layer)"]
                if config.vision_feature_layer not in (-1, v.num_hidden_layers - 1) else []) \
        + ([f"vision rope_theta {rope_theta} (llama.cpp's Pixtral uses 10000)"] if rope_theta != 10000.0 else []) \
        + ([f"vision hidden_act {v.hidden_act!r}"] if v.hidden_act not in ("silu", "gelu") else []) \
        + ([f"projector_hidden_act {config.projector_hidden_act!r} (llama.cpp's is GELU)"]
           if config.projector_hidden_act != "gelu" else [])
    if problems:
        raise GGUFExportError(f"Pixtral vision tower with {'; '.join(problems)}: convert the merged folder with "
                              "llama.cpp's convert_hf_to_gguf.py --mmproj")
    w.add_vision_image_size(int(v.image_size))
    w.add_vision_embedding_length(int(v.hidden_size))
    w.add_vision_feed_forward_length(int(v.intermediate_size))
    w.add_vision_attention_layernorm_eps(1e-5)  # transformers' Pixtral RMSNorm eps (fixed)
    getattr(w, f"add_vision_use_{v.hidden_act}")(True)
    w.add_vision_spatial_merge_size(int(config.spatial_merge_size))


def _pixtral_vision_tensors(name: str, array: np.ndarray, config: Any) -> Iterator[tuple[str, np.ndarray]]:
    if name.endswith(("attention.q_proj.weight", "attention.k_proj.weight")):  # 2-D RoPE, interleaved pairs
        array = _rope_pairs(array, int(config.vision_config.num_attention_heads))
    yield name, array


def _pixtral_image_break(config: Any, processor: Any, text: dict) -> Iterator[tuple[str, np.ndarray]]:
    """The ``[IMG_BREAK]`` token's (merged) input embedding: llama.cpp's Pixtral graph puts it after each row."""
    tokenizer = getattr(processor, "tokenizer", processor)
    token = getattr(processor, "image_break_token", None) or "[IMG_BREAK]"
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise GGUFExportError(f"the tokenizer has no {token} token, which llama.cpp's Pixtral projector needs")
    yield "v.token_embd.img_break", text[_TEXT_PREFIX + "embed_tokens.weight"][token_id]


_QWEN = dict(text_arch="QWEN2VL", text_params=_qwen_text_params, text_tensor=_unchanged, projector=_qwen_projector,
             vision_params=_qwen_vision_params, vision_tensors=_qwen_vision_tensors)
ARCHS: dict[str, GGUFArch] = {
    "qwen2_vl": GGUFArch(**_QWEN),
    "qwen2_5_vl": GGUFArch(**_QWEN),
    "qwen3_vl": GGUFArch(**{**_QWEN, "text_arch": "QWEN3VL"}, f32_vision=(".pos_embed.",)),
    "gemma3": GGUFArch("GEMMA3", _gemma_text_params, _gemma_text_tensor, lambda config: "gemma3",
                       _gemma_vision_params, _gemma_vision_tensors, f32_vision=(".embeddings.",)),
    "mistral3": GGUFArch("MISTRAL3", _mistral_text_params, _mistral_text_tensor, lambda config: "pixtral",
                         _pixtral_vision_params, _pixtral_vision_tensors, text_to_vision=_pixtral_image_break),
}
"""``config.model_type`` -> :class:`GGUFArch`: the architectures this exporter writes."""


def gguf_arch(config: Any) -> GGUFArch:
    """The :class:`GGUFArch` of a model config, or a clear error naming the supported ones."""
    spec = ARCHS.get(getattr(config, "model_type", None))
    if spec is None:
        raise GGUFExportError(
            f"GGUF export supports {', '.join(ARCHS)}, not {getattr(config, 'model_type', None)!r}. Save the merged "
            "model (save_pretrained_merged) and convert that folder with llama.cpp's convert_hf_to_gguf.py "
            "(plus --mmproj for the vision projector) where llama.cpp supports the architecture.")
    return spec


# ------------------------------------------------------------------------------------------ vocabulary
def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE ``tokenizer.json`` (read from its structure)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "starcoder"  # digits one by one, then GPT-2's regex
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    pattern = json.dumps(steps[0].get("pattern", {})) if kinds[:1] == ["Split"] else ""
    if "\\\\p{N}{1,3}" in pattern:
        return "llama-bpe"
    if "\\\\p{N}|" in pattern and "?\\\\p{L}+" in pattern:
        return "qwen2"
    raise GGUFExportError(
        f"unrecognised pre-tokenizer {kinds}: convert the merged folder with llama.cpp's convert_hf_to_gguf.py")


def _add_vocab(w: Any, processor: Any, vocab_size: int) -> None:
    """Tokens, types, special ids and the chat template: a byte-level BPE tokenizer as llama.cpp's ``gpt2``
    model (with its merges), a SentencePiece-style one (BPE with byte fallback, Gemma's) as its ``llama`` model."""
    import gguf

    tokenizer = getattr(processor, "tokenizer", processor)
    with tempfile.TemporaryDirectory(prefix="visiontune-gguf-") as tmp:
        tokenizer.save_pretrained(tmp)
        tokenizer_json = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        model = tokenizer_json.get("model", {})
        decoder = (tokenizer_json.get("decoder") or {}).get("type")
        spm = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
        if not spm and (model.get("type") != "BPE" or decoder != "ByteLevel"):
            raise GGUFExportError(
                "the tokenizer is neither byte-level BPE nor SentencePiece-style BPE (byte fallback); this exporter "
                "writes those two kinds only. Convert the merged folder with llama.cpp's convert_hf_to_gguf.py.")
        merges = None if spm else gguf.SpecialVocab(tmp, load_merges=True).merges
    if spm:
        _add_spm_tokens(w, tokenizer_json, vocab_size)
    else:
        _add_byte_level_tokens(w, tokenizer, tokenizer_json, merges, vocab_size)
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(w, f"add_{kind}_token_id")(int(token_id))
    probe = tokenizer("a").input_ids
    w.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    if spm:  # llama.cpp's SentencePiece defaults (add a space prefix, no eos) stated either way
        w.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
        w.add_add_space_prefix(False)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if template:
        w.add_chat_template(template)


def _add_byte_level_tokens(w: Any, tokenizer: Any, tokenizer_json: dict, merges: list, vocab_size: int) -> None:
    """A byte-level BPE vocabulary as llama.cpp's ``gpt2`` tokenizer model: tokens, types, merges."""
    import gguf

    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(id_to_token) > vocab_size:
        raise GGUFExportError(f"tokenizer has {len(id_to_token)} tokens but the model's vocab_size is {vocab_size}")
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = id_to_token.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED if token is None else gguf.TokenType.CONTROL if token in special
                     else gguf.TokenType.USER_DEFINED if token in added else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(tokenizer_json))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)


SPM_SPACE = "\u2581"
"""SentencePiece's whitespace symbol "▁", which the tokenizer's normalizer puts in place of every space."""
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Added tokens that Gemma's tokenizer does not flag as special but that are control tokens all the same;
# llama.cpp's converter types them CONTROL too (only matched in text when special tokens are parsed).
_GEMMA_CONTROL = ("<mask>", "[@BOS@]", "<2mass>")


def _check_spm_layout(tokenizer_json: dict) -> None:
    """Refuse a byte-fallback BPE ``tokenizer.json`` that llama.cpp's SentencePiece tokenizer would not
    reproduce: it must turn spaces into "▁" and nothing else (no space prefix: llama.cpp is told
    ``add_space_prefix = false``), split nothing before the BPE model (a split at " " after that normalizer,
    as transformers 5's ``GemmaTokenizer`` has, splits nothing), and merge deterministically."""
    model = tokenizer_json["model"]
    norm = tokenizer_json.get("normalizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    replaces_spaces = [s.get("type") for s in steps] == ["Replace"] and steps[0].get("pattern") == {"String": " "} \
        and steps[0].get("content") == SPM_SPACE
    pre = tokenizer_json.get("pre_tokenizer") or {}
    # transformers 5's GemmaTokenizer splits at " ", of which the normalizer has left none: nothing is split
    splits_nothing = not pre or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "})
    problems = ([] if replaces_spaces else [f"normalizer {[s.get('type') for s in steps]} is not Replace(' ' -> '▁')"]) \
        + ([] if splits_nothing else [f"pre-tokenizer {pre.get('type')}"]) \
        + [f"BPE {k}={model[k]!r}" for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix") if model.get(k)]
    if problems:
        raise GGUFExportError(
            f"SentencePiece-style tokenizer with {'; '.join(problems)}: this exporter writes the layout of Gemma's "
            "tokenizer only (llama.cpp tokenizes it as SentencePiece). Convert the merged folder with llama.cpp's "
            "convert_hf_to_gguf.py (it reads tokenizer.model).")


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    """The BPE merges of a ``tokenizer.json`` model, as pairs (both of its spellings: "a b" and ["a", "b"])."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges", [])]


def spm_vocab(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of a SentencePiece-style BPE ``tokenizer.json`` for llama.cpp's ``llama``
    tokenizer model, padded to ``vocab_size`` with unused ``[PAD<id>]`` tokens.

    llama.cpp does not read merges for this model: it merges adjacent pieces whose concatenation is a token,
    highest score first (leftmost among equals). A token's score is therefore minus the rank of the first
    merge that makes it, which reproduces the BPE merge order; tokens no merge makes (characters) score below
    all of them, and bytes ``<0xNN>``, the unknown token and added tokens keep SentencePiece's and llama.cpp's
    fixed scores. That equals the BPE model only when its merges are closed: every way of splitting a token
    into two tokens is a merge (true of tokenizers converted from SentencePiece, whose merges are generated
    that way); otherwise llama.cpp would make tokens the BPE model never makes, so that is refused.
    Types: ``<0xNN>`` BYTE, added special tokens (and Gemma's unflagged ``<mask>``, ``[@BOS@]``, ``<2mass>``,
    ``<unusedN>``) CONTROL, other added tokens USER_DEFINED (written with "▁" back to spaces where the token
    is matched in normalized text: llama.cpp matches them in the raw text), the unknown token UNKNOWN unless
    it is an added special token (Gemma's ``<unk>`` is: CONTROL, as llama.cpp's converter types it).
    """
    import gguf

    types_ = gguf.TokenType
    _check_spm_layout(tokenizer_json)
    model = tokenizer_json["model"]
    vocab: dict[str, int] = model["vocab"]
    added = {int(t["id"]): t for t in tokenizer_json.get("added_tokens", [])}
    top = max([*vocab.values(), *added], default=-1)
    if top >= vocab_size:
        raise GGUFExportError(f"tokenizer has token id {top} but the model's vocab_size is {vocab_size}")
    merges = _merge_pairs(model)
    first_merge: dict[str, int] = {}
    for rank, (a, b) in enumerate(merges):
        first_merge.setdefault(a + b, rank)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [int(types_.UNUSED)] * vocab_size
    unk = model.get("unk_token")
    for token, i in vocab.items():
        tokens[i] = token
        if _BYTE_TOKEN.fullmatch(token):
            scores[i], types[i] = 0.0, int(types_.BYTE)
        elif token == unk:
            scores[i], types[i] = 0.0, int(types_.UNKNOWN)
        else:
            scores[i], types[i] = -float(first_merge.get(token, len(merges) + i)), int(types_.NORMAL)
    for i, t in added.items():
        content = t["content"]
        control = t.get("special") or content in _GEMMA_CONTROL or (content.startswith("<unused") and content.endswith(">"))
        if not control and t.get("normalized"):
            content = content.replace(SPM_SPACE, " ")
        tokens[i], scores[i] = content, -1000.0
        types[i] = int(types_.CONTROL if control else types_.USER_DEFINED)
    pairs = set(merges)
    normal = dict.fromkeys(t for t, i in vocab.items() if types[i] == types_.NORMAL)  # ordered: a stable error
    for token in normal:
        for cut in range(1, len(token)):
            a, b = token[:cut], token[cut:]
            if a in normal and b in normal and (a, b) not in pairs:
                raise GGUFExportError(
                    f"the tokenizer's BPE merges are not closed: {a!r} + {b!r} makes token {token!r}, but no merge says "
                    "so; llama.cpp's SentencePiece tokenizer would make it where this tokenizer does not. Convert the "
                    "merged folder with llama.cpp's convert_hf_to_gguf.py from the model's tokenizer.model.")
    return tokens, scores, types


def _add_spm_tokens(w: Any, tokenizer_json: dict, vocab_size: int) -> None:
    """A SentencePiece-style vocabulary as llama.cpp's ``llama`` tokenizer model: tokens, scores, types."""
    tokens, scores, types = spm_vocab(tokenizer_json, vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)


# ------------------------------------------------------------------------------------------ writing
def _tensor_type(gguf: Any, name: str, array: np.ndarray, ltype: str) -> Any:
    """GGML type of one tensor: 1-D tensors in f32; q8_0 where rows split into 32-blocks, else f16."""
    types = gguf.GGMLQuantizationType
    if array.ndim == 1 or ltype == "f32":
        return types.F32
    if ltype == "q8_0" and array.shape[-1] % 32 == 0:
        return types.Q8_0
    return types.F16


def _add_tensor(w: Any, name: str, array: np.ndarray, qtype: Any) -> None:
    import gguf

    data = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
    w.add_tensor(name, data, raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.Q8_0 else None)


def _finish(w: Any) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _map_name(name_map: Any, name: str) -> str:
    if name.startswith(("v.", "mm.")):  # already a gguf name (a split made by the architecture)
        return name
    mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias", ".weight.1"))
    if mapped is None:
        raise GGUFExportError(f"no llama.cpp tensor name for {name!r}")
    return mapped


def _write_language_model(path: Path, spec: GGUFArch, config: Any, tensors: dict[str, np.ndarray],
                          processor: Any, ltype: str, name: str) -> Path:
    import gguf

    text = config.get_text_config()
    arch = getattr(gguf.MODEL_ARCH, spec.text_arch)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ltype])
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    w.add_context_length(int(text.max_position_embeddings))
    w.add_embedding_length(int(text.hidden_size))
    w.add_block_count(int(text.num_hidden_layers))
    w.add_feed_forward_length(int(text.intermediate_size))
    w.add_head_count(int(text.num_attention_heads))
    w.add_head_count_kv(int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads))
    w.add_key_length(int(head_dim))
    w.add_value_length(int(head_dim))
    w.add_layer_norm_rms_eps(float(text.rms_norm_eps))
    w.add_rope_freq_base(_rope_theta(text))
    spec.text_params(w, config)
    _add_vocab(w, processor, int(text.vocab_size))
    name_map = gguf.get_tensor_name_map(arch, int(text.num_hidden_layers))
    for hf_name, array in tensors.items():
        plain = "model." + hf_name[len(_TEXT_PREFIX):] if hf_name.startswith(_TEXT_PREFIX) else hf_name
        gguf_name = _map_name(name_map, plain)
        array = spec.text_tensor(gguf_name, array, text)
        _add_tensor(w, gguf_name, array, _tensor_type(gguf, gguf_name, array, ltype))
    _finish(w)
    return path


def _write_projector(path: Path, spec: GGUFArch, config: Any, tensors: dict[str, np.ndarray], processor: Any,
                     name: str, text: dict[str, np.ndarray]) -> Path:
    import gguf

    v = config.vision_config
    image_processor = getattr(processor, "image_processor", processor)
    blocks = int(getattr(v, "depth", None) or v.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(spec.projector(config))
    w.add_vision_projection_dim(int(config.get_text_config().hidden_size))
    w.add_vision_patch_size(int(v.patch_size))
    w.add_vision_block_count(blocks)
    w.add_vision_head_count(int(getattr(v, "num_heads", None) or v.num_attention_heads))
    w.add_vision_image_mean([float(x) for x in image_processor.image_mean])
    w.add_vision_image_std([float(x) for x in image_processor.image_std])
    spec.vision_params(w, config, image_processor)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(blocks, 3))  # the merger MLP is "block" 2
    parts = [part for hf_name, array in tensors.items()
             for part in spec.vision_tensors(hf_name[len("model."):], array, config)]
    if spec.text_to_vision is not None:
        parts += list(spec.text_to_vision(config, processor, text))
    for part_name, part in parts:
        gguf_name = _map_name(name_map, part_name)
        keep_f32 = part.ndim == 1 or any(s in part_name for s in spec.f32_vision)
        _add_tensor(w, gguf_name, part, gguf.GGMLQuantizationType.F32 if keep_f32 else gguf.GGMLQuantizationType.F16)
    _finish(w)
    return path


def write_gguf(model: Any, processor: Any, out_dir: Union[str, Path], types: Iterable[str] = ("q8_0",),
               name: str = "model", dequantize: bool = False) -> list[Path]:
    """Write ``model`` (LoRA or plain) as ``{name}-{TYPE}.gguf`` for each of ``types`` (:data:`LANGUAGE_TYPES`)
    plus ``mmproj-{name}-F16.gguf`` in ``out_dir``; returns the files, language models first."""
    from visiontune.models.merge import embeddings_differ, merged_tensors
    from visiontune.models.state import base_model

    types = list(dict.fromkeys(types))
    bad = [t for t in types if t not in LANGUAGE_TYPES]
    if bad or not types:
        raise GGUFExportError(f"GGUF type(s) {bad or types}: choose from {', '.join(LANGUAGE_TYPES)}; make others "
                              "(e.g. Q4_K_M) from the f16 file with llama.cpp's llama-quantize")
    config = base_model(model).config
    spec = gguf_arch(config)
    tensors = merged_tensors(model, dequantize=dequantize)
    text_config = config.get_text_config()
    tied = (getattr(text_config, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)) \
        and not embeddings_differ(base_model(model), tensors)
    arrays = {k: t.detach().float().cpu().numpy() for k, t in tensors.items()
              if t.is_floating_point() and not (tied and k == "lm_head.weight")}  # llama.cpp reuses token_embd
    text = {k: a for k, a in arrays.items() if k.startswith(_TEXT_PREFIX) or k == "lm_head.weight"}
    vision = {k: a for k, a in arrays.items() if k.startswith(_VISION_PREFIXES)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_write_language_model(out / f"{name}-{t.upper()}.gguf", spec, config, text, processor, t, name)
             for t in types]
    return paths + [_write_projector(out / f"mmproj-{name}-F16.gguf", spec, config, vision, processor, name, text)]


def save_pretrained_gguf(model: Any, save_directory: Union[str, Path], tokenizer: Any = None,
                         quantization_method: Union[str, list[str]] = "fast_quantized", *, dequantize: bool = False,
                         **unsloth_options: Any) -> list[Path]:
    """Unsloth's ``save_pretrained_gguf``: the merged language model in each requested type plus the mmproj.

    ``quantization_method``: one name or a list of ``"f32"``, ``"f16"``, ``"q8_0"``, ``"not_quantized"`` (f16),
    ``"fast_quantized"`` (q8_0). Unsloth's build options (``maximum_memory_usage`` ...) have no effect.
    Returns the written files.
    """
    from visiontune.models.merge import check_unsloth_options, processor_of

    check_unsloth_options("save_pretrained_gguf", unsloth_options)
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    unknown = [m for m in methods if m.lower() not in UNSLOTH_METHODS]
    if unknown:
        raise GGUFExportError(f"quantization_method {unknown}: choose from {', '.join(UNSLOTH_METHODS)}; make "
                              "other types from the f16 file with llama.cpp's llama-quantize")
    return write_gguf(model, processor_of(model, tokenizer), save_directory,
                      [UNSLOTH_METHODS[m.lower()] for m in methods], dequantize=dequantize)
