"""One registry, one ``patch_model``: swaps visiontune's fused kernels into a transformers VLM.

Every supported architecture's kernel map is part of its entry in the architecture registry
(:data:`visiontune.models.archs.REGISTRY`, ``ArchSpec.kernels``, a
:class:`~visiontune.models.archspec.KernelMap`): which module classes are RMSNorms (and with which
convention), which are gated or plain MLPs (attribute names of their projections and activation), which
rotary-embedding modules compute Qwen's M-RoPE, which attention modules are Qwen-style text / vision
attention that can run packed varlen attention, and which modeling modules' ``apply_rotary_pos_emb`` may
be swapped. A single walker (:func:`patch_model`) applies it to any model; there is no per-model
``apply_*`` function.

Patching is reversible: module ``forward``s are replaced on *instances* (the class is untouched), the
few module-level function swaps are reference-counted, and :meth:`PatchHandle.unpatch` (or
:func:`unpatch_model`) restores everything. Patched forwards read their child modules at call time, so
patching may happen before PEFT wraps the Linear layers in LoRA layers (``FastVisionModel`` patches at
load time, ``get_peft_model`` comes later). Any call the fused path cannot serve (KV cache during
generation, LoRA dropout > 0 while training, DoRA, quantized or trainable base weights, dtype mismatch)
falls through to the original forward, so results never change beyond kernel tolerances. The one quantized
base served is bitsandbytes NF4 under a PEFT LoRA layer (:func:`nf4_base`: the NF4 LoRA Function of
:mod:`~visiontune.kernels.nf4_lora`, inside the patched blocks and, through :func:`patch_lora_layers`, on the
LoRA layers themselves).

The fused linear + cross-entropy wraps ``*ForConditionalGeneration.forward``: when ``labels`` are given,
the ``lm_head`` is bypassed for that call, the hidden states come back in place of the logits, and the
loss (causal shift, ignore_index -100, optional ``num_items_in_batch``) is computed chunk-wise. The
returned output then has ``logits=None``: no full-vocabulary logits are ever built.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from visiontune.kernels._common import use_fused
from visiontune.kernels.activations import ACTIVATIONS, act_reference
from visiontune.kernels.attention import varlen_attention
from visiontune.kernels.cross_entropy import fused_linear_cross_entropy
from visiontune.kernels.layernorm import layer_norm
from visiontune.kernels.lora import gated_mlp, lora_linear, plain_mlp
from visiontune.kernels.fp8 import fp8_base_weight
from visiontune.kernels.nf4 import NF4Weight, nf4_weight
from visiontune.kernels.rmsnorm import rms_norm
from visiontune.kernels.rope import (
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_vision,
    mrope_axis_map,
    mrope_cos_sin,
)
from visiontune.models.archs import REGISTRY
from visiontune.models.archspec import KernelMap
from visiontune.models.checkpointing import replaying
from visiontune.models.packing import longest_sequence
from visiontune.models.state import vision_state

# --------------------------------------------------------------------------------------------------
# handle


class PatchHandle:
    """What :func:`patch_model` changed; :meth:`unpatch` undoes it (idempotent)."""

    def __init__(self, model: nn.Module | None, model_type: str | None, active: bool) -> None:
        self.model_type = model_type
        self.active = active
        self.counts: dict[str, int] = {}
        self._undo: list[Callable[[], None]] = []
        self._model = model
        #: read by the patched MLPs at every call: True -> keep only inputs, rerun gate/up in backward
        self.recompute_mlp = False

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def unpatch(self) -> None:
        """Restore every patched forward and module-level function."""
        while self._undo:
            self._undo.pop()()
        if self._model is not None and vision_state(self._model).kernel_handle is self:
            vision_state(self._model).kernel_handle = None
        self.active = False

    def __repr__(self) -> str:
        return f"PatchHandle(model_type={self.model_type!r}, active={self.active}, counts={self.counts})"


def _set_forward(handle: PatchHandle, module: nn.Module, new: Callable, kind: str) -> None:
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = new

    def undo() -> None:
        if had:
            module.forward = old
        else:
            module.__dict__.pop("forward", None)

    handle._undo.append(undo)
    handle._count(kind)


_GLOBAL_SWAPS: dict[tuple[str, str], list[Any]] = {}  # (module, attr) -> [original, refcount]


def _swap_global(handle: PatchHandle, mod_name: str, attr: str, make: Callable[[Callable], Callable]) -> None:
    try:
        mod = importlib.import_module(mod_name)
    except Exception:
        return
    if not hasattr(mod, attr):
        return
    key = (mod_name, attr)
    if key in _GLOBAL_SWAPS:
        _GLOBAL_SWAPS[key][1] += 1
    else:
        orig = getattr(mod, attr)
        _GLOBAL_SWAPS[key] = [orig, 1]
        setattr(mod, attr, make(orig))

    def undo() -> None:
        entry = _GLOBAL_SWAPS.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            setattr(mod, attr, entry[0])
            del _GLOBAL_SWAPS[key]

    handle._undo.append(undo)
    handle._count("rope_function")


# --------------------------------------------------------------------------------------------------
# helpers used by the patched forwards


def _linear4bit_class() -> type | None:
    bnb = sys.modules.get("bitsandbytes")  # no Linear4bit can exist unless bitsandbytes was imported
    nn_mod = getattr(bnb, "nn", None) if bnb is not None else None
    return getattr(nn_mod, "Linear4bit", None) if nn_mod is not None else None


def nf4_base(base: nn.Module, x: torch.Tensor) -> NF4Weight | None:
    """The frozen NF4 weight of a bitsandbytes ``Linear4bit`` when the engine's NF4 LoRA path serves input
    ``x`` (:mod:`visiontune.kernels.nf4_lora`), else None (the layer keeps bitsandbytes' own path).

    Served: the engine's devices (:func:`~visiontune.kernels._common.use_fused`: CUDA; CPU tensors only
    under ``TRITON_INTERPRET=1`` in ``force_triton``), NF4 in bitsandbytes' plain layout (with or without
    double quantization), x in the layer's compute dtype and the weight's dequantize dtype. Not served:
    FP4, weights the CPU backend repacked for its AVX512-BF16 inference kernel (``packing_format_for_cpu``,
    see ``bnb_cpu.keep_cpu_4bit_differentiable``), and one-row inputs without grad (decoding), which
    bitsandbytes answers with its fused 4-bit GEMV instead of dequantizing the whole weight.
    """
    cls = _linear4bit_class()
    if cls is None or not isinstance(base, cls) or not use_fused(x):
        return None
    if x.numel() == x.shape[-1] and not x.requires_grad:
        return None
    w = base.weight
    if w.requires_grad or getattr(base, "compute_dtype", None) not in (None, x.dtype):
        return None
    q = nf4_weight(w)
    if q is None or q.dtype != x.dtype or q.device != x.device or q.shape[1] != x.shape[-1]:
        return None
    return q


def lora_params(module: nn.Module, x: torch.Tensor) -> tuple | None:
    """``(W, b, A, B, scale)`` of a plain ``nn.Linear`` or a single-adapter PEFT LoRA Linear, or None
    when the fused path cannot reproduce the module exactly (then the caller uses the module itself).

    A LoRA layer over a bitsandbytes NF4 ``Linear4bit`` gives an :class:`~visiontune.kernels.nf4.NF4Weight`
    as W where :func:`nf4_base` serves it (``lora_linear`` and the MLP ops hand it to
    :mod:`~visiontune.kernels.nf4_lora`); other 4-bit layers give None. A LoRA layer over a base that
    :func:`~visiontune.kernels.fp8.convert_fp8_base` put into FP8 gives its :class:`~visiontune.kernels.fp8.FP8Weight`.
    """
    if type(module) is nn.Linear:
        w = module.weight
        if w.requires_grad or w.dtype != x.dtype:
            return None
        return (w, module.bias, None, None, 1.0)
    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(module, "lora_A"):
        return None
    if type(base) is nn.Linear:
        w = base.weight
        if w.requires_grad:
            return None
        fp8 = fp8_base_weight(base)  # a base convert_fp8_base put into FP8: the FP8 LoRA Function serves it
        if fp8 is not None:
            if fp8.dtype != x.dtype:
                return None
            w = fp8
        elif w.dtype != x.dtype:
            return None
    else:
        w = nf4_base(base, x)
        if w is None:
            return None
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return (w, base.bias, None, None, 1.0)
    active = list(getattr(module, "active_adapters", []))
    adapters = [a for a in active if a in module.lora_A]
    if not adapters:
        return (w, base.bias, None, None, 1.0)
    if len(adapters) != 1:
        return None
    name = adapters[0]
    if getattr(module, "use_dora", {}).get(name, False):
        return None
    drop = module.lora_dropout[name]
    if module.training and isinstance(drop, nn.Dropout) and drop.p > 0:
        return None
    a_lin, b_lin = module.lora_A[name], module.lora_B[name]
    if type(a_lin) is not nn.Linear or type(b_lin) is not nn.Linear or a_lin.bias is not None or b_lin.bias is not None:
        return None
    return (w, base.bias, a_lin.weight, b_lin.weight, float(module.scaling[name]))


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    p = lora_params(module, x)
    if p is None:
        return module(x)
    return lora_linear(x, *p)


_ACT_CACHE: dict[type, str | None] = {}


def identify_activation(act: nn.Module) -> str | None:
    """Name (key of :data:`ACTIVATIONS`) of an activation module, found by probing it numerically.

    Robust to transformers renaming its activation classes; None if it matches none of ours.
    """
    cls = type(act)
    if cls in _ACT_CACHE:
        return _ACT_CACHE[cls]
    probe = torch.linspace(-6, 6, 97, dtype=torch.float64)
    found = None
    try:
        with torch.no_grad():
            got = act(probe)
        for name in ("silu", "gelu_pytorch_tanh", "gelu", "quick_gelu"):
            if torch.allclose(got, act_reference(probe, name), atol=1e-6, rtol=1e-6):
                found = name
                break
    except Exception:
        found = None
    _ACT_CACHE[cls] = found
    return found


def _bind(sig: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    try:
        ba = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    out = dict(ba.arguments)
    extra = {}
    for name, p in sig.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in out:
            extra = out.pop(name)
    out.update(extra)
    return out


_FALL_BACK = object()  # a fused forward's answer "not this call": the original forward runs instead


def _bound_forward(orig: Callable, fused: Callable[[dict[str, Any]], Any]) -> Callable:
    """A forward that binds each call's arguments to ``orig``'s signature (by name, ``**kwargs`` merged in)
    and returns ``fused(arguments)``; ``orig`` runs when the call does not bind or ``fused`` returns
    ``_FALL_BACK`` (a case the fused path does not serve)."""
    sig = inspect.signature(orig)

    def forward(*args: Any, **kwargs: Any):
        a = _bind(sig, args, kwargs)
        out = _FALL_BACK if a is None else fused(a)
        return orig(*args, **kwargs) if out is _FALL_BACK else out

    forward.__wrapped__ = orig  # inspect.signature (generate's model-kwargs check) sees orig's parameters
    return forward


# --------------------------------------------------------------------------------------------------
# patched forwards (factories close over the module and its original forward)


def _is_lora_over_4bit(m: nn.Module) -> bool:
    cls = _linear4bit_class()
    return cls is not None and hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None), cls)


def _nf4_lora_forward(m: nn.Module, orig: Callable) -> Callable:
    """Forward of a PEFT LoRA layer over a bitsandbytes 4-bit base: the NF4 LoRA Function for the calls
    :func:`lora_params` serves with an NF4 weight, PEFT's forward (``orig``) for every other call."""
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        p = None if (args or kwargs) else lora_params(m, x)
        if p is None or not isinstance(p[0], NF4Weight):
            return orig(x, *args, **kwargs)
        return lora_linear(x, *p)

    forward._vt_nf4_lora = True
    return forward


