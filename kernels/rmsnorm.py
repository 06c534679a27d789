"""RMSNorm: Triton forward/backward, autograd Function and the pure-torch reference.

Covers both conventions found in the supported models:

* Llama/Qwen/Mistral/Mllama: ``w * (x * rstd).to(x.dtype)`` (``offset=0``, ``cast_before_weight=True``)
* Gemma3: ``(x * rstd * (1 + w)).to(x.dtype)`` (``offset=1``, ``cast_before_weight=False``)

The kernel keeps one row per program in registers, saves only ``x`` and the per-row ``rstd`` (4 bytes
a row) for backward, and reduces the weight gradient through per-program fp32 partial sums instead of
materializing ``dy * x_hat`` for every row.
"""

from __future__ import annotations

import torch

from visiontune.kernels._common import (
    HAS_TRITON,
    next_pow2,
    reduction_programs,
    row_warps,
    rows_per_program,
    use_fused,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rmsnorm_fwd(X, W, Y, RSTD, stride_x, stride_y, n_rows, N, eps, offset,
                     CAST_BEFORE_W: tl.constexpr, BR: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)[:, None]
        cols = tl.arange(0, BLOCK)[None, :]
        rmask = rows < n_rows
        mask = rmask & (cols < N)
        x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)[:, None]
        xh = x * rstd
        if CAST_BEFORE_W:
            xh = xh.to(Y.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32) + offset
        tl.store(Y + rows * stride_y + cols, (xh * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, n_rows, N, offset,
                     BR: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)[None, :]
        cmask = cols < N
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
        dw_acc = tl.zeros([BR, BLOCK], dtype=tl.float32)
        for start in range(pid * BR, n_rows, n_prog * BR):
            rows = start + tl.arange(0, BR)[:, None] + tl.zeros([], dtype=tl.int64)
            rmask = rows < n_rows
            mask = rmask & cmask
            x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            xh = x * rstd
            dyw = dy * w
            c = tl.sum(dyw * xh, axis=1)[:, None] / N
            dx = (dyw - xh * c) * rstd
            tl.store(DX + rows * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xh
        tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0)[None, :], mask=cmask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       cast_before_weight: bool = True) -> torch.Tensor:
    """Pure-torch RMSNorm with the same semantics as the kernel (the HF modules' math)."""
    xf = x.float()
    xh = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_weight:
        return ((weight.float() + offset) * xh.to(x.dtype).float()).to(x.dtype)
    return (xh * (weight.float() + offset)).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton RMSNorm; saves x and rstd only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                cast_before_weight: bool) -> torch.Tensor:
        shape = x.shape
        n = shape[-1]
        x2 = x.reshape(-1, n)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        rows = x2.shape[0]
        y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = next_pow2(n)
        if rows:
            br = rows_per_program(rows, block)
            _rmsnorm_fwd[(triton.cdiv(rows, br),)](x2, weight, y, rstd, x2.stride(0), y.stride(0), rows, n, eps,
                                                   offset, CAST_BEFORE_W=cast_before_weight, BR=br, BLOCK=block,
                                                   num_warps=row_warps(block * br))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.meta = (shape, offset, block)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        shape, offset, block = ctx.meta
        n = shape[-1]
        dy2 = dy.reshape(-1, n)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        rows = x2.shape[0]
        dx = torch.empty_like(x2)
        br = rows_per_program(rows, block)
        progs = reduction_programs(triton.cdiv(max(rows, 1), br), x2.device)
        dw_part = torch.empty((progs, n), dtype=torch.float32, device=x2.device)
        if rows:
            _rmsnorm_bwd[(progs,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0),
                                   dx.stride(0), rows, n, offset, BR=br, BLOCK=block,
                                   num_warps=row_warps(block * br))
        dw = dw_part.sum(0).to(weight.dtype) if (ctx.needs_input_grad[1] and rows) else None
        if ctx.needs_input_grad[1] and not rows:
            dw = torch.zeros_like(weight)
        return dx.view(shape), dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             cast_before_weight: bool = True) -> torch.Tensor:
    """RMSNorm over the last dim; Triton on CUDA (or forced under the interpreter), else reference."""
    if use_fused(x):
        return RMSNormFunction.apply(x, weight, float(eps), float(offset), bool(cast_before_weight))
    return rms_norm_reference(x, weight, eps, offset, cast_before_weight)
