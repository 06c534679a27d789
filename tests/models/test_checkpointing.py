import pytest
import torch

from visiontune.models.checkpointing import checkpoint_modules


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU()) for _ in range(4)])


@pytest.mark.parametrize("mode", ["recompute", "recompute_offload", "offload"])
def test_checkpoint_same_grads_and_reversible(mode):
    m = _model()
    x = torch.randn(5, 16)
    ref = [g.clone() for g in torch.autograd.grad(m(x).square().sum(), list(m.parameters()))]
    counts = {"n": 0}
    hook = m[1][0].register_forward_hook(lambda *a: counts.__setitem__("n", counts["n"] + 1))
    handle = checkpoint_modules([m[1], m[2]], mode=mode)
    assert len(handle) == 2 and "forward" in m[1].__dict__
    got = torch.autograd.grad(m(x).square().sum(), list(m.parameters()))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)
    # recompute runs the wrapped module's forward again during backward (hook fires twice)
    assert counts["n"] == (1 if mode == "offload" else 2)
    handle.remove()
    hook.remove()
    assert "forward" not in m[1].__dict__
    with torch.no_grad():  # no-grad calls bypass the wrapper entirely
        torch.testing.assert_close(m(x), m(x))


@pytest.mark.parametrize("shape", [(1, 16), (7, 3, 16)])
def test_recompute_offload_backward_matches_and_input_grad(shape):
    # float32, atol/rtol 1e-6: the same ops recomputed on a bit-exact copy of the input.
    torch.manual_seed(1)
    m = _model()
    x0 = torch.randn(*shape)
    ref_x = x0.clone().requires_grad_(True)
    m(ref_x).tanh().sum().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    m[0].requires_grad_(False)  # frozen parts get no grad, as in LoRA
    handle = checkpoint_modules(list(m), mode="recompute_offload")
    x = x0.clone().requires_grad_(True)
    m(x).tanh().sum().backward()
    handle.remove()
    torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-6, rtol=1e-6)
    for n, p in m.named_parameters():
        if n.startswith("0."):
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-6, msg=n)


def test_recompute_offload_falls_back_when_another_input_needs_grad():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, scale):
            return self.lin(x) * scale

    torch.manual_seed(2)
    mod = Two()
    x, s = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    ref = torch.autograd.grad(mod(x, s).sum(), (x, s))
    handle = checkpoint_modules([mod], mode="recompute_offload")
    got = torch.autograd.grad(mod(x, scale=s).sum(), (x, s))  # `scale` needs grad: plain checkpoint path
    handle.remove()
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["recompute", "recompute_offload"])
def test_recompute_replays_dropout_masks(mode):
    # Dropout inside a recomputed layer must draw the same mask again, or the gradients are wrong.
    torch.manual_seed(3)
    m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 32), torch.nn.Dropout(0.3))
    x = torch.randn(9, 32)
    torch.manual_seed(11)
    ref = torch.autograd.grad(m(x).pow(2).sum(), list(m.parameters()))
    handle = checkpoint_modules([m], mode=mode)
    torch.manual_seed(11)
    out = m(x)
    torch.randn(100)  # RNG moves on between forward and backward, as in training
    got = torch.autograd.grad(out.pow(2).sum(), list(m.parameters()))
    handle.remove()
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)


def test_recompute_handles_tuple_returning_modules():
    class TupleOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 6)

        def forward(self, x):
            return (self.lin(x).tanh(),)

    torch.manual_seed(4)
    mod = TupleOut()
    x = torch.randn(2, 6, requires_grad=True)
    ref = torch.autograd.grad(mod(x)[0].sum(), (x, *mod.parameters()))
    handle = checkpoint_modules([mod], mode="recompute")
    for _ in range(2):  # first call discovers the tuple, second goes straight to torch's checkpoint
        got = torch.autograd.grad(mod(x)[0].sum(), (x, *mod.parameters()))
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)
    assert mod._vt_heavy_checkpoint
    handle.remove()


def test_recompute_refuses_an_input_changed_in_place():
    torch.manual_seed(5)
    lin = torch.nn.Linear(4, 4)
    handle = checkpoint_modules([lin], mode="recompute")
    x = torch.randn(3, 4).requires_grad_(True)
    h = x * 1.0
    out = lin(h)
    h.add_(1.0)  # the kept layer input changes before backward: recomputing from it would be wrong
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    handle.remove()


