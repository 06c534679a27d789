"""Per-architecture module maps: one registry instead of a function per model.

Each supported architecture is described once, as data: which Linear layers are the vision tower's and
the language model's attention and MLP projections (regular expressions over module names, as
``model.named_modules()`` yields them in transformers 5), which modules are never LoRA targets unless
named (projector / merger, lm_head), and the vision patch geometry the collator snaps to. Everything
that differs between architectures is looked up here; the code that uses it is shared.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

# Names are matched with re.fullmatch after an optional prefix, so they hold both for the bare model
# ("model.visual.blocks.0.attn.qkv") and inside PEFT's wrapper ("base_model.model.model.visual...").
_PREFIX = r"(?:.*\.)?"
_LANG_ATTN = r"language_model\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
_LANG_MLP = r"language_model\.layers\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class ArchSpec:
    """What visiontune needs to know about one architecture."""

    model_type: str
    """``config.model_type`` of the checkpoint (the registry key)."""
    display_name: str
    vision_attention: str
    """Regex (without prefix) of the vision tower's attention projections."""
    vision_mlp: str
    """Regex of the vision tower's MLP projections."""
    language_attention: str
    """Regex of the language model's attention projections (cross-attention included where present)."""
    language_mlp: str
    """Regex of the language model's MLP projections."""
    never: str
    """Regex of Linear layers that are never LoRA targets unless named: projector/merger and lm_head."""
    patch_size_attr: str = "patch_size"
    """Attribute of ``config.vision_config`` holding the patch size."""
    merge_size_attr: Optional[str] = None
    """Attribute (on vision_config or config) of the spatial merge factor, where the model merges patches."""
    dynamic_resolution: bool = True
    """True when the model accepts any image size (Qwen, Pixtral); False for fixed-size/tiled inputs."""

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
        return _PREFIX + "(?:" + "|".join(parts) + ")"

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


REGISTRY: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in [
        ArchSpec(
            "qwen2_vl", "Qwen2-VL",
            vision_attention=r"visual\.blocks\.\d+\.attn\.(?:qkv|proj)",
            vision_mlp=r"visual\.blocks\.\d+\.mlp\.(?:fc1|fc2)",
            language_attention=_LANG_ATTN, language_mlp=_LANG_MLP,
            never=r"(?:visual\.merger\..*|lm_head)", merge_size_attr="spatial_merge_size",
        ),
        ArchSpec(
            "qwen2_5_vl", "Qwen2.5-VL",
            vision_attention=r"visual\.blocks\.\d+\.attn\.(?:qkv|proj)",
            vision_mlp=r"visual\.blocks\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj)",
            language_attention=_LANG_ATTN, language_mlp=_LANG_MLP,
            never=r"(?:visual\.merger\..*|lm_head)", merge_size_attr="spatial_merge_size",
        ),
        ArchSpec(
            "qwen3_vl", "Qwen3-VL",
            vision_attention=r"visual\.blocks\.\d+\.attn\.(?:qkv|proj)",
            vision_mlp=r"visual\.blocks\.\d+\.mlp\.(?:linear_fc1|linear_fc2)",
            language_attention=_LANG_ATTN, language_mlp=_LANG_MLP,
            never=r"(?:visual\.(?:merger|deepstack_merger_list\.\d+)\..*|lm_head)", merge_size_attr="spatial_merge_size",
        ),
        ArchSpec(
            "mllama", "Llama 3.2 Vision",
            vision_attention=r"vision_model\.(?:transformer|global_transformer)\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)",
            vision_mlp=r"vision_model\.(?:transformer|global_transformer)\.layers\.\d+\.mlp\.(?:fc1|fc2)",
            language_attention=r"language_model\.layers\.\d+\.(?:self_attn|cross_attn)\.(?:q_proj|k_proj|v_proj|o_proj)",
            language_mlp=_LANG_MLP,
            never=r"(?:multi_modal_projector|lm_head)", dynamic_resolution=False,
        ),
        ArchSpec(
            "gemma3", "Gemma 3",
            vision_attention=r"vision_tower\.(?:vision_model\.)?encoder\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj)",
            vision_mlp=r"vision_tower\.(?:vision_model\.)?encoder\.layers\.\d+\.mlp\.(?:fc1|fc2)",
            language_attention=_LANG_ATTN, language_mlp=_LANG_MLP,
            never=r"(?:multi_modal_projector(?:\..*)?|lm_head)", dynamic_resolution=False,
        ),
        ArchSpec(
            "mistral3", "Mistral 3 (Pixtral vision)",
            vision_attention=r"vision_tower\.transformer\.layers\.\d+\.attention\.(?:q_proj|k_proj|v_proj|o_proj)",
            vision_mlp=r"vision_tower\.transformer\.layers\.\d+\.feed_forward\.(?:gate_proj|up_proj|down_proj)",
            language_attention=_LANG_ATTN, language_mlp=_LANG_MLP,
            never=r"(?:multi_modal_projector\..*|lm_head)", merge_size_attr="spatial_merge_size",
        ),
    ]
}


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
    if "longest_edge" in size and spec.model_type.startswith("qwen"):
        # Qwen's processors store pixel *counts* in shortest_edge/longest_edge.
        hi = int(math.sqrt(size["longest_edge"]))
    else:
        hi = int(size.get("longest_edge") or getattr(model_config.vision_config, "image_size", 1024))
    hi = max(lo, min(hi, 1024) // mult * mult)
    return lo, hi
