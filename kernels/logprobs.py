"""Per-token log-probabilities of ``h @ W.T`` at given labels, chunked: the full logits never exist.

``log p(y | h) = -CE(h @ W.T, y)``: this is the chunked linear + cross-entropy of
:mod:`visiontune.kernels.cross_entropy`, kept per row instead of summed. It runs the same Triton kernel
(``_ce_fwd_grad``): each chunk's logits come from one GEMM, the kernel writes the row's loss and
overwrites the logits with ``softmax - onehot``, and one more GEMM turns that into ``d loss_r / d h_r``,
kept for the backward. The backward scales row ``r``'s stored gradient by ``-grad_output[r]``: a
policy-gradient loss (GRPO, DPO) weights every token's log-probability differently, so unlike the summed
loss nothing can be folded into one scalar.

The LM head weight must be frozen (LoRA; TRL refuses an adapter on ``lm_head``): its gradient would need
every row's ``grad_output``, known only in the backward. A trainable weight takes the reference path.

Optional statistics without gradient, taken from each chunk's logits before the kernel overwrites them:
the entropy of the row's distribution, its mean logit and whether the label is the arg-max (the metrics
TRL's GRPO and DPO trainers log).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from visiontune.kernels._common import HAS_TRITON, next_pow2, use_fused
from visiontune.kernels.cross_entropy import _default_chunk

if HAS_TRITON:
    from visiontune.kernels.cross_entropy import _ce_fwd_grad

STATS = ("entropy", "mean_logits", "is_top1")


def _chunk_stats(logits: torch.Tensor, labels: torch.Tensor, out: torch.Tensor) -> None:
    """Entropy, mean logit and label-is-arg-max of each row of ``logits``, written into ``out`` (3, rows).

    A few rows at a time: their fp32 temporaries stay near 128 MB whatever the chunk and vocabulary size.
    """
    step = max(1, 2**25 // logits.shape[1])
    for start in range(0, logits.shape[0], step):
        x = logits[start:start + step].float()
        logp = torch.log_softmax(x, dim=-1)
        out[0, start:start + step] = -(logp.exp() * logp).sum(-1)
        out[1, start:start + step] = x.mean(-1)
        out[2, start:start + step] = (x.argmax(-1) == labels[start:start + step]).float()


class FusedLinearLogProbFunction(torch.autograd.Function):
    """Per-row log-probabilities and their input gradients computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: Optional[int],
                with_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h2 = h.reshape(-1, h.shape[-1])
        lab = labels.reshape(-1).to(h.device)
        n, v = h2.shape[0], weight.shape[0]
        chunk = chunk_size or _default_chunk(n, v, h2.element_size())
        grad_h = torch.empty_like(h2) if h.requires_grad else None
        losses = torch.empty(n, dtype=torch.float32, device=h.device)
        stats = torch.empty((3, n) if with_stats else (0,), dtype=torch.float32, device=h.device)
        w = weight.to(h2.dtype)
        block = min(4096, next_pow2(v))
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            logits = torch.mm(h2[start:end], w.t())
            if with_stats:
                _chunk_stats(logits, lab[start:end], stats[:, start:end])
            _ce_fwd_grad[(end - start,)](logits, logits.stride(0), lab[start:end], losses[start:end], v, -100,
                                         BLOCK=block, num_warps=8 if block >= 2048 else 4)
            if grad_h is not None:
                torch.mm(logits, w, out=grad_h[start:end])
            del logits
        ctx.save_for_backward(grad_h)
        ctx.shape = h.shape
        ctx.mark_non_differentiable(stats)
        return losses.neg_(), stats

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, grad_stats: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        dh = None
        if grad_h is not None:
            dh = (grad_h * grad_logp.neg().to(grad_h.dtype).unsqueeze(-1)).view(ctx.shape)
        return dh, None, None, None, None


def fused_linear_log_probs_reference(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                     with_stats: bool = False) -> tuple[torch.Tensor, Optional[dict]]:
    """Materializing reference: fp32 logits, ``-F.cross_entropy(reduction='none')`` (0 where ignored)."""
    logits = (h.reshape(-1, h.shape[-1]) @ weight.to(h.dtype).t()).float()
    lab = labels.reshape(-1).to(h.device)
    logp = -F.cross_entropy(logits, lab, ignore_index=-100, reduction="none")
    if not with_stats:
        return logp, None
    stats = torch.empty(3, lab.shape[0], dtype=torch.float32, device=h.device)
    _chunk_stats(logits.detach(), lab, stats)
    return logp, dict(zip(STATS, stats))


def fused_linear_log_probs(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                           chunk_size: Optional[int] = None, chunk_bytes: Optional[int] = None,
                           with_stats: bool = False) -> tuple[torch.Tensor, Optional[dict]]:
    """``(log_probs, stats)``: the fp32 log-probability of each label under ``softmax(h @ weight.T)``.

    ``h``: (N, H); ``weight``: (V, H); ``labels``: (N,) (already shifted for causal LM; -100 rows get 0).
    ``stats`` is None, or with ``with_stats`` a dict of fp32 (N,) tensors without gradient: ``entropy``,
    ``mean_logits`` and ``is_top1`` (1.0 where the label is the arg-max). Triton chunked path on CUDA (or
    forced under the interpreter) when ``weight`` is frozen, else the reference. Chunks of ``chunk_size`` rows,
    else of about ``chunk_bytes`` of logits (default ~640 MB).
    """
    if use_fused(h) and not weight.requires_grad:
        if chunk_size is None and chunk_bytes is not None:
            chunk_size = _default_chunk(h.shape[0], weight.shape[0], h.element_size(), chunk_bytes)
        logp, stats = FusedLinearLogProbFunction.apply(h, weight, labels, chunk_size, with_stats)
        return logp, dict(zip(STATS, stats)) if with_stats else None
    return fused_linear_log_probs_reference(h, weight, labels, with_stats)
