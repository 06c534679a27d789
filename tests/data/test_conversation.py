"""The conversation format the collator consumes: images first, instruction, multi-image, multi-turn."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from visiontune.data import to_conversation, to_conversations


def test_single_image_caption():
    conv = to_conversation({"image": "a.png", "text": "307"}, instruction="Read it.")
    assert conv == {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Read it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "307"}]},
    ]}


def test_multi_image_and_question_with_pil_and_path():
    im = Image.new("RGB", (8, 8))
    conv = to_conversation(
        {"img": [im, Path("b.png")], "more": ["c.png"], "q": "What differs?", "a": "colour"},
        instruction="Compare.", image_key="img", text_key="a", question_key="q", extra_images_key="more",
    )
    user = conv["messages"][0]["content"]
    assert [p["type"] for p in user] == ["image", "image", "image", "text"]
    assert user[0]["image"] is im and user[1]["image"] == "b.png" and user[2]["image"] == "c.png"
    assert user[3]["text"] == "Compare.\nWhat differs?"


def test_multi_turn_pairs_questions_and_answers():
    conv = to_conversation({"image": "a.png", "q": ["How many?", "Which first?"], "text": ["3", "7"]},
                           instruction="", question_key="q")
    roles = [m["role"] for m in conv["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert conv["messages"][2]["content"] == [{"type": "text", "text": "Which first?"}]
    assert conv["messages"][3]["content"][0]["text"] == "7"


def test_mismatched_turns_and_missing_questions_are_clear_errors():
    with pytest.raises(ValueError, match="2 questions but 3 answers"):
        to_conversation({"image": "a", "q": ["1", "2"], "text": ["a", "b", "c"]}, question_key="q")
    with pytest.raises(ValueError, match="multi-turn needs questions"):
        to_conversation({"image": "a", "text": ["a", "b"]})
    with pytest.raises(KeyError, match="image_key"):
        to_conversation({"picture": "a", "text": "x"})


def test_batch_form_is_a_plain_list_of_heterogeneous_rows():
    rows = to_conversations([{"image": ["a", "b"], "text": "x"}, {"image": "c", "text": "y"}], instruction="I")
    assert isinstance(rows, list) and len(rows) == 2
    assert len(rows[0]["messages"][0]["content"]) == 3 and len(rows[1]["messages"][0]["content"]) == 2
    assert "text" not in rows[0]["messages"][0]["content"][0]  # no Arrow-added None fields