def _patch_nf4_lora(handle: PatchHandle, m: nn.Module) -> bool:
    if not _is_lora_over_4bit(m) or getattr(m.__dict__.get("forward"), "_vt_nf4_lora", False):
        return False
    _set_forward(handle, m, _nf4_lora_forward(m, m.forward), "nf4_lora")
    return True


def patch_lora_layers(model: nn.Module) -> int:
    """Give the LoRA layers over bitsandbytes 4-bit bases that PEFT added to an already patched ``model``
    the NF4 LoRA forward (``FastVisionModel.get_peft_model`` calls it: the patch is applied at load time,
    before those layers exist). The patched attention and MLP blocks find them without it; this covers the
    projections of every other module (cross-attention, unpatched attention). Undone by the model's
    :meth:`PatchHandle.unpatch`. Returns how many layers it patched (0 when ``model`` is not patched).
    """
    handle = vision_state(model).kernel_handle
    if handle is None or not handle.active:
        return 0
    return sum(_patch_nf4_lora(handle, m) for m in model.modules())


def _rmsnorm_forward(m: nn.Module, offset: float, cast: bool) -> Callable:
    eps = float(getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))

    def forward(x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, m.weight, eps, offset, cast)

    return forward


def _layernorm_forward(m: nn.LayerNorm) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, m.weight, m.bias, m.eps)

    return forward


