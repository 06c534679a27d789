"""FP8 (e4m3) frozen weights: row-wise quantization (one Triton pass) and the scaled FP8 matmul around it.

Hopper's tensor cores multiply FP8 at twice their bf16 rate. The frozen base of a LoRA layer never changes,
so it can be kept in FP8 with one fp32 scale per output channel (row of W), and each matmul's other operand
quantized row by row on the fly:

* forward ``y = x W^T``: x (tokens x K) gets one scale per token row, W one per output row; both scales lie
  outside the reduction over K, so ``torch._scaled_mm`` applies them to the fp32 accumulator (row-wise
  scaling: ``y[m, n] = s_x[m] s_w[n] sum_k q_x[m, k] q_w[n, k]``).
* backward ``dx = dy W``: the reduction runs over N, where W's scales sit, so they are folded into dy before
  it is quantized (``dy'[m, n] = dy[m, n] s_w[n]``, one scale per token row again) and W's FP8 values enter
  unscaled (``dx = s_dy' q_dy' q_W``). W's transpose is made per call (N x K bytes, well under the GEMM's
  own traffic), so one FP8 copy serves both products.

e4m3 keeps 3 mantissa bits (relative rounding error up to 2^-4) and a range up to 448; a row's scale maps
its largest magnitude to 448, so nothing saturates. The quantization kernel reads a row twice (max, then
scale-and-round) and writes 1 byte an element; a program takes one row at the 7B's widths on a GPU and many
under the CPU interpreter, whose cost is per program. :func:`rowwise_quantize_reference` is the same arithmetic in
torch: fp32 throughout, round-to-nearest-even on the cast (a quotient that differs from torch's in its last
bit next to a tie lands one unit away; tests/kernels/test_fp8.py allows for that).

:class:`FP8Weight` is a quantized base as the engine passes it where a weight goes (like
:class:`~visiontune.kernels.nf4.NF4Weight`); :func:`convert_fp8_base` puts LoRA layers' frozen bases into FP8
(``FastVisionModel.from_pretrained(load_in_fp8=True)``) and :func:`restore_fp8_base` undoes it.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from visiontune.kernels._common import HAS_TRITON, next_pow2, rows_per_program, use_fused

if HAS_TRITON:
    import triton
    import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# A row of zeros gets this scale (not 0, whose reciprocal would be inf); its values quantize to 0 anyway.
_MIN_SCALE = 1e-12


def rowwise_quantize_reference(x: torch.Tensor, col_scale: Optional[torch.Tensor] = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)`` with ``q[m] = fp8(x'[m] / s[m])``, ``s[m] = max|x'[m]| / 448``, ``x' = x * col_scale`` (fp32).

    ``x`` is 2-D; ``col_scale`` (one value per column, fp32) is folded in before the row maximum (the
    backward's ``dy s_w``)."""
    xf = x.float()
    if col_scale is not None:
        xf = xf * col_scale.float()
    s = (xf.abs().amax(dim=1) / FP8_MAX).clamp_min(_MIN_SCALE)
    q = (xf / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, s


if HAS_TRITON:

    @triton.jit
    def _round_to_e4m3(v):
        """fp32 ``v`` (|v| <= 448) rounded to the nearest e4m3 value, ties to even, still in fp32.

        The cast that follows is then exact. Done here because Triton's CPU interpreter casts fp32 -> fp8
        without carrying a mantissa round-up into the exponent (1.96 became 1.0, 7.75 became 4.0); on the GPU
        the hardware cast of an e4m3 value is the identity, so both give torch's round-to-nearest-even.
        Normal range: round the fp32 mantissa to 3 bits on the bit pattern. Below 2^-6 (e4m3 subnormals,
        spacing 2^-9): add and subtract 1.5 * 2^14, which leaves v rounded to a multiple of 2^-9.
        """
        bits = v.to(tl.int32, bitcast=True)
        lsb = (bits >> 20) & 1
        normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
        sub = (v + 24576.0) - 24576.0
        return tl.where(tl.abs(v) < 0.015625, sub, normal)

    @triton.jit
    def _load_tile(x_ptr, cs_ptr, rows, rmask, k0, K, stride_x, HAS_CS: tl.constexpr, BLOCK: tl.constexpr):
        """Columns ``k0 .. k0 + BLOCK`` of ``rows`` in fp32, times the column scales if any; (offsets, mask, values)."""
        o = k0 + tl.arange(0, BLOCK)
        m = rmask[:, None] & (o < K)[None, :]
        v = tl.load(x_ptr + rows[:, None] * stride_x + o[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_CS:
            v = v * tl.load(cs_ptr + o, mask=o < K, other=0.0)[None, :]
        return o, m, v

    @triton.jit
    def _rowwise_quant_kernel(x_ptr, cs_ptr, q_ptr, s_ptr, M, K, stride_x, stride_q,
                              HAS_CS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                              FP8_MAXV: tl.constexpr, MIN_SCALE: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        amax = tl.zeros((ROWS,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            o, m, v = _load_tile(x_ptr, cs_ptr, rows, rmask, k0, K, stride_x, HAS_CS, BLOCK)
            amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
        s = tl.maximum(amax / FP8_MAXV, MIN_SCALE)
        tl.store(s_ptr + rows, s, mask=rmask)
        for k0 in range(0, K, BLOCK):
            o, m, v = _load_tile(x_ptr, cs_ptr, rows, rmask, k0, K, stride_x, HAS_CS, BLOCK)
            v = tl.minimum(tl.maximum(v / s[:, None], -FP8_MAXV), FP8_MAXV)
            tl.store(q_ptr + rows[:, None] * stride_q + o[None, :], _round_to_e4m3(v).to(tl.float8e4nv), mask=m)


def rowwise_quantize(x: torch.Tensor, col_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise FP8 quantization of a 2-D tensor (the Triton kernel on the engine's devices, else the
    reference): ``(q (M, K) float8_e4m3fn, s (M,) fp32)``; see :func:`rowwise_quantize_reference`."""
    if x.dim() != 2:
        raise ValueError(f"rowwise_quantize: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if col_scale is not None and col_scale.shape != (x.shape[1],):
        raise ValueError(f"rowwise_quantize: col_scale has shape {tuple(col_scale.shape)}, x has {x.shape[1]} columns")
    if not use_fused(x):
        return rowwise_quantize_reference(x, col_scale)
    x = x if x.stride(1) == 1 else x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        cs = col_scale.float().contiguous() if col_scale is not None else s  # s: an unused pointer
        block = min(4096, next_pow2(k))
        rows = rows_per_program(m, block)  # 1 at the 7B's widths on a GPU; many under the CPU interpreter
        _rowwise_quant_kernel[(triton.cdiv(m, rows),)](
            x, cs, q, s, m, k, x.stride(0), q.stride(0), HAS_CS=col_scale is not None, ROWS=rows, BLOCK=block,
            FP8_MAXV=FP8_MAX, MIN_SCALE=_MIN_SCALE, num_warps=8 if block * rows >= 2048 else 4)
    return q, s


def scaled_mm(a: torch.Tensor, sa: torch.Tensor, b_t: torch.Tensor, sb: torch.Tensor,
              bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """``(sa[:, None] * a) @ (sb[:, None] * b_t)^T + bias`` for FP8 ``a`` (M, K) and ``b_t`` (N, K), both
    row-major, in ``out_dtype`` (``torch._scaled_mm`` with row-wise scales: fp32 accumulation).

    cuBLAS wants M a multiple of 16: other row counts are padded with zero rows and cut off again.
    """
    m = a.shape[0]
    pad = (-m) % 16 if a.is_cuda else 0
    if pad:
        a = F.pad(a.view(torch.uint8), (0, 0, 0, pad)).view(FP8)
        sa = F.pad(sa, (0, pad), value=1.0)
    out = torch._scaled_mm(a, b_t.t(), scale_a=sa.view(-1, 1), scale_b=sb.view(1, -1),
                           bias=bias.to(out_dtype) if bias is not None else None, out_dtype=out_dtype)
    return out[:m] if pad else out


def _ones(n: int, device: torch.device) -> torch.Tensor:
    """A cached fp32 vector of n ones (the unit scales of W^T's rows in ``dx``)."""
    key = (n, device)
    t = _ONES.get(key)
    if t is None:
        t = _ONES[key] = torch.ones(n, dtype=torch.float32, device=device)
    return t


_ONES: dict[tuple[int, torch.device], torch.Tensor] = {}

# The last activation quantize_input quantized: q, k and v (and an MLP's gate and up, also when they run again
# in backward) multiply the same input, so all but the first reuse its FP8 copy. The tensor is held by a weak
# reference whose callback drops the entry, so a freed activation (e.g. an MLP's h, deleted after its down
# projection) takes its FP8 copy with it, and its address cannot be reused under a live entry.
_LAST_INPUT: dict[str, Any] = {}


def _input_key(x2: torch.Tensor) -> tuple:
    return (x2.data_ptr(), tuple(x2.shape), x2.stride(), x2._version, x2.dtype, x2.device)


def quantize_input(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rowwise_quantize` of ``x2``, reusing the result of the previous call when it was for the same
    values: the same tensor (or a view of the same tensor with the same storage offset, shape and strides)
    not written in place since (its version counter is part of the key)."""
    root = x2._base if x2._base is not None else x2
    hit = _LAST_INPUT.get("entry")
    key = _input_key(x2)
    if hit is not None and hit[0]() is root and hit[1] == key:
        return hit[2]
    qs = rowwise_quantize(x2)
    _LAST_INPUT.clear()
    _LAST_INPUT["entry"] = (weakref.ref(root, _drop_entry), key, qs)
    return qs


def _drop_entry(ref: weakref.ref) -> None:
    """Weak-reference callback: the cached input died; drop its entry (not a newer one)."""
    entry = _LAST_INPUT.get("entry")
    if entry is not None and entry[0] is ref:
        _LAST_INPUT.clear()


class FP8Weight:
    """A frozen (N, K) weight in FP8 e4m3 with one fp32 scale per output row, standing in for a bf16/fp16
    weight of ``dtype``; the engine hands it where a weight goes (``lora_linear`` applies it)."""

    __slots__ = ("data", "scale", "dtype")

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        if data.dtype != FP8 or data.dim() != 2 or scale.shape != (data.shape[0],):
            raise ValueError(f"FP8Weight: expected (N, K) float8_e4m3fn data and (N,) scales, got "
                             f"{data.dtype} {tuple(data.shape)} and {tuple(scale.shape)}")
        self.data, self.scale, self.dtype = data, scale, dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.data.shape[0]), int(self.data.shape[1]))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def numel(self) -> int:
        return self.data.numel()

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight the FP8 values stand for, in ``dtype`` (default: the weight's own)."""
        return (self.data.float() * self.scale[:, None]).to(dtype or self.dtype)

    fused_mlp = True  # the fused LoRA MLP Functions take it through mm/dx

    def mm(self, x2: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x2 W^T + b`` for 2-D ``x2``: x2 quantized row-wise (once for the projections that share it, see
        :func:`quantize_input`), the product on FP8 tensor cores, out in x2's dtype (what the fused LoRA
        Functions call for a base that is not a tensor)."""
        q, s = quantize_input(x2)
        return scaled_mm(q, s, self.data, self.scale, b, x2.dtype)

    def dx(self, dy2: torch.Tensor) -> torch.Tensor:
        """``dy2 W``: W's row scales folded into dy2's row-wise quantization, W^T made for this call."""
        q, s = rowwise_quantize(dy2, self.scale)
        wt = self.data.t().contiguous()  # (K, N) row-major: its rows are dx's columns
        return scaled_mm(q, s, wt, _ones(wt.shape[0], wt.device), None, dy2.dtype)

    def lora_linear(self, x: torch.Tensor, b: torch.Tensor | None, a: torch.Tensor | None,
                    bm: torch.Tensor | None, scale: float) -> torch.Tensor:
        """``x W^T + b + scale (x A^T) B^T`` in FP8 for the base product (how ``lora_linear`` applies it)."""
        from visiontune.kernels.fp8_lora import fp8_lora_linear

        return fp8_lora_linear(x, self, b, a, bm, scale)

    def __repr__(self) -> str:
        return f"FP8Weight(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def quantize_weight(w: torch.Tensor) -> FP8Weight:
    """``w`` (N, K) in FP8 with one scale per output row (the same row-wise rule as activations)."""
    q, s = rowwise_quantize_reference(w.detach())
    return FP8Weight(q, s, w.dtype)


# What convert_fp8_base leaves on a converted nn.Linear (the base layer of a PEFT LoRA layer).
_SCALE = "vt_fp8_scale"       # non-persistent buffer: per-row fp32 scales (moves with .to(), not saved)
_ORIGINAL = "_vt_fp8_original"  # the bf16/fp16 weight, on the CPU, for restore_fp8_base (keep_original)
_DTYPE = "_vt_fp8_dtype"


def fp8_base_weight(base: nn.Module) -> Optional[FP8Weight]:
    """The :class:`FP8Weight` of an ``nn.Linear`` that :func:`convert_fp8_base` converted, else None."""
    scale = getattr(base, _SCALE, None)
    if scale is None or base.weight.dtype != FP8:
        return None
    return FP8Weight(base.weight, scale, getattr(base, _DTYPE))


def original_weight(base: nn.Linear) -> torch.Tensor:
    """The 16-bit weight of a converted ``nn.Linear`` on its device: the original where kept, else the
    dequantized FP8 values (what merging folds the LoRA update into)."""
    w = fp8_base_weight(base)
    original = base.__dict__.get(_ORIGINAL)
    return original.to(w.device) if original is not None else w.dequantize()


def _dequantizing_forward(base: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:  # any call the engine does not serve (fallbacks, CPU)
        w = fp8_base_weight(base)
        return F.linear(x, w.dequantize(x.dtype), base.bias)

    return forward


def convertible(module: nn.Module) -> bool:
    """A PEFT LoRA layer whose base is a plain ``nn.Linear`` with a frozen bf16 weight whose sides are multiples
    of 16 (what FP8 GEMMs take; Qwen2.5-VL's vision MLP, 3420 wide, stays in bf16). Not fp16: cuBLAS's
    row-wise scaled FP8 GEMM writes bf16 only, so an fp16 model's products could not run."""
    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(module, "lora_A") or type(base) is not nn.Linear:
        return False
    w = base.weight
    return (not w.requires_grad and w.dtype == torch.bfloat16
            and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0)


def convert_fp8_base(model: nn.Module, keep_original: bool = True) -> int:
    """Put the frozen base weight of every :func:`convertible` LoRA layer of ``model`` into FP8 (in place);
    returns how many were converted.

    The FP8 values replace the weight parameter (half the bytes; the LoRA adapters stay as they are) and the
    scales become a non-persistent buffer; the base layer's own forward dequantizes for any call the engine
    does not serve. ``keep_original`` moves the bf16/fp16 weight to the CPU so :func:`restore_fp8_base` gives
    it back bit for bit (merging and export need it): without it, restoring gives the dequantized values.
    """
    n = 0
    for m in model.modules():
        if not convertible(m):
            continue
        base = m.base_layer
        w = base.weight
        fp8 = quantize_weight(w)
        if keep_original:
            setattr(base, _ORIGINAL, w.detach().to("cpu", copy=True))
        setattr(base, _DTYPE, w.dtype)
        base.register_buffer(_SCALE, fp8.scale, persistent=False)
        base.weight = nn.Parameter(fp8.data, requires_grad=False)
        base.forward = _dequantizing_forward(base)
        n += 1
    return n


def restore_fp8_base(model: nn.Module) -> int:
    """Undo :func:`convert_fp8_base`: the original weights where kept, else the dequantized ones; returns how
    many layers were restored."""
    n = 0
    for base in model.modules():
        w = fp8_base_weight(base) if isinstance(base, nn.Linear) else None
        if w is None:
            continue
        data = original_weight(base)
        base.__dict__.pop(_ORIGINAL, None)
        base.weight = nn.Parameter(data, requires_grad=False)
        del base._buffers[_SCALE]
        base.__dict__.pop(_DTYPE, None)
        base.__dict__.pop("forward", None)
        n += 1
    return n


def has_fp8_base(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds an FP8 base from :func:`convert_fp8_base`."""
    return any(isinstance(m, nn.Linear) and fp8_base_weight(m) is not None for m in model.modules())


__all__ = ["FP8", "FP8Weight", "convert_fp8_base", "convertible", "fp8_base_weight", "has_fp8_base",
           "original_weight", "quantize_input", "quantize_weight", "restore_fp8_base", "rowwise_quantize", "rowwise_quantize_reference", "scaled_mm"]
