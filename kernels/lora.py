"""LoRA linear layers fused with their frozen base matmul, and fused LoRA MLP blocks.

``y = x W^T + b + s * (x A^T) B^T`` as one autograd Function that saves only ``x`` and the rank-r
product ``x A^T`` (r=16: 0.4% of a 3584-wide activation). The base output is never saved, the frozen
W gets no gradient, and the LoRA update is added into the base GEMM's output buffer (``addmm_``), so
no separate output-sized temporary is created. The GEMMs are cuBLAS (torch.mm): at these shapes
(K, N >= 1280) they run at 600-700 TFLOP/s on an H100, which no hand-written Triton GEMM here beats.

The fused MLPs go further: ``down(act(gate(x)) * up(x))`` saves x, gate(x), up(x) and the rank-r
products, but NOT the activation output h (recomputed from g and u by the backward kernel, which also
writes dg/du over g/u in place). For Qwen2.5-VL-7B that is 2 instead of 3 intermediate-sized (18944)
tensors per token and layer: 76 KB instead of 114 KB per token per layer in bf16.

Parameters of one linear are passed as ``(W, b, A, B)`` plus a float scale; A/B/b may be None. A and B
may be fp32 (PEFT upcasts adapters): they are cast to the activation dtype for the GEMMs and their
gradients are returned in their own dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from visiontune.kernels.activations import (
    ACTIVATIONS,
    _act_bwd,
    _act_fwd,
    _grid,
    _block,
    act_reference,
    activation,
    glu,
    glu_backward_kernel,
    glu_forward_kernel,
    glu_reference,
)
from visiontune.kernels._common import use_fused


def lora_linear_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, a: torch.Tensor | None,
                          bm: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Unfused reference: ``F.linear(x, W, b) + scale * B(A(x))`` (PEFT's math)."""
    y = F.linear(x, w, b)
    if a is not None:
        y = y + scale * F.linear(F.linear(x.to(a.dtype), a), bm).to(y.dtype)
    return y


# Optimizer steps counted process-wide. Part of the cache key below: torch's optimizers bump a weight's
# ``_version``, but bitsandbytes' 8-bit AdamW writes it from its own CUDA code without doing so, and a
# stale cached copy then froze training (loss flat at 8.436 for every step with adamw_8bit on an H200).
_STEPS = [0]


def _count_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    _STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


