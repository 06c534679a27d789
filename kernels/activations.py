"""MLP activations: SwiGLU, GeGLU (tanh), and plain GELU-tanh / GELU / QuickGELU / SiLU.

Gated form ``h = act(g) * u`` (LM MLPs) and plain form ``h = act(x)`` (vision MLPs fc1 -> act -> fc2).
One elementwise pass each way in fp32 registers: the backward recomputes ``act(g)`` from ``g`` instead
of saving it, and can write ``dg``/``du`` over ``g``/``u`` in place (used by the fused LoRA MLP, which
also asks the backward kernel to re-emit ``h`` for the down projection's LoRA gradient).
"""

from __future__ import annotations

import math

import torch

from visiontune.kernels._common import HAS_TRITON, interpret_mode, use_fused

#: activation names (transformers' ACT2FN keys) -> kernel code
ACTIVATIONS: dict[str, int] = {
    "silu": 0, "swish": 0,
    "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu_fast": 1,
    "gelu": 2,
    "quick_gelu": 3,
}

_BLOCK = 1024  # elements per program on a GPU (4 warps x 32 threads x 8 elements)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _act_and_grad(x, ACT: tl.constexpr):
        """Returns (act(x), act'(x)) in fp32."""
        if ACT == 0:  # silu
            s = tl.sigmoid(x)
            a = x * s
            da = s * (1.0 + x * (1.0 - s))
        elif ACT == 1:  # gelu, tanh approximation
            k0 = 0.7978845608028654  # sqrt(2/pi)
            inner = k0 * (x + 0.044715 * x * x * x)
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh
            a = 0.5 * x * (1.0 + t)
            da = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k0 * (1.0 + 3 * 0.044715 * x * x)
        elif ACT == 2:  # exact (erf) gelu
            cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
            a = x * cdf
            da = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
        else:  # quick_gelu
            s = tl.sigmoid(1.702 * x)
            a = x * s
            da = s + 1.702 * x * s * (1.0 - s)
        return a, da

    @triton.jit
    def _glu_fwd(G, U, H, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(g, ACT)
        tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=m)

    @triton.jit
    def _glu_bwd(G, U, DH, DG, DU, H, n, ACT: tl.constexpr, STORE_H: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        dh = tl.load(DH + offs, mask=m, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, ACT)
        if STORE_H:
            tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=m)
        tl.store(DG + offs, (dh * u * da).to(DG.dtype.element_ty), mask=m)
        tl.store(DU + offs, (dh * a).to(DU.dtype.element_ty), mask=m)

    @triton.jit
    def _act_fwd(X, Y, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(x, ACT)
        tl.store(Y + offs, a.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _act_bwd(X, DY, DX, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        _, da = _act_and_grad(x, ACT)
        tl.store(DX + offs, (dy * da).to(DX.dtype.element_ty), mask=m)


def _block() -> int:
    # the CPU interpreter pays per program, so it takes 64x larger blocks
    return 65536 if interpret_mode() else _BLOCK


def _grid(n: int) -> tuple[int]:
    return (max(1, math.ceil(n / _block())),)


def glu_forward_kernel(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """Raw launcher (no autograd): ``act(g) * u`` for contiguous g, u."""
    h = torch.empty_like(g)
    if g.numel():
        _glu_fwd[_grid(g.numel())](g, u, h, g.numel(), ACT=ACTIVATIONS[act], BLOCK=_block(), num_warps=4)
    return h


def glu_backward_kernel(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, act: str, in_place: bool = False,
                        want_h: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Raw launcher: returns (dg, du, h or None). With ``in_place`` dg/du overwrite g/u's storage."""
    dg = g if in_place else torch.empty_like(g)
    du = u if in_place else torch.empty_like(u)
    h = torch.empty_like(g) if want_h else None
    if g.numel():
        _glu_bwd[_grid(g.numel())](g, u, dh, dg, du, h if want_h else dg, g.numel(), ACT=ACTIVATIONS[act],
                                   STORE_H=want_h, BLOCK=_block(), num_warps=4)
    return dg, du, h


class GLUFunction(torch.autograd.Function):
    """``act(g) * u`` with a Triton forward/backward; saves g and u, never act(g)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
        g, u = g.contiguous(), u.contiguous()
        ctx.save_for_backward(g, u)
        ctx.act = act
        return glu_forward_kernel(g, u, act)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g, u = ctx.saved_tensors
        dg, du, _ = glu_backward_kernel(g, u, dh.contiguous(), ctx.act)
        return dg, du, None


class ActFunction(torch.autograd.Function):
    """Plain activation ``act(x)`` with a Triton forward/backward; saves x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, act: str) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        if x.numel():
            _act_fwd[_grid(x.numel())](x, y, x.numel(), ACT=ACTIVATIONS[act], BLOCK=_block(), num_warps=4)
        ctx.save_for_backward(x)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x)
        if x.numel():
            _act_bwd[_grid(x.numel())](x, dy.contiguous(), dx, x.numel(), ACT=ACTIVATIONS[ctx.act],
                                       BLOCK=_block(), num_warps=4)
        return dx, None


def act_reference(x: torch.Tensor, act: str) -> torch.Tensor:
    """Pure-torch activation in fp32, cast back to x.dtype."""
    xf = x.float()
    code = ACTIVATIONS[act]
    if code == 0:
        y = torch.nn.functional.silu(xf)
    elif code == 1:
        y = torch.nn.functional.gelu(xf, approximate="tanh")
    elif code == 2:
        y = torch.nn.functional.gelu(xf)
    else:
        y = xf * torch.sigmoid(1.702 * xf)
    return y.to(x.dtype)


def glu_reference(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """Pure-torch gated activation ``act(g) * u`` in fp32, cast back to g.dtype."""
    return (act_reference(g.float(), act) * u.float()).to(g.dtype)


def glu(g: torch.Tensor, u: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """SwiGLU (``act='silu'``) / GeGLU (``act='gelu_pytorch_tanh'``): Triton when available, else reference."""
    if use_fused(g) and act in ACTIVATIONS:
        return GLUFunction.apply(g, u, act)
    return glu_reference(g, u, act)


def activation(x: torch.Tensor, act: str = "gelu_pytorch_tanh") -> torch.Tensor:
    """Plain activation (vision MLPs): Triton when available, else reference."""
    if use_fused(x) and act in ACTIVATIONS:
        return ActFunction.apply(x, act)
    return act_reference(x, act)
