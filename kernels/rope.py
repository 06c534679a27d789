"""Rotary position embeddings: 1D text RoPE, Qwen's multimodal M-RoPE and the vision towers' 2D RoPE.

All three reduce to the same rotation ``y = x * cos + rotate_half(x) * sin`` once cos/sin are known:

* text RoPE (Llama/Mistral/Gemma/Mllama): cos/sin of shape (B, S, D) broadcast over heads;
* M-RoPE (Qwen2-VL, Qwen2.5-VL: contiguous sections; Qwen3-VL: interleaved): each frequency j takes
  its angle from one of the three position rows (t, h, w). :func:`mrope_cos_sin` builds cos/sin
  straight from the (3, B, S) position ids in one Triton pass instead of the 3x-sized fp32 angle
  tensor plus the split/cat that transformers does;
* vision 2D RoPE (Qwen-VL towers): cos/sin of shape (S, D), q/k of shape (S, H, D).

The rotation kernel handles a block of (token, head) rows per program (~4K elements on a GPU), computes
in fp32 and writes the input dtype. Backward is the inverse rotation, so the
op saves only cos/sin (which the model holds anyway).
"""

from __future__ import annotations

import torch

from visiontune.kernels._common import HAS_TRITON, next_pow2, rows_per_program, use_fused

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kernel(X, COS, SIN, Y, stride_xr, stride_xh, stride_yr, stride_yh, stride_c, n_rows, H, HALF,
                     BACKWARD: tl.constexpr, BI: tl.constexpr, BD: tl.constexpr):
        # one "row" = one (token, head) pair; BI of them per program
        i = tl.program_id(0).to(tl.int64) * BI + tl.arange(0, BI)[:, None]
        r = i // H
        h = i % H
        ds = tl.arange(0, BD)[None, :]
        m = (i < n_rows) & (ds < HALF)
        c1 = tl.load(COS + r * stride_c + ds, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(COS + r * stride_c + HALF + ds, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + r * stride_c + ds, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + r * stride_c + HALF + ds, mask=m, other=0.0).to(tl.float32)
        xp = X + r * stride_xr + h * stride_xh + ds
        x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=m, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the rotation
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        yp = Y + r * stride_yr + h * stride_yh + ds
        tl.store(yp, y1.to(Y.dtype.element_ty), mask=m)
        tl.store(yp + HALF, y2.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _mrope_cos_sin_kernel(POS, INV, AXIS, COS, SIN, stride_axis, n_tok, HALF, scaling,
                              BT: tl.constexpr, BD: tl.constexpr):
        t = tl.program_id(0) * BT + tl.arange(0, BT)[:, None]
        j = tl.arange(0, BD)[None, :]
        jm = j < HALF
        m = (t < n_tok) & jm
        axis = tl.load(AXIS + j, mask=jm, other=0)
        inv = tl.load(INV + j, mask=jm, other=0.0)
        pos = tl.load(POS + axis.to(tl.int64) * stride_axis + t, mask=m, other=0).to(tl.float32)
        f = pos * inv
        c = tl.cos(f) * scaling
        s = tl.sin(f) * scaling
        base = t.to(tl.int64) * (2 * HALF) + j
        tl.store(COS + base, c.to(COS.dtype.element_ty), mask=m)
        tl.store(COS + base + HALF, c.to(COS.dtype.element_ty), mask=m)
        tl.store(SIN + base, s.to(SIN.dtype.element_ty), mask=m)
        tl.store(SIN + base + HALF, s.to(SIN.dtype.element_ty), mask=m)


def _rotate(x3: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor, backward: bool) -> torch.Tensor:
    """Launch the rotation on x3 (R, H, D) with unit stride on D; returns a new contiguous tensor."""
    r, h, d = x3.shape
    y = torch.empty((r, h, d), dtype=x3.dtype, device=x3.device)
    n = r * h
    if n:
        half = d // 2
        bd = next_pow2(half)
        bi = rows_per_program(n, bd)
        _rope_kernel[(triton.cdiv(n, bi),)](x3, cos2, sin2, y, x3.stride(0), x3.stride(1), y.stride(0),
                                           y.stride(1), cos2.stride(0), n, h, half, BACKWARD=backward, BI=bi,
                                           BD=bd, num_warps=4)
    return y


class RotaryFunction(torch.autograd.Function):
    """Rotate q and k (each (R, H, D), D contiguous) by per-row cos/sin (R, D). Saves cos/sin only."""

    @staticmethod
    def forward(ctx, q3: torch.Tensor, k3: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor):
        ctx.save_for_backward(cos2, sin2)
        return _rotate(q3, cos2, sin2, False), _rotate(k3, cos2, sin2, False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos2, sin2 = ctx.saved_tensors
        dq = _rotate(dq if dq.stride(-1) == 1 else dq.contiguous(), cos2, sin2, True)
        dk = _rotate(dk if dk.stride(-1) == 1 else dk.contiguous(), cos2, sin2, True)
        return dq, dk, None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``apply_rotary_pos_emb`` math, computed in fp32 and cast back to the input dtype."""
    c = cos.unsqueeze(unsqueeze_dim).float()
    s = sin.unsqueeze(unsqueeze_dim).float()
    qf, kf = q.float(), k.float()
    return (qf * c + _rotate_half(qf) * s).to(q.dtype), (kf * c + _rotate_half(kf) * s).to(k.dtype)


def vision_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-VL vision tower 2D RoPE: q/k (S, H, D), cos/sin (S, D); fp32 math like transformers."""
    return rotary_reference(q, k, cos, sin, unsqueeze_dim=-2)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for transformers' ``apply_rotary_pos_emb`` (same signature and layouts).

    q/k are (B, H, S, D) with ``unsqueeze_dim=1`` or (B, S, H, D) with ``unsqueeze_dim=2``; cos/sin are
    (B or 1, S, D). Anything else (partial rotary, odd broadcasting) takes the reference.
    """
    ok = (use_fused(q) and q.ndim == 4 and k.ndim == 4 and cos.ndim == 3 and unsqueeze_dim in (1, 2)
          and cos.shape[-1] == q.shape[-1] and q.shape[-1] % 2 == 0 and cos.shape == sin.shape)
    if not ok:
        return rotary_reference(q, k, cos, sin, unsqueeze_dim)
    if unsqueeze_dim == 1:  # (B, H, S, D) -> (B, S, H, D): a free view for the usual projection layout
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    else:
        qt, kt = q, k
    b, s, hq, d = qt.shape
    hk = kt.shape[2]
    q3 = qt.reshape(b * s, hq, d)
    k3 = kt.reshape(b * s, hk, d)
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    if k3.stride(-1) != 1:
        k3 = k3.contiguous()
    cos2 = cos.expand(b, s, d).reshape(b * s, d).contiguous()
    sin2 = sin.expand(b, s, d).reshape(b * s, d).contiguous()
    qo, ko = RotaryFunction.apply(q3, k3, cos2, sin2)
    qo, ko = qo.view(b, s, hq, d), ko.view(b, s, hk, d)
    if unsqueeze_dim == 1:
        qo, ko = qo.transpose(1, 2), ko.transpose(1, 2)
    return qo, ko


def apply_rotary_pos_emb_vision(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for the Qwen-VL towers' ``apply_rotary_pos_emb_vision``: q/k (S, H, D), cos/sin (S, D)."""
    ok = (use_fused(q) and q.ndim == 3 and cos.ndim == 2 and cos.shape[-1] == q.shape[-1]
          and q.shape[-1] % 2 == 0)
    if not ok:
        return vision_rotary_reference(q, k, cos, sin)
    q3 = q if q.stride(-1) == 1 else q.contiguous()
    k3 = k if k.stride(-1) == 1 else k.contiguous()
    cos2 = cos.contiguous()
    sin2 = sin.contiguous()
    return RotaryFunction.apply(q3, k3, cos2, sin2)


def mrope_axis_map(mrope_section: list[int], half: int, interleaved: bool) -> torch.Tensor:
    """Which position row (0=t, 1=h, 2=w) each of the ``half`` frequencies reads.

    Qwen2-VL/Qwen2.5-VL: contiguous sections ``[t]*s0 + [h]*s1 + [w]*s2``; Qwen3-VL: interleaved
    ``t h w t h w ...`` over the first ``3*s1`` / ``3*s2`` slots, t elsewhere.
    """
    axis = torch.zeros(half, dtype=torch.int32)
    if interleaved:
        for dim, offset in ((1, 1), (2, 2)):
            axis[offset: mrope_section[dim] * 3: 3] = dim
    else:
        start = 0
        for i, n in enumerate(mrope_section):
            axis[start:start + n] = i % 3
            start += n
    return axis


def mrope_cos_sin_reference(position_ids: torch.Tensor, inv_freq: torch.Tensor, axis: torch.Tensor,
                            scaling: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch M-RoPE cos/sin: position_ids (3, B, S) -> cos, sin (B, S, 2*len(inv_freq))."""
    pos = position_ids.float()  # (3, B, S)
    sel = pos[axis.long().to(pos.device)]  # (half, B, S)
    freqs = sel.permute(1, 2, 0) * inv_freq.float().to(pos.device)
    cos = torch.cat([freqs.cos(), freqs.cos()], -1) * scaling
    sin = torch.cat([freqs.sin(), freqs.sin()], -1) * scaling
    return cos.to(dtype), sin.to(dtype)


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, axis: torch.Tensor,
                  scaling: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE cos/sin straight from (3, B, S) integer positions in one Triton pass (no autograd needed)."""
    if not use_fused(position_ids):
        return mrope_cos_sin_reference(position_ids, inv_freq, axis, scaling, dtype)
    _, b, s = position_ids.shape
    half = inv_freq.shape[0]
    pos = position_ids.reshape(3, b * s).contiguous()
    inv = inv_freq.float().contiguous()
    ax = axis.to(device=pos.device, dtype=torch.int32).contiguous()
    n = b * s
    cos = torch.empty((b, s, 2 * half), dtype=dtype, device=pos.device)
    sin = torch.empty_like(cos)
    if n:
        bt = 16
        _mrope_cos_sin_kernel[(triton.cdiv(n, bt),)](pos, inv, ax, cos, sin, pos.stride(0), n, half,
                                                    float(scaling), BT=bt, BD=next_pow2(half), num_warps=4)
    return cos, sin
