"""Reward functions on hand-checkable answers, in both completion shapes TRL passes (strings; messages)."""

from __future__ import annotations

import pytest

from visiontune import rewards


def _msgs(*texts: str) -> list:
    return [[{"role": "assistant", "content": t}] for t in texts]


def test_exact_match_and_cer_compare_with_the_reference():
    assert rewards.exact_match(completions=[" 42 ", "41", ""], answer=["42", "42", "42"]) == [1.0, 0.0, 0.0]
    got = rewards.cer(completions=_msgs("42", "43", "", "4200"), answer=["42"] * 4)
    assert got == pytest.approx([1.0, 0.5, 0.0, 0.0])  # 4200: two insertions over two characters
    assert rewards.cer(completions=["123456"], answer=["1"])[0] == pytest.approx(-4.0)  # long and wrong: below 0
    parts = [[{"role": "assistant", "content": [{"type": "text", "text": "4"}, {"type": "text", "text": "2"}]}]]
    assert rewards.exact_match(completions=parts, answer=["42"]) == [1.0]


def test_numeric_reward_takes_the_first_number_within_tolerance():
    numeric = rewards.numeric_reward(tolerance=0.05)
    got = numeric(completions=["It is 3.14.", "3,2", "pi", "-3.14"], answer=["3.1416"] * 4)
    assert got == [1.0, 0.0, 0.0, 0.0]
    assert rewards.numeric_reward()(completions=["7 apples"], answer=["7"]) == [1.0]
    assert rewards.numeric_reward(0.1, relative=True)(completions=["105", "120"], answer=["100"] * 2) == [1.0, 0.0]
    assert rewards.first_number("x = 1e3, y = 2") == 1000.0 and rewards.first_number("none") is None


def test_format_reward_matches_the_whole_answer():
    fmt = rewards.format_reward(r"<answer>\d+</answer>")
    assert fmt(completions=["<answer>12</answer>", "<answer>12</answer> and more", "12"]) == [1.0, 0.0, 0.0]
    assert rewards.get("format", format_pattern=r"\d+")(completions=_msgs("0912", "09 12")) == [1.0, 0.0]


def test_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="no 'answer' column"):
        rewards.cer(completions=["1"])
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        rewards.exact_match(completions=["1", "2"], answer=["1"])
    with pytest.raises(ValueError, match="does not compile"):
        rewards.format_reward("(")
    with pytest.raises(ValueError, match="unknown reward 'bleu': choose from exact_match, cer, numeric, format"):
        rewards.get("bleu")
    with pytest.raises(TypeError, match="a completion is a string or a list of messages"):
        rewards.completion_text(3)
