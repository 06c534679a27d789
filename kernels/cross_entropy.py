"""Chunked linear + cross-entropy that never materializes the full logits.

For Qwen2.5-VL (vocab 152064) a 16 x 1280-token batch would need 20480 x 152064 logits: 6.2 GB in bf16,
12.5 GB once transformers upcasts them to fp32, plus the same again for their gradient. Here the rows
are processed in chunks (default ~2048 rows, ~0.6 GB of bf16 logits): each chunk's logits come from
one cuBLAS GEMM, one Triton kernel computes the per-row loss (online log-sum-exp) and overwrites the
logits in place with d loss / d logits (softmax - onehot), and two more GEMMs turn that into the
chunk's grad of the hidden states (and of the weight, only if it requires grad: with LoRA the lm_head
is frozen). Everything the backward needs is therefore computed during the forward; the backward only
scales the stored grad by ``grad_output / normalizer``.

Labels equal to ``ignore_index`` contribute neither loss nor gradient. The loss is
``sum(row losses) / normalizer`` with ``normalizer = max(#valid labels, 1)`` by default (so an
all-ignored batch yields 0, not NaN) or the caller's ``num_items_in_batch``.
"""

from __future__ import annotations

import torch

from visiontune.kernels._common import HAS_TRITON, next_pow2, use_fused

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _ce_fwd_grad(LOGITS, stride_l, LABELS, LOSS, V, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride_l
        y = tl.load(LABELS + row).to(tl.int64)
        valid = y != ignore_index
        cols = tl.arange(0, BLOCK)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        for off in range(0, V, BLOCK):
            x = tl.load(ptr + off + cols, mask=off + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        y_safe = tl.where(valid, y, 0)
        x_y = tl.load(ptr + y_safe).to(tl.float32)
        loss = tl.where(valid, lse - x_y, 0.0)
        scale = tl.where(valid, 1.0, 0.0)
        for off in range(0, V, BLOCK):
            c = off + cols
            msk = c < V
            x = tl.load(ptr + c, mask=msk, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(c == y_safe, 1.0, 0.0)) * scale
            tl.store(ptr + c, g.to(LOGITS.dtype.element_ty), mask=msk)
        tl.store(LOSS + row, loss)


# ~640 MB of logits per chunk: large enough that the (chunk x H) @ (H x V) GEMM runs at full rate, small
# enough to be a fraction of what full fp32 logits would cost. Callers may ask for less (``chunk_bytes``):
# ``use_gradient_checkpointing="auto"`` does when every layer checkpointed with offloaded inputs is still over
# its budget, where the chunk is the largest thing left on the device.
DEFAULT_CHUNK_BYTES = 640 * 2**20


def _default_chunk(n_rows: int, vocab: int, elt: int, chunk_bytes: int | None = None) -> int:
    return max(1, min(n_rows, (chunk_bytes or DEFAULT_CHUNK_BYTES) // max(1, vocab * elt)))


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Loss and all gradients computed chunk by chunk in the forward; see the module docstring."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                normalizer: torch.Tensor | None, chunk_size: int | None) -> torch.Tensor:
        hid = h.shape[-1]
        h2 = h.reshape(-1, hid)
        lab = labels.reshape(-1).to(h.device)
        n, v = h2.shape[0], weight.shape[0]
        chunk = chunk_size or _default_chunk(n, v, h2.element_size())
        need_w = weight.requires_grad
        grad_h = torch.empty_like(h2) if h.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        losses = torch.empty(n, dtype=torch.float32, device=h.device)
        w = weight.to(h2.dtype)
        block = min(4096, next_pow2(v))
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            hc = h2[start:end]
            logits = torch.mm(hc, w.t())  # (c, V) in the activation dtype, fp32 accumulation
            _ce_fwd_grad[(end - start,)](logits, logits.stride(0), lab[start:end], losses[start:end], v,
                                         ignore_index, BLOCK=block, num_warps=8 if block >= 2048 else 4)
            if grad_h is not None:
                torch.mm(logits, w, out=grad_h[start:end])
            if need_w:
                grad_w.add_(torch.mm(logits.t(), hc).float())
            del logits
        if normalizer is None:
            normalizer = (lab != ignore_index).sum().clamp(min=1).to(torch.float32)
        else:
            normalizer = normalizer.to(device=h.device, dtype=torch.float32)
        loss = losses.sum() / normalizer
        ctx.save_for_backward(grad_h, grad_w, normalizer)
        ctx.meta = (h.shape, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, normalizer = ctx.saved_tensors
        shape, w_dtype = ctx.meta
        scale = grad_out.float() / normalizer
        dh = (grad_h * scale.to(grad_h.dtype)).view(shape) if grad_h is not None else None
        dw = (grad_w * scale).to(w_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None


def fused_linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                         ignore_index: int = -100,
                                         normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
    """Materializing reference: fp32 logits, ``F.cross_entropy(reduction='sum') / normalizer``."""
    logits = (h.reshape(-1, h.shape[-1]) @ weight.to(h.dtype).t()).float()
    lab = labels.reshape(-1).to(h.device)
    total = torch.nn.functional.cross_entropy(logits, lab, ignore_index=ignore_index, reduction="sum")
    if normalizer is None:
        normalizer = (lab != ignore_index).sum().clamp(min=1).float()
    return total / normalizer


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100, normalizer: torch.Tensor | float | None = None,
                               chunk_size: int | None = None, chunk_bytes: int | None = None) -> torch.Tensor:
    """Mean (or ``sum / normalizer``) cross-entropy of ``h @ weight.T`` against ``labels``.

    ``h``: (..., H); ``weight``: (V, H); ``labels``: same leading shape as h (already shifted for
    causal LM). Triton chunked path on CUDA (or forced under the interpreter), else the reference.
    Chunks of ``chunk_size`` rows, else of about ``chunk_bytes`` of logits (default ~640 MB).
    """
    if use_fused(h):
        if chunk_size is None and chunk_bytes is not None:
            chunk_size = _default_chunk(h.numel() // max(1, h.shape[-1]), weight.shape[0], h.element_size(), chunk_bytes)
        if normalizer is not None and not torch.is_tensor(normalizer):
            normalizer = torch.tensor(float(normalizer))
        return FusedLinearCrossEntropyFunction.apply(h, weight, labels, int(ignore_index), normalizer, chunk_size)
    return fused_linear_cross_entropy_reference(h, weight, labels, ignore_index, normalizer)
