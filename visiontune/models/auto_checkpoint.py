"""``use_gradient_checkpointing="auto"``: the fewest checkpointed layers whose measured step fits a budget.

Checkpointing trades memory for a second forward of each checkpointed layer: for LoRA on a frozen base that
is +50% work per layer (``visiontune.models.checkpointing``), so the fastest setting that fits is the one that
checkpoints least. This module finds it the way ``benchmarks/bench_engine.py`` does, but on the user's own
model and first batch: it measures a few training steps (forward + backward, no optimizer step, gradients
dropped) under different checkpointing and keeps the cheapest that fits.

1. Every layer checkpointed (``recompute``): the floor. Over the budget: the same with the layer inputs in
   pinned CPU memory (``recompute_offload``); still over: the same with the engine's chunked loss computing
   its logits in chunks of :data:`LOW_LOSS_CHUNK_BYTES` instead of ~640 MB (``VisionState.loss_chunk_bytes``;
   at a batch of 4 on Qwen2.5-VL-7B that chunk is the largest tensor left on the device), the lowest this
   module can go; the search goes on from there with the low chunk.
2. Vision blocks checkpointed, LM layers storing their activations: the cost of an LM layer; then nothing
   checkpointed: the cost of a vision block (a probe that runs out of memory counts as over any budget, and
   half the stack is measured instead).
3. LM layers are stored first (per byte freed, a vision block is about 3x cheaper to recompute than an LM
   layer at Qwen2.5-VL-7B shapes: benchmarks/RESULTS_engine.md), then vision blocks, while the estimate fits;
   the choice is measured once more and, if it is over, one more layer is checkpointed until it fits.

The budget is in bytes of the device's memory for the step's peak (``torch.cuda.max_memory_allocated``),
plus ``extra_bytes`` the probes cannot see (the optimizer's state, created at the first real step).
:func:`saved_activation_bytes` is the same measurement for any device (what autograd keeps for backward on
the model's device), which the CPU tests use to run the search on a real model.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from visiontune.kernels.cross_entropy import DEFAULT_CHUNK_BYTES
from visiontune.models.checkpointing import CheckpointHandle, checkpoint_modules, layer_stacks
from visiontune.models.state import vision_state

Measure = Callable[[Callable[[], None], torch.device], float]

# The chunked loss's logits chunk at the floor: 1/5 of the default, still >= 400 rows of a 152k vocabulary,
# a GEMM that runs near full rate.
LOW_LOSS_CHUNK_BYTES = 128 * 2**20


@dataclass
class CheckpointChoice:
    """What ``"auto"`` chose, and the probes it measured (bytes), for the run's record."""

    vision_checkpointed: int
    """Vision blocks checkpointed (the first ones), of ``vision_blocks``."""
    lm_checkpointed: int
    """Language-model layers checkpointed (the first ones), of ``lm_layers``."""
    mode: str
    """``recompute`` or ``recompute_offload`` (the checkpointed layers' inputs in pinned CPU memory)."""
    vision_blocks: int
    lm_layers: int
    budget_bytes: float
    peak_bytes: float
    """The chosen setting's measured peak plus ``extra_bytes``."""
    fits: bool
    """False only when even every layer checkpointed with offloaded inputs is over the budget."""
    loss_chunk_bytes: Optional[int] = None
    """The chunked loss's logits chunk, when the floor had to lower it (None: the default)."""
    probes: list[dict[str, Any]] = field(default_factory=list)

    def as_params(self) -> dict[str, Any]:
        """Flat values for the MLflow run's tags (a resumed run measures again: tags may change, params may not)."""
        gib = 2**30
        return {"ckpt_auto_vision_checkpointed": self.vision_checkpointed, "ckpt_auto_vision_blocks": self.vision_blocks,
                "ckpt_auto_lm_checkpointed": self.lm_checkpointed, "ckpt_auto_lm_layers": self.lm_layers,
                "ckpt_auto_mode": self.mode, "ckpt_auto_budget_gib": round(self.budget_bytes / gib, 3),
                "ckpt_auto_peak_gib": round(self.peak_bytes / gib, 3), "ckpt_auto_fits": self.fits,
                "ckpt_auto_loss_chunk_mib": round(self.loss_chunk_bytes / 2**20) if self.loss_chunk_bytes else "default"}

    def summary(self) -> str:
        gib = 2**30
        return (f"use_gradient_checkpointing='auto': {self.vision_checkpointed}/{self.vision_blocks} vision blocks and "
                f"{self.lm_checkpointed}/{self.lm_layers} LM layers checkpointed ({self.mode}"
                + (f", loss chunks of {self.loss_chunk_bytes / 2**20:.0f} MiB" if self.loss_chunk_bytes else "")
                + "); measured peak "
                f"{self.peak_bytes / gib:.2f} GiB against a budget of {self.budget_bytes / gib:.2f} GiB"
                + ("" if self.fits else " (over: nothing lower is available; lower the batch size)"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> float:
    """Peak memory allocated on the CUDA ``device`` while ``step`` runs (from a clean allocator)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device))


def saved_activation_bytes(step: Callable[[], None], device: torch.device) -> float:
    """Bytes that autograd keeps for backward on ``device`` during ``step``'s forward (any device type).

    A proxy for the activation part of the peak: tensors saved to pinned CPU memory (offload) are not on the
    device and are not counted; the same storage saved twice counts once; what a checkpointed layer saves while
    it is recomputed in backward (held for that layer's backward only) is not counted."""
    seen: dict[int, Any] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device == device and torch._C._current_graph_task_id() == -1:  # -1: not inside a backward pass
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage  # held: a freed storage's address could be reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return float(sum(s.nbytes() for s in seen.values()))


def choose_counts(n_vis: int, n_lm: int, floor: float, vis_cost: float, lm_cost: float,
                  budget: float) -> tuple[int, int]:
    """(vision blocks, LM layers) to checkpoint so that ``floor`` plus the stored layers' costs fits ``budget``:
    LM layers are stored first, then vision blocks (see the module docstring). Pure arithmetic."""
    room = budget - floor
    lm_stored = n_lm if lm_cost <= 0 else max(0, min(n_lm, int(room // lm_cost)))
    room -= lm_stored * max(lm_cost, 0.0)
    vis_stored = n_vis if vis_cost <= 0 else max(0, min(n_vis, int(room // vis_cost)))
    return n_vis - vis_stored, n_lm - lm_stored


def plan_checkpointing(model: nn.Module, step: Callable[[], None], budget_bytes: float, *, extra_bytes: float = 0.0,
                       measure: Optional[Measure] = None, max_refines: int = 6) -> CheckpointChoice:
    """Measure ``step`` (one forward + backward of the first batch; it must drop its gradients) under
    different checkpointing of ``model``'s layer stacks and return the cheapest choice that fits
    ``budget_bytes`` (see the module docstring). Installs nothing: :func:`install_choice` does.

    ``measure`` defaults to :func:`cuda_peak_bytes` on a CUDA model and :func:`saved_activation_bytes`
    elsewhere. A probe that runs out of memory counts as over any budget.
    """
    vision, lm = layer_stacks(model)
    device = next(p.device for p in model.parameters())
    if measure is None:
        measure = cuda_peak_bytes if device.type == "cuda" else saved_activation_bytes
    probes: list[dict[str, Any]] = []
    state = vision_state(model)
    chunk: list[Optional[int]] = [None]  # the loss chunk every probe runs with (lowered at the floor only)

    def probe(nv: int, nl: int, mode: str) -> float:
        handle = checkpoint_modules(vision[:nv] + lm[:nl], mode=mode)
        previous, state.loss_chunk_bytes = state.loss_chunk_bytes, chunk[0] or state.loss_chunk_bytes
        try:
            peak = measure(step, device) + extra_bytes
        except torch.OutOfMemoryError:
            peak = math.inf
        finally:
            state.loss_chunk_bytes = previous
            handle.remove()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        probes.append({"vision_checkpointed": nv, "lm_checkpointed": nl, "mode": mode, "peak_bytes": peak,
                       "loss_chunk_bytes": chunk[0]})
        return peak

    def choice(nv: int, nl: int, mode: str, peak: float) -> CheckpointChoice:
        return CheckpointChoice(nv, nl, mode, len(vision), len(lm), budget_bytes, peak, peak <= budget_bytes,
                                probes=probes, loss_chunk_bytes=chunk[0])

    n_vis, n_lm = len(vision), len(lm)
    mode = "recompute"
    floor = probe(n_vis, n_lm, mode)
    if floor > budget_bytes:
        mode = "recompute_offload"
        floor = probe(n_vis, n_lm, mode)
        if floor > budget_bytes and (state.loss_chunk_bytes or DEFAULT_CHUNK_BYTES) > LOW_LOSS_CHUNK_BYTES:
            chunk[0] = LOW_LOSS_CHUNK_BYTES
            floor = probe(n_vis, n_lm, mode)
        if floor > budget_bytes:
            return choice(n_vis, n_lm, mode, floor)
    lm_half = n_lm // 2
    with_lm = probe(n_vis, 0, mode) if n_lm else floor
    lm_cost = (with_lm - floor) / n_lm if n_lm and math.isfinite(with_lm) else math.inf
    if not math.isfinite(lm_cost) and lm_half:
        half = probe(n_vis, n_lm - lm_half, mode)
        lm_cost = (half - floor) / lm_half if math.isfinite(half) else math.inf
    vis_cost = math.inf
    if math.isfinite(with_lm) and with_lm <= budget_bytes and n_vis:
        none = probe(0, 0, mode)
        if none <= budget_bytes:
            return choice(0, 0, mode, none)
        vis_cost = (none - with_lm) / n_vis if math.isfinite(none) else math.inf
        if not math.isfinite(vis_cost) and n_vis // 2:
            half = probe(n_vis - n_vis // 2, 0, mode)
            vis_cost = (half - with_lm) / (n_vis // 2) if math.isfinite(half) else math.inf
    if not math.isfinite(lm_cost):  # even half the LM stack stored does not fit: store none of it
        lm_cost = budget_bytes + 1.0
    if not math.isfinite(vis_cost):
        vis_cost = budget_bytes + 1.0
    nv, nl = choose_counts(n_vis, n_lm, floor, vis_cost, lm_cost, budget_bytes)
    best = (n_vis, n_lm, floor)
    for _ in range(max_refines):
        if (nv, nl) == (n_vis, n_lm):
            break
        peak = probe(nv, nl, mode)
        if peak <= budget_bytes:
            best = (nv, nl, peak)
            break
        if nv < n_vis:  # over: checkpoint one more vision block first, then LM layers
            nv += 1
        else:
            nl += 1
    return choice(best[0], best[1], mode, best[2])


def install_choice(model: nn.Module, choice: CheckpointChoice) -> CheckpointHandle:
    """Checkpoint the first ``choice.vision_checkpointed`` vision blocks and ``choice.lm_checkpointed`` LM layers."""
    vision, lm = layer_stacks(model)
    handle = checkpoint_modules(vision[:choice.vision_checkpointed] + lm[:choice.lm_checkpointed], mode=choice.mode)
    if choice.loss_chunk_bytes:
        state = vision_state(model)
        previous, state.loss_chunk_bytes = state.loss_chunk_bytes, choice.loss_chunk_bytes

        def restore() -> None:
            state.loss_chunk_bytes = previous

        handle.on_remove(restore)
    return handle
