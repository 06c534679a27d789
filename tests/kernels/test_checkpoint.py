import pytest
import torch

from visiontune.kernels.checkpoint import checkpoint_modules


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU()) for _ in range(4)])


@pytest.mark.parametrize("mode", ["recompute", "offload"])
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
    assert counts["n"] == (2 if mode == "recompute" else 1)
    handle.remove()
    hook.remove()
    assert "forward" not in m[1].__dict__
    with torch.no_grad():  # no-grad calls bypass the wrapper entirely
        torch.testing.assert_close(m(x), m(x))


def test_checkpoint_rejects_unknown_mode():
    with pytest.raises(ValueError):
        checkpoint_modules([torch.nn.Linear(2, 2)], mode="swap")


def test_checkpoint_fraction_picks_layer_stacks():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from visiontune.kernels.checkpoint import checkpoint_fraction, layer_stacks

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