def _lowp(p: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``p`` cast to the activation dtype and multiplied by ``scale``, cached on the parameter until it
    changes (in-place updates bump ``p._version``, any optimizer step bumps ``_STEPS``, a new storage
    changes ``data_ptr``).

    PEFT keeps adapters in fp32; without the cache every LoRA linear launched 2 casts in the forward,
    2 more in the recompute and 4 casts/scales in the backward: ~2,500 of the launches of a
    Qwen2.5-VL-7B step, which is launch-bound at small batches.
    """
    if p.dtype == dtype and scale == 1.0:
        return p
    key = (p._version, _STEPS[0], p.data_ptr(), dtype, scale)
    cached = getattr(p, "_vt_lowp", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        t = p.detach().to(dtype)
        if scale != 1.0:
            t = t * scale
    p._vt_lowp = (key, t)
    return t


def _fwd_linear(x2: torch.Tensor, w, b, a, bm, scale):
    """y = x2 W^T (+b) (+ s (x2 A^T) B^T); returns (y, x2 A^T or None)."""
    xa = torch.mm(x2, _lowp(a, x2.dtype).t()) if a is not None else None
    return _linear_from_xa(x2, w, b, bm, xa, scale), xa


def _linear_from_xa(x2: torch.Tensor, w, b, bm, xa, scale) -> torch.Tensor:
    """y of :func:`_fwd_linear` given the rank-r product ``xa`` (also how backward recomputes y). ``w`` may be
    a quantized base with its own products (``mm``/``dx``: :class:`~visiontune.kernels.fp8.FP8Weight`)."""
    if not torch.is_tensor(w):
        y = w.mm(x2, b)
    else:
        y = torch.addmm(b.to(x2.dtype), x2, w.t()) if b is not None else torch.mm(x2, w.t())
    if xa is not None:
        y.addmm_(xa, _lowp(bm, x2.dtype, scale).t())
    return y


def _bwd_linear(dy2: torch.Tensor, x2: torch.Tensor, xa, w, b, a, bm, scale, need_dx: bool, need_db: bool):
    """Gradients of one fused linear: (dx or None, db or None, dA or None, dB or None). ``w``: a tensor or a
    quantized base with its own products (see :func:`_linear_from_xa`)."""
    dx = _base_dx(w, dy2) if need_dx else None
    da = dbm = None
    if a is not None:
        dyb = torch.mm(dy2, _lowp(bm, dy2.dtype, scale))  # s * dy B, (N, r)
        if need_dx:
            dx.addmm_(dyb, _lowp(a, dy2.dtype))
        if a.requires_grad:
            da = torch.mm(dyb.t(), x2).to(a.dtype)
        if bm.requires_grad:
            dbm = torch.mm(dy2.t(), xa).to(bm.dtype).mul_(scale)
    db = dy2.sum(0).to(b.dtype) if (need_db and b is not None) else None
    return dx, db, da, dbm


def _base_dx(w, dy2: torch.Tensor) -> torch.Tensor:
    """``dy2 W``: a GEMM for a tensor W, the quantized base's own product otherwise."""
    return torch.mm(dy2, w.to(dy2.dtype)) if torch.is_tensor(w) else w.dx(dy2)


def _has_products(w) -> bool:
    """Whether the fused MLP Functions take base ``w``: a tensor, or a quantized base that says so
    (``fused_mlp``: NF4 and FP8 bases, through their ``mm``/``dx``)."""
    return torch.is_tensor(w) or getattr(w, "fused_mlp", False)


def _save(ctx, *ts) -> None:
    """``ctx.save_for_backward`` of ``ts`` with quantized bases (not tensors) kept on ``ctx`` instead."""
    ctx.objs = {i: t for i, t in enumerate(ts) if t is not None and not torch.is_tensor(t)}
    ctx.save_for_backward(*(None if i in ctx.objs else t for i, t in enumerate(ts)))


def _saved(ctx) -> list:
    """What :func:`_save` kept, in order."""
    return [ctx.objs.get(i, t) for i, t in enumerate(ctx.saved_tensors)]


class LoRALinearFunction(torch.autograd.Function):
    """Frozen base linear + LoRA in one Function; saves x and x A^T only."""

    @staticmethod
    def forward(ctx, x, w, b, a, bm, scale: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y, xa = _fwd_linear(x2, w, b, a, bm, scale)
        ctx.save_for_backward(x2, xa, w, b, a, bm)
        ctx.scale = scale
        ctx.in_shape = shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, w, b, a, bm = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx, db, da, dbm = _bwd_linear(dy2, x2, xa, w, b, a, bm, ctx.scale, ctx.needs_input_grad[0],
                                      ctx.needs_input_grad[2])
        dw = None
        if ctx.needs_input_grad[1]:  # unusual (base not frozen) but keep it correct
            dw = torch.mm(dy2.t(), x2).to(w.dtype)
        if dx is not None:
            dx = dx.view(ctx.in_shape)
        return dx, dw, db, da, dbm, None


class QuantizedLoRALinearFunction(torch.autograd.Function):
    """Frozen quantized base + LoRA. The base is an object with its own products (``mm(x2, b)`` = x2 W^T + b,
    ``dx(dy2)`` = dy2 W: NF4 dequantizes into a shared workspace, FP8 runs scaled FP8 GEMMs); the Function saves
    x and x A^T only and holds the base by reference, like :class:`LoRALinearFunction` otherwise. Each format
    subclasses it (its own name in autograd graphs and profiles)."""

    @staticmethod
    def forward(ctx, x, w, b, a, bm, scale: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y, xa = _fwd_linear(x2, w, b, a, bm, scale)
        ctx.save_for_backward(x2, xa, b, a, bm)
        ctx.w, ctx.scale, ctx.in_shape = w, scale, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, b, a, bm = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx, db, da, dbm = _bwd_linear(dy2, x2, xa, ctx.w, b, a, bm, ctx.scale, ctx.needs_input_grad[0],
                                      ctx.needs_input_grad[2])
        if dx is not None:
            dx = dx.view(ctx.in_shape)
        return dx, None, db, da, dbm, None


def quantized_lora_linear(function: type, reference, name: str, x: torch.Tensor, w, b, a, bm,
                          scale: float) -> torch.Tensor:
    """``function`` (a :class:`QuantizedLoRALinearFunction`) on the engine's devices, ``reference`` elsewhere;
    ``name`` is the caller's, for the error when x's width is not the weight's."""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"{name}: x has {x.shape[-1]} features, the weight takes {w.shape[1]}")
    if use_fused(x):
        return function.apply(x, w, b, a, bm, float(scale))
    return reference(x, w, b, a, bm, scale)


def lora_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, a: torch.Tensor | None = None,
                bm: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """Fused frozen-base + LoRA linear (torch GEMMs); reference path off the engine.

    ``w`` may also be a quantized base that applies itself (:class:`~visiontune.kernels.nf4.NF4Weight`,
    handed out by :func:`~visiontune.kernels.patch.lora_params` for bitsandbytes NF4 layers).
    """
    if not torch.is_tensor(w):
        return w.lora_linear(x, b, a, bm, scale)
    if use_fused(x):  # no Triton here: the cuBLAS Function runs wherever the engine's Triton ops run
        return LoRALinearFunction.apply(x, w, b, a, bm, float(scale))
    return lora_linear_reference(x, w, b, a, bm, scale)


class LoRAGatedMLPFunction(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` with LoRA on each projection; saves x, g, u and rank-r products."""

    @staticmethod
    def forward(ctx, x, wg, bg, ag, bmg, wu, bu, au, bmu, wd, bd, ad, bmd, scales, act: str, recompute: bool = False):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        sg, su, sd = scales
        g, xag = _fwd_linear(x2, wg, bg, ag, bmg, sg)
        u, xau = _fwd_linear(x2, wu, bu, au, bmu, su)
        h = glu_forward_kernel(g, u, act)
        y, had = _fwd_linear(h, wd, bd, ad, bmd, sd)
        del h  # recomputed in backward from g and u
        if recompute:  # keep neither g nor u (2 x tokens x intermediate): two GEMMs again in backward
            g = u = None
        _save(ctx, x2, g, u, xag, xau, had, wg, bg, ag, bmg, wu, bu, au, bmu, wd, bd, ad, bmd)
        ctx.scales, ctx.act, ctx.in_shape = scales, act, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        (x2, g, u, xag, xau, had, wg, bg, ag, bmg, wu, bu, au, bmu, wd, bd, ad, bmd) = _saved(ctx)
        sg, su, sd = ctx.scales
        if g is None:
            g = _linear_from_xa(x2, wg, bg, bmg, xag, sg)
            u = _linear_from_xa(x2, wu, bu, bmu, xau, su)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dh = _base_dx(wd, dy2)
        dad = dbmd = None
        if ad is not None:
            dyb = torch.mm(dy2, _lowp(bmd, dy2.dtype, sd))  # sd * dy B_down
            dh.addmm_(dyb, _lowp(ad, dy2.dtype))
            if bmd.requires_grad:
                dbmd = torch.mm(dy2.t(), had).to(bmd.dtype).mul_(sd)
        dbd = dy2.sum(0).to(bd.dtype) if (bd is not None and bd.requires_grad) else None
        # one pass: dg, du written over g, u; h re-emitted only if the down LoRA needs it
        dg, du, h = glu_backward_kernel(g, u, dh, ctx.act, in_place=True, want_h=ad is not None)
        del dh
        if ad is not None and ad.requires_grad:
            dad = torch.mm(dyb.t(), h).to(ad.dtype)
        del h
        need_dx = ctx.needs_input_grad[0]
        dxg, dbg, dag, dbmg = _bwd_linear(dg, x2, xag, wg, bg, ag, bmg, sg, need_dx, bg is not None and bg.requires_grad)
        dxu, dbu, dau, dbmu = _bwd_linear(du, x2, xau, wu, bu, au, bmu, su, need_dx, bu is not None and bu.requires_grad)
        dx = None
        if need_dx:
            dx = dxg.add_(dxu).view(ctx.in_shape)
        return (dx, None, dbg, dag, dbmg, None, dbu, dau, dbmu, None, dbd, dad, dbmd, None, None, None)


class LoRAPlainMLPFunction(torch.autograd.Function):
    """``fc2(act(fc1(x)))`` with LoRA on both (vision towers); saves x, fc1(x), rank-r products."""

    @staticmethod
    def forward(ctx, x, w1, b1, a1, bm1, w2, b2, a2, bm2, scales, act: str, recompute: bool = False):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        s1, s2 = scales
        z, xa1 = _fwd_linear(x2, w1, b1, a1, bm1, s1)
        h = torch.empty_like(z)
        if z.numel():
            _act_fwd[_grid(z.numel())](z, h, z.numel(), ACT=ACTIVATIONS[act], BLOCK=_block(), num_warps=4)
        y, ha2 = _fwd_linear(h, w2, b2, a2, bm2, s2)
        del h
        if recompute:  # keep no tokens x intermediate tensor: fc1 runs again in backward
            z = None
        _save(ctx, x2, z, xa1, ha2, w1, b1, a1, bm1, w2, b2, a2, bm2)
        ctx.scales, ctx.act, ctx.in_shape = scales, act, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, z, xa1, ha2, w1, b1, a1, bm1, w2, b2, a2, bm2 = _saved(ctx)
        s1, s2 = ctx.scales
        if z is None:
            z = _linear_from_xa(x2, w1, b1, bm1, xa1, s1)
        dy2 = dy.reshape(-1, dy.shape[-1])
        code = ACTIVATIONS[ctx.act]
        h = None
        if a2 is not None and a2.requires_grad:
            h = torch.empty_like(z)
            _act_fwd[_grid(z.numel())](z, h, z.numel(), ACT=code, BLOCK=_block(), num_warps=4)
        dh, db2, da2, dbm2 = _bwd_linear(dy2, h if h is not None else z, ha2, w2, b2, a2, bm2, s2, True,
                                         b2 is not None and b2.requires_grad)
        del h
        dz = z  # in place: z is not needed after this
        if z.numel():
            _act_bwd[_grid(z.numel())](z, dh, dz, z.numel(), ACT=code, BLOCK=_block(), num_warps=4)
        del dh
        dx, db1, da1, dbm1 = _bwd_linear(dz, x2, xa1, w1, b1, a1, bm1, s1, ctx.needs_input_grad[0],
                                         b1 is not None and b1.requires_grad)
        if dx is not None:
            dx = dx.view(ctx.in_shape)
        return dx, None, db1, da1, dbm1, None, db2, da2, dbm2, None, None, None


LinearParams = tuple  # (W, b, A, B, scale)


def gated_mlp_reference(x: torch.Tensor, gate: LinearParams, up: LinearParams, down: LinearParams,
                        act: str) -> torch.Tensor:
    """Unfused reference of the gated LoRA MLP."""
    g = lora_linear_reference(x, *gate)
    u = lora_linear_reference(x, *up)
    return lora_linear_reference(glu_reference(g, u, act), *down)


def plain_mlp_reference(x: torch.Tensor, fc1: LinearParams, fc2: LinearParams, act: str) -> torch.Tensor:
    """Unfused reference of the plain (vision) LoRA MLP."""
    return lora_linear_reference(act_reference(lora_linear_reference(x, *fc1), act), *fc2)


def gated_mlp(x: torch.Tensor, gate: LinearParams, up: LinearParams, down: LinearParams,
              act: str = "silu", recompute: bool = False) -> torch.Tensor:
    """Fused LoRA gated MLP (SwiGLU/GeGLU); reference path off the engine.

    ``recompute=True`` saves only x and the rank-r products and runs the gate/up GEMMs again in backward:
    2 x tokens x intermediate fewer bytes held per MLP (Qwen2.5-VL-7B LM: 74 KiB per token), for 2 more
    GEMMs, cheaper than recomputing the whole layer when memory is what limits.
    """
    if not all(_has_products(p[0]) for p in (gate, up, down)):
        # a quantized base without products for the fused Function: one LoRA Function per projection around
        # the fused GLU (it keeps h for the down projection, which the fused Function does not).
        return lora_linear(glu(lora_linear(x, *gate), lora_linear(x, *up), act), *down)
    if use_fused(x) and act in ACTIVATIONS:
        scales = (float(gate[4]), float(up[4]), float(down[4]))
        return LoRAGatedMLPFunction.apply(x, *gate[:4], *up[:4], *down[:4], scales, act, bool(recompute))
    return gated_mlp_reference(x, gate, up, down, act)


def plain_mlp(x: torch.Tensor, fc1: LinearParams, fc2: LinearParams, act: str = "gelu_pytorch_tanh",
              recompute: bool = False) -> torch.Tensor:
    """Fused LoRA plain MLP (vision towers); reference path off the engine. ``recompute``: as in
    :func:`gated_mlp` (fc1 runs again in backward instead of keeping its output)."""
    if not _has_products(fc1[0]) or not _has_products(fc2[0]):  # as in gated_mlp
        return lora_linear(activation(lora_linear(x, *fc1), act), *fc2)
    if use_fused(x) and act in ACTIVATIONS:
        return LoRAPlainMLPFunction.apply(x, *fc1[:4], *fc2[:4], (float(fc1[4]), float(fc2[4])), act, bool(recompute))
    return plain_mlp_reference(x, fc1, fc2, act)
