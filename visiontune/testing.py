"""Tiny, offline, random-weight VLMs for tests, the demo and CI.

For each supported architecture this builds a model from its transformers config with very small
dimensions, plus a byte-level BPE tokenizer trained on the spot (so it encodes any text, with no
download) that carries the architecture's real special tokens, a chat template of the same shape as the
real one, and the architecture's own image processor and processor class. Everything is written with
``save_pretrained`` so that ``FastVisionModel.from_pretrained(local_dir)`` takes exactly the code path a
user's real checkpoint takes.

This is the one place such models are made: tests, the demo (``visiontune tiny-model``) and the
benchmarks' CPU smoke runs all call :func:`build_tiny_model`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mllama", "gemma3", "mistral3")

# A small corpus for the BPE merges: chat words, digits and a little of everything, so common
# instruction text tokenizes into few tokens. Any text still encodes (byte-level alphabet).
_CORPUS = [
    "Transcribe the handwritten digits in this image.",
    "Describe the image. What is shown? Count the objects. Answer the question.",
    "user assistant system model You are a helpful assistant.",
    "0123456789 " * 4,
    " ".join(str(i) for i in range(1000)),
    "The quick brown fox jumps over the lazy dog. Radiology: chest X-ray shows no acute findings.",
    "handwriting to LaTeX: \\frac{a}{b} + \\sqrt{x} = y^2",
    "日本語のテキストも符号化できます。",
]


@dataclass
class TinySpec:
    """How to build one architecture's tiny model, tokenizer and processor."""

    special_tokens: list[str]
    chat_template: str
    tokenizer_attrs: dict[str, str]  # bos_token / eos_token / pad_token and extra named tokens
    make_config: Callable[[Any], Any]  # tokenizer -> PretrainedConfig
    make_processor: Callable[[Any, str], Any]  # (tokenizer, chat_template) -> ProcessorMixin
    model_class: str  # transformers class name
    extra_special: dict[str, str] = field(default_factory=dict)  # tokenizer attributes like image_token


# ---------------------------------------------------------------------------------------------------
# chat templates: same structure and special tokens as the real models' templates (our own Jinja).
# An image part is recognised by type == "image" (Arrow-stored rows carry image: None on text parts).

_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|image|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

_MISTRAL3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST]{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}[IMG]"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}[/INST]{% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


# ---------------------------------------------------------------------------------------------------
# configs (tiny dimensions; token ids come from the tokenizer so they always agree)

def _tid(tok: Any, t: str) -> int:
    return tok.convert_tokens_to_ids(t)


def _qwen_ids(tok: Any) -> dict[str, int]:
    return dict(bos_token_id=_tid(tok, "<|endoftext|>"), eos_token_id=_tid(tok, "<|im_end|>"),
                pad_token_id=_tid(tok, "<|endoftext|>"))


def _qwen2_vl_config(tok: Any) -> Any:
    from transformers import Qwen2VLConfig

    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                tie_word_embeddings=False, **_qwen_ids(tok))
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=_tid(tok, "<|image_pad|>"),
                         video_token_id=_tid(tok, "<|video_pad|>"), vision_start_token_id=_tid(tok, "<|vision_start|>"),
                         vision_end_token_id=_tid(tok, "<|vision_end|>"), tie_word_embeddings=False)


def _qwen2_5_vl_config(tok: Any) -> Any:
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                tie_word_embeddings=False, **_qwen_ids(tok))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], in_channels=3)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=_tid(tok, "<|image_pad|>"),
                            video_token_id=_tid(tok, "<|video_pad|>"), vision_start_token_id=_tid(tok, "<|vision_start|>"),
                            vision_end_token_id=_tid(tok, "<|vision_end|>"), tie_word_embeddings=False)


