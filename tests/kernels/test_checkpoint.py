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
