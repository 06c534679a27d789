"""Benchmark: stock transformers + PEFT (gradient checkpointing) vs the visiontune fused-kernel engine.

One script, one run, side by side, on a Qwen2.5-VL-7B-shaped model with random weights (built from
``Qwen2_5_VLConfig`` with the 7B's dimensions, bf16, nothing downloaded), LoRA r=16 on every linear
layer of the language model and the vision blocks (not the merger, not lm_head).

Per config (batch, image px, text tokens) it reports LM tokens/s, peak GPU memory, MFU and ratios.

* tokens = batch x (merged image tokens + text tokens), i.e. the language model's sequence tokens.
* MFU = 4 * N * tokens/s / peak, N = all parameters except the input embedding table (LM layers,
  lm_head and vision tower: 7.75e9 for this model); 4N = forward 2N + backward activation-grads 2N
  (LoRA: frozen base weights get no weight gradient). Recomputation is not counted as useful work.
  Vision FLOPs per LM token are counted as if the tower saw one patch per token (it sees 1.3-4 x that),
  and attention FLOPs are not counted, so MFU is understated, equally for both columns.
  The peak is the measured bf16 8192^3 matmul rate on this GPU (798 TFLOP/s seen on this H100).

Stock: ``model.gradient_checkpointing_enable()`` (non-reentrant), SDPA attention, transformers' loss.
Engine: ``visiontune.kernels.patch_model`` (Triton norms / RoPE / M-RoPE / SwiGLU, LoRA fused with the
frozen matmuls, flash varlen attention for the vision windows and the text, chunked linear+CE) and
*selective* checkpointing: layers keep their activations while a memory budget allows, vision blocks are
checkpointed first (3.3x cheaper to recompute per byte freed than LM layers). The budget is the stock
run's peak for the same config (so the engine never uses more memory than stock), or 70 GiB where
stock ran out of memory. Second engine column ("lean"; ``--no-peer-budget`` skips it): the same search
under the lower of stock's peak and the peer's memory, falling back to parking the checkpointed
layers' inputs in pinned CPU memory when recomputing every layer alone does not fit.
``--peer``: the peer (Unsloth) is measured in the same run (``bench_peer.py`` in a child process, on the
same saved weights, batches, optimizer and statistic) and the lean budget is its measured peak; without
it the peer column and budget are the issue's H100 figures (``REFERENCE``).
``--qlora``: 4-bit columns on the same weights quantized as ``FastVisionModel.from_pretrained(load_in_4bit=
True)`` does: stock PEFT over bitsandbytes with gradient checkpointing, and the engine's NF4 path under the
peer QLoRA's measured peak (with ``--peer``, which then also runs the peer's QLoRA).
Every column's time is the median of the timed steps after warm-up (``train_steps``).
``--recompute-mlp``: every engine run patches with ``recompute_mlp=True`` (the fused MLPs of layers that
keep their activations rerun gate/up in backward instead of storing them). Every column uses
``AdamW(fused=True)``.

Usage (GPU): ``python benchmarks/bench_engine.py --out $OUT [--peer] [--qlora]`` ; ``--quick`` for a smoke run.
``--peer`` and ``--qlora`` need unsloth / bitsandbytes on the device (RESULTS_engine.md lists the wheels).
Never run as a unit test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

CONFIGS = [(1, 448, 512), (4, 448, 512), (8, 672, 256), (16, 448, 1024)]
REFERENCE = {  # H100 80GB, from the issue: stock HF+PEFT+GC and the fastest known peer (tok/s, GiB)
    "stock": {(1, 448, 512): (851, 17.9), (4, 448, 512): (1674, 23.2), (8, 672, 256): (1543, 32.4),
              (16, 448, 1024): (None, None)},
    "peer": {(1, 448, 512): (1141, 16.6), (4, 448, 512): (2673, 17.8), (8, 672, 256): (2045, 19.7),
             (16, 448, 1024): (4394, 26.3)},
}
LORA_TARGETS = (r".*(?:language_model\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
                r"|mlp\.(?:gate_proj|up_proj|down_proj))"
                r"|visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:gate_proj|up_proj|down_proj)))")
IMAGE_TOKEN, VISION_START, VISION_END = 151655, 151652, 151653
GIB = 2**30

# Activation bytes each stored layer keeps per token (bf16) on the engine path, minus what a
# checkpointed layer keeps (its input): LM layer: x, norm(x), q, k, v, attn-out, h, norm(h), gate, up
# = 3584*5 + 512*2 + 18944*2 elements; vision block: 1280*6 + 3420*2 elements (see kernels/lora.py).
LM_LAYER_BYTES_PER_TOKEN = 2 * (3584 * 5 + 512 * 2 + 18944 * 2 - 3584)
VISION_BLOCK_BYTES_PER_PATCH = 2 * (1280 * 6 + 3420 * 2 - 1280)
# With --recompute-mlp the fused MLPs keep neither gate nor up (kernels.lora.gated_mlp(recompute=True)).
LM_LAYER_BYTES_PER_TOKEN_RECOMPUTE_MLP = LM_LAYER_BYTES_PER_TOKEN - 2 * 18944 * 2
VISION_BLOCK_BYTES_PER_PATCH_RECOMPUTE_MLP = VISION_BLOCK_BYTES_PER_PATCH - 2 * 3420 * 2
#: set by --recompute-mlp: every engine column patches with patch_model(recompute_mlp=True)
RECOMPUTE_MLP = False


def _patch(model):
    from visiontune.kernels import patch_model

    return patch_model(model, recompute_mlp=RECOMPUTE_MLP)


def build_model(device: torch.device):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, use_cache=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, in_chans=3,
                           fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584, hidden_act="silu"),
        image_token_id=IMAGE_TOKEN, video_token_id=151656, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=False, use_cache=False,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    model.to(device=device, dtype=torch.bfloat16)
    return model


def add_lora(model):
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    lcfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(model, lcfg)


def make_batch(b: int, px: int, text: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One image per sample at the start, then text; explicit M-RoPE position ids (3, B, S)."""
    g = px // 14
    gm = g // 2
    n_patch, merged = g * g, gm * gm
    seq = merged + text
    gen = torch.Generator(device="cpu").manual_seed(b * 7919 + px + text)
    ids = torch.randint(0, 150000, (b, seq), generator=gen)
    ids[:, 0] = VISION_START
    ids[:, 1:1 + merged] = IMAGE_TOKEN
    ids[:, 1 + merged] = VISION_END
    labels = ids.clone()
    labels[:, :2 + merged] = -100
    pos = torch.empty(3, seq, dtype=torch.long)
    pos[:, 0] = 0
    i = torch.arange(merged)
    pos[0, 1:1 + merged] = 1
    pos[1, 1:1 + merged] = 1 + i // gm
    pos[2, 1:1 + merged] = 1 + i % gm
    nxt = 1 + gm
    pos[:, 1 + merged:] = nxt + torch.arange(seq - 1 - merged)
    pixel = torch.randn(b * n_patch, 3 * 2 * 14 * 14, generator=gen).to(torch.bfloat16)
    return {
        "input_ids": ids.to(device), "labels": labels.to(device),
        "position_ids": pos[:, None, :].expand(3, b, seq).contiguous().to(device),
        "pixel_values": pixel.to(device),
        "image_grid_thw": torch.tensor([[1, g, g]] * b, device=device),
    }


