"""Selective activation checkpointing, with CPU offload as the alternative to recomputation.

For LoRA, full recomputation costs a whole extra forward: backward of a frozen-base model is about one
forward (activation grads only, no weight grads), so ``fwd + recompute + bwd`` is 3 units of work
instead of 2 (+50%). visiontune therefore stores activations for as many layers as the memory budget
allows and only checkpoints (or offloads to pinned CPU memory) the rest. This module is the small
utility that wraps chosen modules' ``forward`` reversibly; ``FastVisionModel``'s
``use_gradient_checkpointing`` drives it. Plain torch, no Triton: it works with or without the fused
kernels (whose patched MLPs read :func:`replaying`).

Three modes per wrapped module:

* ``recompute``: keep only the layer input (on the GPU) and run the layer again in backward.
* ``recompute_offload``: recompute too, but the layer input (the only tensor a checkpointed layer keeps)
  waits in pinned CPU memory, copied on the compute stream so no sync is needed. For the lowest memory:
  at Qwen2.5-VL-7B shapes those inputs are 7 KiB per token per LM layer (1.2 GiB for 28 layers at 6.6k
  tokens) plus 2.5 KiB per patch per vision block (1.4 GiB at 18k patches), benchmark config (8, 672, 256).
* ``offload``: no recomputation; everything autograd saves inside the module goes to pinned CPU memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class CheckpointHandle:
    """Restores the original ``forward`` of every wrapped module on :meth:`remove`."""

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Module, object, bool]] = []
        self._undo: list[Callable[[], object]] = []

    def on_remove(self, undo: Callable[[], object]) -> None:
        """Also call ``undo`` on :meth:`remove` (a setting installed with the wrapped modules)."""
        self._undo.append(undo)

    def _add(self, module: nn.Module, had_instance_forward: bool, old: object) -> None:
        self._saved.append((module, old, had_instance_forward))

    def remove(self) -> None:
        for module, _, _ in self._saved:
            module.__dict__.pop("_vt_trainable", None)
        for module, old, had in reversed(self._saved):
            if had:
                module.forward = old
            else:
                module.__dict__.pop("forward", None)
        self._saved.clear()
        while self._undo:
            self._undo.pop()()

    def __len__(self) -> int:
        return len(self._saved)


def checkpoint_modules(modules: Iterable[nn.Module], mode: str = "recompute") -> CheckpointHandle:
    """Wrap each module's forward: ``mode='recompute'`` (keep only the input, recompute in backward),
    ``'recompute_offload'`` (the same with the input in pinned CPU memory) or ``'offload'`` (keep
    everything, but in pinned CPU memory). Modules whose call does not fit the light path (another
    input needing grad, or not returning one tensor) use ``torch.utils.checkpoint`` (non-reentrant).

    Only active while grad is enabled, so evaluation/generation is untouched.
    """
    if mode not in ("recompute", "recompute_offload", "offload"):
        raise ValueError(f"mode must be 'recompute', 'recompute_offload' or 'offload', got {mode!r}")
    handle = CheckpointHandle()
    for m in modules:
        had = "forward" in m.__dict__
        orig = m.forward

        def wrapped(*args, __orig=orig, __mod=m, **kwargs):
            if not torch.is_grad_enabled():
                return __orig(*args, **kwargs)
            if mode == "offload":
                with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                    return __orig(*args, **kwargs)
            if _offloadable(args, kwargs) and not getattr(__mod, "_vt_heavy_checkpoint", False):
                try:
                    return _recompute(__mod, __orig, args, kwargs, offload=mode == "recompute_offload")
                except _NotOneTensor:  # remember, and use torch's checkpoint for this module from now on
                    __mod._vt_heavy_checkpoint = True
            return checkpoint(__orig, *args, use_reentrant=False, **kwargs)

        m.forward = wrapped
        handle._add(m, had, orig if had else None)
    return handle


def _offloadable(args: tuple, kwargs: dict) -> bool:
    """Our light path handles the usual layer call: hidden states first, no other input needing grad;
    anything else goes through ``torch.utils.checkpoint`` (non-reentrant)."""
    if not args or not torch.is_tensor(args[0]):
        return False
    others = list(args[1:]) + list(kwargs.values())
    flat = [t for o in others for t in (o if isinstance(o, (tuple, list)) else (o,))]
    return not any(torch.is_tensor(t) and t.requires_grad for t in flat)


class _NotOneTensor(Exception):
    """The wrapped module returned something other than one tensor (older layers return tuples)."""


_REPLAYING = [0]  # > 0 while a checkpointed layer's forward is being replayed in backward


def replaying() -> bool:
    """True inside the backward-time recomputation of a checkpointed layer. The fused MLPs then keep
    their gate/up outputs even with ``recompute_mlp`` on: they are used moments later by that layer's
    backward, so recomputing them a second time would only cost GEMMs."""
    return _REPLAYING[0] > 0


class _Recompute(torch.autograd.Function):
    """Run ``run(x)`` saving nothing but ``x`` (on the GPU, or a pinned-CPU copy); recompute in backward.

    Lighter than ``torch.utils.checkpoint`` (non-reentrant), whose saved-tensor hooks fire for every
    tensor an op saves: on the H200 benchmark, config (1, 448, 512) with every layer checkpointed ran
    0.348 s/step through this Function (with offload) vs 0.409 s/step with 49 of 60 layers through
    torch's checkpoint. The module's trainable parameters are explicit inputs, so ``torch.autograd.grad``
    and ``.backward()`` both get their gradients (a plain reentrant checkpoint only fills ``.grad``).
    The RNG state (CPU and the input's CUDA device) and autocast settings of the forward are replayed,
    so dropout masks and casts are the same in the recomputation.
    """

    @staticmethod
    def forward(ctx, run, offload, x, *params):  # noqa: ANN001, ANN205
        if offload and x.is_cuda:
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host.copy_(x, non_blocking=True)  # same stream: later kernels cannot reuse x before the copy
            ctx.keep = host
        else:  # saved the autograd way: an in-place change of x before backward raises instead of going unseen
            ctx.keep = None
            ctx.save_for_backward(x)
        ctx.run, ctx.device, ctx.x_grad, ctx.params = run, x.device, x.requires_grad, params
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        kind = x.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        out = run(x)
        if not torch.is_tensor(out):
            raise _NotOneTensor(type(out).__name__)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        kept = ctx.keep if ctx.keep is not None else ctx.saved_tensors[0]
        x = kept.to(ctx.device, non_blocking=True).detach().requires_grad_(True)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        kind, enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=devices, device_type=kind if devices else "cuda"):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            _REPLAYING[0] += 1
            try:
                with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
                    out = ctx.run(x)
            finally:
                _REPLAYING[0] -= 1
        grads = torch.autograd.grad(out, (x, *ctx.params), grad_out, allow_unused=True)
        ctx.run = ctx.keep = ctx.params = None
        return (None, None, grads[0] if ctx.x_grad else None, *grads[1:])


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    """The module's parameters that need grad, cached on the module.

    Walking a decoder layer's ~50 submodules on every call cost 25 ms of Python per step at
    Qwen2.5-VL-7B size (49 checkpointed layers, measured with ``bench_engine.py --cprofile``). The cache
    is re-checked cheaply: it is rebuilt when a cached parameter stopped needing grad, and an empty one
    (frozen layer, or LoRA not added yet) is never trusted.
    """
    cached = module.__dict__.get("_vt_trainable")
    if cached and all(p.requires_grad for p in cached):
        return cached
    params = [p for p in module.parameters() if p.requires_grad]
    module.__dict__["_vt_trainable"] = params
    return params


def _recompute(module: nn.Module, orig, args: tuple, kwargs: dict, offload: bool) -> torch.Tensor:  # noqa: ANN001
    params = _trainable(module)
    rest = args[1:]
    return _Recompute.apply(lambda x: orig(x, *rest, **kwargs), offload, args[0], *params)


def layer_stacks(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(vision blocks, language-model layers) of a transformers VLM, found by name: the
    ``nn.ModuleList``s called ``layers``/``blocks`` under a ``visual``/``vision`` path vs the rest."""
    vision: list[nn.Module] = []
    lm: list[nn.Module] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "blocks") and len(mod):
            (vision if ("visual" in name or "vision" in name) else lm).extend(list(mod))
    return vision, lm


def checkpoint_fraction(model: nn.Module, lm_fraction: float, vision_fraction: float = 1.0,
                        mode: str = "recompute") -> CheckpointHandle:
    """Selective checkpointing: wrap the first ``ceil(fraction * n)`` layers of each stack.

    What the benchmark found for Qwen2.5-VL-7B under stock's memory (benchmarks/RESULTS_engine.md):
    all vision blocks and ~55% of LM layers checkpointed still ran 2.8-4.9x faster than stock's full
    checkpointing at 0.87-0.98x its peak memory. Checkpoint vision blocks first: per byte freed they are
    ~3x cheaper to recompute than LM layers.
    """
    vision, lm = layer_stacks(model)
    pick = lambda layers, f: layers[: math.ceil(max(0.0, min(1.0, f)) * len(layers))]  # noqa: E731
    return checkpoint_modules(pick(vision, vision_fraction) + pick(lm, lm_fraction), mode=mode)
