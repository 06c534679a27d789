"""NF4 dequantization (kernels/nf4.py) and LoRA over an NF4 base (kernels/nf4_lora.py): QLoRA on the engine.

The dequant kernel is checked against bitsandbytes' own ``dequantize_4bit`` (its CPU backend here, CUDA in
the GPU test) and against the torch reference, on fresh random weights of odd shapes; the Function's output
and every gradient against dequantize-then-PEFT math; the patched LoRA layer against PEFT's bitsandbytes
layer; and a tiny 4-bit model trains through the new path.
"""

import copy

import pytest
import torch
from conftest import adamw_losses, record_gpu_error, rel_err

bnb = pytest.importorskip("bitsandbytes", reason="NF4 weights come from bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

from visiontune.kernels.nf4 import (  # noqa: E402
    NF4Weight,
    nf4_dequantize,
    nf4_dequantize_kernel,
    nf4_dequantize_reference,
    nf4_weight,
)
from visiontune.kernels.nf4_lora import (  # noqa: E402
    NF4LoRALinearFunction,
    nf4_lora_linear,
    nf4_lora_linear_reference,
)

# (N, K): 96x200 (200 not a multiple of 64: blocks straddle rows), 37x45 (odd N*K: the last byte holds one
# element, the last block is short, bytes straddle rows), 3x64, 130x7 (K odd: bitsandbytes' CPU backend
# takes its generic path).
SHAPES = [(96, 200), (37, 45), (3, 64), (130, 7)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _quantize(shape, dtype=torch.float32, nested=True, blocksize=64, device="cpu", quant_type="nf4"):
    w = torch.randn(shape, device=device).to(dtype)
    return bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)


def _close_to_bnb(got, want):
    """Bit-exact, except bf16 under the CPU interpreter: Triton's interpreter rounds fp32 -> bf16 toward zero
    (numpy has no bf16), a GPU and torch round to nearest even; then within one bf16 ulp. The fp32 arithmetic
    itself is checked bit-exact by the fp32 cases."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.bfloat16 and not got.is_cuda:
        torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2**-7)
    else:
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [True, False])
def test_nf4_dequant_matches_bitsandbytes_and_reference(triton_cpu, shape, dtype, nested):
    q, st = _quantize(shape, dtype, nested)
    w = nf4_weight(q, st)
    assert w is not None and w.nested == nested and w.shape == shape and w.dtype == dtype
    want = bnbf.dequantize_4bit(q, st)
    ref = nf4_dequantize_reference(w)
    assert torch.equal(ref, want)  # the torch reference reads bitsandbytes' layout exactly
    _close_to_bnb(nf4_dequantize_kernel(w), want)
    _close_to_bnb(nf4_dequantize(w), want)  # the dispatcher takes the kernel under force_triton
    # fp32 out of any stored dtype: the same fp32 values bitsandbytes computes before its final rounding
    assert torch.equal(nf4_dequantize_kernel(w, torch.float32), nf4_dequantize_reference(w, torch.float32))


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_nf4_dequant_other_blocksizes(triton_cpu, blocksize):
    q, st = _quantize((41, 72), torch.float32, True, blocksize)
    w = nf4_weight(q, st)
    assert torch.equal(nf4_dequantize_kernel(w), bnbf.dequantize_4bit(q, st))


def test_nf4_dequant_into_a_larger_workspace(triton_cpu):
    q, st = _quantize((37, 45), torch.float16)
    w = nf4_weight(q, st)
    buf = torch.full((5000,), 7.0, dtype=torch.float16)
    got = nf4_dequantize_kernel(w, out=buf[: 37 * 45])
    assert got.data_ptr() == buf.data_ptr() and got.shape == (37, 45)
    assert torch.equal(got, bnbf.dequantize_4bit(q, st)) and (buf[37 * 45:] == 7).all()  # nothing written past n
    with pytest.raises(ValueError, match="out must be"):
        nf4_dequantize_kernel(w, out=buf[:100])


def test_nf4_weight_reads_a_linear4bit_and_refuses_other_layouts():
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(45, 37, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(37, 45), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes (double quantization is Params4bit's default)
    w = nf4_weight(layer.weight)
    assert isinstance(w, NF4Weight) and w.nested and w.shape == (37, 45)
    assert nf4_weight(layer.weight) is w  # cached on the parameter
    assert torch.equal(nf4_dequantize_reference(w), bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state))

    q, st = _quantize((37, 45), quant_type="fp4")
    assert nf4_weight(q, st) is None  # FP4: not this kernel's code table
    q, st = _quantize((37, 45))
    repacked = copy.copy(st)
    repacked.packing_format_for_cpu = True  # what bitsandbytes' CPU inference repacking marks
    assert nf4_weight(q, repacked) is None
    assert nf4_weight(q[:-1], st) is None  # packed size does not match the shape
    assert nf4_weight(torch.zeros(4)) is None  # no quant state


# --------------------------------------------------------------------------------------------------
# the LoRA-over-NF4 Function


def _nf4_params(n_in, n_out, r, bias, lora=True, nested=True, dtype=torch.float32, lora_dtype=None):
    lora_dtype = lora_dtype or dtype
    q, st = _quantize((n_out, n_in), dtype, nested)
    w = nf4_weight(q, st)
    b = (torch.randn(n_out) * 0.1).to(dtype).requires_grad_() if bias else None
    if not lora:
        return [w, b, None, None, 1.0], q
    a = (torch.randn(r, n_in) / n_in**0.5).to(lora_dtype).requires_grad_()
    bm = (torch.randn(n_out, r) * 0.1).to(lora_dtype).requires_grad_()
    return [w, b, a, bm, 2.0], q


def _grads(fn, x, params, dy):
    leaves = [t for p in params for t in p[1:4] if t is not None and t.requires_grad]
    xx = x.detach().clone().requires_grad_()
    y = fn(xx)
    return (y.detach(), *torch.autograd.grad(y, [xx, *leaves], dy)), len(leaves)


@pytest.mark.parametrize("shape,n_out,bias,lora,nested", [((1, 64), 5, False, True, True),
                                                          ((2, 3, 45), 37, True, True, True),
                                                          ((7, 72), 20, True, True, False),
                                                          ((4, 24), 6, True, False, True)])
def test_nf4_lora_linear_matches_reference(triton_cpu, shape, n_out, bias, lora, nested):
    p, q = _nf4_params(shape[-1], n_out, 4, bias, lora, nested)
    x, dy = torch.randn(shape), torch.randn(*shape[:-1], n_out)
    got, n_leaves = _grads(lambda x: nf4_lora_linear(x, *p), x, [p], dy)
    want, _ = _grads(lambda x: nf4_lora_linear_reference(x, *p), x, [p], dy)
    assert len(got) == 2 + n_leaves == 2 + int(bias) + 2 * int(lora)  # out, dx, (db), (dA, dB)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert q.grad is None and not q.requires_grad  # the frozen 4-bit weight gets no gradient


def test_nf4_lora_function_saves_no_dequantized_weight(triton_cpu):
    """Saved for backward: x, x A^T and the (small) parameters; never an N x K weight."""
    rows, n_in, n_out, r = 11, 72, 40, 4
    p, _ = _nf4_params(n_in, n_out, r, True)
    y = nf4_lora_linear(torch.randn(rows, n_in, requires_grad=True), *p)
    assert type(y.grad_fn).__name__ == "NF4LoRALinearFunctionBackward"
    saved = sorted(tuple(t.shape) for t in y.grad_fn.saved_tensors if t is not None)
    assert saved == sorted([(rows, n_in), (rows, r), (n_out,), (r, n_in), (n_out, r)]), saved


def test_nf4_lora_layers_share_one_workspace(triton_cpu):
    """Two NF4 layers in a row reuse one dequantization buffer; each backward dequantizes its own W again, so
    the second layer's forward overwriting the buffer does not leak into the first one's gradients."""
    from visiontune.kernels import nf4_lora

    p1, _ = _nf4_params(45, 64, 3, True)
    p2, _ = _nf4_params(64, 45, 3, False, nested=False)
    x, dy = torch.randn(6, 45), torch.randn(6, 45)
    got, _ = _grads(lambda x: nf4_lora_linear(nf4_lora_linear(x, *p1), *p2), x, [p1, p2], dy)
    want, _ = _grads(lambda x: nf4_lora_linear_reference(nf4_lora_linear_reference(x, *p1), *p2), x, [p1, p2], dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert len(nf4_lora._WORKSPACE) == 1  # one (device, dtype) buffer
    nf4_lora.release_workspace()
    assert not nf4_lora._WORKSPACE


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_mlps_take_nf4_bases(triton_cpu, recompute):
    """gated_mlp and plain_mlp over NF4 bases run the fused MLP Functions (h not kept; with recompute, nor the
    first products) and equal one NF4 LoRA linear per projection around the activation: output and every
    gradient (the shared workspace is reused by every projection, forward and backward)."""
    from visiontune.kernels.activations import activation, glu
    from visiontune.kernels.lora import LoRAGatedMLPFunction, LoRAPlainMLPFunction, gated_mlp, plain_mlp

    gate, up = _nf4_params(48, 80, 4, True)[0], _nf4_params(48, 80, 4, False)[0]
    down = _nf4_params(80, 48, 4, True, nested=False)[0]
    x, dy = torch.randn(2, 9, 48), torch.randn(2, 9, 48)
    got, _ = _grads(lambda x: gated_mlp(x, gate, up, down, act="silu", recompute=recompute), x, [gate, up, down], dy)
    want, _ = _grads(lambda x: nf4_lora_linear(glu(nf4_lora_linear(x, *gate), nf4_lora_linear(x, *up), "silu"),
                                               *down), x, [gate, up, down], dy)
    y = gated_mlp(x.requires_grad_(), gate, up, down, act="silu", recompute=recompute)
    assert type(y.grad_fn).__name__ == LoRAGatedMLPFunction.__name__ + "Backward"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    fc1, fc2 = _nf4_params(48, 72, 4, True)[0], _nf4_params(72, 48, 4, True)[0]
    act = "gelu_pytorch_tanh"
    got, _ = _grads(lambda x: plain_mlp(x, fc1, fc2, act, recompute=recompute), x, [fc1, fc2], dy)
    want, _ = _grads(lambda x: nf4_lora_linear(activation(nf4_lora_linear(x, *fc1), act), *fc2), x, [fc1, fc2], dy)
    y = plain_mlp(x, fc1, fc2, act, recompute=recompute)
    assert type(y.grad_fn).__name__ == LoRAPlainMLPFunction.__name__ + "Backward"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_nf4_lora_bf16_activations_fp32_adapters(triton_cpu):
    """PEFT keeps adapters in fp32 while the base computes in bf16: the Function casts them (cached)."""
    p, _ = _nf4_params(72, 40, 4, True, dtype=torch.bfloat16, lora_dtype=torch.float32)
    x, dy = torch.randn(9, 72).bfloat16(), torch.randn(9, 40).bfloat16()
    got, _ = _grads(lambda x: nf4_lora_linear(x, *p), x, [p], dy)
    p32 = [p[0], p[1].detach().float().requires_grad_(), p[2], p[3], p[4]]
    want, _ = _grads(lambda x: nf4_lora_linear_reference(x, *p32), x.float(), [p32], dy.float())
    assert [g.dtype for g in got] == [torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2e-2


# --------------------------------------------------------------------------------------------------
# wiring: PEFT's LoRA layer over a Linear4bit


def _peft_lora_4bit(n_in=45, n_out=37, r=4, bias=True):
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from visiontune.models.bnb_cpu import keep_cpu_4bit_differentiable

    base = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(n_out, n_in) / n_in**0.5, requires_grad=False, quant_type="nf4")
    base = base.to("cpu")
    keep_cpu_4bit_differentiable(base)
    layer = LoraLinear4bit(base, "default", config=LoraConfig(r=r, lora_alpha=2 * r), r=r, lora_alpha=2 * r)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.1)
    if bias:
        base.bias.requires_grad_(True)  # a trainable bias (bias="all") gets its gradient too
    return layer


def test_patched_lora_4bit_layer_matches_peft(triton_cpu):
    from visiontune.kernels.patch import PatchHandle, _patch_nf4_lora, lora_params

    layer = _peft_lora_4bit()
    x, dy = torch.randn(2, 5, 45), torch.randn(2, 5, 37)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert len(params) == 3  # lora A, lora B, bias

    def run():
        xx = x.clone().requires_grad_()
        y = layer(xx)
        return y, (y.detach(), *torch.autograd.grad(y, [xx, *params], dy))

    y_peft, want = run()  # PEFT's bitsandbytes layer (bitsandbytes' CPU 4-bit matmul)
    assert "NF4LoRA" not in type(y_peft.grad_fn).__name__
    p = lora_params(layer, x)
    assert isinstance(p[0], NF4Weight) and p[2] is layer.lora_A["default"].weight and p[4] == 2.0
    handle = PatchHandle(None, None, active=True)
    assert _patch_nf4_lora(handle, layer) and not _patch_nf4_lora(handle, layer)  # once
    y, got = run()
    assert type(y.grad_fn).__name__ == "NF4LoRALinearFunctionBackward"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # one-row inference: bitsandbytes' own GEMV path stays
        assert lora_params(layer, x[0, :1]) is None
    handle.unpatch()
    assert "forward" not in layer.__dict__


def test_lora_4bit_keeps_peft_path_off_the_engine(triton_cpu):
    """CPU tensors outside force_triton (the default on a CPU machine), weights repacked by bitsandbytes' CPU
    inference, FP4, and x not in the compute dtype: lora_params gives None, the layer runs PEFT/bitsandbytes."""
    from visiontune.kernels._common import force_triton
    from visiontune.kernels.patch import lora_params

    layer = _peft_lora_4bit(bias=False)
    x = torch.randn(3, 45)
    assert isinstance(lora_params(layer, x)[0], NF4Weight)  # served (interpreter, forced)
    with force_triton(False):
        assert lora_params(layer, x) is None
    assert lora_params(layer, x.double()) is None  # compute dtype float32
    qs = layer.base_layer.weight.quant_state
    for attr, value, restore in (("packing_format_for_cpu", True, False), ("quant_type", "fp4", "nf4")):
        setattr(qs, attr, value)
        try:
            assert lora_params(layer, x) is None, attr
        finally:
            setattr(qs, attr, restore)
    assert isinstance(lora_params(layer, x)[0], NF4Weight)


# --------------------------------------------------------------------------------------------------
# a tiny 4-bit model through FastVisionModel


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "mllama"])
def test_tiny_4bit_model_trains_through_the_nf4_lora_path(triton_cpu, tiny_model_dir, monkeypatch, arch):
    """from_pretrained(load_in_4bit=True) + get_peft_model on a patched model: every LoRA layer over a
    Linear4bit runs the NF4 LoRA Function, the loss and LoRA gradients equal PEFT's bitsandbytes path at the
    first step, and a few AdamW steps lower the loss. Qwen2.5-VL's projections sit in fused attention/MLP
    blocks (lora_params); Mllama's attention is not in its kernel map, so its projections go through the
    patched LoRA layers themselves (patch_lora_layers)."""
    import numpy as np
    from PIL import Image

    from visiontune import FastVisionModel, VisionDataCollator
    from visiontune.kernels import nf4_lora, patch_model

    def sample(seed):
        img = Image.fromarray((np.random.RandomState(seed).rand(60, 60, 3) * 255).astype("uint8"))
        return {"messages": [
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Read."}]},
            {"role": "assistant", "content": [{"type": "text", "text": str(10 + seed)}]}]}

    torch.manual_seed(0)
    model, processor = FastVisionModel.from_pretrained(tiny_model_dir(arch), load_in_4bit=True,
                                                       use_fused_kernels=False, use_gradient_checkpointing=False)
    handle = patch_model(model, enabled=True)  # what from_pretrained does on CUDA
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    lora_4bit = [m for m in model.modules()
                 if hasattr(m, "lora_A") and isinstance(m.get_base_layer(), bnb.nn.Linear4bit)]
    assert lora_4bit and handle.counts.get("nf4_lora") == len(lora_4bit)  # patched after PEFT wrapped them
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    FastVisionModel.for_training(model)
    batch = VisionDataCollator(model, processor)([sample(0), sample(1)])
    params = [p for p in model.parameters() if p.requires_grad]

    calls = {"n": 0}
    apply = NF4LoRALinearFunction.apply

    def counting(*a, **k):
        calls["n"] += 1
        return apply(*a, **k)

    monkeypatch.setattr(nf4_lora.NF4LoRALinearFunction, "apply", counting)
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, params)
    assert calls["n"] == len(lora_4bit)  # each LoRA-over-4-bit layer once per forward, none left to PEFT
    handle.unpatch()
    calls["n"] = 0
    loss_peft = model(**batch).loss
    grads_peft = torch.autograd.grad(loss_peft, params)
    assert calls["n"] == 0
    torch.testing.assert_close(loss, loss_peft, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, grads_peft):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)

    handle = patch_model(model, enabled=True)  # patching the PEFT-wrapped model finds the LoRA layers itself
    assert handle.counts.get("nf4_lora") == len(lora_4bit)
    losses = adamw_losses(model, batch, params)
    assert calls["n"] == 4 * len(lora_4bit)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses
    handle.unpatch()


# --------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_dequant_gpu_matches_bitsandbytes(cuda_device, dtype):
    """Qwen2.5-VL-7B MLP shape and an odd one: bit-exact against bitsandbytes' CUDA dequantize."""
    for shape in [(18944, 3584), (37, 45)]:
        q, st = _quantize(shape, dtype, True, device=cuda_device)
        _close_to_bnb(nf4_dequantize_kernel(nf4_weight(q, st)), bnbf.dequantize_4bit(q, st))


@pytest.mark.gpu
def test_nf4_lora_linear_gpu_bf16(cuda_device):
    rows, n_in, n_out, r = 4096, 3584, 18944, 16
    q, st = _quantize((n_out, n_in), torch.bfloat16, True, device=cuda_device)
    w = nf4_weight(q, st)
    a = (torch.randn(r, n_in, device=cuda_device) / n_in**0.5).requires_grad_()
    bm = (torch.randn(n_out, r, device=cuda_device) * 0.1).requires_grad_()
    x = torch.randn(rows, n_in, device=cuda_device).bfloat16()
    dy = torch.randn(rows, n_out, device=cuda_device).bfloat16()
    xx = x.clone().requires_grad_()
    y = nf4_lora_linear(xx, w, None, a, bm, 2.0)
    got = (y.detach(), *torch.autograd.grad(y, [xx, a, bm], dy))
    wf = bnbf.dequantize_4bit(q, st).float()
    xr = x.float().requires_grad_()
    yr = torch.nn.functional.linear(xr, wf) + 2.0 * (xr @ a.t()) @ bm.t()
    want = (yr.detach(), *torch.autograd.grad(yr, [xr, a, bm], dy.float()))
    for name, g, wt in zip(["out", "dx", "dA", "dB"], got, want):
        err = rel_err(g, wt)
        record_gpu_error("nf4_lora_linear", name, err, 2e-2)
        assert torch.isfinite(g).all() and err < 2e-2, (name, err)
