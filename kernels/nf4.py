"""NF4 dequantization: one Triton pass from bitsandbytes' packed 4-bit weight to a bf16/fp16/fp32 matrix.

The layout read is bitsandbytes' (``bnb.nn.Params4bit`` + its ``QuantState``, ``quant_type="nf4"``):

* the (N, K) weight, flattened row-major, is cut into blocks of ``blocksize`` (64) elements; element
  ``i`` is ``code[nibble_i] * absmax[i // blocksize]`` with ``code`` the 16-entry NF4 table;
* two nibbles a byte, **element 2j in the high nibble** of byte j, element 2j+1 in the low one; the
  flat layout ignores rows (an odd K splits bytes across rows), a last odd element leaves a low nibble
  unused, and the last block may be short;
* with double quantization (``bnb_4bit_use_double_quant``, ``QuantState.nested``) ``absmax`` itself is
  stored as uint8 codes into an 8-bit table (``state2.code``), in blocks of ``state2.blocksize`` (256)
  with their own fp32 scales (``state2.absmax``) and one fp32 ``offset`` added back:
  ``absmax[b] = state2.code[q[b]] * state2.absmax[b // 256] + offset``.

All of it is computed in fp32 and rounded once to the output dtype, as bitsandbytes' dequantize does (on
the CPU interpreter the last fp32 -> bf16 rounding truncates, an interpreter limitation: numpy has no bf16;
fp32 and fp16 outputs are bit-exact against bitsandbytes there, tests/kernels/test_nf4.py).
The kernel walks whole 64-blocks (one absmax decode per block, not per element) and writes each
block's two nibble halves interleaved back to contiguous memory. :func:`nf4_dequantize_reference` is
the pure-torch version of the same arithmetic, written from the layout above.

:class:`NF4Weight` gathers the tensors of one quantized weight (validated: NF4, 2-D, bitsandbytes'
plain layout, not the CPU backend's AVX512 repacking) so the engine can pass it where a weight goes;
:func:`nf4_weight` builds it from a ``Linear4bit``'s weight, or answers None when the layout is not one
this kernel reads (the caller then keeps bitsandbytes' own path).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from visiontune.kernels._common import HAS_TRITON, interpret_mode, use_fused

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _nf4_dequant(Q, ABSMAX, ABSMAX2, CODE2, OFFSET, CODE, OUT, n, n_blocks,
                     BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, NB: tl.constexpr):
        # NB quantization blocks of BS elements per program; a block is BS // 2 bytes.
        half: tl.constexpr = BS // 2
        blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
        bmask = blk < n_blocks
        if NESTED:
            qa = tl.load(ABSMAX + blk, mask=bmask, other=0).to(tl.int32)
            a = tl.load(CODE2 + qa, mask=bmask, other=0.0) * tl.load(ABSMAX2 + blk // BS2, mask=bmask, other=0.0)
            a = a + tl.load(OFFSET)
        else:
            a = tl.load(ABSMAX + blk, mask=bmask, other=0.0).to(tl.float32)
        byte = blk[:, None] * half + tl.arange(0, half)[None, :]  # (NB, half) byte index
        q = tl.load(Q + byte, mask=byte * 2 < n, other=0).to(tl.int32)
        hi = tl.load(CODE + (q >> 4)) * a[:, None]  # element 2j
        lo = tl.load(CODE + (q & 15)) * a[:, None]  # element 2j + 1
        w = tl.interleave(hi, lo)  # (NB, BS): elements in memory order
        elem = blk[:, None] * BS + tl.arange(0, BS)[None, :]
        tl.store(OUT + elem, w.to(OUT.dtype.element_ty), mask=elem < n)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NF4Weight:
    """The tensors of one bitsandbytes NF4 weight, as the kernel reads them (built by :func:`nf4_weight`).

    ``packed``: flat uint8 bytes; ``absmax``: fp32 per block, or uint8 codes when ``nested``;
    ``absmax2``/``code2``/``offset``: the double-quantization state (None unless nested); ``code``: the
    16 NF4 values (fp32); ``shape``: (out_features, in_features); ``dtype``: the dtype bitsandbytes
    dequantizes to (``QuantState.dtype``).
    """

    __slots__ = ("packed", "absmax", "absmax2", "code2", "offset", "code", "blocksize", "blocksize2", "shape",
                 "dtype")

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                 shape: tuple[int, int], dtype: torch.dtype, absmax2: torch.Tensor | None = None,
                 code2: torch.Tensor | None = None, offset: torch.Tensor | None = None, blocksize2: int = 256):
        self.packed, self.absmax, self.code = packed, absmax, code
        self.absmax2, self.code2, self.offset = absmax2, code2, offset
        self.blocksize, self.blocksize2 = int(blocksize), int(blocksize2)
        self.shape, self.dtype = (int(shape[0]), int(shape[1])), dtype

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    # The fused LoRA MLP Functions take it through mm/dx: they keep neither h nor (with recompute) g and u,
    # which the 4-bit step needs most, since it runs under the smallest budgets.
    fused_mlp = True

    def mm(self, x2: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """``x2 W^T + b`` (dequantized into a shared workspace, then cuBLAS)."""
        from visiontune.kernels.nf4_lora import nf4_mm

        return nf4_mm(self, x2, b)

    def dx(self, dy2: torch.Tensor) -> torch.Tensor:
        """``dy2 W`` (dequantized into the workspace again)."""
        from visiontune.kernels.nf4_lora import nf4_dx

        return nf4_dx(self, dy2)

    def lora_linear(self, x: torch.Tensor, b: torch.Tensor | None, a: torch.Tensor | None,
                    bm: torch.Tensor | None, scale: float) -> torch.Tensor:
        """``x dequant(W)^T + b + scale (x A^T) B^T`` (how :func:`~visiontune.kernels.lora.lora_linear`
        applies a quantized base it is handed)."""
        from visiontune.kernels.nf4_lora import nf4_lora_linear

        return nf4_lora_linear(x, self, b, a, bm, scale)

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={self.shape}, blocksize={self.blocksize}, nested={self.nested}, "
                f"dtype={self.dtype}, device={self.device})")


def _state_from_quant_state(packed: torch.Tensor, qs: Any) -> NF4Weight | None:
    if (getattr(qs, "quant_type", None) != "nf4" or getattr(qs, "packing_format_for_cpu", False)
            or qs.shape is None or len(qs.shape) != 2 or qs.dtype not in _DTYPES):
        return None
    bs = int(qs.blocksize)
    if bs < 2 or bs & (bs - 1) or bs > 4096:
        return None
    shape = (int(qs.shape[0]), int(qs.shape[1]))
    n = shape[0] * shape[1]
    if packed.dtype != torch.uint8:  # quant_storage other than uint8 (FSDP): the same bytes, viewed
        if not packed.is_contiguous():
            return None
        packed = packed.view(torch.uint8)
    if not packed.is_contiguous() or packed.numel() != (n + 1) // 2 or n >= 2**31:
        return None
    packed = packed.view(-1)
    n_blocks = math.ceil(n / bs)
    code, absmax = qs.code, qs.absmax
    dev = packed.device
    if (code is None or code.numel() != 16 or code.dtype != torch.float32 or absmax is None
            or absmax.numel() != n_blocks):
        return None
    tensors = [code, absmax]
    if getattr(qs, "nested", False):
        s2 = qs.state2
        if (absmax.dtype != torch.uint8 or s2 is None or s2.code is None or s2.code.numel() != 256
                or s2.code.dtype != torch.float32 or s2.absmax.dtype != torch.float32 or qs.offset is None):
            return None
        bs2 = int(s2.blocksize)
        offset = qs.offset if torch.is_tensor(qs.offset) else torch.tensor(float(qs.offset), device=dev)
        if offset.dtype != torch.float32 or offset.numel() != 1 or s2.absmax.numel() != math.ceil(n_blocks / bs2):
            return None
        tensors += [s2.absmax, s2.code, offset]
        if any(t.device != dev or not t.is_contiguous() for t in tensors):
            return None
        return NF4Weight(packed, absmax.view(-1), code, bs, shape, qs.dtype, absmax2=s2.absmax.view(-1),
                         code2=s2.code, offset=offset.reshape(1), blocksize2=bs2)
    if absmax.dtype != torch.float32 or any(t.device != dev or not t.is_contiguous() for t in tensors):
        return None
    return NF4Weight(packed, absmax.view(-1), code, bs, shape, qs.dtype)


def nf4_weight(weight: Any, quant_state: Any = None) -> NF4Weight | None:
    """An :class:`NF4Weight` over a bitsandbytes 4-bit weight (``Params4bit``, its ``quant_state`` or the
    one given), or None when it is not NF4 in bitsandbytes' plain layout (FP4; the CPU backend's
    AVX512-BF16 repacking, ``packing_format_for_cpu``; no quant state yet; tensors on different devices).

    The result is cached on the weight and rebuilt when its storage or quant state changes.
    """
    qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
    if qs is None or not torch.is_tensor(weight):
        return None
    key = (id(qs), weight.data_ptr(), weight.device, getattr(qs, "packing_format_for_cpu", False),
           getattr(qs, "nested", False), getattr(qs, "quant_type", None), getattr(qs, "dtype", None))
    cached = getattr(weight, "_vt_nf4", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    state = _state_from_quant_state(weight.detach(), qs)
    try:
        weight._vt_nf4 = (key, state)
    except Exception:  # a tensor that takes no attributes: just do not cache
        pass
    return state


def nf4_dequantize_reference(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure torch: the (N, K) weight in ``dtype`` (default ``w.dtype``), computed in fp32."""
    dtype = dtype or w.dtype
    n = w.numel
    byte = w.packed.to(torch.int64)
    nibbles = torch.stack((byte >> 4, byte & 15), dim=1).reshape(-1)[:n]
    if w.nested:
        nb = w.absmax.numel()
        scale2 = w.absmax2.repeat_interleave(w.blocksize2)[:nb]
        absmax = w.code2[w.absmax.to(torch.int64)] * scale2 + w.offset
    else:
        absmax = w.absmax.float()
    vals = w.code[nibbles] * absmax.repeat_interleave(w.blocksize)[:n]
    return vals.reshape(w.shape).to(dtype)