def matmul_peak(device: torch.device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ bm
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ bm
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (start.elapsed_time(end) / 1e3)


def count_flop_params(model) -> int:
    n = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "lora_" in name:
            continue
        n += p.numel()
    return n


def train_steps(model, opt, batch, steps: int, warmup: int) -> dict[str, Any]:
    """Run ``warmup`` + ``steps`` training steps; the median timed step and the first and last loss.

    Step boundaries are CUDA events recorded on the stream (no host sync between steps, so a launch-bound
    step is timed as it runs); every column, the peer's included (``bench_peer.py``), uses this function.
    Returns ``sec_per_step`` (median of the timed steps), ``step_s`` (each timed step), ``first_loss`` (the
    first step's, before any update) and ``loss`` (the last step's).
    """
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    losses = []
    for i in range(warmup + steps):
        if i >= warmup:
            events[i - warmup].record()
        out = model(**batch, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
        del out
    events[steps].record()
    torch.cuda.synchronize()
    step_s = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
    return dict(sec_per_step=statistics.median(step_s), step_s=step_s, first_loss=float(losses[0]),
                loss=float(losses[-1]))


def _lm_layers(model):
    return list(model.base_model.model.model.language_model.layers)


def _vision_blocks(model):
    return list(model.base_model.model.model.visual.blocks)


def choose_checkpointing(model, batch, budget_gib: float, base_peak_gib: float) -> tuple[int, int]:
    """How many vision blocks / LM layers to checkpoint so the estimated peak fits ``budget_gib``.

    ``base_peak_gib`` is the measured peak with every layer checkpointed; each stored layer adds its
    activation bytes (constants above). Vision blocks are checkpointed first.
    """
    tokens = batch["input_ids"].numel()
    patches = batch["pixel_values"].shape[0]
    n_vis, n_lm = len(_vision_blocks(model)), len(_lm_layers(model))
    lm_cost = (LM_LAYER_BYTES_PER_TOKEN_RECOMPUTE_MLP if RECOMPUTE_MLP else LM_LAYER_BYTES_PER_TOKEN) * tokens / GIB
    vis_cost = (VISION_BLOCK_BYTES_PER_PATCH_RECOMPUTE_MLP if RECOMPUTE_MLP else VISION_BLOCK_BYTES_PER_PATCH) * patches / GIB
    room = budget_gib - base_peak_gib - 0.5  # margin: allocator fragmentation, CE chunk, workspace
    lm_stored = max(0, min(n_lm, int(room // lm_cost))) if lm_cost > 0 else n_lm
    room -= lm_stored * lm_cost
    vis_stored = max(0, min(n_vis, int(room // vis_cost))) if vis_cost > 0 else n_vis
    return n_vis - vis_stored, n_lm - lm_stored


def engine_batch(batch: dict[str, torch.Tensor], model: Any = None) -> dict[str, Any]:
    """The same batch, padding-free packed into one row (position ids restart per sample, cu_seqlens), with
    the vision tower's metadata when ``model`` is given, as the collator gives it (``ab_engine_switch.py --switch
    vision_metadata`` compares it with the tower computing its own).

    The benchmark's samples have no padding, so packing saves no FLOPs here; it routes the text
    attention through the varlen kernel with exact per-sample boundaries. The first label of every
    sample is <vision_start>'s, already -100, so the loss is over exactly the same tokens as stock.
    """
    from visiontune.models.packing import pack_padded_batch

    ids = batch["input_ids"]
    packed = pack_padded_batch(ids, torch.ones_like(ids), batch["labels"], batch["position_ids"])
    packed.update(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    if model is not None:
        from visiontune.models.archs import get_spec
        from visiontune.models.state import base_model

        spec = get_spec(base_model(model).config)
        if spec.vision_metadata is not None:
            meta = spec.vision_metadata(model, batch["image_grid_thw"].cpu())
            device = batch["input_ids"].device
            packed.update({k: v.to(device) if torch.is_tensor(v) else v for k, v in meta.items()})
    return packed


def run_engine(model, opt, batch, budget_gib: float, steps: int, warmup: int, log) -> dict[str, Any]:
    """The fastest engine setting found under ``budget_gib``: the fewest checkpointed layers (vision blocks
    first) whose measured peak fits. Checkpointed layers recompute on the GPU; if even all of them
    recomputing does not fit, their inputs are parked in pinned CPU memory too (``recompute_offload``)."""
    from visiontune.models.checkpointing import checkpoint_modules

    batch = engine_batch(batch, model)
    model.base_model.model.gradient_checkpointing_disable()
    handle = _patch(model)
    log(f"  engine patch counts: {handle.counts}")
    vis, lm = _vision_blocks(model), _lm_layers(model)

    def floor(mode: str) -> float:
        """Peak of one step with every layer checkpointed in ``mode``."""
        ck = checkpoint_modules(vis + lm, mode=mode)
        _reset()
        train_steps(model, opt, batch, 1, 0)
        ck.remove()
        return torch.cuda.max_memory_allocated() / GIB

    mode = "recompute"
    base = floor(mode)
    if base > budget_gib:
        mode = "recompute_offload"
        recompute_floor, base = base, floor(mode)
        log(f"  all layers recomputing peak at {recompute_floor:.2f} GiB > budget {budget_gib:.2f}: checkpointed "
            f"layers' inputs offloaded too (floor {base:.2f} GiB)")
    n_vis_ck, n_lm_ck = choose_checkpointing(model, batch, budget_gib, base)
    result: dict[str, Any] = {}
    while True:
        ck = checkpoint_modules(vis[:n_vis_ck] + lm[:n_lm_ck], mode=mode)
        _reset()
        try:
            timed = train_steps(model, opt, batch, steps, warmup)
            peak = torch.cuda.max_memory_allocated() / GIB
            ck.remove()
            if peak > budget_gib and (n_lm_ck < len(lm) or n_vis_ck < len(vis)):
                log(f"  over budget ({peak:.1f} > {budget_gib:.1f} GiB) with {n_vis_ck}/{n_lm_ck} checkpointed; more")
                n_vis_ck, n_lm_ck = _more_checkpointing(n_vis_ck, n_lm_ck, len(vis), len(lm))
                continue
            result = dict(**timed, peak_gib=peak,
                          reserved_gib=torch.cuda.max_memory_reserved() / GIB, floor_gib=base,
                          vision_checkpointed=n_vis_ck, lm_checkpointed=n_lm_ck, checkpoint_mode=mode,
                          over_budget=peak > budget_gib)
            break
        except torch.OutOfMemoryError:
            ck.remove()
            _reset()
            if n_lm_ck == len(lm) and n_vis_ck == len(vis):
                result = dict(oom=True)
                break
            log(f"  OOM with {n_vis_ck}/{n_lm_ck} checkpointed; more")
            n_vis_ck, n_lm_ck = _more_checkpointing(n_vis_ck, n_lm_ck, len(vis), len(lm))
    handle.unpatch()
    return result


def _measured(model, opt, batch, steps: int, warmup: int) -> dict[str, Any]:
    """Time ``steps`` training steps from a clean allocator; peak memory, or ``oom``. Leaves no grads behind."""
    _reset()
    try:
        res = dict(**train_steps(model, opt, batch, steps, warmup), peak_gib=torch.cuda.max_memory_allocated() / GIB,
                   reserved_gib=torch.cuda.max_memory_reserved() / GIB)
    except torch.OutOfMemoryError:
        res = dict(oom=True)
    opt.zero_grad(set_to_none=True)
    _reset()
    return res


def _more_checkpointing(nv: int, nl: int, tv: int, tl: int) -> tuple[int, int]:
    if nv < tv:
        return tv, nl
    return nv, min(tl, nl + max(2, tl // 7))


def run_stock(model, opt, batch, steps: int, warmup: int) -> dict[str, Any]:
    inner = model.base_model.model
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    res = _measured(model, opt, batch, steps, warmup)
    inner.gradient_checkpointing_disable()
    return res


def _reset() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def _engine_step(model, opt, batch, n_vis_ck: int, n_lm_ck: int, mode: str = "recompute"):
    """The engine as benchmarked (patched, packed batch, the given layers checkpointed), warmed up by one
    step; yields the packed batch and undoes the patch and the checkpointing afterwards."""
    from visiontune.models.checkpointing import checkpoint_modules

    handle = _patch(model)
    batch = engine_batch(batch, model)
    ck = checkpoint_modules(_vision_blocks(model)[:n_vis_ck] + _lm_layers(model)[:n_lm_ck], mode=mode)
    try:
        train_steps(model, opt, batch, 1, 1)
        yield batch
    finally:
        ck.remove()
        handle.unpatch()


def profile_engine(model, opt, batch, out_dir: Path, n_vis_ck: int, n_lm_ck: int, tag: str, log,
                   mode: str = "recompute") -> None:
    """torch.profiler over one engine step: top kernels to a file, kernel families + GPU-busy share logged."""
    from torch.profiler import ProfilerActivity, profile

    with _engine_step(model, opt, batch, n_vis_ck, n_lm_ck, mode) as packed:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            train_steps(model, opt, packed, 1, 0)
        wall = time.perf_counter() - t0
    groups: dict[str, float] = {}
    total = 0.0
    for ev in prof.key_averages():
        if ev.self_cpu_time_total > 0:  # operator-level event; its kernels are listed separately
            continue
        t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)
        if not t:
            continue
        name = ev.key.lower()
        total += t
        if "flash" in name or "fmha" in name:  # before GEMM: flash kernels carry cutlass:: template args
            g = "attention (flash varlen)"
        elif any(k in name for k in ("gemm", "cutlass", "nvjet", "cublas", "sm90_xmma")):
            g = "GEMM (cuBLAS)"
        elif "_ce_fwd" in name:
            g = "cross-entropy kernel"
        elif "rmsnorm" in name or "layernorm" in name:
            g = "norm kernels (Triton)"
        elif "glu" in name or "_act_" in name:
            g = "activation kernels (Triton)"
        elif "rope" in name:
            g = "rope kernels (Triton)"
        elif "adam" in name or "foreach" in name or "multi_tensor" in name:
            g = "optimizer"
        elif "copy" in name or "cat" in name or "memcpy" in name or "memset" in name or "fill" in name:
            g = "copies / casts / fills"
        else:
            g = "other torch elementwise / reductions"
        groups[g] = groups.get(g, 0.0) + t
    lines = [f"  {k:<36} {v / 1e3:8.1f} ms  {100 * v / total:5.1f}%" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])]
    summary = (f"profile {tag}: one engine step, wall {wall * 1e3:.0f} ms (profiler on), GPU kernel time "
               f"{total / 1e3:.0f} ms = {100 * total / 1e3 / (wall * 1e3):.0f}% busy\n" + "\n".join(lines))
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70)
    (out_dir / f"profile_{tag}.txt").write_text(summary + "\n\n" + table)
    log(summary)


def cprofile_engine(model, opt, batch, out_dir: Path, n_vis_ck: int, n_lm_ck: int, tag: str, log,
                    mode: str = "recompute") -> None:
    """cProfile over one engine step (CPU side: where the Python time goes when the GPU waits), and the
    GPU->CPU syncs of another step, by the Python line that caused them (each one drains the GPU queue)."""
    import cProfile
    import io
    import pstats
    import warnings
    from collections import Counter

    with _engine_step(model, opt, batch, n_vis_ck, n_lm_ck, mode) as packed:
        prof = cProfile.Profile()
        prof.enable()
        train_steps(model, opt, packed, 1, 0)
        prof.disable()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_steps(model, opt, packed, 1, 0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    log(f"syncs {tag}: {sum(syncs.values())} in one step: " + "; ".join(f"{k} x{v}" for k, v in syncs.most_common(12)))
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(45)
    (out_dir / f"cprofile_{tag}.txt").write_text(buf.getvalue())
    log(f"cprofile {tag}: written")


def save_for_peer(model, out_dir: Path) -> Path:
    """Save the benchmark's base model (before LoRA) where the peer's child process and the QLoRA columns load
    it from, with a processor beside it (Unsloth's ``from_pretrained`` loads one; the batches are token ids,
    so the tiny test tokenizer of :func:`visiontune.testing.build_tiny_model` serves)."""
    import shutil
    import tempfile

    from visiontune.testing import build_tiny_model

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_model("qwen2_5_vl", tmp)
        for f in tiny.iterdir():
            if f.is_file() and not (f.suffix == ".safetensors" or f.name in (
                    "config.json", "generation_config.json", "visiontune_tiny.json")):
                shutil.copy(f, out_dir / f.name)
    return out_dir


def run_peer(model_dir: Path, configs: list[tuple[int, int, int]], steps: int, warmup: int, four_bit: bool,
             log) -> dict[tuple[int, int, int], dict[str, Any]]:
    """The peer's column for ``configs``, measured by ``bench_peer.py`` in a child process (see its docstring)."""
    idx = ",".join(str(CONFIGS.index(c)) for c in configs)
    cmd = [sys.executable, str(Path(__file__).with_name("bench_peer.py")), "--model-dir", str(model_dir),
           "--configs", idx, "--steps", str(steps), "--warmup", str(warmup)] + (["--4bit"] if four_bit else [])
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found: dict[tuple[int, int, int], dict[str, Any]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("PEER_RESULT "):
            r = json.loads(line[len("PEER_RESULT "):])
            found[tuple(r["config"])] = r
        elif line.strip():
            log(f"  peer: {line}")
    if proc.returncode != 0:
        log(f"  peer{' 4-bit' if four_bit else ''} exited {proc.returncode}:\n" + proc.stderr[-6000:])
    log(f"peer{' 4-bit' if four_bit else ''} ({time.time() - t0:.0f}s): " + json.dumps(
        {str(k): {kk: v[kk] for kk in ("sec_per_step", "peak_gib", "first_loss", "oom") if kk in v}
         for k, v in found.items()}))
    return found


def load_four_bit(model_dir: Path):
    """The saved base in NF4 as ``FastVisionModel.from_pretrained(load_in_4bit=True)`` loads it (the same
    quantization settings: :func:`visiontune.models.fast_vision._load_kwargs`), with the benchmark's LoRA."""
    from transformers import AutoModelForImageTextToText

    from visiontune.models.fast_vision import _load_kwargs

    kw = _load_kwargs(torch.bfloat16, True, "sdpa", True, None, {})
    return add_lora(AutoModelForImageTextToText.from_pretrained(str(model_dir), **kw))


def check_equivalence(model, batch) -> tuple[float, float]:
    """Loss of the same weights and batch, stock vs engine (no grad): the patch must not change results."""
    from visiontune.kernels import patch_model

    with torch.no_grad():
        stock = float(model(**batch, use_cache=False).loss)
        handle = patch_model(model)
        engine = float(model(**engine_batch(batch, model), use_cache=False).loss)
        handle.unpatch()
    return stock, engine


def run_qlora(model_dir: Path, configs, results: list[dict[str, Any]], steps: int, warmup: int, n_flop: int,
              peak: float, log, out_dir: Path, profile: tuple[int, ...] = ()) -> None:
    """The 4-bit columns, into each config's row: stock HF+PEFT+GC over the NF4 base (``stock_qlora``) and the
    engine's NF4 LoRA path (``engine_qlora``) under the lower of stock's 4-bit peak and the peer QLoRA's
    measured peak (``row["peer_qlora"]``, from ``--peer``), searched as ``run_engine`` does."""
    _reset()
    t0 = time.time()
    model = load_four_bit(model_dir)
    log(f"4-bit model loaded in {time.time() - t0:.0f}s: weights {torch.cuda.memory_allocated() / GIB:.1f} GiB")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    device = torch.device("cuda")
    for row in results:
        cfg = tuple(row["config"])
        if cfg not in [tuple(c) for c in configs]:
            continue
        batch = make_batch(*cfg, device)
        tokens = row["tokens_per_step"]
        row["stock_qlora"] = run_stock(model, opt, batch, steps, warmup)
        log(f"{cfg} stock 4-bit: {row['stock_qlora']}")
        budget = row["stock_qlora"].get("peak_gib") or 70.0
        if row.get("peer_qlora", {}).get("peak_gib"):
            budget = min(budget, row["peer_qlora"]["peak_gib"] - 0.01)
        row["qlora_budget_gib"] = budget
        row["engine_qlora"] = run_engine(model, opt, batch, budget, steps, warmup, log)
        log(f"{cfg} engine 4-bit: {row['engine_qlora']}")
        e = row["engine_qlora"]
        if CONFIGS.index(cfg) in profile and not e.get("oom"):
            profile_engine(model, opt, batch, out_dir, e["vision_checkpointed"], e["lm_checkpointed"],
                           f"qlora_cfg{CONFIGS.index(cfg)}", log, e["checkpoint_mode"])
        for k in ("stock_qlora", "engine_qlora"):
            r = row[k]
            if not r.get("oom"):
                r["tokens_per_s"] = tokens / r["sec_per_step"]
                r["mfu"] = 4 * n_flop * r["tokens_per_s"] / peak
        del batch
        _reset()
    del model, opt
    _reset()


def _cell(x: dict, mfu: bool) -> str:
    """One column's tok/s and peak GiB (and MFU) for the text tables; '-' not run, 'OOM' out of memory."""
    width = 23 if mfu else 16
    if not x or x.get("oom"):
        return f"{'-' if not x else 'OOM':>{width}}"
    if mfu:
        return f"{x['tokens_per_s']:>11.0f}{x['peak_gib']:>6.1f}{100 * x['mfu']:>5.1f}%"
    return f"{x['tokens_per_s']:>8.0f} @{x['peak_gib']:>5.1f}"


def _ckpt(x: dict) -> str:
    """An engine column's checkpointed vision blocks / LM layers, '+off' when their inputs were offloaded."""
    text = f"{x.get('vision_checkpointed', '-')}/{x.get('lm_checkpointed', '-')}"
    return text + "+off" if x.get("checkpoint_mode") == "recompute_offload" else text


def qlora_table(results: list[dict[str, Any]]) -> str:
    """The 4-bit columns as a text table: tok/s @ peak GiB and the engine's ratios to stock and the peer."""
    out = [f"{'4-bit (B,px,text)':<20} | {'stock QLoRA':>16} | {'engine QLoRA':>16}{'ckpt v/l':>11} | "
           f"{'peer QLoRA':>16} | {'vs stock':>8} | {'vs peer':>7}{'mem':>6}"]
    out.append("-" * len(out[0]))
    for r in results:
        if "engine_qlora" not in r:
            continue
        s, e, pq = r.get("stock_qlora", {}), r["engine_qlora"], r.get("peer_qlora", {})
        ck = _ckpt(e)
        vs = (f"{e['tokens_per_s'] / s['tokens_per_s']:>7.2f}x" if e.get("tokens_per_s") and s.get("tokens_per_s")
              else f"{'-':>8}")
        vp = (f"{e['tokens_per_s'] / pq['tokens_per_s']:>6.2f}x{e['peak_gib'] / pq['peak_gib']:>6.2f}"
              if e.get("tokens_per_s") and pq.get("tokens_per_s") else f"{'-':>7}{'-':>6}")
        out.append(f"{str(tuple(r['config'])):<20} | {_cell(s, False)} | {_cell(e, False)}{ck:>11} | "
                   f"{_cell(pq, False)} | {vs} | {vp}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="first config only, 1+1 steps")
    ap.add_argument("--configs", default="", help="comma-separated indices into CONFIGS")
    ap.add_argument("--no-stock", action="store_true")
    ap.add_argument("--no-peer-budget", action="store_true",
                    help="skip the second engine run, the one under the lower of stock's and the peer's memory")
    ap.add_argument("--cprofile", default="", help="comma-separated config indices to cProfile (CPU side)")
    ap.add_argument("--profile", default="0,3", help="comma-separated config indices to profile ('' for none)")
    ap.add_argument("--recompute-mlp", action="store_true",
                    help="engine columns patch with recompute_mlp=True (MLPs rerun gate/up in backward)")
    ap.add_argument("--peer", action="store_true",
                    help="measure the peer (Unsloth, bench_peer.py) in this run; the lean budget is its measured peak")
    ap.add_argument("--qlora", action="store_true",
                    help="also the 4-bit columns: stock HF+PEFT+GC, the engine (under the peer QLoRA's measured "
                         "peak with --peer) and, with --peer, the peer's QLoRA")
    ap.add_argument("--qlora-only", action="store_true",
                    help="only the 4-bit columns (and the peer's QLoRA with --peer): no bf16 stock/engine/lean/peer")
    ap.add_argument("--profile-qlora", default="", help="config indices whose engine 4-bit step to profile")
    ap.add_argument("--model-dir", default="/tmp/vt_bench_model",
                    help="where --peer / --qlora save the base model for the child process and the 4-bit load")
    args = ap.parse_args(argv)
    args.qlora = args.qlora or args.qlora_only
    global RECOMPUTE_MLP
    RECOMPUTE_MLP = args.recompute_mlp
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_f = open(out_dir / "bench_log.txt", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    device = torch.device("cuda")
    configs = CONFIGS
    if args.configs:
        configs = [CONFIGS[int(i)] for i in args.configs.split(",")]
    steps, warmup = args.steps, args.warmup
    if args.quick:
        configs, steps, warmup = configs[:1], 1, 1
    import peft
    import transformers

    peak = matmul_peak(device)
    log(f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__} "
        f"GPU {torch.cuda.get_device_name()} measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    t0 = time.time()
    base = build_model(device)
    model_dir = Path(args.model_dir)
    if args.peer or args.qlora:
        save_for_peer(base, model_dir)
        log(f"base saved to {model_dir} for the peer / 4-bit columns ({time.time() - t0:.0f}s since start)")
    model = add_lora(base)
    del base
    n_flop = count_flop_params(model)
    log(f"model built in {time.time() - t0:.0f}s: {n_flop / 1e9:.2f}e9 FLOP-counted params; "
        f"weights {torch.cuda.memory_allocated() / GIB:.1f} GiB")
    # fused AdamW (one kernel, no foreach temporaries) for every column: the same optimizer for stock and engine.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    total_gib = torch.cuda.get_device_properties(device).total_memory / GIB
    peer: dict[tuple[int, int, int], dict[str, Any]] = {}
    peer4: dict[tuple[int, int, int], dict[str, Any]] = {}
    if args.peer:  # first, while this process only holds its model: the lean budget needs the peer's peak
        if not args.qlora_only:
            peer = run_peer(model_dir, configs, steps, warmup, False, log)
        if args.qlora:
            peer4 = run_peer(model_dir, configs, steps, warmup, True, log)
    results = []
    for cfg in configs:
        b, px, text = cfg
        batch = make_batch(b, px, text, device)
        tokens = batch["input_ids"].numel()
        row: dict[str, Any] = dict(config=list(cfg), tokens_per_step=tokens, patches=batch["pixel_values"].shape[0])
        if args.qlora_only:
            if tuple(cfg) in peer4:
                row["peer_qlora"] = dict(peer4[tuple(cfg)], tokens_per_s=tokens / peer4[tuple(cfg)]["sec_per_step"])
            results.append(row)
            continue
        ls, le = check_equivalence(model, batch)
        row["equivalence"] = dict(stock_loss=ls, engine_loss=le, rel_diff=abs(le - ls) / abs(ls))
        log(f"{cfg} same weights, no grad: stock loss {ls:.5f} engine loss {le:.5f} (rel diff {abs(le - ls) / abs(ls):.1e})")
        if not args.no_stock:
            row["stock"] = run_stock(model, opt, batch, steps, warmup)
            log(f"{cfg} stock: {row['stock']}")
        stock_peak = row.get("stock", {}).get("peak_gib")
        budget = stock_peak if stock_peak else min(70.0, total_gib - 8)
        row["engine_budget_gib"] = budget
        row["engine"] = run_engine(model, opt, batch, budget, steps, warmup, log)
        log(f"{cfg} engine: {row['engine']}")
        if tuple(cfg) in peer:
            row["peer"] = peer[tuple(cfg)]
        if tuple(cfg) in peer4:
            row["peer_qlora"] = peer4[tuple(cfg)]
        peer_gib = (row["peer"].get("peak_gib") if "peer" in row
                    else REFERENCE["peer"].get(tuple(cfg), (None, None))[1])
        row["peer_budget_source"] = "measured" if "peer" in row else "reference (H100)"
        if not args.no_peer_budget and peer_gib:  # the goal's memory bar: under stock's peak AND the peer's
            row["peer_budget_gib"] = min(budget, peer_gib - 0.01)
            row["engine_lean"] = run_engine(model, opt, batch, row["peer_budget_gib"], steps, warmup, log)
            log(f"{cfg} engine under the peer's memory: {row['engine_lean']}")
        for k in ("stock", "engine", "engine_lean", "peer", "peer_qlora"):
            r = row.get(k)
            if r and not r.get("oom"):
                r["tokens_per_s"] = tokens / r["sec_per_step"]
                r["mfu"] = 4 * n_flop * r["tokens_per_s"] / peak
        if row.get("stock", {}).get("tokens_per_s") and row["engine"].get("tokens_per_s"):
            row["speedup"] = row["engine"]["tokens_per_s"] / row["stock"]["tokens_per_s"]
            row["memory_ratio"] = row["engine"]["peak_gib"] / row["stock"]["peak_gib"]
        if row.get("stock", {}).get("tokens_per_s") and row.get("engine_lean", {}).get("tokens_per_s"):
            row["lean_speedup"] = row["engine_lean"]["tokens_per_s"] / row["stock"]["tokens_per_s"]
            row["lean_memory_ratio"] = row["engine_lean"]["peak_gib"] / row["stock"]["peak_gib"]
        results.append(row)
        del batch
        _reset()
        json.dump(dict(results=results, peak_flops=peak, flop_params=n_flop, recompute_mlp=RECOMPUTE_MLP),
                  open(out_dir / "bench_engine.json", "w"), indent=1)
    for idx in [int(i) for i in args.profile.split(",") if i.strip()] if not args.quick else []:
        cfg = CONFIGS[idx]
        row = next((r for r in results if tuple(r["config"]) == cfg and not r.get("engine", {"oom": 1}).get("oom")), None)
        if row is not None:
            profile_engine(model, opt, make_batch(*cfg, device), out_dir, row["engine"]["vision_checkpointed"],
                           row["engine"]["lm_checkpointed"], f"cfg{idx}", log, row["engine"]["checkpoint_mode"])
    for idx in [int(i) for i in args.cprofile.split(",") if i.strip()]:
        cfg = CONFIGS[idx]
        row = next((r for r in results if tuple(r["config"]) == cfg and not r.get("engine", {"oom": 1}).get("oom")), None)
        if row is not None:
            cprofile_engine(model, opt, make_batch(*cfg, device), out_dir, row["engine"]["vision_checkpointed"],
                            row["engine"]["lm_checkpointed"], f"cfg{idx}", log, row["engine"]["checkpoint_mode"])
    if args.qlora:
        del model, opt  # the 4-bit columns' peaks must not count the bf16 model
        run_qlora(model_dir, configs, results, steps, warmup, n_flop, peak, log, out_dir,
                  tuple(int(i) for i in args.profile_qlora.split(",") if i.strip()))
        json.dump(dict(results=results, peak_flops=peak, flop_params=n_flop, recompute_mlp=RECOMPUTE_MLP),
                  open(out_dir / "bench_engine.json", "w"), indent=1)
    # the table, printed last
    hdr = (f"{'config (B,px,text)':<20}{'tokens':>7} | {'stock tok/s':>11}{'GiB':>6}{'MFU':>6} | "
           f"{'engine tok/s':>12}{'GiB':>6}{'MFU':>6}{'ckpt v/l':>9} | {'speedup':>7}{'mem':>6} | "
           f"{'lean tok/s':>11}{'GiB':>6}{'MFU':>6}{'ckpt v/l':>11} | {'speedup':>7}{'mem':>6} | {'peer tok/s (GiB)':>17}")
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        if "engine" not in r:  # --qlora-only
            continue
        s, e = r.get("stock", {}), r["engine"]
        cfg = tuple(r["config"])

        ef = _cell(e, mfu=True)
        ck = _ckpt(e)
        sp = f"{r['speedup']:>6.2f}x{r['memory_ratio']:>6.2f}" if "speedup" in r else f"{'-':>7}{'-':>6}"
        peer = REFERENCE["peer"].get(cfg)
        if r.get("peer", {}).get("tokens_per_s"):
            peer = (round(r["peer"]["tokens_per_s"]), round(r["peer"]["peak_gib"], 1))
        lean = _cell(r.get("engine_lean", {}), mfu=True)
        lck = _ckpt(r.get("engine_lean", {}))
        lsp = f"{r['lean_speedup']:>6.2f}x{r['lean_memory_ratio']:>6.2f}" if "lean_speedup" in r else f"{'-':>7}{'-':>6}"
        peer_s = f"{peer[0]} ({peer[1]})" if peer else "-"
        lines.append(f"{str(cfg):<20}{r['tokens_per_step']:>7} | {_cell(s, mfu=True)} | {ef:>24}{ck:>9} | {sp} | "
                     f"{lean}{lck:>11} | {lsp} | {peer_s:>17}")
    if any("peer" in r for r in results):
        lines.append("peer column: Unsloth measured in this run (bench_peer.py); lean budget = its peak")
    else:
        lines.append("peer column: the issue's H100 figures (REFERENCE), not measured here")
    if any("engine_qlora" in r for r in results):
        lines += ["", qlora_table(results)]
    table = "\n".join(lines)
    (out_dir / "bench_table.txt").write_text(table + "\n")
    log(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
