"""LayerNorm (vision towers: Qwen2-VL/Qwen3-VL blocks, SigLIP, Mllama): Triton fwd/bwd + reference.

Saves x plus per-row mean and rstd (8 bytes a row); weight and bias gradients are reduced through
per-program fp32 partial sums.
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
    def _layernorm_fwd(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, n_rows, N, eps,
                       BR: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)[:, None]
        cols = tl.arange(0, BLOCK)[None, :]
        rmask = rows < n_rows
        cmask = cols < N
        mask = rmask & cmask
        x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        mean = (tl.sum(x, axis=1) / N)[:, None]
        xc = tl.where(cmask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)[:, None]
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(Y + rows * stride_y + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def _layernorm_bwd(DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, stride_dy, stride_x, stride_dx,
                       n_rows, N, BR: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)[None, :]
        cmask = cols < N
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BR, BLOCK], dtype=tl.float32)
        db_acc = tl.zeros([BR, BLOCK], dtype=tl.float32)
        for start in range(pid * BR, n_rows, n_prog * BR):
            rows = start + tl.arange(0, BR)[:, None] + tl.zeros([], dtype=tl.int64)
            rmask = rows < n_rows
            mask = rmask & cmask
            x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            xh = tl.where(mask, (x - mean) * rstd, 0.0)
            dyw = dy * w
            c1 = tl.sum(dyw * xh, axis=1)[:, None] / N
            c2 = tl.sum(dyw, axis=1)[:, None] / N
            dx = (dyw - (xh * c1 + c2)) * rstd
            tl.store(DX + rows * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xh
            db_acc += dy
        tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0)[None, :], mask=cmask)
        tl.store(DB_PART + pid * N + cols, tl.sum(db_acc, axis=0)[None, :], mask=cmask)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float) -> torch.Tensor:
    """Pure-torch LayerNorm over the last dim, computed in fp32 and cast back to x.dtype."""
    n = x.shape[-1]
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return torch.nn.functional.layer_norm(x.float(), (n,), w, b, eps).to(x.dtype)


class LayerNormFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton LayerNorm; saves x, mean and rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        n = shape[-1]
        x2 = x.reshape(-1, n)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        rows = x2.shape[0]
        y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = next_pow2(n)
        if rows:
            br = rows_per_program(rows, block)
            _layernorm_fwd[(triton.cdiv(rows, br),)](x2, weight, bias, y, mean, rstd, x2.stride(0), y.stride(0),
                                                     rows, n, eps, BR=br, BLOCK=block,
                                                     num_warps=row_warps(block * br))
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.meta = (shape, block, bias.dtype)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, mean, rstd = ctx.saved_tensors
        shape, block, bias_dtype = ctx.meta
        n = shape[-1]
        dy2 = dy.reshape(-1, n)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        rows = x2.shape[0]
        dx = torch.empty_like(x2)
        br = rows_per_program(rows, block)
        progs = reduction_programs(triton.cdiv(max(rows, 1), br), x2.device)
        dw_part = torch.zeros((progs, n), dtype=torch.float32, device=x2.device)
        db_part = torch.zeros((progs, n), dtype=torch.float32, device=x2.device)
        if rows:
            _layernorm_bwd[(progs,)](dy2, x2, weight, mean, rstd, dx, dw_part, db_part, dy2.stride(0),
                                     x2.stride(0), dx.stride(0), rows, n, BR=br, BLOCK=block,
                                     num_warps=row_warps(block * br))
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = db_part.sum(0).to(bias_dtype) if ctx.needs_input_grad[2] else None
        return dx.view(shape), dw, db, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dim; Triton on CUDA (or forced under the interpreter), else reference."""
    if use_fused(x):
        n = x.shape[-1]
        w = weight if weight is not None else torch.ones(n, dtype=x.dtype, device=x.device)
        b = bias if bias is not None else torch.zeros(n, dtype=w.dtype, device=x.device)
        return LayerNormFunction.apply(x, w, b, float(eps))
    return layer_norm_reference(x, weight, bias, eps)
