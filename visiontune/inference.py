"""Inference: one path from a conversation to a model's answer, for evaluation and serving alike.

A conversation is cut at its last assistant turn (:func:`split_conversation`); :func:`chat_parts` (which
the training collator uses too) turns it into the chat template's messages and its image values; the
images are loaded and sized by the training :class:`~visiontune.images.ImageRule`; :func:`generate_answers`
answers batches of prompts greedily. The evaluate stage and the served MLflow model both call it, so what is measured is
what is served. The adapter helpers say where a trained LoRA adapter and its processor are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

from visiontune.images import ImageRule, Resizer, decode_image_value, load_image

ADAPTER_CONFIG = "adapter_config.json"


# ------------------------------------------------------------------------------------------ conversations
def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content or [] if isinstance(p, dict) and p.get("type") == "text")


def split_conversation(messages: list[dict]) -> tuple[list[dict], Optional[str]]:
    """(prompt messages, reference answer): the conversation up to its last assistant turn, and that turn's text.

    A conversation without an assistant turn is all prompt (reference None), as at serving time.
    """
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        return list(messages), None
    return list(messages[:last]), _text_of(messages[last]["content"])


def chat_parts(messages: list[dict]) -> tuple[list[dict], list[Any]]:
    """Messages for the chat template (image parts become ``{"type": "image"}``; Arrow's None keys go) and
    the image values in order."""
    clean, images = [], []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image":
                    parts.append({"type": "image"})
                    images.append(p.get("image"))
                elif p.get("type") == "text":
                    parts.append({"type": "text", "text": p.get("text") or ""})
            content = parts
        clean.append({"role": m["role"], "content": content})
    return clean, images


# ------------------------------------------------------------------------------------------------ adapters
def require_adapter(adapter_dir: Optional[Union[str, Path]], fix: str) -> Path:
    """``adapter_dir`` as a Path, after checking that it holds a PEFT adapter; ``fix`` says what to do if not."""
    if not adapter_dir or not (Path(adapter_dir) / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"no PEFT adapter in {adapter_dir} ({ADAPTER_CONFIG} missing): {fix}")
    return Path(adapter_dir)


def adapter_processor(adapter_dir: Union[str, Path], fallback: Any) -> Any:
    """The processor saved next to the adapter (what training used), else ``fallback``."""
    from transformers import AutoProcessor

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "processor_config.json").exists() or (adapter_dir / "tokenizer_config.json").exists():
        return AutoProcessor.from_pretrained(str(adapter_dir), local_files_only=True)
    return fallback


# ---------------------------------------------------------------------------------------------- generation
def model_resizer(rule: ImageRule, model_config: Any, processor: Any) -> Resizer:
    """``rule`` with the 'min'/'max' sides and patch multiple of the model whose (base) config is ``model_config``."""
    from visiontune.models.archs import get_spec, image_size_bounds

    try:
        spec = get_spec(model_config)
    except ValueError:  # an architecture without a module map: generic sides, no snapping
        return Resizer(rule)
    multiple = spec.patch_multiple(model_config) if rule.snap_to_patch_size else None
    return Resizer(rule, image_size_bounds(spec, model_config, processor), multiple)


def _prompt_batch(processor: Any, samples: Sequence[Any], resizer: Resizer, root: Optional[Path]) -> Any:
    """The processor's (left-padded) batch for the prompts of ``samples``, images loaded and resized."""
    texts, images = [], []
    for sample in samples:
        messages = sample["messages"] if isinstance(sample, dict) else sample
        clean, values = chat_parts(split_conversation(list(messages))[0])
        texts.append(processor.apply_chat_template(clean, tokenize=False, add_generation_prompt=True))
        images.append([resizer(load_image(decode_image_value(v), root)) for v in values])
    kwargs: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True)
    if any(images):
        kwargs["images"] = images
    return processor(**kwargs)


def _on_model(batch: Any, model: Any) -> dict[str, Any]:
    """The batch's tensors on the model's device; pixel values and other floating-point ones in its dtype."""
    import torch

    try:
        device = next(model.parameters()).device
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    return {k: (v.to(device, dtype) if k == "pixel_values" or v.is_floating_point() else v.to(device))
            if torch.is_tensor(v) else v for k, v in batch.items()}


def generate_answers(
    model: Any,
    processor: Any,
    samples: Sequence[Any],
    max_new_tokens: int,
    batch_size: int,
    *,
    rule: ImageRule,
    image_root: Optional[Union[str, Path]] = None,
    desc: str = "generate",
    progress: bool = True,
) -> list[str]:
    """Greedy answers of ``model`` to each sample's conversation (up to its last assistant turn).

    ``samples`` are ``{"messages": [...]}`` dicts (or message lists) in visiontune's conversation format;
    images may be paths, PIL images, bytes, Arrow ``{"bytes", "path"}`` dicts or base64 strings. The
    prompt is rendered with the processor's chat template plus the generation prompt; prompts are
    left-padded in batches of ``batch_size``; only the new tokens are decoded, without special tokens.
    ``rule`` is the image rule used in training, so the model sees images of the size it was trained on.
    """
    import torch
    from tqdm.auto import tqdm

    from visiontune.models.fast_vision import FastVisionModel
    from visiontune.models.state import base_model, padding_side

    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be a positive integer (eval.max_new_tokens)")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: must be a positive integer (eval.batch_size)")
    if not samples:
        return []
    tokenizer = getattr(processor, "tokenizer", processor)
    resizer = model_resizer(rule, base_model(model).config, processor)
    root = Path(image_root) if image_root else None
    answers: list[str] = []
    # Left padding: generation continues from the right end of every row. The caller's processor may be
    # training's, so its side is restored on return.
    with padding_side(processor, "left"):
        FastVisionModel.for_inference(model)
        for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch", disable=not progress):
            batch = _on_model(_prompt_batch(processor, samples[start:start + batch_size], resizer, root), model)
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers
