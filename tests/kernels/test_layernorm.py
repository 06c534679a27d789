import pytest
import torch
from conftest import record_gpu_error, rel_err

from visiontune.kernels.layernorm import layer_norm, layer_norm_reference


def _run(fn, x, w, b, dy):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    return (y.detach(), *torch.autograd.grad(y, (x, w, b), dy))


@pytest.mark.parametrize("shape", [(1, 5), (2, 3, 48), (11, 130)])
def test_layernorm_cpu_matches_reference(triton_cpu, shape):
    x = torch.randn(shape) * 2 + 0.5
    w = torch.randn(shape[-1]) * 0.3 + 1
    b = torch.randn(shape[-1]) * 0.1
    dy = torch.randn(shape)
    out = _run(lambda a, c, d: layer_norm(a, c, d, 1e-6), x, w, b, dy)
    ref = _run(lambda a, c, d: layer_norm_reference(a, c, d, 1e-6), x, w, b, dy)
    for got, want in zip(out, ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_layernorm_cpu_matches_nn_layernorm(triton_cpu):
    ln = torch.nn.LayerNorm(37, eps=1e-5)
    torch.nn.init.normal_(ln.weight)
    x = torch.randn(4, 37)
    torch.testing.assert_close(layer_norm(x, ln.weight, ln.bias, 1e-5), ln(x), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_layernorm_gpu_bf16(cuda_device):
    rows, n = 16384, 1280
    x = (torch.randn(rows, n, device=cuda_device) + 0.3).bfloat16()
    w = (torch.randn(n, device=cuda_device) * 0.2 + 1).bfloat16()
    b = (torch.randn(n, device=cuda_device) * 0.1).bfloat16()
    dy = torch.randn(rows, n, device=cuda_device).bfloat16()
    out = _run(lambda a, c, d: layer_norm(a, c, d, 1e-6), x, w, b, dy)
    ref = _run(lambda a, c, d: layer_norm_reference(a.float(), c.float(), d.float(), 1e-6), x, w, b, dy.float())
    for name, got, want in zip(("out", "dx", "dw", "db"), out, ref):
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        err = rel_err(got, want)
        record_gpu_error("layernorm", name, err, 1e-2)
        assert err < 1e-2, (name, err)
