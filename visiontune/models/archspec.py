"""What visiontune knows about one architecture: the :class:`ArchSpec` type and the types it holds.

An :class:`ArchSpec` is the single home of every architecture-specific fact: the LoRA module map
(``FastVisionModel.get_peft_model``), the fused-kernel map (:class:`KernelMap`, read by
``visiontune.kernels.patch_model``), the collator's facts (image tokens, padding-free support, patch
geometry, image bounds) and the recipe of its tiny offline test model (:class:`TinySpec`, read by
``visiontune.testing.build_tiny_model``). The six supported architectures are entries in
:data:`visiontune.models.archs.REGISTRY`; see docs/architectures.md for adding one.

Pure data: this module imports neither torch nor transformers (the served model and the CLI import it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# Names are matched with re.fullmatch after an optional prefix, so they hold both for the bare model
# ("model.visual.blocks.0.attn.qkv") and inside PEFT's wrapper ("base_model.model.model.visual...").
_PREFIX = r"(?:.*\.)?"

def full_name_regex(patterns: Iterable[str]) -> str:
    """One regex that matches a full module name (under any prefix, PEFT's wrapper included) by any of
    ``patterns`` (regexes over the name without prefix)."""
    return _PREFIX + "(?:" + "|".join(patterns) + ")"


LLAMA_NORM = (0.0, True)
"""RMSNorm convention ``w * x_hat.to(dtype)`` (Llama, Qwen, Mistral)."""
GEMMA_NORM = (1.0, False)
"""RMSNorm convention ``(x_hat * (1 + w)).to(dtype)`` (Gemma)."""


@dataclass(frozen=True)
class KernelMap:
    """Which modules of one architecture get which fused kernel (class names as in transformers 5.x)."""

    rms_norms: Mapping[str, tuple[float, bool]] = field(default_factory=dict)
    """RMSNorm class -> (weight offset, cast x_hat to the input dtype before the weight):
    :data:`LLAMA_NORM` or :data:`GEMMA_NORM`."""
    gated_mlps: Mapping[str, tuple[str, str, str, str]] = field(default_factory=dict)
    """``down(act(gate(x)) * up(x))`` class -> (gate, up, down, activation) attribute names."""
    plain_mlps: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)
    """``fc2(act(fc1(x)))`` class -> (fc1, fc2, activation) attribute names."""
    layer_norms: bool = True
    """Swap every ``nn.LayerNorm`` (vision towers)."""
    mrope_rotary: Mapping[str, bool] = field(default_factory=dict)
    """M-RoPE rotary-embedding class -> interleaved (Qwen3-VL) or contiguous sections (Qwen2/2.5-VL)."""
    text_attention: tuple[str, ...] = ()
    """Qwen-style text attention classes (q/k/v/o_proj, optional q_norm/k_norm): fused LoRA, Triton RoPE,
    packed varlen attention (``cu_seq_lens_q`` from ``visiontune.models.packing.pack_padded_batch``, else
    one sequence a row)."""
    vision_attention: tuple[str, ...] = ()
    """Qwen-VL vision attention classes (qkv/proj, ``cu_seqlens``): one varlen call instead of a loop."""
    rope_modules: tuple[str, ...] = ()
    """Modeling modules whose module-level ``apply_rotary_pos_emb`` is swapped for the Triton RoPE."""
    fused_cross_entropy: bool = True


@dataclass(frozen=True)
class ImageTokens:
    """The tokens that stand for image content or image structure: never a training target."""

    strings: tuple[str, ...]
    """The token strings as they stand in the vocabulary (e.g. ``"<|image_pad|>"``)."""
    attrs: tuple[str, ...] = ("image_token",)
    """Processor / tokenizer attributes whose value is such a token string (e.g. ``boi_token``)."""
    config_ids: tuple[str, ...] = ()
    """Model-config attributes whose value is such a token id (e.g. ``image_token_index``)."""

    @classmethod
    def union(cls, many: Iterable[ImageTokens]) -> ImageTokens:
        """All strings and attribute names of ``many``, in first-seen order."""
        many = list(many)

        def merged(name: str) -> tuple[str, ...]:
            return tuple(dict.fromkeys(v for tokens in many for v in getattr(tokens, name)))

        return cls(merged("strings"), merged("attrs"), merged("config_ids"))


@dataclass(frozen=True)
class TinySpec:
    """How to build one architecture's tiny random-weight model, its tokenizer and its processor."""

    special_tokens: list[str]
    """The architecture's real special tokens; they come first in the tiny BPE vocabulary."""
    chat_template: str
    """A Jinja chat template of the same shape and special tokens as the real one (our own text)."""
    tokenizer_attrs: dict[str, str]
    """bos_token / eos_token / pad_token."""
    make_config: Callable[[Any], Any]
    """tokenizer -> ``PretrainedConfig`` with tiny dimensions (token ids read off the tokenizer)."""
    make_processor: Callable[[Any, str], Any]
    """(tokenizer, chat_template) -> the architecture's own ``ProcessorMixin`` with tiny image sizes."""
    model_class: str
    """transformers class name of the model, e.g. ``"Qwen2VLForConditionalGeneration"``."""
    extra_special: dict[str, str] = field(default_factory=dict)
    """Named tokenizer attributes such as ``image_token`` that the real tokenizer carries."""
    sizes: tuple[str, ...] = ("test",)
    """The ``visiontune.testing.TINY_SIZES`` presets this architecture's config takes."""


@dataclass(frozen=True)
class ArchSpec:
    """Everything visiontune needs to know about one architecture (one entry of the registry)."""

    model_type: str
    """``config.model_type`` of the checkpoint (the registry key)."""
    display_name: str
    # ---- LoRA module map: regexes (without prefix) over ``model.named_modules()`` names, transformers 5
    vision_attention: str
    """The vision tower's attention projections."""
    vision_mlp: str
    """The vision tower's MLP projections."""
    language_attention: str
    """The language model's attention projections (cross-attention included where present)."""
    language_mlp: str
    """The language model's MLP projections."""
    never: str
    """Linear layers that are never LoRA targets unless named: projector/merger and lm_head."""
    # ---- fused kernels
    kernels: KernelMap
    """Which modules ``visiontune.kernels.patch_model`` swaps for which kernel."""
    # ---- collator facts
    image_tokens: ImageTokens
    """Image placeholder / structure tokens (masked out of the labels)."""
    padding_free: bool
    """True when samples can share one packed row: causal text attention everywhere, image features
    placed by token id. Mllama (per-sample cross-attention masks) and Gemma 3 (bidirectional attention
    inside each image) would need per-sample masks that a packed row does not carry."""
    # ---- tiny offline test model
    tiny: TinySpec
    """Recipe of the tiny model that tests, the demo and CI build (``visiontune.testing``)."""
    # ---- image geometry
    patch_size_attr: str = "patch_size"
    """Attribute of ``config.vision_config`` holding the patch size."""
    merge_size_attr: Optional[str] = None
    """Attribute (on vision_config or config) of the spatial merge factor, where the model merges patches."""
    dynamic_resolution: bool = True
    """True when the model accepts any image size (Qwen, Pixtral); False for fixed-size/tiled inputs."""
    size_in_pixels: bool = False
    """True when the image processor's ``size`` holds pixel *counts* in shortest_edge/longest_edge (Qwen)."""
    mixed_batch: Optional[Callable[[Any, list[int], int, int], dict[str, Any]]] = None
    """None when the model's processor encodes a batch that mixes rows with and without images. Otherwise
    (Mllama) the collator encodes the image rows and the text rows apart, and this gives the whole batch's
    image inputs: (the image rows' batch, their indexes, batch size, sequence length) -> the image keys,
    with the text rows holding what the processor gives an absent image."""
    vision_metadata: Optional[Callable[[Any, Any], dict[str, Any]]] = None
    """(model, ``image_grid_thw`` on the CPU) -> the vision tower's per-batch metadata as ``image_*`` model
    kwargs, or ``{}`` where this transformers cannot take them. The collator computes them on the CPU batch;
    left to the model, each forward reads the grid back from the GPU (host syncs). None: nothing to give."""
    prepare_model: Optional[Callable[[Any], None]] = None
    """What ``FastVisionModel.from_pretrained`` does to a freshly loaded model of this architecture, if
    anything (Mllama: rows without an image skip cross-attention in a mixed batch, as they do alone)."""

    def pattern(self, vision: bool, language: bool, attention: bool, mlp: bool) -> str:
        """The regex of LoRA targets for the four Unsloth flags (a PEFT ``target_modules`` string)."""
        parts = []
        if vision and attention:
            parts.append(self.vision_attention)
        if vision and mlp:
            parts.append(self.vision_mlp)
        if language and attention:
            parts.append(self.language_attention)
        if language and mlp:
            parts.append(self.language_mlp)
        if not parts:
            raise ValueError(
                "get_peft_model: no LoRA targets selected: at least one of finetune_vision_layers / "
                "finetune_language_layers must be True, and at least one of finetune_attention_modules / "
                "finetune_mlp_modules must be True (or pass target_modules explicitly)."
            )
        return full_name_regex(parts)

    def classify(self, name: str) -> Optional[str]:
        """'vision_attention' | 'vision_mlp' | 'language_attention' | 'language_mlp' | 'never' | None."""
        for kind in ("vision_attention", "vision_mlp", "language_attention", "language_mlp", "never"):
            if re.fullmatch(_PREFIX + getattr(self, kind), name):
                return kind
        return None

    def patch_multiple(self, config: Any) -> int:
        """Pixels an image side should be a multiple of: patch size, times merge size where the model merges."""
        vc = config.vision_config
        patch = getattr(vc, self.patch_size_attr)
        merge = 1
        if self.merge_size_attr:
            merge = getattr(vc, self.merge_size_attr, None) or getattr(config, self.merge_size_attr, 1) or 1
        return int(patch) * int(merge)
