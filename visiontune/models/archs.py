"""The architecture registry: one :class:`~visiontune.models.archspec.ArchSpec` per supported architecture.

Each architecture is described once, as data, in its own section below: its LoRA module map, its fused-
kernel map, its collator facts and its tiny test model (config, processor, tokenizer facts). Everything
that differs between architectures is looked up here; the code that uses it (``get_peft_model``,
``kernels.patch_model``, the collator, ``testing.build_tiny_model``) is shared. Adding an architecture
is one section in this file and its name in :data:`REGISTRY` (docs/architectures.md).

The tiny builders import transformers inside their bodies: importing this module stays cheap.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from visiontune.models.archspec import (GEMMA_NORM, LLAMA_NORM, ArchSpec, ImageTokens, KernelMap, TinySpec,
                                        full_name_regex)

_LANG_ATTN = r"language_model\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
_LANG_MLP = r"language_model\.layers\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj)"
_GATED = ("gate_proj", "up_proj", "down_proj", "act_fn")


def _tid(tok: Any, t: str) -> int:
    return tok.convert_tokens_to_ids(t)


# Tiny chat templates have the same structure and special tokens as the real models' templates (our own
# Jinja). An image part is recognised by type == "image" (Arrow-stored rows carry image: None on text parts).

# ---------------------------------------------------------------------------------------------------
# Qwen2-VL, Qwen2.5-VL, Qwen3-VL

_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
_QWEN_ATTRS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
_QWEN_EXTRA = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}
_QWEN_IMAGE_TOKENS = ImageTokens(
    strings=("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    attrs=("image_token", "video_token", "vision_bos_token", "vision_eos_token"),
    config_ids=("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"),
)
_QWEN_VISION_ATTN = r"visual\.blocks\.\d+\.attn\.(?:qkv|proj)"


def _qwen_text(tok: Any, **extra: Any) -> dict[str, Any]:
    """The tiny Qwen language-model config (M-RoPE sections for a 16-wide head)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], **extra.pop("rope", {})}
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_parameters=rope,
                tie_word_embeddings=False, bos_token_id=_tid(tok, "<|endoftext|>"),
                eos_token_id=_tid(tok, "<|im_end|>"), pad_token_id=_tid(tok, "<|endoftext|>"), **extra)


def _qwen_config(config_cls: str, tok: Any, text: dict[str, Any], vision: dict[str, Any]) -> Any:
    import transformers

    return getattr(transformers, config_cls)(
        text_config=text, vision_config=vision, image_token_id=_tid(tok, "<|image_pad|>"),
        video_token_id=_tid(tok, "<|video_pad|>"), vision_start_token_id=_tid(tok, "<|vision_start|>"),
        vision_end_token_id=_tid(tok, "<|vision_end|>"), tie_word_embeddings=False)


def _qwen_processor(cls_name: str, patch: int, video_cls: str) -> Callable[[Any, str], Any]:
    def make(tok: Any, template: str) -> Any:
        import transformers
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        # min/max pixels sized for tiny tests: a 56x56 image gives 4x4 patches -> 4 tokens after the 2x2 merge.
        size = {"shortest_edge": (patch * 2) ** 2, "longest_edge": (patch * 2) ** 2 * 64}
        image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2, size=size)
        video_processor = getattr(transformers, video_cls)(patch_size=patch, merge_size=2, temporal_patch_size=2, size=size)
        return getattr(transformers, cls_name)(image_processor=image_processor, tokenizer=tok,
                                              video_processor=video_processor, chat_template=template)

    return make


def _qwen2_vl_config(tok: Any) -> Any:
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return _qwen_config("Qwen2VLConfig", tok, _qwen_text(tok), vision)


def _qwen2_5_vl_config(tok: Any) -> Any:
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], in_channels=3)
    return _qwen_config("Qwen2_5_VLConfig", tok, _qwen_text(tok), vision)


