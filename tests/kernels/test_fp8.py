"""FP8 frozen weights (kernels/fp8.py) and LoRA over an FP8 base (kernels/fp8_lora.py).

The row-wise quantization kernel is checked against its torch reference (interpreter) on odd shapes; the
Function's output and every gradient against the same arithmetic written in fp32 torch (quantize, dequantize,
matmul) and against the unquantized LoRA linear within FP8's error; the conversion of a tiny PEFT model
(what converts, what stays, restore gives back every bit, merging uses the 16-bit original); and a tiny
``load_in_fp8`` model trains through the FP8 Function.
"""

import pytest
import torch
from conftest import adamw_losses, record_gpu_error, rel_err

from visiontune.kernels.fp8 import (
    FP8,
    FP8Weight,
    convert_fp8_base,
    fp8_base_weight,
    quantize_weight,
    restore_fp8_base,
    rowwise_quantize,
    rowwise_quantize_reference,
)
from visiontune.kernels.fp8_lora import (
    FP8LoRALinearFunction,
    fp8_dx_emulated,
    fp8_linear_emulated,
    fp8_lora_linear,
    fp8_lora_linear_reference,
)

# (M, K): odd row counts and widths, one wider than a block (4096) so the kernel loops.
SHAPES = [(5, 37), (33, 300), (2, 4200), (1, 16)]


