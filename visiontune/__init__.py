"""visiontune: fine-tuning of vision-language models as a real MLOps pipeline.

The library API is call-compatible with Unsloth's vision API::

    from visiontune import FastVisionModel, VisionDataCollator
    model, processor = FastVisionModel.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct")
    model = FastVisionModel.get_peft_model(model, finetune_vision_layers=True, r=16, lora_alpha=16)

``SFTTrainer`` / ``SFTConfig`` are TRL's, taking Unsloth's arguments too (``visiontune.trainer``;
docs/unsloth.md).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["FastVisionModel", "SFTConfig", "SFTTrainer", "VisionDataCollator", "__version__"]


def __getattr__(name: str):
    # Lazy: importing visiontune (e.g. for the CLI's --help) must not import torch/transformers.
    if name == "FastVisionModel":
        from visiontune.models.fast_vision import FastVisionModel

        return FastVisionModel
    if name == "VisionDataCollator":
        from visiontune.collator import VisionDataCollator

        return VisionDataCollator
    if name in ("SFTTrainer", "SFTConfig"):
        from visiontune import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'visiontune' has no attribute {name!r}")