def _mlp_forward(m: nn.Module, orig: Callable, names: tuple[str, ...], act: str, handle: PatchHandle,
                 kernel: Callable) -> Callable:
    """``kernel`` (:func:`gated_mlp`: gate, up, down projections; :func:`plain_mlp`: fc1, fc2) over the
    projections ``names`` of ``m``; ``orig`` for calls it does not serve."""
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        ps = [lora_params(getattr(m, n), x) for n in names]
        if args or kwargs or any(p is None for p in ps):
            return orig(x, *args, **kwargs)
        return kernel(x, *ps, act=act, recompute=handle.recompute_mlp and not replaying())

    return forward


def _mrope_forward(m: nn.Module, orig: Callable, interleaved: bool) -> Callable:
    half = int(m.inv_freq.shape[0])
    axis = mrope_axis_map(list(m.mrope_section), half, interleaved)

    def forward(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(m, "rope_type", "default") != "default":
            return orig(x, position_ids)
        pos = position_ids
        if pos.ndim == 2:
            pos = pos[None].expand(3, -1, -1)
        if pos.ndim != 3 or pos.shape[0] != 3:
            return orig(x, position_ids)
        return mrope_cos_sin(pos, m.inv_freq, axis, float(m.attention_scaling), x.dtype)

    return forward


def _text_attention_forward(m: nn.Module, orig: Callable) -> Callable:
    def fused(a: dict[str, Any]) -> Any:
        hs = a.get("hidden_states")
        cache = a.get("cache", a.get("past_key_values"))
        pe = a.get("position_embeddings")
        if (hs is None or cache is not None or pe is None or getattr(m, "sliding_window", None)
                or a.get("output_attentions")):
            return _FALL_BACK
        params = [lora_params(getattr(m, n), hs) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if any(p is None for p in params):
            return _FALL_BACK
        b, s, _ = hs.shape
        hd = m.head_dim
        q = lora_linear(hs, *params[0]).view(b, s, -1, hd)
        k = lora_linear(hs, *params[1]).view(b, s, -1, hd)
        v = lora_linear(hs, *params[2]).view(b, s, -1, hd)
        if hasattr(m, "q_norm"):
            q, k = m.q_norm(q), m.k_norm(k)
        cos, sin = pe
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        out = _causal_attention(q, k, v, a, getattr(m, "scaling", hd ** -0.5))
        return lora_linear(out.reshape(b, s, -1), *params[3]), None

    return _bound_forward(orig, fused)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: dict[str, Any],
                      scale: float) -> torch.Tensor:
    """Causal attention of (B, S, heads, head_dim) ``q``/``k``/``v`` for a text attention call's arguments
    ``a``: packed varlen (``cu_seq_lens_q``, one row), varlen over equal rows (no mask), or SDPA with
    transformers' 4-D mask (a padded batch). Returns (B, S, heads, head_dim)."""
    b, s, _, hd = q.shape
    cu = a.get("cu_seq_lens_q")
    mask = a.get("attention_mask")
    if cu is not None and b == 1:
        max_len = a.get("max_length_q")
        if max_len is None or torch.is_tensor(max_len):
            max_len = max_seqlen_of(cu)
        return varlen_attention(q.reshape(s, -1, hd), k.reshape(s, -1, hd), v.reshape(s, -1, hd), cu,
                                int(max_len), causal=True, scale=scale)
    if mask is None:
        cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
        return varlen_attention(q.reshape(b * s, -1, hd), k.reshape(b * s, -1, hd), v.reshape(b * s, -1, hd),
                                cu, s, causal=True, scale=scale)
    if mask.ndim == 4:
        mask = mask[:, :, :, :s]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)


