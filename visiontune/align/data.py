"""visiontune conversations -> the rows TRL's ``GRPOTrainer`` and ``DPOTrainer`` take.

A conversation is the collator's format (``{"messages": [...]}``, any number of images per sample, in any
turn). Its prompt is every message up to the last assistant turn (:func:`~visiontune.inference.split_conversation`),
with each image part left as a ``{"type": "image"}`` placeholder and the images, loaded and sized by the
training :class:`~visiontune.images.ImageRule`, listed in order under ``images``: TRL fills the
placeholders from that list. The last assistant turn is the reference ``answer`` the rewards compare with.

DPO pairs come from the dataset (chosen/rejected columns, :func:`dpo_rows`) or are built from the model's
own samples scored by a reward (:func:`sampled_pairs`: the best sample is chosen, the worst rejected).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

from visiontune.images import Resizer, decode_image_value, load_image
from visiontune.inference import chat_parts, split_conversation

log = logging.getLogger(__name__)


def _messages(sample: Any) -> list[dict]:
    return list(sample["messages"] if isinstance(sample, dict) else sample)


def prompt_and_images(sample: Any, resizer: Optional[Resizer] = None) -> tuple[list[dict], list[Any], Optional[str]]:
    """(prompt messages with image placeholders, the prompt's images as RGB PIL, reference answer or None)."""
    prompt, answer = split_conversation(_messages(sample))
    messages, values = chat_parts(prompt)
    images = [load_image(decode_image_value(v)) for v in values]
    return messages, [resizer(im) for im in images] if resizer is not None else images, answer


def grpo_rows(samples: Sequence[Any], resizer: Optional[Resizer] = None) -> list[dict[str, Any]]:
    """GRPO rows ``{"prompt", "images", "answer"}`` from conversations (the answer feeds the rewards)."""
    rows = []
    for i, sample in enumerate(samples):
        prompt, images, answer = prompt_and_images(sample, resizer)
        if answer is None:
            raise ValueError(f"sample {i} has no assistant turn: GRPO's rewards need its reference answer")
        rows.append({"prompt": prompt, "images": images, "answer": answer})
    return rows


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def dpo_rows(samples: Sequence[Any], chosen_column: str = "chosen", rejected_column: str = "rejected",
             resizer: Optional[Resizer] = None) -> list[dict[str, Any]]:
    """DPO rows ``{"prompt", "images", "chosen", "rejected"}`` from conversations carrying the preferred and
    the dispreferred answer as text in ``chosen_column`` / ``rejected_column``."""
    rows = []
    for i, sample in enumerate(samples):
        missing = [c for c in (chosen_column, rejected_column) if not isinstance(sample, dict) or not sample.get(c)]
        if missing:
            raise ValueError(f"sample {i} has no {' / '.join(missing)} text: DPO from the dataset needs both columns "
                             "(or build pairs from model samples: visiontune.align.sampled_pairs)")
        prompt, images, _ = prompt_and_images(sample, resizer)
        rows.append({"prompt": prompt, "images": images, "chosen": _assistant(str(sample[chosen_column])),
                     "rejected": _assistant(str(sample[rejected_column]))})
    return rows


def sample_answers(model: Any, processor: Any, samples: Sequence[Any], num_samples: int, max_new_tokens: int,
                   temperature: float, resizer: Resizer, batch_size: int = 8) -> list[list[str]]:
    """``num_samples`` sampled answers of ``model`` to each conversation's prompt (temperature sampling)."""
    import torch

    from visiontune.inference import _on_model, _prompt_batch
    from visiontune.models.fast_vision import FastVisionModel
    from visiontune.models.state import padding_side

    tokenizer = getattr(processor, "tokenizer", processor)
    answers: list[list[str]] = []
    with padding_side(processor, "left"):
        FastVisionModel.for_inference(model)
        for start in range(0, len(samples), batch_size):
            batch = _on_model(_prompt_batch(processor, samples[start:start + batch_size], resizer, None), model)
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                     top_p=1.0, top_k=0, num_return_sequences=num_samples,
                                     pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            answers.extend([t.strip() for t in texts[k:k + num_samples]] for k in range(0, len(texts), num_samples))
    return answers


def sampled_pairs(samples: Sequence[Any], answers: Sequence[Sequence[str]], reward: Callable[..., list[float]],
                  resizer: Optional[Resizer] = None) -> list[dict[str, Any]]:
    """DPO rows from sampled answers (:func:`sample_answers`) scored by ``reward`` against each reference:
    the best-scoring answer is chosen, the worst rejected; prompts whose answers all score alike are left out."""
    rows = []
    for sample, candidates in zip(samples, answers):
        prompt, images, reference = prompt_and_images(sample, resizer)
        scores = reward(completions=list(candidates), answer=[reference] * len(candidates))
        best = max(range(len(candidates)), key=scores.__getitem__)
        worst = min(range(len(candidates)), key=scores.__getitem__)
        if scores[best] > scores[worst]:
            rows.append({"prompt": prompt, "images": images, "chosen": _assistant(candidates[best]),
                         "rejected": _assistant(candidates[worst])})
    log.info("sampled pairs: %d of %d prompts had answers of different reward", len(rows), len(samples))
    return rows
