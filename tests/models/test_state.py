"""VisionState (one typed home for what visiontune keeps beside a model) and the padding-side helpers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from visiontune.models.state import VisionState, padding_side, set_padding_side, vision_state


class _Wrapper:
    """Stands in for a PEFT model: ``get_base_model()`` returns the wrapped model."""

    def __init__(self, base: object) -> None:
        self.base = base

    def get_base_model(self) -> object:
        return self.base


def test_state_is_created_once_and_shared_with_a_wrapper():
    base = SimpleNamespace()
    state = vision_state(base)
    assert state == VisionState() and vision_state(base) is state
    state.checkpointing = "offload"
    assert vision_state(_Wrapper(base)) is state
    assert vision_state(_Wrapper(base)).checkpointing == "offload"


def test_padding_side_block_restores_even_on_error():
    processor = SimpleNamespace(tokenizer=SimpleNamespace(padding_side="right"))
    with pytest.raises(RuntimeError), padding_side(processor, "left"):
        assert processor.tokenizer.padding_side == "left"
        raise RuntimeError("boom")
    assert processor.tokenizer.padding_side == "right"
    tokenizer = SimpleNamespace(padding_side="left")  # a bare tokenizer works too
    assert set_padding_side(tokenizer, "right") == "left" and tokenizer.padding_side == "right"


def test_bad_padding_side_is_refused():
    with pytest.raises(ValueError, match="expected 'left'"):
        set_padding_side(SimpleNamespace(padding_side="right"), "center")