def _qwen3_vl_config(tok: Any) -> Any:
    from transformers import Qwen3VLConfig

    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True}, tie_word_embeddings=False, **_qwen_ids(tok))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0], in_channels=3)
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=_tid(tok, "<|image_pad|>"),
                         video_token_id=_tid(tok, "<|video_pad|>"), vision_start_token_id=_tid(tok, "<|vision_start|>"),
                         vision_end_token_id=_tid(tok, "<|vision_end|>"), tie_word_embeddings=False)


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


# ---------------------------------------------------------------------------------------------------
# processors

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


def _mllama_processor(tok: Any, template: str) -> Any:
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    ip = MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=2)
    return MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=template)


def _gemma3_processor(tok: Any, template: str) -> Any:
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ip = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    return Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=template, image_seq_length=16)


def _mistral3_processor(tok: Any, template: str) -> Any:
    from transformers import PixtralProcessor
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    ip = PixtralImageProcessorPil(size={"longest_edge": 112}, patch_size=14)
    return PixtralProcessor(image_processor=ip, tokenizer=tok, chat_template=template, patch_size=14,
                            spatial_merge_size=2)


_QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
_QWEN_ATTRS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
_QWEN_EXTRA = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}

SPECS: dict[str, TinySpec] = {
    "qwen2_vl": TinySpec(_QWEN_SPECIAL, _QWEN_TEMPLATE, _QWEN_ATTRS, _qwen2_vl_config,
                         _qwen_processor("Qwen2VLProcessor", 14, "Qwen2VLVideoProcessor"),
                         "Qwen2VLForConditionalGeneration", _QWEN_EXTRA),
    "qwen2_5_vl": TinySpec(_QWEN_SPECIAL, _QWEN_TEMPLATE, _QWEN_ATTRS, _qwen2_5_vl_config,
                           _qwen_processor("Qwen2_5_VLProcessor", 14, "Qwen2VLVideoProcessor"),
                           "Qwen2_5_VLForConditionalGeneration", _QWEN_EXTRA),
    "qwen3_vl": TinySpec(_QWEN_SPECIAL, _QWEN_TEMPLATE, _QWEN_ATTRS, _qwen3_vl_config,
                         _qwen_processor("Qwen3VLProcessor", 16, "Qwen3VLVideoProcessor"),
                         "Qwen3VLForConditionalGeneration", _QWEN_EXTRA),
    "mllama": TinySpec(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>", "<|image|>", "<|python_tag|>", "<|finetune_right_pad_id|>"],
                       _MLLAMA_TEMPLATE,
                       {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"},
                       _mllama_config, _mllama_processor, "MllamaForConditionalGeneration"),
    "gemma3": TinySpec(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                        "<end_of_image>", "<image_soft_token>"],
                       _GEMMA3_TEMPLATE, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
                       _gemma3_config, _gemma3_processor, "Gemma3ForConditionalGeneration",
                       {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}),
    "mistral3": TinySpec(["<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"],
                         _MISTRAL3_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
                         _mistral3_config, _mistral3_processor, "Mistral3ForConditionalGeneration"),
}


# Sizes of the tiny models. "test" is the smallest that exercises every code path (unit tests, CI).
# "demo" is the one the bundled demo trains: it must learn to read digit strings within the demo's
# 10-minute CPU budget. Measured with 1,000-1,500-step LoRA probes on one core (README, "What the demo
# model learns"): with head_dim 16 and the usual text rope_theta of 1e4, M-RoPE's width channels rotate
# so slowly that image columns a few tokens apart look alike to the language model (strings of coloured
# squares after 1,000 steps: 6% exact match for the test-size Qwen2.5-VL at 1e4, 58% for this size at 3);
# 4x the test width instead of 2x gained nothing (10.6% vs 9.5% of digits in place after 1,500 steps,
# old demo layout).
TINY_SIZES: dict[str, dict[str, Any]] = {
    "test": {},
    "demo": {
        "text": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8},
        "text_rope_theta": 3.0,
        "vision": {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "out_hidden_size": 128},
    },
}


