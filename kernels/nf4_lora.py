"""LoRA over a frozen NF4 (bitsandbytes 4-bit) base weight: QLoRA's linear as one autograd Function.

``y = x dequant(W)^T + b + s * (x A^T) B^T``. The Function saves ``x`` and the rank-r product ``x A^T``
only, as :class:`~visiontune.kernels.lora.LoRALinearFunction` does, and never the dequantized weight:
forward dequantizes W (Triton, :mod:`~visiontune.kernels.nf4`) into a per-device, per-dtype workspace
that is reused by every NF4 layer, and backward dequantizes it into the same workspace again for
``dx = dy W``. The frozen W gets no gradient; x, A, B and a trainable bias get PEFT's gradients (the
GEMMs and their order are those of the unquantized Function, :func:`~visiontune.kernels.lora._fwd_linear`
and :func:`~visiontune.kernels.lora._bwd_linear`). The workspace holds the largest NF4 weight seen in
the activation dtype (Qwen2.5-VL-7B's MLP, 18944 x 3584 in bf16: 130 MiB) for the life of the process;
:func:`release_workspace` frees it.

The GEMMs are torch.mm (cuBLAS on a GPU) over the dequantized weight: one extra write and read of W in
the activation dtype per GEMM that needs it. Whether a fully fused dequantize-in-the-GEMM Triton kernel
(reading 4-bit W tiles straight into the matmul) beats dequantize + cuBLAS at these shapes is a question
for the GPU, not measured yet.

Used by the engine's patch (:func:`visiontune.kernels.patch.lora_params`) for PEFT LoRA layers whose base
is a ``bnb.nn.Linear4bit`` in NF4, on CUDA (and on CPU tensors only under ``TRITON_INTERPRET=1`` inside
``force_triton``); every other 4-bit case keeps bitsandbytes' and PEFT's own path.
"""

from __future__ import annotations

import torch

from visiontune.kernels.lora import QuantizedLoRALinearFunction, lora_linear_reference, quantized_lora_linear
from visiontune.kernels.nf4 import NF4Weight, nf4_dequantize, nf4_dequantize_reference

_WORKSPACE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _workspace(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least ``n`` elements, shared by all NF4 layers of that device and dtype.

    Safe to share because each use is consumed by the GEMM right after it on the same stream: the weight
    never outlives the call that dequantized it (the Functions save no view of it).
    """
    key = (device, dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < n:
        _WORKSPACE.pop(key, None)  # free the smaller one before allocating the larger
        buf = torch.empty(n, dtype=dtype, device=device)
        _WORKSPACE[key] = buf
    return buf[:n]


def release_workspace() -> None:
    """Free the dequantization workspaces (they are re-created at the next NF4 call)."""
    _WORKSPACE.clear()


def _dequant_into_workspace(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    return nf4_dequantize(w, dtype, out=_workspace(w.numel, dtype, w.device))


def nf4_lora_linear_reference(x: torch.Tensor, w: NF4Weight, b: torch.Tensor | None, a: torch.Tensor | None,
                              bm: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Unfused reference: dequantize (pure torch) in x's dtype, then PEFT's math (``F.linear`` + LoRA)."""
    return lora_linear_reference(x, nf4_dequantize_reference(w, x.dtype), b, a, bm, scale)


def nf4_mm(w: NF4Weight, x2: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x2 W^T + b``: W dequantized into the workspace, then cuBLAS (:meth:`NF4Weight.mm`)."""
    wd = _dequant_into_workspace(w, x2.dtype)
    return torch.addmm(b.to(x2.dtype), x2, wd.t()) if b is not None else torch.mm(x2, wd.t())


def nf4_dx(w: NF4Weight, dy2: torch.Tensor) -> torch.Tensor:
    """``dy2 W``: W dequantized into the workspace again (:meth:`NF4Weight.dx`)."""
    return torch.mm(dy2, _dequant_into_workspace(w, dy2.dtype))


class NF4LoRALinearFunction(QuantizedLoRALinearFunction):
    """Frozen NF4 base linear + LoRA; saves x and x A^T, dequantizes W again in backward."""


def nf4_lora_linear(x: torch.Tensor, w: NF4Weight, b: torch.Tensor | None = None, a: torch.Tensor | None = None,
                    bm: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """LoRA linear over a frozen NF4 weight: the Function on the engine's devices, the reference elsewhere."""
    return quantized_lora_linear(NF4LoRALinearFunction, nf4_lora_linear_reference, "nf4_lora_linear", x, w, b, a,
                                 bm, scale)


__all__ = ["NF4LoRALinearFunction", "nf4_lora_linear", "nf4_lora_linear_reference", "release_workspace"]
