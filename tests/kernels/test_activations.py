import pytest
import torch
from conftest import record_gpu_error, rel_err

from visiontune.kernels.activations import activation, act_reference, glu, glu_reference

ACTS = ["silu", "gelu_pytorch_tanh", "gelu", "quick_gelu"]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 33), (1031,)])
def test_glu_cpu(triton_cpu, act, shape):
    g, u, dh = torch.randn(shape) * 3, torch.randn(shape), torch.randn(shape)
    outs = []
    for fn in (glu, glu_reference):
        gg, uu = g.clone().requires_grad_(), u.clone().requires_grad_()
        h = fn(gg, uu, act)
        outs.append((h.detach(), *torch.autograd.grad(h, (gg, uu), dh)))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ACTS)
def test_plain_activation_cpu(triton_cpu, act):
    x, dy = torch.randn(5, 77) * 4, torch.randn(5, 77)
    outs = []
    for fn in (activation, act_reference):
        xx = x.clone().requires_grad_()
        y = fn(xx, act)
        outs.append((y.detach(), *torch.autograd.grad(y, (xx,), dy)))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_glu_gpu_bf16(cuda_device, act):
    shape = (8192, 18944)
    g = (torch.randn(shape, device=cuda_device) * 2).bfloat16()
    u, dh = torch.randn_like(g), torch.randn_like(g)
    outs = []
    for fn, cast in ((glu, lambda t: t), (glu_reference, lambda t: t.float())):
        gg, uu = cast(g).clone().requires_grad_(), cast(u).clone().requires_grad_()
        h = fn(gg, uu, act)
        outs.append((h.detach(), *torch.autograd.grad(h, (gg, uu), cast(dh))))
    for name, got, want in zip(("h", "dg", "du"), *outs):
        err = rel_err(got, want)
        record_gpu_error(f"glu[{act}]", name, err, 1e-2)
        assert got.dtype == torch.bfloat16 and err < 1e-2, (name, err)