_MAX_SEQLEN: dict[int, tuple[Any, int, int]] = {}  # id(cu) -> (weakref to cu, cu._version, value)


def max_seqlen_of(cu: torch.Tensor) -> int:
    """Longest sequence in ``cu_seqlens``, computed once per tensor (and per in-place change).

    Reading it is a GPU->CPU sync. A Qwen2.5-VL vision tower passes the same two ``cu_seqlens``
    tensors (windows, full) to all 32 blocks, and again when checkpointed blocks recompute: one sync per
    tensor instead of 63 per step, which matters when the step is launch-bound (config (1, 448, 512) of
    ``benchmarks/bench_engine.py``). Keyed by ``id`` plus a weak reference (a tensor's ``==`` is
    elementwise, so tensors cannot be dictionary keys compared by value).
    """
    if cu.is_inference():  # made under torch.inference_mode (generation): no version counter to key a cache on
        return longest_sequence(cu)
    hit = _MAX_SEQLEN.get(id(cu))
    if hit is not None and hit[0]() is cu and hit[1] == cu._version:
        return hit[2]
    value = longest_sequence(cu)
    if len(_MAX_SEQLEN) > 64:  # drop entries whose tensors are gone
        for key in [k for k, v in _MAX_SEQLEN.items() if v[0]() is None]:
            del _MAX_SEQLEN[key]
    _MAX_SEQLEN[id(cu)] = (weakref.ref(cu), cu._version, value)
    return value