def _qwen3_vl_config(tok: Any) -> Any:
    text = _qwen_text(tok, head_dim=16, rope={"mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0], in_channels=3)
    return _qwen_config("Qwen3VLConfig", tok, text, vision)


def _qwen_vision_metadata(model: Any, grid: Any) -> dict[str, Any]:
    """The Qwen-VL vision tower's metadata for ``grid`` (``image_grid_thw``, CPU), computed with transformers'
    own ``vision_utils`` functions, as ``image_*`` kwargs the tower pops instead of computing them itself.

    Computed in the tower's forward, they read the grid back from the GPU several times per step (``tolist``,
    ``repeat_interleave``, ``unique_consecutive``, and the attention's longest sequence), and each read drains
    the GPU's queue. ``{}`` when this transformers' tower does not take precomputed metadata (releases
    before ``transformers.vision_utils``), or the model has no tower we know.
    """
    import sys

    try:
        from transformers import vision_utils as vu
    except ImportError:
        return {}
    from visiontune.models.packing import longest_sequence
    from visiontune.models.state import base_model

    base = base_model(model)
    visual = getattr(getattr(base, "model", base), "visual", None)
    module = sys.modules.get(type(visual).__module__) if visual is not None else None
    if module is None or getattr(module, "get_vision_position_ids", None) is not vu.get_vision_position_ids:
        return {}

    merge = visual.spatial_merge_size
    cu = vu.get_vision_cu_seqlens(grid)
    out = {"image_position_ids": vu.get_vision_position_ids(grid, merge), "image_cu_seqlens": cu,
           "image_max_seqlen": longest_sequence(cu)}
    if getattr(visual, "window_size", None) is not None and hasattr(module, "get_vision_window_index"):
        index, cu_window = vu.get_vision_window_index(grid, spatial_merge_size=merge, window_size=visual.window_size,
                                                      patch_size=visual.patch_size)
        out.update(image_window_index=index, image_cu_window_seqlens=cu_window,
                   image_max_window_seqlen=longest_sequence(cu_window))
    side = getattr(visual, "num_grid_per_side", None)  # Qwen3-VL: learned position table resampled per image
    mode = getattr(visual, "interpolation_mode", None)
    if side is not None and mode is not None and hasattr(module, "get_vision_interpolation_indices_and_weights"):
        indices, weights = vu.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=side, mode=mode, align_corners=visual.interpolation_align_corners,
            spatial_merge_size=visual.config.spatial_merge_size)
        out.update(image_interp_indices=indices, image_interp_weights=weights)
    return out


def _qwen(model_type: str, display_name: str, *, vision_mlp: str, never: str, kernels: KernelMap,
          tiny_config: Callable[[Any], Any], processor: str, patch: int, video_processor: str,
          sizes: tuple[str, ...] = ("test", "demo")) -> ArchSpec:
    """A Qwen-VL family entry: the family's shared facts (language model, image tokens, merged patches,
    packing, tiny tokenizer) plus what differs between its generations."""
    tiny = TinySpec(_QWEN_SPECIAL, _QWEN_TEMPLATE, _QWEN_ATTRS, tiny_config,
                    _qwen_processor(processor, patch, video_processor),
                    processor.replace("Processor", "ForConditionalGeneration"), _QWEN_EXTRA, sizes=sizes)
    return ArchSpec(model_type, display_name, vision_attention=_QWEN_VISION_ATTN, vision_mlp=vision_mlp,
                    language_attention=_LANG_ATTN, language_mlp=_LANG_MLP, never=never, kernels=kernels,
                    image_tokens=_QWEN_IMAGE_TOKENS, padding_free=True, tiny=tiny,
                    merge_size_attr="spatial_merge_size", size_in_pixels=True, vision_metadata=_qwen_vision_metadata)


QWEN2_VL = _qwen(
    "qwen2_vl", "Qwen2-VL",
    vision_mlp=r"visual\.blocks\.\d+\.mlp\.(?:fc1|fc2)",
    never=r"(?:visual\.merger\..*|lm_head)",
    kernels=KernelMap(
        rms_norms={"Qwen2RMSNorm": LLAMA_NORM, "Qwen2VLRMSNorm": LLAMA_NORM},
        gated_mlps={"Qwen2MLP": _GATED},
        plain_mlps={"VisionMlp": ("fc1", "fc2", "act")},
        mrope_rotary={"Qwen2VLRotaryEmbedding": False},
        text_attention=("Qwen2VLAttention",),
        vision_attention=("VisionAttention", "VisionSdpaAttention"),
    ),
    tiny_config=_qwen2_vl_config, processor="Qwen2VLProcessor", patch=14, video_processor="Qwen2VLVideoProcessor",
)

QWEN2_5_VL = _qwen(
    "qwen2_5_vl", "Qwen2.5-VL",
    vision_mlp=r"visual\.blocks\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj)",
    never=r"(?:visual\.merger\..*|lm_head)",
    kernels=KernelMap(
        rms_norms={"Qwen2_5_VLRMSNorm": LLAMA_NORM, "Qwen2RMSNorm": LLAMA_NORM},
        gated_mlps={"Qwen2MLP": _GATED, "Qwen2_5_VLMLP": _GATED},
        mrope_rotary={"Qwen2_5_VLRotaryEmbedding": False},
        text_attention=("Qwen2_5_VLAttention",),
        vision_attention=("Qwen2_5_VLVisionAttention",),
    ),
    tiny_config=_qwen2_5_vl_config, processor="Qwen2_5_VLProcessor", patch=14, video_processor="Qwen2VLVideoProcessor",
)

QWEN3_VL = _qwen(
    "qwen3_vl", "Qwen3-VL",
    vision_mlp=r"visual\.blocks\.\d+\.mlp\.(?:linear_fc1|linear_fc2)",
    never=r"(?:visual\.(?:merger|deepstack_merger_list\.\d+)\..*|lm_head)",
    kernels=KernelMap(
        rms_norms={"Qwen3VLTextRMSNorm": LLAMA_NORM},
        gated_mlps={"Qwen3VLTextMLP": _GATED},
        plain_mlps={"Qwen3VLVisionMLP": ("linear_fc1", "linear_fc2", "act_fn")},
        mrope_rotary={"Qwen3VLTextRotaryEmbedding": True},
        text_attention=("Qwen3VLTextAttention",),
        vision_attention=("Qwen3VLVisionAttention",),
    ),
    tiny_config=_qwen3_vl_config, processor="Qwen3VLProcessor", patch=16, video_processor="Qwen3VLVideoProcessor",
    sizes=("test", "demo", "base"),
)

# ---------------------------------------------------------------------------------------------------
# Llama 3.2 Vision (Mllama)

_MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|image|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _mllama_config(tok: Any) -> Any:
    from transformers import MllamaConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                  attention_heads=2, image_size=56, patch_size=14, max_num_tiles=2,
                  intermediate_layers_indices=[0, 1], vision_output_dim=96,
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                max_position_embeddings=4096, bos_token_id=_tid(tok, "<|begin_of_text|>"),
                eos_token_id=_tid(tok, "<|eot_id|>"), pad_token_id=_tid(tok, "<|finetune_right_pad_id|>"),
                tie_word_embeddings=False)
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=_tid(tok, "<|image|>"))


