import pytest
import torch
from conftest import record_gpu_error, rel_err

from visiontune.kernels.cross_entropy import (DEFAULT_CHUNK_BYTES, _default_chunk, fused_linear_cross_entropy,
                                              fused_linear_cross_entropy_reference)


def _run(fn, h, w, labels, **kw):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(hh, ww, labels, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (hh, ww)))


@pytest.mark.parametrize("n,hid,vocab,chunk", [(1, 8, 11, None), (37, 16, 300, 8), (20, 12, 4100, 7)])
def test_fused_linear_ce_cpu(triton_cpu, n, hid, vocab, chunk):
    h, w = torch.randn(n, hid), torch.randn(vocab, hid) * 0.5
    labels = torch.randint(0, vocab, (n,))
    labels[torch.rand(n) < 0.3] = -100  # ignored positions
    if n > 1:
        labels[0] = -100
    got = _run(fused_linear_cross_entropy, h, w, labels, chunk_size=chunk)
    want = _run(fused_linear_cross_entropy_reference, h, w, labels)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_chunk_bytes_sets_the_chunk_and_keeps_the_loss(triton_cpu):
    """What use_gradient_checkpointing="auto" lowers at its floor: chunks of about ``chunk_bytes`` of logits when
    the caller gives no chunk_size; the loss and gradients stay the reference's (float32, 1e-5)."""
    h, w = torch.randn(29, 16), torch.randn(300, 16) * 0.5
    labels = torch.randint(0, 300, (29,))
    assert _default_chunk(29, 300, 4) == 29 and _default_chunk(29, 300, 4, DEFAULT_CHUNK_BYTES) == 29
    assert _default_chunk(29, 300, 4, 300 * 4 * 6) == 6  # six fp32 rows of logits per chunk: five chunks
    got = _run(fused_linear_cross_entropy, h, w, labels, chunk_bytes=300 * 4 * 6)
    for g, r in zip(got, _run(fused_linear_cross_entropy_reference, h, w, labels)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_fused_linear_ce_cpu_matches_torch_mean_and_normalizer(triton_cpu):
    h, w = torch.randn(2, 9, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 9))
    labels[1, :4] = -100
    loss = fused_linear_cross_entropy(h, w, labels, chunk_size=5)
    want = torch.nn.functional.cross_entropy((h @ w.T).reshape(-1, 50), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    got = _run(fused_linear_cross_entropy, h, w, labels, normalizer=7.0)
    ref = _run(fused_linear_cross_entropy_reference, h, w, labels, normalizer=7.0)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_fused_linear_ce_cpu_all_ignored_is_zero(triton_cpu):
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    loss, dh, dw = _run(fused_linear_cross_entropy, h, w, torch.full((4,), -100))
    assert loss.item() == 0.0 and dh.abs().max() == 0 and dw.abs().max() == 0


@pytest.mark.gpu
def test_fused_linear_ce_gpu_bf16(cuda_device):
    n, hid, vocab = 8192, 3584, 152064
    h = torch.randn(n, hid, device=cuda_device).bfloat16()
    w = (torch.randn(vocab, hid, device=cuda_device) * 0.02).bfloat16()
    labels = torch.randint(0, vocab, (n,), device=cuda_device)
    labels[::3] = -100
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    hh = h.clone().requires_grad_()
    loss = fused_linear_cross_entropy(hh, w, labels)
    (dh,) = torch.autograd.grad(loss, hh)
    peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    hr = h.float().requires_grad_()
    ref = fused_linear_cross_entropy_reference(hr, w.float(), labels)
    (dhr,) = torch.autograd.grad(ref, hr)
    e_loss, e_dh = rel_err(loss, ref), rel_err(dh, dhr)
    record_gpu_error("fused_linear_ce", "loss", e_loss, 5e-3)
    record_gpu_error("fused_linear_ce", "dh", e_dh, 2e-2)
    assert e_loss < 5e-3 and e_dh < 2e-2
    # full fp32 logits alone would be n * vocab * 4 bytes = 4.6 GiB
    assert peak_gib < 1.5, peak_gib
