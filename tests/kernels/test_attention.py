import pytest
import torch
from conftest import record_gpu_error, rel_err

from visiontune.kernels import attention as attn_mod
from visiontune.kernels.attention import varlen_attention, varlen_attention_reference


def _run(fn, q, k, v, dout, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


@pytest.mark.parametrize("lengths,hq,hk,causal", [([1], 2, 2, True), ([5, 1, 9], 4, 2, True),
                                                   ([6, 6, 3], 3, 3, False)])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_varlen_attention_cpu(lengths, hq, hk, causal, per_sequence, monkeypatch):
    if per_sequence:  # exercise the one-SDPA-per-sequence path used for very long packed rows
        monkeypatch.setattr(attn_mod, "MASK_MAX_TOKENS", 0)
    t, d = sum(lengths), 16
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hk, d), torch.randn(t, hk, d)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    dout = torch.randn(t, hq, d)
    got = _run(varlen_attention, q, k, v, dout, cu_seqlens=cu, max_seqlen=max(lengths), causal=causal)
    want = _run(varlen_attention_reference, q, k, v, dout, cu_seqlens=cu, causal=causal)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("causal,hq,hk,d,lengths", [(True, 28, 4, 128, [1280] * 4 + [77, 900]),
                                                    (False, 16, 16, 80, [64] * 64 + [40])])
def test_varlen_attention_gpu_bf16(cuda_device, causal, hq, hk, d, lengths):
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, d, device=cuda_device).bfloat16() for h in (hq, hk, hk))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=cuda_device)
    dout = torch.randn(t, hq, d, device=cuda_device).bfloat16()
    got = _run(varlen_attention, q, k, v, dout, cu_seqlens=cu, max_seqlen=max(lengths), causal=causal)
    want = _run(varlen_attention_reference, q.float(), k.float(), v.float(), dout.float(), cu_seqlens=cu,
                causal=causal)
    path = "flash-varlen" if attn_mod.flash_varlen_available(q) else "sdpa-mask"
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = rel_err(g, w)
        record_gpu_error(f"varlen_attn[{path},{'causal' if causal else 'full'}]", name, err, 2e-2)
        assert err < 2e-2, (name, err)


@pytest.mark.gpu
@pytest.mark.parametrize("causal,hq,hk,d,lengths", [(True, 28, 4, 128, [768]), (False, 16, 16, 80, [64] * 16 + [33])])
def test_direct_flash_ops_match_torch_varlen_attn(cuda_device, causal, hq, hk, d, lengths, monkeypatch):
    """The direct aten path (FlashVarlenFunction) runs the same kernels as torch's varlen_attn wrapper."""
    if attn_mod._varlen_attn is None or attn_mod._FLASH_FWD is None:
        pytest.skip("this torch has no varlen_attn / flash ops")
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, d, device=cuda_device).bfloat16() for h in (hq, hk, hk))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=cuda_device)
    dout = torch.randn(t, hq, d, device=cuda_device).bfloat16()
    kw = dict(cu_seqlens=cu, max_seqlen=max(lengths), causal=causal, scale=d ** -0.5)
    direct = _run(varlen_attention, q, k, v, dout, **kw)
    monkeypatch.setattr(attn_mod, "DIRECT_FLASH_OPS", False)
    wrapped = _run(varlen_attention, q, k, v, dout, **kw)
    for name, g, w in zip(("out", "dq", "dk", "dv"), direct, wrapped):
        # same kernels; only the dq/dk/dv accumulation order inside flash's backward may differ
        assert rel_err(g, w) < 1e-3, (name, rel_err(g, w))
