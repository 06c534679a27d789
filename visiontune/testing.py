"""Tiny, offline, random-weight VLMs for tests, the demo and CI.

For each supported architecture this builds a model from its transformers config with very small
dimensions, plus a byte-level BPE tokenizer trained on the spot (so it encodes any text, with no
download) that carries the architecture's real special tokens, a chat template of the same shape as the
real one, and the architecture's own image processor and processor class. What is architecture-specific
(config, processor, special tokens, template) is the ``tiny`` recipe of its entry in
:data:`visiontune.models.archs.REGISTRY`; this module is the machinery. Everything is written with
``save_pretrained`` so that ``FastVisionModel.from_pretrained(local_dir)`` takes exactly the code path a
user's real checkpoint takes.

This is the one place such models are made: tests, the demo (``visiontune tiny-model``) and the
benchmarks' CPU smoke runs all call :func:`build_tiny_model`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from visiontune.models.archs import REGISTRY

ARCHITECTURES = tuple(REGISTRY)
"""Every supported architecture (``model_type``), in registry order: each has a tiny model."""

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
    # "base": the demo's pretrained base (`visiontune pretrain`, Qwen3-VL only): deep enough in the vision
    # tower to learn glyph shapes from print, small enough (~3.5M parameters, ~14 MB in fp32) to commit and
    # to LoRA-fine-tune within the demo's CPU budget. M-RoPE sections for its 32-wide heads.
    "base": {
        "text": {"hidden_size": 192, "intermediate_size": 512, "num_attention_heads": 6, "num_key_value_heads": 2,
                 "num_hidden_layers": 3, "head_dim": 32},
        "text_rope_theta": 10.0,
        "text_rope": {"mrope_section": [4, 6, 6]},
        "vision": {"hidden_size": 96, "intermediate_size": 256, "num_heads": 4, "depth": 4, "out_hidden_size": 192,
                   "deepstack_visual_indexes": [1]},
    },
}


def _resize_config(config: Any, size: str) -> Any:
    """Apply a :data:`TINY_SIZES` preset (a known name: :func:`build_tiny_model` checks) to a fresh tiny config."""
    preset = TINY_SIZES[size]
    for key, value in preset.get("text", {}).items():
        setattr(config.text_config, key, value)
    for key, value in preset.get("vision", {}).items():
        setattr(config.vision_config, key, value)
    if "text_rope_theta" in preset or "text_rope" in preset:
        rope = dict(getattr(config.text_config, "rope_parameters", None) or {})
        rope.update(preset.get("text_rope", {}))
        rope["rope_theta"] = preset.get("text_rope_theta", rope.get("rope_theta"))
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

    ``size`` is a :data:`TINY_SIZES` preset ("test": smallest; "demo": the demo's model, for the architectures
    whose ``tiny.sizes`` list it: the Qwen family, whose vision configs take the preset's keys). Returns the
    directory. Building takes about a second; nothing is downloaded.
    """
    if arch not in REGISTRY:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {', '.join(TINY_SIZES)}")
    spec = REGISTRY[arch].tiny
    if size not in spec.sizes:
        having = ", ".join(a for a, s in REGISTRY.items() if size in s.tiny.sizes)
        raise ValueError(f"tiny model size {size!r} is defined for {having}, not {arch!r}; "
                         "use size 'test' for this architecture")
    import torch
    import transformers

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
    build_tiny_model(arch, path, seed=cfg.model.tiny_seed, size=size)
    return {"model": str(path), "architecture": arch, "size": size, "built": True}


def ensure_tiny_model(name_or_path: str, arch: str, seed: int = 0, size: str = "test") -> str:
    """If ``name_or_path`` is a not-yet-built ``models/tiny-*`` path, build it; return the path unchanged."""
    p = Path(name_or_path)
    if p.name.startswith("tiny-") and not (p / "config.json").exists():
        build_tiny_model(arch, p, seed=seed, size=size)
    return name_or_path
