"""Samples -> the conversation format the collator consumes.

::

    {"messages": [
        {"role": "user", "content": [{"type": "image", "image": <PIL.Image | path str | bytes>}, ...,
                                     {"type": "text", "text": "<instruction>\\n<question>"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<answer>"}]},
        ...  # further turns: user text, assistant text
    ]}

Images go into the first user turn, before its text. Multi-turn samples hold equal-length lists of
questions and answers. :func:`to_conversations` returns a plain Python list (no Arrow round trip), which
is what multi-image data wants: Arrow would unify the content structs and add ``None`` fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

DEFAULT_INSTRUCTION = "Transcribe the handwritten digits in this image."


def _listify(v: Any) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)) and not hasattr(v, "getpixel"):
        return list(v.tolist())
    return [v]


def _image_value(v: Any) -> Any:
    return str(v) if isinstance(v, Path) else v


def to_conversation(
    sample: dict,
    instruction: str = DEFAULT_INSTRUCTION,
    image_key: str = "image",
    text_key: str = "text",
    question_key: Optional[str] = None,
    extra_images_key: Optional[str] = None,
) -> dict:
    """One sample -> ``{"messages": [...]}``.

    ``sample[image_key]`` is one image or a list of images (PIL image, path or bytes); ``extra_images_key``
    names further images appended after them. ``sample[text_key]`` is the answer, or a list of answers
    for a multi-turn sample, in which case ``sample[question_key]`` must be a list of the same length.
    The user text of each turn is the instruction (first turn only) followed by that turn's question.
    """
    if image_key not in sample:
        raise KeyError(f"sample has no image column {image_key!r} (keys: {sorted(sample)}); pass image_key=")
    if text_key not in sample:
        raise KeyError(f"sample has no text column {text_key!r} (keys: {sorted(sample)}); pass text_key=")
    images = [_image_value(i) for i in _listify(sample[image_key])]
    if extra_images_key:
        images += [_image_value(i) for i in _listify(sample.get(extra_images_key))]
    answers = sample[text_key]
    multi = isinstance(answers, (list, tuple))
    answers = list(answers) if multi else [answers]
    questions: list = [None] * len(answers)
    if question_key is not None:
        q = sample.get(question_key)
        if isinstance(q, (list, tuple)) != multi:
            raise ValueError(
                f"{question_key!r} and {text_key!r} must both be lists (multi-turn) or both be single values; "
                f"got {type(q).__name__} and {type(sample[text_key]).__name__}"
            )
        questions = list(q) if multi else [q]
        if len(questions) != len(answers):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers in one sample: they must pair up")
    elif multi and len(answers) > 1:
        raise ValueError(f"{text_key!r} holds {len(answers)} answers but no question_key was given: multi-turn needs questions")
    messages: list[dict] = []
    for turn, (q, a) in enumerate(zip(questions, answers)):
        parts = [instruction if turn == 0 else None, q]
        text = "\n".join(str(p) for p in parts if p is not None and str(p).strip())
        if not text and not (turn == 0 and images):
            raise ValueError(f"turn {turn} has neither an instruction nor a question")
        content: list[dict] = [{"type": "image", "image": img} for img in images] if turn == 0 else []
        if text:
            content.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "" if a is None else str(a)}]})
    return {"messages": messages}


def to_conversations(samples: Iterable[dict], **kwargs: Any) -> list[dict]:
    """:func:`to_conversation` over a batch; a plain list, never an Arrow table."""
    return [to_conversation(s, **kwargs) for s in samples]