def _vision_attention_forward(m: nn.Module, orig: Callable) -> Callable:
    def fused(a: dict[str, Any]) -> Any:
        hs, cu, pe = a.get("hidden_states"), a.get("cu_seqlens"), a.get("position_embeddings")
        if hs is None or cu is None or pe is None:
            return _FALL_BACK
        pq, pp = lora_params(m.qkv, hs), lora_params(m.proj, hs)
        if pq is None or pp is None:
            return _FALL_BACK
        s = hs.shape[0]
        q, k, v = lora_linear(hs, *pq).reshape(s, 3, m.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = pe
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        max_len = a.get("max_seqlen")
        if max_len is None or torch.is_tensor(max_len):
            max_len = max_seqlen_of(cu)
        hd = q.shape[-1]
        out = varlen_attention(q, k, v.contiguous(), cu, int(max_len), causal=False,
                               scale=getattr(m, "scaling", hd ** -0.5))
        return lora_linear(out.reshape(s, -1), *pp)

    return _bound_forward(orig, fused)


def _rope_function(orig: Callable) -> Callable:
    def apply(q, k, cos, sin, unsqueeze_dim=1):
        if (use_fused(q) and q.ndim == 4 and cos.ndim == 3 and unsqueeze_dim in (1, 2)
                and cos.shape[-1] == q.shape[-1] and q.shape[-1] % 2 == 0 and cos.shape == sin.shape
                and cos.dtype == q.dtype):
            return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
        return orig(q, k, cos, sin, unsqueeze_dim)

    apply.__wrapped__ = orig
    return apply


def _fused_ce_forward(model: nn.Module, orig: Callable) -> Callable:
    def forward(*args: Any, **kwargs: Any):
        labels = kwargs.get("labels")
        lm_head = getattr(model, "lm_head", None)
        text_cfg = getattr(model.config, "text_config", model.config)
        if (labels is None or type(lm_head) is not nn.Linear or lm_head.bias is not None
                or getattr(text_cfg, "final_logit_softcapping", None) is not None
                or kwargs.get("return_dict") is False or kwargs.get("shift_labels") is not None):
            return orig(*args, **kwargs)
        kw = dict(kwargs)
        kw["labels"] = None
        normalizer = kw.pop("num_items_in_batch", None)
        if kw.get("logits_to_keep", 0) not in (0, None):
            return orig(*args, **kwargs)
        lm_head.forward = lambda h: h  # this call only: hidden states come back as "logits"
        try:
            out = orig(*args, **kw)
        finally:
            lm_head.__dict__.pop("forward", None)
        hidden = out.logits
        if hidden is None or hidden.shape[-1] != lm_head.in_features:
            raise RuntimeError("fused cross-entropy: the model did not return hidden states through lm_head")
        hidden = hidden.to(lm_head.weight.dtype)
        shift = F.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)
        if normalizer is not None and not torch.is_tensor(normalizer):
            normalizer = torch.tensor(float(normalizer), device=hidden.device)
        out.loss = fused_linear_cross_entropy(hidden, lm_head.weight, shift, -100, normalizer,
                                              chunk_bytes=vision_state(model).loss_chunk_bytes)
        out.logits = None
        return out

    # generate() validates its model kwargs against inspect.signature(model.forward): without this a bare
    # (*args, **kwargs) hides pixel_values and friends and generation refuses them.
    forward.__wrapped__ = orig
    return forward


# --------------------------------------------------------------------------------------------------
# entry points


def _model_on_cuda(model: nn.Module) -> bool:
    for p in model.parameters():
        return p.is_cuda
    return False