def _mllama_processor(tok: Any, template: str) -> Any:
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    ip = MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=2)
    return MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=template)


def _mllama_mixed_batch(image_batch: Any, rows: list[int], n: int, length: int) -> dict[str, Any]:
    """The image inputs of a Mllama batch of ``n`` rows (``length`` tokens) whose rows ``rows`` have images.

    Mllama's processor cannot encode rows without images beside rows with images (transformers 5.24: an
    IndexError, or ``aspect_ratio_ids`` for fewer rows than ``pixel_values``, which the model rejects with
    "shape '[2, -1]' is invalid"). The text rows get what the processor gives an absent image: zero tiles,
    ``aspect_ratio_ids`` 0, ``aspect_ratio_mask`` with only the first tile on, and a cross-attention mask of
    zeros (the model then masks cross-attention out for those rows). The image rows' cross-attention masks
    are extended to ``length`` as the processor builds them: an image attended to the end of its row stays
    attended over the padding. Each row's logits equal those of the row alone (tested).
    """
    import torch

    batch = {}
    for key, value in image_batch.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if key == "cross_attention_mask" and value.shape[1] < length:
            value = torch.cat([value, value[:, -1:].expand(-1, length - value.shape[1], -1, -1)], dim=1)
        full = value.new_zeros((n, *value.shape[1:]))
        if key == "aspect_ratio_mask":
            full[:, :, 0] = 1
        full[rows] = value
        batch[key] = full
    return batch


