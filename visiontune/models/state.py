"""What visiontune keeps beside a loaded model (:class:`VisionState`) and the processor's padding side.

``FastVisionModel``, the kernel patcher and the collator share a few facts about a model: its processor,
the checkpointing mode in force and the wrappers installed for it, and the fused-kernel patch. They live
in one typed object on the transformers model (under a PEFT wrapper, the model it wraps), so the wrapper
and the model see the same state; :func:`vision_state` is the one way to read and change it.

Padding side: training batches are right-padded (labels line up with the processor's output, tested in
the collator), batched ``generate`` needs left padding (every row continues from its right end).
:func:`set_padding_side` and :func:`padding_side` are the one place that flips it.

Imports neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

_ATTR = "_visiontune_state"


@dataclass
class VisionState:
    """visiontune's state of one model (one per transformers model; PEFT wrappers share it)."""

    processor: Any = None
    """The processor ``FastVisionModel.from_pretrained`` loaded (its tokenizer's padding side follows the mode)."""
    checkpointing: Union[bool, str, float] = False
    """``use_gradient_checkpointing`` that ``for_training`` puts in force when given none."""
    checkpoint_plan: Optional[tuple[float, str]] = None
    """(share of LM layers checkpointed, checkpoint mode) of the installed wrappers, or None."""
    checkpoint_handle: Any = None
    """``visiontune.models.checkpointing.CheckpointHandle`` of the installed wrappers, or None."""
    kernel_handle: Any = None
    """``visiontune.kernels.patch.PatchHandle`` of an active fused-kernel patch, or None."""
    load_in_fp8: bool = False
    """``from_pretrained(load_in_fp8=True)``: ``get_peft_model`` puts the LoRA layers' frozen bases into FP8."""
    fp8_layers: int = 0
    """How many LoRA layers' bases are in FP8 (``visiontune.kernels.fp8.convert_fp8_base``)."""
    loss_chunk_bytes: Optional[int] = None
    """Bytes of logits per chunk of the engine's chunked losses (None: the kernels' default, ~640 MB); lowered by
    ``use_gradient_checkpointing="auto"`` at its floor."""
    auto_choice: Any = None
    """``use_gradient_checkpointing="auto"``: the measured choice installed by the trainer
    (``visiontune.models.auto_checkpoint.CheckpointChoice``), or None before it is made."""


def base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def vision_state(model: Any) -> VisionState:
    """The :class:`VisionState` of ``model`` (PEFT-wrapped or not), created empty on first use."""
    base = base_model(model)
    state = getattr(base, _ATTR, None)
    if state is None:
        state = VisionState()
        setattr(base, _ATTR, state)
    return state


def set_padding_side(processor: Any, side: str) -> str:
    """Make ``processor`` (or a bare tokenizer) pad on ``side`` ("left" or "right"); returns the old side."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side {side!r}: expected 'left' (generation) or 'right' (training)")
    tokenizer = getattr(processor, "tokenizer", processor)
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    return old


@contextlib.contextmanager
def padding_side(processor: Any, side: str) -> Iterator[None]:
    """Pad on ``side`` inside the block and restore the previous side after it (even on error).

    For code that borrows a processor whose owner may be training: the collator pads right, batched
    generation pads left, and neither leaves the processor changed.
    """
    old = set_padding_side(processor, side)
    try:
        yield
    finally:
        getattr(processor, "tokenizer", processor).padding_side = old
