"""Reward functions for GRPO (and for scoring samples into DPO pairs): plain Python callables.

Each takes what TRL's ``GRPOTrainer`` passes a reward function, ``(prompts, completions, **columns)``,
and returns one float per completion. A completion is a string, or (conversational prompts) a list of
messages whose last one is the assistant's answer; the reference is the dataset column ``answer``
(:func:`visiontune.align.grpo_rows` writes it). Ready ones:

* :func:`exact_match`: 1.0 if the answer equals the reference (both stripped), else 0.0;
* :func:`cer`: ``1 - CER``: 1.0 for a perfect answer, 0.0 for an empty one, below 0 for an answer that
  is longer and wrong (CER can exceed 1; a lower bound would hide how far off long garbage is);
* :func:`numeric_reward`: a factory, 1.0 if the answer's first number is within a tolerance of the
  reference's;
* :func:`format_reward`: a factory, 1.0 if the whole answer matches a regular expression.

:func:`get` builds them by name for the ``align.rewards`` setting.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

RewardFunc = Callable[..., list[float]]

_NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:[eE][-+]?\d+)?")


def completion_text(completion: Any) -> str:
    """The answer text of one completion: a string, or the content of a conversation's last message."""
    if isinstance(completion, str):
        return completion.strip()
    if isinstance(completion, list) and completion:
        content = completion[-1].get("content")
        if isinstance(content, list):
            content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
        return str(content or "").strip()
    raise TypeError(f"a completion is a string or a list of messages, got {type(completion).__name__}: {completion!r}")


def _pairs(completions: Sequence[Any], answer: Optional[Sequence[Any]]) -> list[tuple[str, str]]:
    if answer is None:
        raise ValueError("this reward compares with the reference answer, but the dataset has no 'answer' column: "
                         "add one (visiontune.align.grpo_rows writes it from each conversation's last answer)")
    if len(answer) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers: they must pair up")
    return [(completion_text(c), str(a).strip()) for c, a in zip(completions, answer)]


def exact_match(prompts: Any = None, completions: Sequence[Any] = (), answer: Optional[Sequence[Any]] = None,
                **kwargs: Any) -> list[float]:
    """1.0 where the completion equals the reference answer (both stripped), else 0.0."""
    return [float(c == a) for c, a in _pairs(completions, answer)]


def cer(prompts: Any = None, completions: Sequence[Any] = (), answer: Optional[Sequence[Any]] = None,
        **kwargs: Any) -> list[float]:
    """``1 - character error rate`` against the reference answer (1 perfect, 0 empty, < 0 long and wrong)."""
    from visiontune.pipeline.evaluate import sample_cer

    return [1.0 - sample_cer(c, a) for c, a in _pairs(completions, answer)]


def first_number(text: str) -> Optional[float]:
    """The first number in ``text`` (a decimal comma counts as a point), or None."""
    m = _NUMBER.search(text)
    return None if m is None else float(m.group(0).replace(",", "."))


def numeric_reward(tolerance: float = 0.0, relative: bool = False) -> RewardFunc:
    """A reward: 1.0 where the completion's first number is within ``tolerance`` of the reference's
    (``relative``: a fraction of the reference's magnitude), else 0.0 (also when either has no number)."""
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance}: must be >= 0")

    def numeric(prompts: Any = None, completions: Sequence[Any] = (), answer: Optional[Sequence[Any]] = None,
                **kwargs: Any) -> list[float]:
        scores = []
        for c, a in _pairs(completions, answer):
            got, want = first_number(c), first_number(a)
            bound = tolerance * abs(want) if relative and want is not None else tolerance
            scores.append(float(got is not None and want is not None and abs(got - want) <= bound))
        return scores

    return numeric


def format_reward(pattern: str) -> RewardFunc:
    """A reward: 1.0 where the whole (stripped) completion matches the regular expression ``pattern``."""
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"answer format pattern {pattern!r} does not compile: {e}") from e

    def answer_format(prompts: Any = None, completions: Sequence[Any] = (), **kwargs: Any) -> list[float]:
        return [float(compiled.fullmatch(completion_text(c)) is not None) for c in completions]

    return answer_format


NAMES = ("exact_match", "cer", "numeric", "format")


def get(name: str, numeric_tolerance: float = 0.0, format_pattern: str = r"\S+") -> RewardFunc:
    """The reward called ``name`` (one of :data:`NAMES`); ``numeric`` and ``format`` take their setting."""
    if name == "exact_match":
        return exact_match
    if name == "cer":
        return cer
    if name == "numeric":
        return numeric_reward(numeric_tolerance)
    if name == "format":
        return format_reward(format_pattern)
    raise ValueError(f"unknown reward {name!r}: choose from {', '.join(NAMES)} (align.rewards), or pass your own "
                     "callable to GRPOTrainer(reward_funcs=...)")
