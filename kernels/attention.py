"""Packed / variable-length attention for vision windows and padding-free text batches.

``q, k, v`` are packed as (T, H, D) with ``cu_seqlens`` (int32, N+1) marking sequence starts, as
flash-attention's varlen API expects. Paths, fastest first:

1. CUDA, bf16/fp16, and PyTorch's flash-attention varlen kernels present (``aten._flash_attention_forward``
   / ``_backward``, the ones ``torch.nn.attention.varlen.varlen_attn`` wraps): no padding, no mask tensor,
   GQA without repeating k/v. :class:`FlashVarlenFunction` calls the two aten ops from a plain
   ``autograd.Function``: ``varlen_attn`` goes through ``torch.library.custom_op`` dispatch (schema
   checks, fake-tensor registration, autograd wrapper), which costs Python time on every call; with
   109 calls per step at batch 1 that overhead is part of why the small configs are launch-bound.
2. otherwise SDPA on one packed row with a block-diagonal (optionally causal) boolean mask built from
   ``cu_seqlens`` while T <= ``MASK_MAX_TOKENS`` (the mask is T^2 bytes), else one SDPA call per sequence.

This replaces the Qwen2/2.5/3-VL vision towers' stock SDPA path, which splits the packed windows into
one SDPA call per window (Qwen2.5-VL-7B at 448 px: 16 windows x 32 blocks = 512 small calls per image).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

MASK_MAX_TOKENS = 8192

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
except Exception:  # older torch
    _varlen_attn = None
    _VARLEN_PARAMS = set()

#: set to False to forbid the flash varlen path (debugging / A-B comparisons)
ALLOW_FLASH_VARLEN = True
#: set to False to route the flash path through ``torch.nn.attention.varlen.varlen_attn`` (A-B comparisons)
DIRECT_FLASH_OPS = True

_FLASH_FWD = getattr(torch.ops.aten, "_flash_attention_forward", None)
_FLASH_BWD = getattr(torch.ops.aten, "_flash_attention_backward", None)


class FlashVarlenFunction(torch.autograd.Function):
    """Flash-attention varlen forward/backward straight from the aten ops (no custom-op dispatch).

    q: (T, Hq, D), k/v: (T, Hkv, D) with Hq % Hkv == 0 (the kernel handles GQA natively), bf16/fp16 on
    CUDA. Saves q, k, v, the output and the (Hq, T) fp32 log-sum-exp, as flash attention always does.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len: int, causal: bool, scale: float | None):
        out, lse, seed, offset, _ = _FLASH_FWD(q, k, v, cu, cu, max_len, max_len, 0.0, causal, False,
                                               scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu, seed, offset)
        ctx.meta = (max_len, causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        max_len, causal, scale = ctx.meta
        dq, dk, dv = _FLASH_BWD(dout.contiguous(), q, k, v, out, lse, cu, cu, max_len, max_len, 0.0, causal,
                                seed, offset, scale=scale)
        return dq, dk, dv, None, None, None, None


def flash_varlen_available(q: torch.Tensor) -> bool:
    """Whether :func:`varlen_attention` will take the flash-attention varlen kernel for ``q``."""
    has_kernel = (_FLASH_FWD is not None and _FLASH_BWD is not None) if DIRECT_FLASH_OPS else _varlen_attn is not None
    return (ALLOW_FLASH_VARLEN and has_kernel and q.is_cuda
            and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0)


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               causal: bool, scale: float | None = None) -> torch.Tensor:
    """Plain per-sequence attention in fp32 (explicit softmax), the ground truth for the tests."""
    t, hq, d = q.shape
    rep = hq // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        if e == s:
            continue
        qs = q[s:e].float().transpose(0, 1)
        ks = _repeat_kv(k[s:e], rep).float().transpose(0, 1)
        vs = _repeat_kv(v[s:e], rep).float().transpose(0, 1)
        att = (qs @ ks.transpose(-1, -2)) * scale
        if causal:
            n = e - s
            att = att.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        out[s:e] = (att.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


def block_diagonal_mask(cu_seqlens: torch.Tensor, total: int, causal: bool) -> torch.Tensor:
    """(T, T) boolean mask, True where query i may attend key j (same sequence, and j <= i if causal)."""
    idx = torch.arange(total, device=cu_seqlens.device)
    seq = torch.bucketize(idx, cu_seqlens[1:].to(idx.dtype), right=True)
    mask = seq[:, None] == seq[None, :]
    if causal:
        mask &= idx[:, None] >= idx[None, :]
    return mask


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, causal: bool, scale: float | None = None) -> torch.Tensor:
    """Attention over packed sequences. q: (T, Hq, D); k, v: (T, Hkv, D); returns (T, Hq, D)."""
    t, hq, d = q.shape
    hk = k.shape[1]
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if flash_varlen_available(q):
        if DIRECT_FLASH_OPS:
            return FlashVarlenFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu, int(max_seqlen),
                                             causal, scale)
        kw = {"scale": scale}
        if "window_size" in _VARLEN_PARAMS:
            kw["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kw["is_causal"] = causal
        kk, vv = k, v
        if hk != hq:
            if "enable_gqa" in _VARLEN_PARAMS:
                kw["enable_gqa"] = True
            else:
                kk, vv = _repeat_kv(k, hq // hk), _repeat_kv(v, hq // hk)
        return _varlen_attn(q, kk, vv, cu, cu, int(max_seqlen), int(max_seqlen), **kw)
    qb, kb, vb = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    gqa = hk != hq
    if t <= MASK_MAX_TOKENS:
        mask = block_diagonal_mask(cu, t, causal)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out[0].transpose(0, 1)
    outs = []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        o = F.scaled_dot_product_attention(qb[:, :, s:e], kb[:, :, s:e], vb[:, :, s:e], is_causal=causal,
                                           scale=scale, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, 0)
