import pytest
import torch
from conftest import record_gpu_error, rel_err
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_q25

from visiontune.kernels.rope import (
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_vision,
    mrope_axis_map,
    mrope_cos_sin,
    mrope_cos_sin_reference,
    rotary_reference,
    vision_rotary_reference,
)


def _cos_sin(b, s, d, device="cpu"):
    ang = torch.rand(b, s, d // 2, device=device) * 40
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def _grads(fn, q, k, cos, sin, dq, dk):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    qo, ko = fn(q, k, cos, sin)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    return qo.detach(), ko.detach(), gq, gk


@pytest.mark.parametrize("b,s,hq,hk,d", [(1, 1, 1, 1, 8), (2, 7, 6, 2, 20), (3, 5, 4, 4, 64)])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_text_rope_cpu(triton_cpu, b, s, hq, hk, d, unsqueeze_dim):
    if unsqueeze_dim == 1:  # (B, H, S, D) as a transposed view of the projection layout, like HF
        q = torch.randn(b, s, hq, d).transpose(1, 2)
        k = torch.randn(b, s, hk, d).transpose(1, 2)
    else:
        q, k = torch.randn(b, s, hq, d), torch.randn(b, s, hk, d)
    cos, sin = _cos_sin(b, s, d)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    fn = lambda *a: apply_rotary_pos_emb(*a, unsqueeze_dim=unsqueeze_dim)  # noqa: E731
    ref = lambda *a: rotary_reference(*a, unsqueeze_dim=unsqueeze_dim)  # noqa: E731
    for got, want in zip(_grads(fn, q, k, cos, sin, dq, dk), _grads(ref, q, k, cos, sin, dq, dk)):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if unsqueeze_dim == 1:  # and transformers' own function agrees
        hq_, hk_ = hf_q25.apply_rotary_pos_emb(q, k, cos, sin)
        torch.testing.assert_close(apply_rotary_pos_emb(q, k, cos, sin)[0], hq_, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("s,h,d", [(1, 1, 16), (9, 3, 40)])
def test_vision_rope_cpu(triton_cpu, s, h, d):
    qkv = torch.randn(s, 3, h, d).permute(1, 0, 2, 3)  # strided like Qwen-VL's qkv.unbind
    q, k = qkv[0], qkv[1]
    cos, sin = (t[0] for t in _cos_sin(1, s, d))
    dq, dk = torch.randn(s, h, d), torch.randn(s, h, d)
    got = _grads(apply_rotary_pos_emb_vision, q, k, cos, sin, dq, dk)
    want = _grads(vision_rotary_reference, q, k, cos, sin, dq, dk)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    hf = hf_q25.apply_rotary_pos_emb_vision(q, k, cos, sin)
    torch.testing.assert_close(got[0], hf[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interleaved,section", [(False, [4, 6, 6]), (True, [6, 5, 5])])
def test_mrope_cos_sin_cpu_matches_hf(triton_cpu, interleaved, section):
    """The Triton M-RoPE cos/sin equals transformers' Qwen2.5-VL (sections) / Qwen3-VL (interleaved)."""
    from transformers import Qwen2_5_VLTextConfig, Qwen3VLTextConfig
    from transformers.models.qwen3_vl import modeling_qwen3_vl as hf_q3

    half = sum(section)
    d = 2 * half
    if interleaved:
        cfg = Qwen3VLTextConfig(hidden_size=d * 2, num_attention_heads=2, head_dim=d,
                                rope_parameters={"rope_type": "default", "rope_theta": 5e5,
                                                 "mrope_section": section, "mrope_interleaved": True})
        rot = hf_q3.Qwen3VLTextRotaryEmbedding(cfg)
    else:
        cfg = Qwen2_5_VLTextConfig(hidden_size=d * 2, num_attention_heads=2,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                    "mrope_section": section})
        rot = hf_q25.Qwen2_5_VLRotaryEmbedding(cfg)
    pos = torch.randint(0, 300, (3, 2, 11))
    x = torch.randn(1, dtype=torch.float32)
    want_cos, want_sin = rot(x, pos)
    axis = mrope_axis_map(section, half, interleaved)
    cos, sin = mrope_cos_sin(pos, rot.inv_freq, axis, rot.attention_scaling, torch.float32)
    rcos, rsin = mrope_cos_sin_reference(pos, rot.inv_freq, axis, rot.attention_scaling, torch.float32)
    for got in ((cos, sin), (rcos, rsin)):
        torch.testing.assert_close(got[0], want_cos, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want_sin, atol=2e-5, rtol=1e-5)


@pytest.mark.gpu
def test_rope_gpu_bf16(cuda_device):
    b, s, hq, hk, d = 4, 2048, 28, 4, 128
    q = torch.randn(b, s, hq, d, device=cuda_device).bfloat16().transpose(1, 2)
    k = torch.randn(b, s, hk, d, device=cuda_device).bfloat16().transpose(1, 2)
    cos, sin = (t.bfloat16() for t in _cos_sin(b, s, d, cuda_device))
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    got = _grads(apply_rotary_pos_emb, q, k, cos, sin, dq, dk)
    want = _grads(rotary_reference, q.float(), k.float(), cos.float(), sin.float(), dq.float(), dk.float())
    for name, g, w in zip(("q", "k", "dq", "dk"), got, want):
        err = rel_err(g, w)
        record_gpu_error("rope(text)", name, err, 1e-2)
        assert g.dtype == torch.bfloat16 and err < 1e-2, (name, err)
    pos = torch.randint(0, 4000, (3, b, s), device=cuda_device)
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=cuda_device).float() / d))
    axis = mrope_axis_map([16, 24, 24], d // 2, False)
    c1, s1 = mrope_cos_sin(pos, inv, axis, 1.0, torch.float32)
    c2, s2 = mrope_cos_sin_reference(pos, inv, axis, 1.0, torch.float32)
    err = max(rel_err(c1, c2), rel_err(s1, s2))
    record_gpu_error("mrope cos/sin (fp32)", "cos,sin", err, 1e-5)
    assert err < 1e-5
