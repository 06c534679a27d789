"""Shared helpers for the fused-kernel engine: when to take the fused path, launch sizing.

The kernels run on CUDA tensors. On the CPU they run only under ``TRITON_INTERPRET=1`` *and* when
forced (tests, the CPU convergence check), because the interpreter is ~1000x slower than the
pure-torch references that every op carries beside its kernel.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

try:  # triton is a Linux-only dependency; everything degrades to the torch references without it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

_FORCE_TRITON = False


def interpret_mode() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def force_triton(enabled: bool = True) -> Iterator[None]:
    """Route ops through the Triton kernels even for CPU tensors (needs ``TRITON_INTERPRET=1``).

    Internal switch for tests and the CPU convergence check; never needed on a GPU.
    """
    global _FORCE_TRITON
    old = _FORCE_TRITON
    _FORCE_TRITON = enabled
    try:
        yield
    finally:
        _FORCE_TRITON = old


def use_fused(t: torch.Tensor) -> bool:
    """Whether the op on tensor ``t`` takes its fused path (else its pure-torch reference).

    The fused path is the op's Triton kernels, except for :func:`~visiontune.kernels.lora.lora_linear`,
    whose fused Function is cuBLAS GEMMs only; all ops share this one gate: CUDA with Triton installed,
    or CPU tensors under ``TRITON_INTERPRET=1`` inside :func:`force_triton`.
    """
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    return _FORCE_TRITON and interpret_mode() and t.device.type == "cpu"


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def row_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel: enough threads to cover the row in 16-byte loads."""
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    if block >= 512:
        return 4
    return 2


def reduction_programs(n_rows: int, device: torch.device) -> int:
    """Programs for kernels that also reduce a per-column gradient (norm weights).

    Each program walks a strided set of rows and keeps a private fp32 partial sum of dW, so the
    partial buffer is (programs x D) instead of (rows x D); 4 programs per SM keeps the SMs busy.
    """
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, 4 * sms))
    return max(1, min(n_rows, 4))


def rows_per_program(n_rows: int, block: int) -> int:
    """Rows one program of a row-wise kernel handles (a power of two).

    On a GPU: enough rows that a program holds ~4K elements (1 row at D=3584, 2 at the vision towers'
    D=1280, 32 at a 128-wide head) so narrow rows do not leave most threads idle. Under the CPU
    interpreter the cost is per program, so it takes up to 64K elements at once.
    """
    budget = 65536 if interpret_mode() else 4096
    return max(1, min(next_pow2(n_rows), max(1, budget // block)))