def _stash_image_rows(layer: Any, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a cross-attention decoder layer: which rows of the batch have an image."""
    mask = kwargs.get("full_text_row_masked_out_mask")
    layer.cross_attn._vt_image_rows = None if mask is None else mask.amax(dim=(1, 2, 3)) > 0


def _zero_rows_without_image(attn: Any, args: tuple, output: tuple) -> Any:
    """Forward hook of a cross-attention module: rows without any image get no cross-attention output."""
    rows = getattr(attn, "_vt_image_rows", None)
    if rows is None or bool(rows.all()):
        return output  # every row has an image (or none has): transformers' own computation, untouched
    return (output[0] * rows.view(-1, 1, 1).to(output[0].dtype), *output[1:])


def _mllama_prepare(model: Any) -> None:
    """Make a text-only row of a mixed batch compute what it computes alone.

    Alone, a row without images skips Mllama's cross-attention layers. In a batch with image rows those
    layers run for it; transformers zeroes their MLP output for tokens that see no image but adds their
    attention output (a uniform average over the batch's empty-image features, scaled by the trained
    gate), which Meta's reference implementation zeroes as well. For rows with no image at all we zero it
    too: the layer is then the identity for them, as when skipped. Batches in which every row has an image
    are left exactly as transformers computes them. Idempotent.
    """
    for layer in model.modules():
        if type(layer).__name__ == "MllamaCrossAttentionDecoderLayer" and not getattr(layer, "_vt_image_rows", False):
            layer.register_forward_pre_hook(_stash_image_rows, with_kwargs=True)
            layer.cross_attn.register_forward_hook(_zero_rows_without_image)
            layer._vt_image_rows = True


MLLAMA = ArchSpec(
    "mllama", "Llama 3.2 Vision",
    vision_attention=r"vision_model\.(?:transformer|global_transformer)\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)",
    vision_mlp=r"vision_model\.(?:transformer|global_transformer)\.layers\.\d+\.mlp\.(?:fc1|fc2)",
    language_attention=r"language_model\.layers\.\d+\.(?:self_attn|cross_attn)\.(?:q_proj|k_proj|v_proj|o_proj)",
    language_mlp=_LANG_MLP,
    never=r"(?:multi_modal_projector|lm_head)",
    kernels=KernelMap(
        rms_norms={"MllamaTextRMSNorm": LLAMA_NORM},
        gated_mlps={"MllamaTextMLP": _GATED},
        plain_mlps={"MllamaVisionMLP": ("fc1", "fc2", "activation_fn")},
        rope_modules=("transformers.models.mllama.modeling_mllama",),
    ),
    image_tokens=ImageTokens(strings=("<|image|>",), config_ids=("image_token_index",)), padding_free=False,
    tiny=TinySpec(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<|image|>", "<|python_tag|>", "<|finetune_right_pad_id|>"],
                  _MLLAMA_TEMPLATE,
                  {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"},
                  _mllama_config, _mllama_processor, "MllamaForConditionalGeneration"),
    dynamic_resolution=False,
    mixed_batch=_mllama_mixed_batch,
    prepare_model=_mllama_prepare,
)

# ---------------------------------------------------------------------------------------------------
# Gemma 3

_GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _gemma3_config(tok: Any) -> Any:
    from transformers import Gemma3Config

    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64,
                max_position_embeddings=4096, layer_types=["sliding_attention", "full_attention"],
                pad_token_id=_tid(tok, "<pad>"), bos_token_id=_tid(tok, "<bos>"), eos_token_id=_tid(tok, "<eos>"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=56, patch_size=7, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                        image_token_index=_tid(tok, "<image_soft_token>"), boi_token_index=_tid(tok, "<start_of_image>"),
                        eoi_token_index=_tid(tok, "<end_of_image>"))


def _gemma3_processor(tok: Any, template: str) -> Any:
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ip = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    return Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=template, image_seq_length=16)


GEMMA3 = ArchSpec(
    "gemma3", "Gemma 3",
    vision_attention=r"vision_tower\.(?:vision_model\.)?encoder\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj)",
    vision_mlp=r"vision_tower\.(?:vision_model\.)?encoder\.layers\.\d+\.mlp\.(?:fc1|fc2)",
    language_attention=_LANG_ATTN, language_mlp=_LANG_MLP,
    never=r"(?:multi_modal_projector(?:\..*)?|lm_head)",
    kernels=KernelMap(
        rms_norms={"Gemma3RMSNorm": GEMMA_NORM},
        gated_mlps={"Gemma3MLP": _GATED},
        plain_mlps={"SiglipMLP": ("fc1", "fc2", "activation_fn")},
        rope_modules=("transformers.models.gemma3.modeling_gemma3",),
    ),
    image_tokens=ImageTokens(strings=("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
                             attrs=("image_token", "boi_token", "eoi_token"),
                             config_ids=("image_token_index", "boi_token_index", "eoi_token_index")),
    padding_free=False,
    tiny=TinySpec(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>"],
                  _GEMMA3_TEMPLATE, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
                  _gemma3_config, _gemma3_processor, "Gemma3ForConditionalGeneration",
                  {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}),
    dynamic_resolution=False,
)

# ---------------------------------------------------------------------------------------------------
# Mistral 3 (Pixtral vision)

_MISTRAL3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST]{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}[IMG]"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}[/INST]{% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def _mistral3_config(tok: Any) -> Any:
    from transformers import Mistral3Config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
                  image_size=224, patch_size=14, num_channels=3)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                bos_token_id=_tid(tok, "<s>"), eos_token_id=_tid(tok, "</s>"), pad_token_id=_tid(tok, "<pad>"),
                tie_word_embeddings=False)
    return Mistral3Config(vision_config=vision, text_config=text, image_token_index=_tid(tok, "[IMG]"),
                          spatial_merge_size=2, vision_feature_layer=-1)


def _mistral3_processor(tok: Any, template: str) -> Any:
    from transformers import PixtralProcessor
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    ip = PixtralImageProcessorPil(size={"longest_edge": 112}, patch_size=14)
    return PixtralProcessor(image_processor=ip, tokenizer=tok, chat_template=template, patch_size=14,
                            spatial_merge_size=2)


MISTRAL3 = ArchSpec(
    "mistral3", "Mistral 3 (Pixtral vision)",
    vision_attention=r"vision_tower\.transformer\.layers\.\d+\.attention\.(?:q_proj|k_proj|v_proj|o_proj)",
    vision_mlp=r"vision_tower\.transformer\.layers\.\d+\.feed_forward\.(?:gate_proj|up_proj|down_proj)",
    language_attention=_LANG_ATTN, language_mlp=_LANG_MLP,
    never=r"(?:multi_modal_projector\..*|lm_head)",
    kernels=KernelMap(
        rms_norms={"Mistral3RMSNorm": LLAMA_NORM, "MistralRMSNorm": LLAMA_NORM, "PixtralRMSNorm": LLAMA_NORM,
                   "Ministral3RMSNorm": LLAMA_NORM, "MinistralRMSNorm": LLAMA_NORM},
        gated_mlps={"MistralMLP": _GATED, "PixtralMLP": _GATED, "Ministral3MLP": _GATED, "MinistralMLP": _GATED},
        rope_modules=("transformers.models.mistral.modeling_mistral",),
    ),
    image_tokens=ImageTokens(strings=("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
                             attrs=("image_token", "image_break_token", "image_end_token"),
                             config_ids=("image_token_index",)),
    padding_free=True,
    tiny=TinySpec(["<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"],
                  _MISTRAL3_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
                  _mistral3_config, _mistral3_processor, "Mistral3ForConditionalGeneration"),
    merge_size_attr="spatial_merge_size",
)

# ---------------------------------------------------------------------------------------------------
# the registry and lookups

REGISTRY: dict[str, ArchSpec] = {spec.model_type: spec for spec in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, MLLAMA, GEMMA3, MISTRAL3)}
"""``config.model_type`` -> :class:`ArchSpec`: the one list of supported architectures."""


def full_precision_modules() -> list[str]:
    """What ``load_in_4bit`` keeps in full precision: the layers no LoRA map targets unless named
    (``ArchSpec.never``: the vision-to-text projector or merger, and ``lm_head``), small and sensitive to
    quantization. One regex for every registered architecture, as transformers 5 matches
    ``llm_int8_skip_modules``: from the start of the full module name (a plain ``"merger"`` would not
    match ``model.visual.merger.mlp.0``)."""
    return [full_name_regex(spec.never for spec in REGISTRY.values())]


class UnsupportedArchitectureError(ValueError):
    pass


def get_spec(model_or_config: Any) -> ArchSpec:
    """The :class:`ArchSpec` of a model or config, or a clear error listing what is supported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    supported = ", ".join(f"{s.display_name} ({k})" for k, s in REGISTRY.items())
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} has no visiontune module map. Supported: {supported}. For another "
        "architecture pass target_modules by hand, e.g. FastVisionModel.get_peft_model(model, "
        "target_modules=r'.*language_model.*\\.(q_proj|k_proj|v_proj|o_proj)') or a list of module names."
    )


def image_size_bounds(spec: ArchSpec, model_config: Any, processor: Any) -> tuple[int, int]:
    """(smallest, largest) image side the model is meant to see, used by ``resize="min"/"max"``.

    Fixed-size models (Mllama tiles, Gemma 3) have one size. Dynamic-resolution models (Qwen, Pixtral)
    accept a range; "min" is the smallest side giving an 8x8 grid of merged patches (detail still
    legible, few tokens: 64 per image) and "max" the processor's own largest side, capped at 1024 px
    (beyond that, token counts explode: a 1024 px square is already 1,296 Qwen tokens).
    """
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None) or {}
    size = dict(size) if not isinstance(size, dict) else size
    if not spec.dynamic_resolution:
        side = size.get("height") or size.get("shortest_edge") or getattr(model_config.vision_config, "image_size", 448)
        return int(side), int(side)
    mult = spec.patch_multiple(model_config)
    lo = 8 * mult
    if "longest_edge" in size and spec.size_in_pixels:
        hi = int(math.sqrt(size["longest_edge"]))
    else:
        hi = int(size.get("longest_edge") or getattr(model_config.vision_config, "image_size", 1024))
    hi = max(lo, min(hi, 1024) // mult * mult)
    return lo, hi
