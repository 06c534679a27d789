"""LoRA over a frozen FP8 base weight: the base products on FP8 tensor cores, the adapters in bf16.

``y = x W^T + b + s (x A^T) B^T`` with W an :class:`~visiontune.kernels.fp8.FP8Weight`. Forward quantizes x
row-wise (one Triton pass, :func:`~visiontune.kernels.fp8.rowwise_quantize`) and runs the base GEMM in FP8
with fp32 accumulation (:func:`~visiontune.kernels.fp8.scaled_mm`); backward quantizes ``dy s_w`` the same
way for ``dx = dy W``. The adapters, their gradients, the bias and everything saved for backward (x and the
rank-r product x A^T, as :class:`~visiontune.kernels.lora.LoRALinearFunction` saves) stay in the activation
dtype: only the frozen base's two products change precision. The frozen W gets no gradient.

The fused MLP Functions of :mod:`~visiontune.kernels.lora` take FP8 bases too (through the same ``mm``/``dx``
products), so an FP8 model keeps the engine's MLP memory savings (``recompute_mlp`` included).

Used where the engine's patch hands an ``FP8Weight`` (:func:`visiontune.kernels.patch.lora_params`: a LoRA
layer whose base :func:`~visiontune.kernels.fp8.convert_fp8_base` converted); off the engine's devices the
reference runs (dequantize W, PEFT's math).
"""

from __future__ import annotations

import torch

from visiontune.kernels.fp8 import FP8Weight, rowwise_quantize_reference
from visiontune.kernels.lora import QuantizedLoRALinearFunction, lora_linear_reference, quantized_lora_linear


def fp8_lora_linear_reference(x: torch.Tensor, w: FP8Weight, b: torch.Tensor | None, a: torch.Tensor | None,
                              bm: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Unfused reference: the dequantized weight in x's dtype, then PEFT's math (x itself not quantized)."""
    return lora_linear_reference(x, w.dequantize(x.dtype), b, a, bm, scale)


def fp8_linear_emulated(x2: torch.Tensor, w: FP8Weight) -> torch.Tensor:
    """The Function's forward base product in plain fp32 torch (for tests): x quantized row-wise, both
    operands dequantized, fp32 matmul."""
    q, s = rowwise_quantize_reference(x2)
    return (q.float() * s[:, None]) @ w.dequantize(torch.float32).t()


def fp8_dx_emulated(dy2: torch.Tensor, w: FP8Weight) -> torch.Tensor:
    """The Function's backward base product ``dy W`` in plain fp32 torch (for tests)."""
    q, s = rowwise_quantize_reference(dy2, w.scale)
    return (q.float() * s[:, None]) @ w.data.float()


class FP8LoRALinearFunction(QuantizedLoRALinearFunction):
    """Frozen FP8 base linear + LoRA: the base products are the weight's ``mm``/``dx`` (scaled FP8 GEMMs)."""


def fp8_lora_linear(x: torch.Tensor, w: FP8Weight, b: torch.Tensor | None = None, a: torch.Tensor | None = None,
                    bm: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """LoRA linear over a frozen FP8 weight: the Function on the engine's devices, the reference elsewhere."""
    return quantized_lora_linear(FP8LoRALinearFunction, fp8_lora_linear_reference, "fp8_lora_linear", x, w, b, a,
                                 bm, scale)


__all__ = ["FP8LoRALinearFunction", "fp8_dx_emulated", "fp8_linear_emulated", "fp8_lora_linear",
           "fp8_lora_linear_reference"]
