"""visiontune's fused-kernel engine (``visiontune.kernels``).

One op per module, each with its Triton kernels, autograd Function and pure-torch reference:
:mod:`~visiontune.kernels.rmsnorm`, :mod:`~visiontune.kernels.layernorm`, :mod:`~visiontune.kernels.rope`
(RoPE, M-RoPE, vision 2D RoPE), :mod:`~visiontune.kernels.activations` (SwiGLU/GeGLU/GELU),
:mod:`~visiontune.kernels.lora` (LoRA fused with the frozen base matmul, fused LoRA MLPs),
:mod:`~visiontune.kernels.nf4` (bitsandbytes NF4 dequantization), :mod:`~visiontune.kernels.nf4_lora`
(LoRA over a frozen NF4 base: QLoRA's linear), :mod:`~visiontune.kernels.fp8` (row-wise FP8 e4m3
quantization and FP8 frozen bases), :mod:`~visiontune.kernels.fp8_lora` (LoRA over a frozen FP8 base),
:mod:`~visiontune.kernels.cross_entropy` (chunked linear + CE), :mod:`~visiontune.kernels.attention`
(packed varlen attention).

:func:`patch_model` (:mod:`~visiontune.kernels.patch`) swaps them into a supported model, driven by each
architecture's kernel map in :data:`visiontune.models.archs.REGISTRY`; it is a no-op on the CPU unless
forced. Ops and the patcher only: selective checkpointing and padding-free packing are
:mod:`visiontune.models.checkpointing` and :mod:`visiontune.models.packing`. Importing this package
imports torch but compiles nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["patch_model", "unpatch_model"]


def patch_model(model: Any, enabled: bool | None = None, **kwargs: Any) -> Any:
    """Patch the fused kernels into ``model``; see :func:`visiontune.kernels.patch.patch_model`.

    ``enabled=None`` means on if CUDA is available and the model is on CUDA. Returns a handle with
    ``.unpatch()``; always safe to call (CPU / unsupported architecture: warning-free / warned no-op).
    """
    from visiontune.kernels.patch import patch_model as _patch

    return _patch(model, enabled, **kwargs)


def unpatch_model(model: Any) -> None:
    """Undo :func:`patch_model`."""
    from visiontune.kernels.patch import unpatch_model as _unpatch

    _unpatch(model)
