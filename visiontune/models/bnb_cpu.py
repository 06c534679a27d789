"""bitsandbytes 4-bit layers on the CPU: two defects of its CPU backend that visiontune steps around.

Both concern models that :meth:`~visiontune.models.fast_vision.FastVisionModel.from_pretrained` loads with
``load_in_4bit=True`` while their weights sit on the CPU (tests, the demo, small models); CUDA layers are
never touched. Each fix is per layer, and only where the defect is present on this machine.

1. Repacking for inference (:func:`keep_cpu_4bit_differentiable`).
2. Wrong dequantization of some weight shapes (:func:`correct_cpu_nf4_dequant`): bitsandbytes 0.49-0.50's
   native CPU ``dequantize_4bit`` on AVX-512 CPUs reads the wrong block scale once 64-wide blocks do not
   line up with the weight's rows (measured on a 96 x 32 weight: every element after the first block
   scaled by block 0's absmax, up to 1.4 off on N(0, 1) weights, against 0.42 for the right dequantization;
   96 x 200 and 96 x 64 were right). bitsandbytes' own training matmul dequantizes with that kernel, so
   PEFT's QLoRA path trains against corrupted weights, silently. Real models' widths are mostly multiples
   of 64; tiny test models' are not.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
import torch.nn.functional as F


def _cpu_linear4bit_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "support_avx512bf16_for_cpu") and getattr(m, "weight", None) is not None
            and m.weight.device.type == "cpu"]


def keep_cpu_4bit_differentiable(model: torch.nn.Module) -> None:
    """On the CPU, keep every bitsandbytes 4-bit layer on the dequantize-and-matmul path that training uses.

    bitsandbytes 0.50's CPU backend, on CPUs with AVX512-BF16, repacks a ``Linear4bit``'s weight for a bf16
    kernel at the layer's first forward in eval mode without grad (e.g. ``for_inference`` + ``generate``).
    The layer keeps using that kernel when training resumes, and it has no backward: no gradient reaches
    the layers before it, silently, and its outputs differ from training's (measured: 0.1 on a 128-wide
    layer). It also fails on layers narrower than its 64-wide blocks (tiny models). Slower CPU inference
    is the price.
    """
    for _, module in _cpu_linear4bit_layers(model):
        module.support_avx512bf16_for_cpu = False


def dense_4bit(param: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (``Params4bit``) dequantized to its stored dtype.

    NF4 weights on the CPU go through :func:`~visiontune.kernels.nf4.nf4_dequantize_reference` (exact, and
    right for every shape, see the module docstring); anything else through bitsandbytes.
    """
    from visiontune.kernels.nf4 import nf4_dequantize_reference, nf4_weight

    quant_state = param.quant_state
    w = nf4_weight(param.data, quant_state) if param.device.type == "cpu" else None
    if w is not None:
        return nf4_dequantize_reference(w)
    from bitsandbytes import functional

    return functional.dequantize_4bit(param.data, quant_state)


def _nf4_cpu_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Linear4bit.forward`` with visiontune's dequantization: what bitsandbytes' training matmul computes
    (dequantize in the compute dtype, then ``F.linear``), for a layer whose shape its CPU kernel gets wrong."""
    from visiontune.kernels.nf4 import nf4_dequantize_reference, nf4_weight

    w = nf4_weight(self.weight) if x.device.type == "cpu" and self.weight.device.type == "cpu" else None
    if w is None:  # moved to a GPU, or repacked: bitsandbytes' own forward
        return type(self).forward(self, x)
    dtype = self.compute_dtype or x.dtype
    bias = None if self.bias is None else self.bias.to(dtype)
    return F.linear(x.to(dtype), nf4_dequantize_reference(w, dtype), bias).to(x.dtype)


def _bnb_dequant_is_wrong(module: torch.nn.Module, w: Any) -> bool:
    from bitsandbytes import functional

    from visiontune.kernels.nf4 import nf4_dequantize_reference

    got = functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    want = nf4_dequantize_reference(w, torch.float32)
    # the defect is off by O(absmax); right dequantizations agree bit for bit (tests/kernels/test_nf4.py)
    return got.shape != want.shape or bool((got - want).abs().max() > 1e-3 * want.abs().max().clamp_min(1e-12))


def correct_cpu_nf4_dequant(model: torch.nn.Module) -> list[str]:
    """Give every CPU NF4 layer whose weight shape bitsandbytes' CPU kernel dequantizes wrongly a forward
    that dequantizes with visiontune's torch reference instead; returns their names.

    One probe per distinct (shape, blocksize, dtype, nesting): dequantize one such layer both ways. Layers
    where bitsandbytes is right keep its (faster) kernel. Warns once, naming the shapes, when it replaced any.
    """
    from visiontune.kernels.nf4 import nf4_weight

    verdict: dict[tuple, bool] = {}
    fixed: list[str] = []
    for name, module in _cpu_linear4bit_layers(model):
        w = nf4_weight(module.weight)
        if w is None:
            continue
        key = (w.shape, w.blocksize, w.dtype, w.nested)
        if key not in verdict:
            verdict[key] = _bnb_dequant_is_wrong(module, w)
        if verdict[key]:
            module.forward = types.MethodType(_nf4_cpu_forward, module)
            fixed.append(name)
    if fixed:
        import bitsandbytes

        shapes = sorted({f"{k[0][0]}x{k[0][1]}" for k, bad in verdict.items() if bad})
        warnings.warn(
            f"bitsandbytes {bitsandbytes.__version__}'s CPU dequantize_4bit gives wrong values for NF4 weights of "
            f"shape {', '.join(shapes)} on this CPU (64-wide blocks not aligned with the rows); visiontune "
            f"dequantizes those {len(fixed)} layers itself (e.g. {fixed[0]!r}). Nothing to do; a bitsandbytes "
            "release that fixes it makes this warning go away.", stacklevel=3)
    return fixed


__all__ = ["correct_cpu_nf4_dequant", "dense_4bit", "keep_cpu_4bit_differentiable"]