def _same_fp8(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal FP8 values, except one unit in the last place where the kernel's fp32 quotient differs from
    torch's in its last bit next to a rounding tie (at most 1% of the elements)."""
    g, w = got.float(), want.float()
    diff = (g - w).abs()
    ulp = w.abs().clamp_min(2.0**-6) * 2.0**-3  # e4m3: 3 mantissa bits (2^-9 spacing below 2^-6)
    assert bool((diff <= ulp + 2.0**-9).all()), float((diff - ulp).max())
    assert float((diff > 0).float().mean()) <= 0.01


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("col_scale", [False, True])
def test_rowwise_quantize_kernel_matches_reference(triton_cpu, shape, dtype, col_scale):
    x = (torch.randn(shape) * torch.rand(shape[0], 1) * 30).to(dtype)
    cs = torch.rand(shape[1]) + 0.05 if col_scale else None
    q, s = rowwise_quantize(x, cs)
    qr, sr = rowwise_quantize_reference(x, cs)
    assert q.dtype == FP8 and q.shape == x.shape and s.shape == (shape[0],)
    torch.testing.assert_close(s, sr, atol=0, rtol=1e-6)
    _same_fp8(q, qr)
    # every row reaches the top of e4m3's range, and dequantizing comes back within FP8's rounding
    assert torch.allclose(q.float().abs().amax(1), torch.full((shape[0],), 448.0))
    xs = x.float() * (cs if cs is not None else 1.0)
    assert rel_err(q.float() * s[:, None], xs) < 0.04


def test_rowwise_quantize_zero_rows_and_bad_input(triton_cpu):
    x = torch.zeros(3, 40)
    x[1] = torch.randn(40)
    q, s = rowwise_quantize(x)
    assert torch.equal(q[0].float(), torch.zeros(40)) and torch.equal(q[2].float(), torch.zeros(40))
    assert torch.isfinite(s).all() and s[0] > 0
    with pytest.raises(ValueError, match="2-D"):
        rowwise_quantize(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="col_scale"):
        rowwise_quantize(torch.randn(2, 4), torch.ones(5))


def _fp8_params(n_in, n_out, r, bias, lora=True):
    w = quantize_weight(torch.randn(n_out, n_in) / n_in**0.5)
    w = FP8Weight(w.data, w.scale, torch.float32)  # fp32 activations: fp32 tolerances on the CPU
    b = (torch.randn(n_out) * 0.1).requires_grad_() if bias else None
    a = (torch.randn(r, n_in) / n_in**0.5).requires_grad_() if lora else None
    bm = (torch.randn(n_out, r) * 0.1).requires_grad_() if lora else None
    return w, b, a, bm


@pytest.mark.parametrize("rows,n_in,n_out", [(7, 48, 32), (40, 64, 96), (1, 32, 16)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_fp8_lora_linear_matches_its_arithmetic_and_gradients(triton_cpu, rows, n_in, n_out, bias, lora):
    """Output and every gradient against the Function's arithmetic in fp32 torch: y = deq(q(x)) deq(W)^T + b +
    s B A x; dx = deq(q(dy s_w)) q_W + s dy B A; dA, dB, db exactly PEFT's (the adapters are not quantized)."""
    w, b, a, bm = _fp8_params(n_in, n_out, 4, bias, lora)
    scale = 1.7
    x = torch.randn(2, rows, n_in).requires_grad_()
    dy = torch.randn(2, rows, n_out)
    leaves = [t for t in (x, b, a, bm) if t is not None]
    y = fp8_lora_linear(x, w, b, a, bm, scale)
    got = torch.autograd.grad(y, leaves, dy)

    x2, dy2 = x.detach().reshape(-1, n_in), dy.reshape(-1, n_out)
    want_y = fp8_linear_emulated(x2, w) + (b.detach() if b is not None else 0.0)
    want_dx = fp8_dx_emulated(dy2, w)
    if lora:
        want_y = want_y + scale * (x2 @ a.detach().t()) @ bm.detach().t()
        want_dx = want_dx + scale * (dy2 @ bm.detach()) @ a.detach()
    torch.testing.assert_close(y.detach().reshape(-1, n_out), want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0].reshape(-1, n_in), want_dx, atol=1e-5, rtol=1e-5)
    # the adapters' and bias' gradients equal the unquantized LoRA linear's (they never touch W)
    xr = x.detach().requires_grad_()
    ref_leaves = [t for t in (xr, b, a, bm) if t is not None]
    ref = fp8_lora_linear_reference(xr, w, b, a, bm, scale)
    want = torch.autograd.grad(ref, ref_leaves, dy)
    for g, wt in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, wt, atol=1e-5, rtol=1e-5)
    # and the whole is the dequantized-weight linear within FP8's rounding of x and dy
    assert rel_err(y.detach(), ref.detach()) < 0.06
    assert rel_err(got[0], want[0]) < 0.06


def test_fp8_function_saves_no_weight_copy(triton_cpu):
    w, b, a, bm = _fp8_params(64, 48, 4, True)
    x = torch.randn(9, 64, requires_grad=True)
    y = FP8LoRALinearFunction.apply(x, w, b, a, bm, 1.0)
    saved = y.grad_fn.saved_tensors
    assert all(t.dtype != FP8 for t in saved)
    assert sum(t.numel() for t in saved) == x.numel() + 9 * 4 + b.numel() + a.numel() + bm.numel()


def test_fp8_lora_linear_refuses_a_wrong_width():
    w, b, a, bm = _fp8_params(32, 16, 2, False)
    with pytest.raises(ValueError, match="features"):
        fp8_lora_linear(torch.randn(3, 31), w, b, a, bm)


# --------------------------------------------------------------------------------------------------
# converting a model's LoRA bases


def _peft_mlp():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(64, 96, bias=True)
            self.odd = torch.nn.Linear(96, 40)  # 40 is not a multiple of 16: stays 16-bit
            self.down = torch.nn.Linear(40, 32)

        def forward(self, x):
            return self.down(torch.relu(self.odd(torch.relu(self.up(x)))))

    model = get_peft_model(MLP().bfloat16(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "odd"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    return model


def test_convert_and_restore_fp8_base():
    from visiontune.models.merge import merged_tensors

    model = _peft_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged_before = {k: v.clone() for k, v in merged_tensors(model).items()}
    x = torch.randn(6, 64).bfloat16()
    with torch.no_grad():
        y16 = model(x)
    assert convert_fp8_base(model) == 1  # "up" only: "odd" is 40 wide, "down" has no LoRA
    up = model.base_model.model.up.base_layer
    assert up.weight.dtype == FP8 and not up.weight.requires_grad
    assert fp8_base_weight(model.base_model.model.odd.base_layer) is None
    assert set(model.state_dict()) == set(before)  # scales are not saved with the model
    with torch.no_grad():
        y8 = model(x)  # the base layer's own forward dequantizes (no engine on the CPU)
    assert rel_err(y8.float(), y16.float()) < 0.05 and not torch.equal(y8, y16)
    merged = merged_tensors(model)  # merging folds the update into the 16-bit original
    for k, v in merged_before.items():
        assert torch.equal(merged[k], v), k
    assert restore_fp8_base(model) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(model(x), y16)


def test_fp16_bases_stay_16_bit():
    """cuBLAS's row-wise scaled FP8 GEMM writes bf16 only: an fp16 model's LoRA bases are not converted."""
    model = _peft_mlp().half()
    assert convert_fp8_base(model) == 0
    assert model.base_model.model.up.base_layer.weight.dtype == torch.float16


def test_convert_without_original_restores_the_dequantized_weight():
    model = _peft_mlp()
    w16 = model.base_model.model.up.base_layer.weight.detach().clone()
    convert_fp8_base(model, keep_original=False)
    restore_fp8_base(model)
    w = model.base_model.model.up.base_layer.weight
    assert w.dtype == torch.bfloat16 and rel_err(w.float(), w16.float()) < 0.04


def test_load_in_fp8_trains_through_the_fp8_function(triton_cpu, tiny_model_dir, monkeypatch):
    """from_pretrained(load_in_fp8=True) + get_peft_model on a patched bf16 model: every convertible LoRA
    layer's base product runs in FP8 (the FP8 LoRA Function, or the fused MLP Function), the first loss is within FP8's error of the 16-bit model's, and a few AdamW
    steps lower the loss. load_in_fp8 with load_in_4bit is refused."""
    import numpy as np
    from PIL import Image

    from visiontune import FastVisionModel, VisionDataCollator
    from visiontune.kernels import patch_model
    from visiontune.kernels.fp8 import convertible

    def sample(seed):
        img = Image.fromarray((np.random.RandomState(seed).rand(60, 60, 3) * 255).astype("uint8"))
        return {"messages": [
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Read."}]},
            {"role": "assistant", "content": [{"type": "text", "text": str(10 + seed)}]}]}

    path = tiny_model_dir("qwen2_5_vl")
    with pytest.raises(ValueError, match="NF4 or FP8"):
        FastVisionModel.from_pretrained(path, load_in_4bit=True, load_in_fp8=True)
    with pytest.raises(ValueError, match="full_finetuning"):
        FastVisionModel.from_pretrained(path, load_in_fp8=True, full_finetuning=True)
    with pytest.raises(ValueError, match="per output row only"):
        FastVisionModel.from_pretrained(path, load_in_fp8="block")
    from visiontune.models.fast_vision import _check_fp8

    assert _check_fp8("row", False, False) is True and _check_fp8(False, True, True) is False
    losses0 = {}
    for fp8 in (False, True):
        torch.manual_seed(0)
        model, processor = FastVisionModel.from_pretrained(path, dtype="bfloat16", load_in_fp8=fp8,
                                                           use_fused_kernels=False, use_gradient_checkpointing=False)
        handle = patch_model(model, enabled=True)  # what from_pretrained does on CUDA
        will_convert = [m for m in model.modules() if type(m) is torch.nn.Linear]
        model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.02, generator=torch.Generator().manual_seed(len(n)))
        converted = [m for m in model.modules() if hasattr(m, "lora_A")
                     and fp8_base_weight(m.get_base_layer()) is not None]
        FastVisionModel.for_training(model)
        batch = VisionDataCollator(model, processor)([sample(0), sample(1)])
        if not fp8:
            assert not converted and will_convert
            with torch.no_grad():
                losses0[fp8] = float(model(**batch).loss)
            handle.unpatch()
            continue
        assert converted and not any(convertible(m) for m in model.modules())  # every convertible one
        from visiontune.models.state import vision_state

        assert vision_state(model).fp8_layers == len(converted)
        calls = {"n": 0}
        mm = FP8Weight.mm

        def counting(self, *a, **k):
            calls["n"] += 1
            return mm(self, *a, **k)

        monkeypatch.setattr(FP8Weight, "mm", counting)
        params = [p for p in model.parameters() if p.requires_grad]
        losses = adamw_losses(model, batch, params)
        assert calls["n"] == 4 * len(converted)  # every converted layer once a step, on FP8 products
        assert abs(losses[0] - losses0[False]) < 0.05 * abs(losses0[False]), (losses[0], losses0)
        assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.3, losses
        handle.unpatch()


# --------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_rowwise_quantize_gpu_matches_reference(cuda_device):
    for shape in [(4099, 3584), (37, 18944)]:
        x = torch.randn(shape, device=cuda_device).bfloat16() * 3
        cs = torch.rand(shape[1], device=cuda_device) + 0.1
        for c in (None, cs):
            q, s = rowwise_quantize(x, c)
            qr, sr = rowwise_quantize_reference(x, c)
            torch.testing.assert_close(s, sr, atol=0, rtol=1e-6)
            _same_fp8(q, qr)  # Triton's fp32 division may differ from torch's by an ulp before rounding


@pytest.mark.gpu
@pytest.mark.parametrize("rows,n_in,n_out", [(4096, 3584, 18944), (4099, 18944, 3584), (37, 1280, 3840)])
def test_fp8_lora_linear_gpu_bf16(cuda_device, rows, n_in, n_out):
    """Qwen2.5-VL-7B shapes (and an odd row count, padded for cuBLAS): the FP8 Function against its own
    arithmetic in fp32 (tight) and against the bf16 weights' linear (FP8's error)."""
    r = 16
    w16 = torch.randn(n_out, n_in, device=cuda_device).bfloat16() / n_in**0.5
    w = quantize_weight(w16)
    b = (torch.randn(n_out, device=cuda_device) * 0.1).bfloat16()
    a = (torch.randn(r, n_in, device=cuda_device) / n_in**0.5).requires_grad_()
    bm = (torch.randn(n_out, r, device=cuda_device) * 0.1).requires_grad_()
    x = torch.randn(rows, n_in, device=cuda_device).bfloat16().requires_grad_()
    dy = torch.randn(rows, n_out, device=cuda_device).bfloat16()
    y = fp8_lora_linear(x, w, b, a, bm, 2.0)
    got = (y.detach(), *torch.autograd.grad(y, [x, a, bm], dy))
    xf = x.detach().float()
    want_y = fp8_linear_emulated(xf, w) + b.float() + 2.0 * (xf @ a.detach().t()) @ bm.detach().t()
    want_dx = fp8_dx_emulated(dy.float(), w) + 2.0 * (dy.float() @ bm.detach()) @ a.detach()
    for name, g, wt in (("out", got[0], want_y), ("dx", got[1], want_dx)):
        err = rel_err(g, wt)
        record_gpu_error("fp8_lora_linear vs emulated", name, err, 1e-2)
        assert torch.isfinite(g).all() and err < 1e-2, (name, err)
    xr = xf.clone().requires_grad_()
    yr = torch.nn.functional.linear(xr, w16.float(), b.float()) + 2.0 * (xr @ a.t()) @ bm.t()
    want = (yr.detach(), *torch.autograd.grad(yr, [xr, a, bm], dy.float()))
    for name, g, wt, bound in zip(["out", "dx", "dA", "dB"], got, want, [6e-2, 6e-2, 2e-2, 2e-2]):
        err = rel_err(g, wt)
        record_gpu_error("fp8_lora_linear vs bf16 W", name, err, bound)
        assert err < bound, (name, err)


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_gated_mlp_takes_fp8_bases(triton_cpu, recompute):
    """gated_mlp over FP8 bases runs the fused MLP Function (h not kept; with recompute, nor g/u) and equals
    one FP8 LoRA linear per projection around the GLU: output and every gradient."""
    from visiontune.kernels.activations import glu
    from visiontune.kernels.lora import LoRAGatedMLPFunction, gated_mlp

    gate, up = _fp8_params(48, 80, 4, True), _fp8_params(48, 80, 4, False)
    down = _fp8_params(80, 48, 4, True)
    projs = [(*p, 1.3) for p in (gate, up, down)]
    x = torch.randn(2, 9, 48, requires_grad=True)
    leaves = [x] + [t for p in (gate, up, down) for t in p[1:] if t is not None]
    dy = torch.randn(2, 9, 48)
    y = gated_mlp(x, *projs, act="silu", recompute=recompute)
    assert y.grad_fn.__class__.__name__ == LoRAGatedMLPFunction.__name__ + "Backward"
    got = torch.autograd.grad(y, leaves, dy)
    ref = fp8_lora_linear(glu(fp8_lora_linear(x, *projs[0]), fp8_lora_linear(x, *projs[1]), "silu"), *projs[2])
    want = torch.autograd.grad(ref, leaves, dy)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_projections_of_one_input_quantize_it_once(triton_cpu, monkeypatch):
    """q, k and v over the same activation quantize it once (forward); gate and up once, also when they run
    again in backward; an in-place write, another tensor or a freed one is quantized afresh, and every result
    equals the uncached arithmetic."""
    from visiontune.kernels import fp8
    from visiontune.kernels.lora import gated_mlp

    calls = []
    real = fp8.rowwise_quantize
    monkeypatch.setattr(fp8, "rowwise_quantize", lambda x, cs=None: calls.append(cs is None) or real(x, cs))
    fp8._LAST_INPUT.clear()
    projs = [_fp8_params(48, 32, 4, True) for _ in range(3)]
    x = torch.randn(2, 5, 48, requires_grad=True)
    h = x * 1.0  # a non-leaf activation, as attention's normed input is
    ys = [fp8_lora_linear(h, *p, 1.5) for p in projs]
    assert calls == [True]  # one quantization of h for three projections
    for y, p in zip(ys, projs):  # the same values as quantizing afresh
        fp8._LAST_INPUT.clear()
        torch.testing.assert_close(y, fp8_lora_linear(h, *p, 1.5), atol=0, rtol=0)
    calls.clear()
    fp8._LAST_INPUT.clear()
    fp8_lora_linear(h, *projs[0], 1.5)
    with torch.no_grad():
        h.mul_(2.0)  # written in place: its version moves on, the FP8 copy is stale
    y2 = fp8_lora_linear(h, *projs[1], 1.5)
    assert calls == [True, True]
    fp8._LAST_INPUT.clear()
    torch.testing.assert_close(y2, fp8_lora_linear(h, *projs[1], 1.5), atol=0, rtol=0)
    tmp = torch.randn(3, 48)
    fp8_lora_linear(tmp, *projs[0], 1.5)
    assert "entry" in fp8._LAST_INPUT
    del tmp  # a freed input drops its FP8 copy with it
    assert not fp8._LAST_INPUT

    gate, up = _fp8_params(48, 80, 4, True), _fp8_params(48, 80, 4, False)
    down = _fp8_params(80, 48, 4, True)
    mlp = [(*p, 1.3) for p in (gate, up, down)]
    calls.clear()
    y = gated_mlp(h, *mlp, act="silu", recompute=True)
    assert calls == [True, True]  # x once for gate and up, h once for down
    y.sum().backward()
    # backward: gate and up run again from x (one quantization), then three dy quantizations (col-scaled)
    assert calls.count(True) == 3 and calls.count(False) == 3, calls
