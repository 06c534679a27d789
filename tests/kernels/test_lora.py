import pytest
import torch
from conftest import record_gpu_error, rel_err

from visiontune.kernels.lora import (
    gated_mlp,
    gated_mlp_reference,
    lora_linear,
    lora_linear_reference,
    plain_mlp,
    plain_mlp_reference,
)


def _params(n_in, n_out, r, bias, lora=True, device="cpu", dtype=torch.float32, lora_dtype=None):
    lora_dtype = lora_dtype or dtype
    w = (torch.randn(n_out, n_in, device=device) / n_in**0.5).to(dtype)
    b = (torch.randn(n_out, device=device) * 0.1).to(dtype) if bias else None
    if not lora:
        return [w, b, None, None, 1.0]
    a = (torch.randn(r, n_in, device=device) / n_in**0.5).to(lora_dtype).requires_grad_()
    bm = (torch.randn(n_out, r, device=device) * 0.1).to(lora_dtype).requires_grad_()
    return [w, b.requires_grad_() if bias else None, a, bm, 2.0]


def _trainables(p):
    return [t for t in p[:4] if t is not None and t.requires_grad]


def _check(fn, ref, x, params, dy, atol, rtol):
    leaves = [t for p in params for t in _trainables(p)]
    outs = []
    for f in (fn, ref):
        xx = x.detach().clone().requires_grad_()
        y = f(xx, *params)
        outs.append((y.detach(), *torch.autograd.grad(y, [xx, *leaves], dy)))
    assert len(outs[0]) == 2 + len(leaves)
    for got, want in zip(*outs):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape,n_out,bias,lora", [((1, 9), 5, False, True), ((2, 3, 24), 17, True, True),
                                                  ((4, 8), 6, True, False)])
def test_lora_linear_cpu(triton_cpu, shape, n_out, bias, lora):
    p = _params(shape[-1], n_out, 4, bias, lora)
    x, dy = torch.randn(shape), torch.randn(*shape[:-1], n_out)
    _check(lambda x, p: lora_linear(x, *p), lambda x, p: lora_linear_reference(x, *p), x, [p], dy, 1e-5, 1e-5)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("rows,hid,inter,bias", [(1, 8, 12, False), (13, 20, 36, True)])
@pytest.mark.parametrize("recompute", [False, True])
def test_gated_mlp_cpu(triton_cpu, act, rows, hid, inter, bias, recompute):
    ps = [_params(hid, inter, 3, bias), _params(hid, inter, 3, bias), _params(inter, hid, 3, bias)]
    x, dy = torch.randn(rows, hid), torch.randn(rows, hid)
    _check(lambda x, *p: gated_mlp(x, *p, act=act, recompute=recompute),
           lambda x, *p: gated_mlp_reference(x, *p, act=act), x, ps, dy, 1e-5, 1e-4)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "quick_gelu", "silu"])
@pytest.mark.parametrize("recompute", [False, True])
def test_plain_mlp_cpu(triton_cpu, act, recompute):
    ps = [_params(24, 40, 4, True), _params(40, 24, 4, True)]
    x, dy = torch.randn(2, 7, 24), torch.randn(2, 7, 24)
    _check(lambda x, *p: plain_mlp(x, *p, act=act, recompute=recompute),
           lambda x, *p: plain_mlp_reference(x, *p, act=act), x, ps, dy, 1e-5, 1e-4)


def test_mlp_recompute_keeps_no_intermediate_activation(triton_cpu):
    """recompute=True: what the MLP Function saves for backward holds no tokens x intermediate tensor."""
    rows, hid, inter = 11, 16, 48
    ps = [_params(hid, inter, 2, False), _params(hid, inter, 2, False), _params(inter, hid, 2, False)]
    x = torch.randn(rows, hid, requires_grad=True)
    for recompute, expect_big in ((False, True), (True, False)):
        y = gated_mlp(x, *ps, act="silu", recompute=recompute)
        saved = [t for t in y.grad_fn.saved_tensors if t is not None]
        big = any(t.shape == (rows, inter) for t in saved)
        assert big == expect_big, (recompute, [tuple(t.shape) for t in saved])


