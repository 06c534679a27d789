"""visiontune's fused-kernel engine (``visiontune.kernels``).

One op per module, each with its Triton kernels, autograd Function and pure-torch reference:
:mod:`~visiontune.kernels.rmsnorm`, :mod:`~visiontune.kernels.layernorm`, :mod:`~visiontune.kernels.rope`
(RoPE, M-RoPE, vision 2D RoPE), :mod:`~visiontune.kernels.activations` (SwiGLU/GeGLU/GELU),
:mod:`~visiontune.kernels.lora` (LoRA fused with the frozen base matmul, fused LoRA MLPs),
:mod:`~visiontune.kernels.cross_entropy` (chunked linear + CE), :mod:`~visiontune.kernels.attention`
(packed varlen attention), plus :mod:`~visiontune.kernels.checkpoint` (selective checkpointing / CPU
offload) and :mod:`~visiontune.kernels.packing` (padding-free batches).

:func:`patch_model` swaps them into a supported model (one registry, :mod:`~visiontune.kernels.patch`);
it is a no-op on the CPU unless forced. Importing this package imports torch but compiles nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["patch_model", "unpatch_model", "KERNEL_REGISTRY", "pack_padded_batch", "checkpoint_modules"]


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


def __getattr__(name: str) -> Any:
    if name == "KERNEL_REGISTRY":
        from visiontune.kernels.patch import KERNEL_REGISTRY

        return KERNEL_REGISTRY
    if name == "pack_padded_batch":
        from visiontune.kernels.packing import pack_padded_batch

        return pack_padded_batch
    if name == "checkpoint_modules":
        from visiontune.kernels.checkpoint import checkpoint_modules

        return checkpoint_modules
    raise AttributeError(f"module 'visiontune.kernels' has no attribute {name!r}")
