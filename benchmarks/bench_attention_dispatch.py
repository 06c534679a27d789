"""Host time of one varlen attention call (forward + backward): direct aten ops vs torch's varlen_attn.

Why this exists: at batch 1 the engine step is launch-bound (GPU busy ~30% of the step), and every
attention call goes through ``torch.library.custom_op`` dispatch when made via
``torch.nn.attention.varlen.varlen_attn``. ``kernels/attention.py`` calls the same aten flash kernels
from a plain ``autograd.Function`` instead; this script measures the difference at the shapes of the
Qwen2.5-VL-7B (1, 448, 512) benchmark config (vision windows and the LM's 768-token row).

    python benchmarks/bench_attention_dispatch.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from visiontune.kernels import attention as attn_mod

SHAPES = {  # name: (causal, Hq, Hkv, D, lengths)
    "vision_windows_448px": (False, 16, 16, 80, [64] * 16),
    "vision_full_448px": (False, 16, 16, 80, [1024]),
    "lm_768_tokens": (True, 28, 4, 128, [768]),
}


def _time(direct: bool, causal, hq, hk, d, lengths, iters: int) -> float:
    attn_mod.DIRECT_FLASH_OPS = direct
    t = sum(lengths)
    dev = torch.device("cuda")
    q, k, v = (torch.randn(t, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for h in (hq, hk, hk))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    dout = torch.randn(t, hq, d, device=dev, dtype=torch.bfloat16)

    def one() -> None:
        out = attn_mod.varlen_attention(q, k, v, cu, max(lengths), causal=causal, scale=d ** -0.5)
        out.backward(dout)

    for _ in range(10):
        one()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        one()
    host = (time.perf_counter() - t0) / iters  # host time per call: the launch-bound regime's cost
    torch.cuda.synchronize()
    return host


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available() or attn_mod._varlen_attn is None:
        raise SystemExit("needs CUDA and torch.nn.attention.varlen (PyTorch >= 2.10)")
    rows = []
    for name, shape in SHAPES.items():
        wrapped = _time(False, *shape, a.iters)
        direct = _time(True, *shape, a.iters)
        rows.append({"shape": name, "wrapped_us": wrapped * 1e6, "direct_us": direct * 1e6,
                     "saved_us": (wrapped - direct) * 1e6})
        print(f"{name:24s} varlen_attn {wrapped * 1e6:8.1f} us   direct {direct * 1e6:8.1f} us   "
              f"saved {(wrapped - direct) * 1e6:7.1f} us per fwd+bwd call")
    attn_mod.DIRECT_FLASH_OPS = True
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "attention_dispatch.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
