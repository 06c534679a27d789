"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` kernel of visiontune.kernels is *decorated*
(Triton picks interpreter vs compiler at decoration time), hence at the very top of this conftest. It
is ``setdefault``: on a GPU machine run ``TRITON_INTERPRET=0 pytest -m gpu tests/kernels`` to compile
the kernels for real. If a test outside this folder imported visiontune.kernels first in the same
process, the ``triton_cpu`` fixture fails loudly instead of silently comparing reference to reference.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _kernels_are_interpreted() -> bool:
    from visiontune.kernels import rmsnorm

    return type(rmsnorm._rmsnorm_fwd).__name__ == "InterpretedFunction"


@pytest.fixture
def triton_cpu():
    """Route ops through the Triton kernels on CPU tensors (interpreter). Fails if that is impossible."""
    from visiontune.kernels._common import HAS_TRITON, force_triton, interpret_mode

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not interpret_mode():
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 (GPU runs use -m gpu with TRITON_INTERPRET=0)")
    if not _kernels_are_interpreted():
        pytest.fail("visiontune.kernels was imported before TRITON_INTERPRET=1 was set: the kernels were "
                    "compiled for a GPU, not interpreted. Export TRITON_INTERPRET=1 for the whole run.")
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh random inputs each run
    with force_triton(True):
        yield


@pytest.fixture
def cuda_device():
    """Skip unless a CUDA GPU is present and the kernels are compiled (not interpreted)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if _kernels_are_interpreted():
        pytest.skip("GPU tests need TRITON_INTERPRET=0")
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return torch.device("cuda")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


_GPU_ERRORS: list[tuple[str, str, float, float]] = []


def adamw_losses(model, batch, params, steps: int = 4, lr: float = 5e-3) -> list[float]:
    """The loss of each of ``steps`` AdamW steps on one batch (the tiny models' "it trains" checks)."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        losses.append(float(loss.detach()))
        optimizer.step()
        optimizer.zero_grad()
    return losses


def record_gpu_error(op: str, what: str, err: float, bound: float) -> None:
    """Keep a GPU test's relative error for the summary table printed at the end of the run."""
    _GPU_ERRORS.append((op, what, err, bound))


def pytest_terminal_summary(terminalreporter):
    if not _GPU_ERRORS:
        return
    terminalreporter.write_line("GPU relative errors (||out - ref|| / ||ref||, bf16 kernel vs fp32 reference):")
    for op, what, err, bound in _GPU_ERRORS:
        terminalreporter.write_line(f"  {op:<28} {what:<14} {err:.2e}  (bound {bound:.0e})")
    path = os.environ.get("VT_GPU_ERRORS_JSON")
    if path:
        import json

        with open(path, "w") as f:
            json.dump([dict(op=o, what=w, rel_err=e, bound=b) for o, w, e, b in _GPU_ERRORS], f, indent=1)
