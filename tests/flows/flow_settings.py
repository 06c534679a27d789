"""The tiny flow settings the flow tests share: 40 demo pages, a test-size model, 2 training steps, 2 evaluation
samples; each test overrides what it is about (``tiny_flow(train={"max_steps": 3})``)."""

from __future__ import annotations

import copy
from typing import Any

TINY_FLOW: dict[str, dict[str, Any]] = {
    "demo": {"samples": 40},
    "model": {"max_seq_length": 512, "tiny_size": "test"},
    "lora": {"r": 4, "lora_alpha": 8},
    "images": {"resize": [112, 56]},
    "train": {"max_steps": 2, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2},
    "eval": {"max_samples": 2, "max_new_tokens": 3, "grid_samples": 2},
    "register": {"input_example": False, "max_new_tokens": 3},
    "report": {"gallery_samples": 2},
}


def tiny_flow(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """:data:`TINY_FLOW` with ``sections`` merged in key by key (a section not in it is added whole)."""
    out = copy.deepcopy(TINY_FLOW)
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out
