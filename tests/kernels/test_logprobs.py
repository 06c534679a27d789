"""Per-token log-probs from the chunked linear + CE kernel: values, per-token gradients and statistics
equal the materialized log-softmax."""

import pytest
import torch
from conftest import record_gpu_error, rel_err

from visiontune.kernels.logprobs import fused_linear_log_probs, fused_linear_log_probs_reference


def _stock(h, w, labels):
    """What TRL's stock path computes: gather of log_softmax over full fp32 logits (0 where ignored)."""
    logp = torch.log_softmax((h @ w.T).float(), -1)
    return logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)


@pytest.mark.parametrize("n,hid,vocab,chunk", [(1, 8, 11, None), (37, 16, 300, 8), (20, 12, 4100, 7)])
def test_log_probs_and_per_token_grads_match_log_softmax(triton_cpu, n, hid, vocab, chunk):
    h, w = torch.randn(n, hid), torch.randn(vocab, hid) * 0.5
    labels = torch.randint(0, vocab, (n,))
    labels[torch.rand(n) < 0.3] = -100
    weights = torch.randn(n)  # a different weight per token, as an advantage-weighted policy loss has
    got_h, want_h = h.clone().requires_grad_(), h.clone().requires_grad_()
    got, stats = fused_linear_log_probs(got_h, w, labels, chunk_size=chunk, with_stats=True)
    want = _stock(want_h, w, labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(got_h.grad, want_h.grad, atol=1e-5, rtol=1e-5)
    _, ref_stats = fused_linear_log_probs_reference(h, w, labels, with_stats=True)
    for name in ("entropy", "mean_logits", "is_top1"):
        torch.testing.assert_close(stats[name], ref_stats[name], atol=1e-5, rtol=1e-5)
    p = torch.softmax(h @ w.T, -1)
    torch.testing.assert_close(stats["entropy"], -(p * p.log()).sum(-1), atol=1e-4, rtol=1e-4)


def test_trainable_weight_takes_the_reference_path_with_its_gradient(triton_cpu):
    h, w = torch.randn(6, 8), torch.randn(20, 8).requires_grad_()
    labels = torch.randint(0, 20, (6,))
    logp, stats = fused_linear_log_probs(h, w, labels)
    assert stats is None
    logp.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.gpu
def test_log_probs_gpu_bf16(cuda_device):
    """8192 tokens through a Qwen2.5-VL-7B-sized head (hidden 3584, vocab 152064), bf16, statistics on."""
    h, w = [(torch.randn(*shape, device=cuda_device) * scale).bfloat16()
            for shape, scale in (((8192, 3584), 1.0), ((152064, 3584), 0.02))]
    labels = torch.randint(0, w.shape[0], h.shape[:1], device=cuda_device)
    g = torch.randn(h.shape[0], device=cuda_device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    hh = h.clone().requires_grad_()
    logp, _ = fused_linear_log_probs(hh, w, labels, with_stats=True)
    (dh,) = torch.autograd.grad((logp * g).sum(), hh)
    peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    hr = h.float().requires_grad_()
    ref = _stock(hr, w.float(), labels)
    (dhr,) = torch.autograd.grad((ref * g).sum(), hr)
    e_logp, e_dh = rel_err(logp, ref), rel_err(dh, dhr)
    record_gpu_error("fused_linear_log_probs", "logp", e_logp, 5e-3)
    record_gpu_error("fused_linear_log_probs", "dh", e_dh, 2e-2)
    assert e_logp < 5e-3 and e_dh < 2e-2
    assert peak_gib < 1.5, peak_gib  # full fp32 logits alone would be 4.6 GiB