def _resize_config(config: Any, size: str) -> Any:
    """Apply a :data:`TINY_SIZES` preset (a known name: :func:`build_tiny_model` checks) to a fresh tiny config."""
    preset = TINY_SIZES[size]
    for key, value in preset.get("text", {}).items():
        setattr(config.text_config, key, value)
    for key, value in preset.get("vision", {}).items():
        setattr(config.vision_config, key, value)
    if "text_rope_theta" in preset:
        rope = dict(getattr(config.text_config, "rope_parameters", None) or {})
        rope["rope_theta"] = preset["text_rope_theta"]
        config.text_config.rope_parameters = rope
    return config


def build_tokenizer(special_tokens: list[str], attrs: dict[str, str], extra_special: dict[str, str],
                    chat_template: str, vocab_size: int = 640) -> Any:
    """A byte-level BPE tokenizer trained on a small built-in corpus, with the given special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits are split one by one before byte-level BPE, as Qwen's and Llama 3's real tokenizers do:
    # "480" is three tokens, so transcription is learnable digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=chat_template,
                                   extra_special_tokens=dict(extra_special), **attrs)
    return fast


def build_tiny_model(arch: str, out_dir: str | os.PathLike, seed: int = 0, size: str = "test") -> Path:
    """Build and save a tiny random-weight ``arch`` model with its tokenizer and processor in ``out_dir``.

    ``size`` is a :data:`TINY_SIZES` preset ("test": smallest; "demo": the demo's model; it is defined for the
    Qwen architectures, whose configs have separate text and vision parts). Returns the directory. Building
    takes about a second; nothing is downloaded.
    """
    if arch not in SPECS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {', '.join(TINY_SIZES)}")
    if size != "test" and not arch.startswith("qwen"):
        raise ValueError(f"tiny model size {size!r} is defined for qwen2_vl, qwen2_5_vl and qwen3_vl, not {arch!r}; "
                         "use size 'test' for this architecture")
    import torch
    import transformers

    spec = SPECS[arch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(spec.special_tokens, spec.tokenizer_attrs, spec.extra_special, spec.chat_template)
    processor = spec.make_processor(tok, spec.chat_template)
    config = _resize_config(spec.make_config(tok), size)
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config)
    # A trained model's readout is far from transformers' std=0.02 init: with a 64-wide hidden state and
    # a frozen final norm, 0.02 caps every logit near +-1.3, so the loss cannot fall much below
    # ln(vocab) whatever LoRA learns (measured: stuck at 5.5 nats for 300 steps). Give lm_head a
    # unit-scale readout (row norm ~2) so a tiny model can actually learn in the demo.
    head = model.get_output_embeddings()
    hidden = head.weight.shape[1]
    with torch.no_grad():
        head.weight.normal_(0.0, 2.0 / hidden**0.5)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "visiontune_tiny.json").write_text(json.dumps({"architecture": arch, "seed": seed, "size": size}))
    return out


def tiny_model_stage(cfg: Any) -> dict:
    """CLI/DVC entry: build the tiny model named by ``model.name_or_path`` unless it exists already."""
    path = Path(cfg.model.name_or_path)
    arch, size = cfg.model.tiny_architecture, cfg.model.tiny_size
    if (path / "config.json").exists():
        return {"model": str(path), "built": False}
    build_tiny_model(arch, path, seed=cfg.train.seed, size=size)
    return {"model": str(path), "architecture": arch, "size": size, "built": True}


def ensure_tiny_model(name_or_path: str, arch: str, seed: int = 0, size: str = "test") -> str:
    """If ``name_or_path`` is a not-yet-built ``models/tiny-*`` path, build it; return the path unchanged."""
    p = Path(name_or_path)
    if p.name.startswith("tiny-") and not (p / "config.json").exists():
        build_tiny_model(arch, p, seed=seed, size=size)
    return name_or_path