def _blocks_per_program(blocksize: int) -> int:
    # ~4K elements a program on a GPU; the CPU interpreter pays per program, so 64K there
    budget = 65536 if interpret_mode() else 4096
    return max(1, budget // blocksize)


def nf4_dequantize_kernel(w: NF4Weight, dtype: torch.dtype | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Raw launcher: the (N, K) weight in ``dtype`` (default ``w.dtype``), into ``out`` if given (any
    contiguous tensor of N*K elements of that dtype, e.g. a reused workspace)."""
    dtype = dtype or w.dtype
    if dtype not in _DTYPES:
        raise ValueError(f"nf4 dequantize: output dtype {dtype} is not one of {_DTYPES}")
    n = w.numel
    if out is None:
        out = torch.empty(w.shape, dtype=dtype, device=w.device)
    elif out.dtype != dtype or out.numel() != n or not out.is_contiguous() or out.device != w.device:
        raise ValueError(f"nf4 dequantize: out must be a contiguous {dtype} tensor of {n} elements on {w.device}")
    if n == 0:
        return out.view(w.shape)
    n_blocks = w.absmax.numel()
    nb = _blocks_per_program(w.blocksize)
    if w.nested:
        absmax2, code2, offset = w.absmax2, w.code2, w.offset
    else:  # unused pointers (NESTED=False compiles their loads away)
        absmax2 = code2 = offset = w.code
    _nf4_dequant[(triton.cdiv(n_blocks, nb),)](
        w.packed, w.absmax, absmax2, code2, offset, w.code, out, n, n_blocks,
        BS=w.blocksize, BS2=w.blocksize2, NESTED=w.nested, NB=nb, num_warps=4,
        # no FMA contraction of code2 * absmax2 + offset: bitsandbytes rounds the product before the add, and
        # one ulp of a block scale shows in fp32 outputs (memory-bound kernel: costs nothing)
        enable_fp_fusion=False)
    return out.view(w.shape)


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (N, K) weight in ``dtype``: the Triton kernel on the engine's devices, the torch reference
    elsewhere (see :func:`~visiontune.kernels._common.use_fused`)."""
    if use_fused(w.packed):
        return nf4_dequantize_kernel(w, dtype, out)
    ref = nf4_dequantize_reference(w, dtype)
    if out is not None:
        return out.view(w.shape).copy_(ref)
    return ref


__all__ = ["NF4Weight", "nf4_dequantize", "nf4_dequantize_kernel", "nf4_dequantize_reference", "nf4_weight"]