def test_checkpoint_rejects_unknown_mode():
    with pytest.raises(ValueError):
        checkpoint_modules([torch.nn.Linear(2, 2)], mode="swap")


def test_checkpoint_fraction_picks_layer_stacks():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from visiontune.models.checkpointing import checkpoint_fraction, layer_stacks

    cfg = Qwen2_5_VLConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                            num_attention_heads=2, num_key_value_heads=1, vocab_size=64),
                           vision_config=dict(depth=3, hidden_size=16, num_heads=2, intermediate_size=32,
                                              out_hidden_size=32, fullatt_block_indexes=[0]))
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    vision, lm = layer_stacks(model)
    assert len(vision) == 3 and len(lm) == 4
    handle = checkpoint_fraction(model, lm_fraction=0.5, vision_fraction=1.0)
    assert len(handle) == 3 + 2
    assert "forward" in lm[1].__dict__ and "forward" not in lm[2].__dict__
    handle.remove()
    assert all("forward" not in m.__dict__ for m in vision + lm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recompute_offload_gpu_frees_layer_inputs_same_grads():
    # bf16 at a real LM width: grads equal to plain recomputation (same kernels, same inputs; atol 0),
    # and between forward and backward the GPU holds no layer inputs (each 8192 x 3584 bf16 = 56 MiB).
    torch.manual_seed(0)
    dev, n_layers = torch.device("cuda"), 6
    blocks = [torch.nn.Sequential(torch.nn.Linear(3584, 3584), torch.nn.SiLU()).to(dev, torch.bfloat16) for _ in range(n_layers)]
    model = torch.nn.Sequential(*blocks)
    x0 = torch.randn(8192, 3584, device=dev, dtype=torch.bfloat16)

    def run(mode):
        model.zero_grad(set_to_none=True)
        handle = checkpoint_modules(blocks, mode=mode)
        x = x0.clone().requires_grad_(True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = model(x)
        held = torch.cuda.memory_allocated() - before
        out.float().square().mean().backward()
        handle.remove()
        return held, x.grad.clone(), [p.grad.clone() for p in model.parameters()]

    held_gpu, gx_gpu, gp_gpu = run("recompute")
    held_cpu, gx_cpu, gp_cpu = run("recompute_offload")
    layer_input = 8192 * 3584 * 2
    assert held_gpu - held_cpu >= (n_layers - 1) * layer_input, (held_gpu, held_cpu)
    torch.testing.assert_close(gx_cpu, gx_gpu, atol=0, rtol=0)
    for a, b in zip(gp_cpu, gp_gpu):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["recompute", "recompute_offload"])
def test_replaying_is_true_only_inside_the_backward_recomputation(mode):
    """The patched MLPs read replaying() to skip their own gate/up recompute inside a replayed layer."""
    from visiontune.models.checkpointing import replaying

    seen: list[bool] = []

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(6, 6)

        def forward(self, x):
            seen.append(replaying())
            return self.lin(x).tanh()

    layer = Probe()
    handle = checkpoint_modules([layer], mode=mode)
    x = torch.randn(3, 6, requires_grad=True)
    layer(x).sum().backward()
    handle.remove()
    assert seen == [False, True] and not replaying()
    assert layer.lin.weight.grad is not None and layer.lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "mllama", "gemma3"])  # three text-model families
def test_from_pretrained_checkpointing_gives_the_gradients_of_none(arch, tiny_model_dir):
    """use_gradient_checkpointing=True straight after from_pretrained + get_peft_model (no for_training: TRL
    users call trainer.train() directly) gives the gradients of False. A KV cache left on in the text config
    made every recomputed layer attend to the forward's detached keys/values: no gradient reached the k/v
    projections or the vision tower."""
    import numpy as np
    from PIL import Image

    from visiontune import FastVisionModel, VisionDataCollator

    image = Image.fromarray((np.random.RandomState(0).rand(60, 60, 3) * 255).astype("uint8"))
    sample = {"messages": [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Read."}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "42"}]}]}
    grads = {}
    for mode in (True, False):
        model, processor = FastVisionModel.from_pretrained(tiny_model_dir(arch), use_gradient_checkpointing=mode)
        model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model.train()
        model(**VisionDataCollator(model, processor)([sample, sample])).loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, ref in grads[False].items():
        torch.testing.assert_close(grads[True][name], ref, atol=1e-6, rtol=1e-4, msg=lambda m: f"{arch} {name}: {m}")