def patch_model(model: nn.Module, enabled: bool | None = None, *, fused_cross_entropy: bool = True,
                attention: bool = True, recompute_mlp: bool = False) -> PatchHandle:
    """Patch the fused kernels into ``model`` (a transformers VLM, optionally PEFT-wrapped).

    ``enabled=None``: on when CUDA is available and the model's parameters are on CUDA; ``False``: a
    no-op (returns an inactive handle); ``True``: patch even on the CPU (the patched forwards then run
    the torch references, or the Triton kernels under ``TRITON_INTERPRET=1`` with ``force_triton``).
    Unsupported architectures get a warning and an inactive handle. Patching twice returns the
    existing handle. ``recompute_mlp=True`` (also settable later as ``handle.recompute_mlp``): the fused
    MLPs keep only their input and rank-r products and run the up/gate (fc1) GEMMs again in backward
    (``kernels.lora.gated_mlp``): less activation memory than storing them, far cheaper than recomputing
    whole layers.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if enabled is None:
        enabled = torch.cuda.is_available() and _model_on_cuda(model)
    if not enabled:
        return PatchHandle(None, model_type, active=False)
    existing = vision_state(model).kernel_handle
    if existing is not None and existing.active:
        return existing
    arch = REGISTRY.get(model_type)
    if arch is None:
        warnings.warn(f"visiontune.kernels: no kernel map for model_type {model_type!r}; running unpatched "
                      f"(supported: {', '.join(REGISTRY)})", stacklevel=2)
        return PatchHandle(None, model_type, active=False)
    handle = PatchHandle(model, model_type, active=True)
    handle.recompute_mlp = bool(recompute_mlp)
    _patch_modules(model, arch.kernels, handle, attention=attention, fused_cross_entropy=fused_cross_entropy)
    for mod_name in arch.kernels.rope_modules:
        _swap_global(handle, mod_name, "apply_rotary_pos_emb", _rope_function)
    vision_state(model).kernel_handle = handle
    return handle


def _patch_modules(model: nn.Module, kmap: KernelMap, handle: PatchHandle, *, attention: bool,
                   fused_cross_entropy: bool) -> None:
    """Swap the fused forward in on every module of ``model`` that the kernel map ``kmap`` names."""
    ce_done = False
    for m in model.modules():
        cls = type(m).__name__
        if _patch_nf4_lora(handle, m):  # model already PEFT-wrapped: its LoRA layers over 4-bit bases
            continue
        if cls in kmap.rms_norms and isinstance(getattr(m, "weight", None), torch.Tensor):
            offset, cast = kmap.rms_norms[cls]
            _set_forward(handle, m, _rmsnorm_forward(m, offset, cast), "rms_norm")
        elif kmap.layer_norms and isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 \
                and m.weight is not None and m.bias is not None:
            _set_forward(handle, m, _layernorm_forward(m), "layer_norm")
        elif cls in kmap.gated_mlps:
            g, u, d, act_attr = kmap.gated_mlps[cls]
            act = identify_activation(getattr(m, act_attr))
            if act is not None:
                _set_forward(handle, m, _mlp_forward(m, m.forward, (g, u, d), act, handle, gated_mlp), "gated_mlp")
        elif cls in kmap.plain_mlps:
            f1, f2, act_attr = kmap.plain_mlps[cls]
            act = identify_activation(getattr(m, act_attr))
            if act is not None:
                _set_forward(handle, m, _mlp_forward(m, m.forward, (f1, f2), act, handle, plain_mlp), "plain_mlp")
        elif cls in kmap.mrope_rotary and hasattr(m, "mrope_section") and hasattr(m, "inv_freq"):
            _set_forward(handle, m, _mrope_forward(m, m.forward, kmap.mrope_rotary[cls]), "mrope")
        elif attention and cls in kmap.text_attention:
            _set_forward(handle, m, _text_attention_forward(m, m.forward), "text_attention")
        elif attention and cls in kmap.vision_attention and hasattr(m, "qkv"):
            _set_forward(handle, m, _vision_attention_forward(m, m.forward), "vision_attention")
        elif (fused_cross_entropy and kmap.fused_cross_entropy and not ce_done
              and cls.endswith("ForConditionalGeneration") and isinstance(getattr(m, "lm_head", None), nn.Linear)):
            _set_forward(handle, m, _fused_ce_forward(m, m.forward), "fused_cross_entropy")
            ce_done = True


def unpatch_model(model: nn.Module) -> None:
    """Undo :func:`patch_model` on ``model`` (no-op if it was not patched)."""
    handle = vision_state(model).kernel_handle
    if handle is not None:
        handle.unpatch()


__all__ = ["ACTIVATIONS", "PatchHandle", "identify_activation",
           "lora_params", "nf4_base", "patch_lora_layers", "patch_model", "unpatch_model"]
