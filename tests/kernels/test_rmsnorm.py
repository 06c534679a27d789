import pytest
import torch
from conftest import record_gpu_error, rel_err

from visiontune.kernels.rmsnorm import rms_norm, rms_norm_reference

VARIANTS = {"llama": (0.0, True), "gemma": (1.0, False)}


def _run(fn, x, w, dy):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y.detach(), dx, dw


@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 64), (13, 100)])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rmsnorm_cpu_matches_reference(triton_cpu, shape, variant):
    offset, cast = VARIANTS[variant]
    x = torch.randn(shape) * 3
    w = torch.randn(shape[-1]) * 0.2 + (0.0 if offset else 1.0)
    dy = torch.randn(shape)
    out = _run(lambda a, b: rms_norm(a, b, 1e-6, offset, cast), x, w, dy)
    ref = _run(lambda a, b: rms_norm_reference(a, b, 1e-6, offset, cast), x, w, dy)
    for got, want in zip(out, ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rmsnorm_gpu_bf16(cuda_device, variant):
    offset, cast = VARIANTS[variant]
    rows, n = 8192, 3584
    x = torch.randn(rows, n, device=cuda_device).bfloat16()
    w = (torch.randn(n, device=cuda_device) * 0.2 + (0.0 if offset else 1.0)).bfloat16()
    dy = torch.randn(rows, n, device=cuda_device).bfloat16()
    out = _run(lambda a, b: rms_norm(a, b, 1e-6, offset, cast), x, w, dy)
    ref = _run(lambda a, b: rms_norm_reference(a.float(), b.float(), 1e-6, offset, cast), x, w, dy.float())
    for name, got, want, bound in zip(("out", "dx", "dw"), out, ref, (1e-2, 1e-2, 1e-2)):
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        err = rel_err(got, want)
        record_gpu_error(f"rmsnorm[{variant}]", name, err, bound)
        assert err < bound, (name, err)