def test_gated_mlp_cpu_partial_lora(triton_cpu):
    """Only some projections carry LoRA (e.g. target_modules without down_proj)."""
    ps = [_params(16, 24, 2, False), _params(16, 24, 2, False, lora=False), _params(24, 16, 2, False, lora=False)]
    x, dy = torch.randn(5, 16), torch.randn(5, 16)
    _check(lambda x, *p: gated_mlp(x, *p, act="silu"), lambda x, *p: gated_mlp_reference(x, *p, act="silu"),
           x, ps, dy, 1e-5, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [False, True])
def test_lora_gated_mlp_gpu_bf16(cuda_device, recompute):
    """Qwen2.5-VL-7B MLP shapes, bf16 base, fp32 adapters (PEFT's autocast_adapter_dtype)."""
    rows, hid, inter = 4096, 3584, 18944
    ps = [_params(hid, inter, 16, False, device=cuda_device, dtype=torch.bfloat16, lora_dtype=torch.float32),
          _params(hid, inter, 16, False, device=cuda_device, dtype=torch.bfloat16, lora_dtype=torch.float32),
          _params(inter, hid, 16, False, device=cuda_device, dtype=torch.bfloat16, lora_dtype=torch.float32)]
    x = torch.randn(rows, hid, device=cuda_device).bfloat16()
    dy = torch.randn(rows, hid, device=cuda_device).bfloat16()
    leaves = [t for p in ps for t in _trainables(p)]
    xx = x.clone().requires_grad_()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = gated_mlp(xx, *ps, act="silu", recompute=recompute)
    held = torch.cuda.memory_allocated() - before  # output + what the Function saved for backward
    got = (y.detach(), *torch.autograd.grad(y, [xx, *leaves], dy))
    inter_bytes = rows * inter * 2
    if recompute:  # gate and up outputs (2 x rows x inter bf16) are not kept
        assert held < inter_bytes, (held, inter_bytes)
    else:
        assert held >= 2 * inter_bytes, (held, inter_bytes)
    ps32 = [[t.float() if torch.is_tensor(t) else t for t in p] for p in ps]
    leaves32 = [t for p in ps32 for t in p[2:4]]
    xr = x.float().requires_grad_()
    yr = gated_mlp_reference(xr, *ps32, act="silu")
    want = (yr.detach(), *torch.autograd.grad(yr, [xr, *leaves32], dy.float()))
    names = ["out", "dx", "dA_gate", "dB_gate", "dA_up", "dB_up", "dA_down", "dB_down"]
    for name, g, w in zip(names, got, want):
        err = rel_err(g, w)
        record_gpu_error(f"lora_gated_mlp{'[recompute]' if recompute else ''}", name, err, 2e-2)
        assert torch.isfinite(g).all() and err < 2e-2, (name, err)


def test_lowp_cast_cache_follows_parameter_updates(triton_cpu):
    """bf16 activations with fp32 adapters: the cached bf16 copies must track in-place optimizer updates."""
    w, b, a, bm, s = _params(16, 12, 4, True, dtype=torch.bfloat16, lora_dtype=torch.float32)
    x = torch.randn(5, 16).bfloat16()
    opt = torch.optim.SGD([a, bm], lr=0.5)
    for _ in range(3):
        y = lora_linear(x, w, b, a, bm, s)
        want = lora_linear_reference(x.float(), w.float(), b.float(), a, bm, s)
        assert rel_err(y, want) < 1e-2  # bf16 output rounding
        y.float().square().sum().backward()
        opt.step()  # in place: bumps a._version / bm._version
        opt.zero_grad()
    with torch.no_grad():
        bm.mul_(0)
    torch.testing.assert_close(lora_linear(x, w, b, a, bm, s).float(), torch.nn.functional.linear(x, w, b).float())


class _OutOfBandStep(torch.optim.Optimizer):
    """Writes the weights through ``.data`` (a separate version counter), as bitsandbytes' 8-bit AdamW does
    from its own CUDA code: ``p._version`` does not move."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(0.25)


def test_lowp_cast_cache_follows_updates_that_do_not_bump_the_version(triton_cpu):
    w, b, a, bm, s = _params(16, 12, 4, True, dtype=torch.bfloat16, lora_dtype=torch.float32)
    x = torch.randn(5, 16).bfloat16()
    lora_linear(x, w, b, a, bm, s)  # fills the cache
    version = (a._version, bm._version)
    _OutOfBandStep([a, bm]).step()
    assert (a._version, bm._version) == version  # the case the version-only cache key missed
    want = lora_linear_reference(x.float(), w.float(), b.float(), a, bm, s)
    assert rel_err(lora_linear(x, w, b, a, bm, s), want) < 1e-2
