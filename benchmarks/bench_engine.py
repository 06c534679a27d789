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
under the lower of stock's peak and the peer's reported memory, falling back to parking the checkpointed
layers' inputs in pinned CPU memory when recomputing every layer alone does not fit.
``--recompute-mlp``: every engine run patches with ``recompute_mlp=True`` (the fused MLPs of layers that
keep their activations rerun gate/up in backward instead of storing them). Every column uses
``AdamW(fused=True)``.

Usage (GPU): ``python benchmarks/bench_engine.py --out $OUT`` ; ``--quick`` for a smoke run.
Never run as a unit test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
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


def train_steps(model, opt, batch, steps: int, warmup: int) -> tuple[float, float]:
    """Run warmup + timed steps; returns (seconds per step, last loss)."""
    loss_val = float("nan")
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        out = model(**batch, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_val = out.loss.detach()
        del out
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, float(loss_val)


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


def engine_batch(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The same batch, padding-free packed into one row (position ids restart per sample, cu_seqlens).

    The benchmark's samples have no padding, so packing saves no FLOPs here; it routes the text
    attention through the varlen kernel with exact per-sample boundaries. The first label of every
    sample is <vision_start>'s, already -100, so the loss is over exactly the same tokens as stock.
    """
    from visiontune.models.packing import pack_padded_batch

    ids = batch["input_ids"]
    packed = pack_padded_batch(ids, torch.ones_like(ids), batch["labels"], batch["position_ids"])
    packed.update(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    return packed


def run_engine(model, opt, batch, budget_gib: float, steps: int, warmup: int, log) -> dict[str, Any]:
    """The fastest engine setting found under ``budget_gib``: the fewest checkpointed layers (vision blocks
    first) whose measured peak fits. Checkpointed layers recompute on the GPU; if even all of them
    recomputing does not fit, their inputs are parked in pinned CPU memory too (``recompute_offload``)."""
    from visiontune.models.checkpointing import checkpoint_modules

    batch = engine_batch(batch)
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
            sec, loss = train_steps(model, opt, batch, steps, warmup)
            peak = torch.cuda.max_memory_allocated() / GIB
            ck.remove()
            if peak > budget_gib and (n_lm_ck < len(lm) or n_vis_ck < len(vis)):
                log(f"  over budget ({peak:.1f} > {budget_gib:.1f} GiB) with {n_vis_ck}/{n_lm_ck} checkpointed; more")
                n_vis_ck, n_lm_ck = _more_checkpointing(n_vis_ck, n_lm_ck, len(vis), len(lm))
                continue
            result = dict(sec_per_step=sec, loss=loss, peak_gib=peak,
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
        sec, loss = train_steps(model, opt, batch, steps, warmup)
        res = dict(sec_per_step=sec, loss=loss, peak_gib=torch.cuda.max_memory_allocated() / GIB,
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
    batch = engine_batch(batch)
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


def check_equivalence(model, batch) -> tuple[float, float]:
    """Loss of the same weights and batch, stock vs engine (no grad): the patch must not change results."""
    from visiontune.kernels import patch_model

    with torch.no_grad():
        stock = float(model(**batch, use_cache=False).loss)
        handle = patch_model(model)
        engine = float(model(**engine_batch(batch), use_cache=False).loss)
        handle.unpatch()
    return stock, engine


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
    args = ap.parse_args(argv)
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
    model = add_lora(build_model(device))
    n_flop = count_flop_params(model)
    log(f"model built in {time.time() - t0:.0f}s: {n_flop / 1e9:.2f}e9 FLOP-counted params; "
        f"weights {torch.cuda.memory_allocated() / GIB:.1f} GiB")
    # fused AdamW (one kernel, no foreach temporaries) for every column: the same optimizer for stock and engine.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    total_gib = torch.cuda.get_device_properties(device).total_memory / GIB
    results = []
    for cfg in configs:
        b, px, text = cfg
        batch = make_batch(b, px, text, device)
        tokens = batch["input_ids"].numel()
        row: dict[str, Any] = dict(config=list(cfg), tokens_per_step=tokens, patches=batch["pixel_values"].shape[0])
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
        peer_gib = REFERENCE["peer"].get(tuple(cfg), (None, None))[1]
        if not args.no_peer_budget and peer_gib:  # the goal's memory bar: under stock's peak AND the peer's
            row["peer_budget_gib"] = min(budget, peer_gib - 0.01)
            row["engine_lean"] = run_engine(model, opt, batch, row["peer_budget_gib"], steps, warmup, log)
            log(f"{cfg} engine under the peer's memory: {row['engine_lean']}")
        for k in ("stock", "engine", "engine_lean"):
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
        row = next((r for r in results if tuple(r["config"]) == cfg and not r["engine"].get("oom")), None)
        if row is not None:
            profile_engine(model, opt, make_batch(*cfg, device), out_dir, row["engine"]["vision_checkpointed"],
                           row["engine"]["lm_checkpointed"], f"cfg{idx}", log, row["engine"]["checkpoint_mode"])
    for idx in [int(i) for i in args.cprofile.split(",") if i.strip()]:
        cfg = CONFIGS[idx]
        row = next((r for r in results if tuple(r["config"]) == cfg and not r["engine"].get("oom")), None)
        if row is not None:
            cprofile_engine(model, opt, make_batch(*cfg, device), out_dir, row["engine"]["vision_checkpointed"],
                            row["engine"]["lm_checkpointed"], f"cfg{idx}", log, row["engine"]["checkpoint_mode"])
    # the table, printed last
    hdr = (f"{'config (B,px,text)':<20}{'tokens':>7} | {'stock tok/s':>11}{'GiB':>6}{'MFU':>6} | "
           f"{'engine tok/s':>12}{'GiB':>6}{'MFU':>6}{'ckpt v/l':>9} | {'speedup':>7}{'mem':>6} | "
           f"{'lean tok/s':>11}{'GiB':>6}{'MFU':>6}{'ckpt v/l':>11} | {'speedup':>7}{'mem':>6} | {'peer tok/s (GiB)':>17}")
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        s, e = r.get("stock", {}), r["engine"]
        cfg = tuple(r["config"])

        def fmt(x: dict) -> str:
            if not x:
                return f"{'-':>11}{'-':>6}{'-':>6}"
            if x.get("oom"):
                return f"{'OOM':>11}{'-':>6}{'-':>6}"
            return f"{x['tokens_per_s']:>11.0f}{x['peak_gib']:>6.1f}{100 * x['mfu']:>5.1f}%"

        ef = fmt(e)
        ck = f"{e.get('vision_checkpointed', '-')}/{e.get('lm_checkpointed', '-')}"
        if e.get("checkpoint_mode") == "recompute_offload":
            ck += "+off"
        sp = f"{r['speedup']:>6.2f}x{r['memory_ratio']:>6.2f}" if "speedup" in r else f"{'-':>7}{'-':>6}"
        peer = REFERENCE["peer"].get(cfg)
        lean = fmt(r.get("engine_lean", {}))
        le = r.get("engine_lean", {})
        lck = f"{le.get('vision_checkpointed', '-')}/{le.get('lm_checkpointed', '-')}"
        if le.get("checkpoint_mode") == "recompute_offload":
            lck += "+off"
        lsp = f"{r['lean_speedup']:>6.2f}x{r['lean_memory_ratio']:>6.2f}" if "lean_speedup" in r else f"{'-':>7}{'-':>6}"
        peer_s = f"{peer[0]} ({peer[1]})" if peer else "-"
        lines.append(f"{str(cfg):<20}{r['tokens_per_step']:>7} | {fmt(s)} | {ef:>24}{ck:>9} | {sp} | "
                     f"{lean}{lck:>11} | {lsp} | {peer_s:>17}")
    table = "\n".join(lines)
    (out_dir / "bench_table.txt").write_text(table + "\n")
    log(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
