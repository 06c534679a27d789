"""Benchmark: LoRA training on N GPUs with DDP and FSDP2: tokens/s per GPU, scaling efficiency, memory per GPU.

The model, the LoRA targets and the batches are the engine benchmark's (``bench_engine.py``, imported): a
Qwen2.5-VL-7B-shaped model with random bf16 weights, LoRA r=16 on every linear layer of the language model and
the vision blocks, the fused-kernel engine patched in, padding-free packed batches of one config
(batch per GPU, image px, text tokens). Every GPU runs the same batch size, so the global batch grows with N.

Phases, in one ``torchrun`` job:

1. ``single`` (rank 0 alone, the others wait): the plain model on one GPU, the reference of scaling efficiency.
2. ``ddp``: ``DistributedDataParallel`` over all ranks (each holds the whole model; LoRA gradients all-reduced).
3. ``fsdp2``: ``fully_shard`` on every vision block and decoder layer, then the root (frozen base and LoRA
   weights sharded; LoRA kept fp32 as in ``single``, so all three phases compute the same thing).

Per phase: median seconds per optimizer step over ``--steps`` timed steps (after ``--warmup``), tokens/s per
GPU (tokens of one GPU's batch / median step), tokens/s over all GPUs, scaling efficiency (tokens/s per GPU /
``single``'s tokens/s), peak memory per GPU (``max_memory_allocated``, each rank), the spread of the timed steps.
Checkpointing: every vision block and ``--lm-ckpt`` of the LM layers recompute (visiontune's light recompute).

Usage (GPU): ``torchrun --nproc-per-node N benchmarks/bench_distributed.py --out $OUT``
(``--config 8,672,256``, ``--modes ddp``, ``--no-single``). CPU smoke run, two gloo processes on a tiny
Qwen2.5-VL (``visiontune.testing.build_tiny_model``) with real collated batches:
``torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --tiny``. Never run as a unit test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine as be  # noqa: E402

GIB = be.GIB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def _reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the LoRA weights: fused on CUDA (as bench_engine), torch's default for FSDP2's DTensor shards."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda" and not any(isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(params, lr=1e-5, fused=fused)


def _time_steps(model: torch.nn.Module, batch: dict, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Seconds of each timed training step (forward, backward with the mode's communication, AdamW)."""
    opt = _optimizer(model, device)
    times, loss = [], float("nan")
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        out = model(**{**batch, "use_cache": False})
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        del out
    del opt
    return {"sec_per_step": statistics.median(times), "step_min": min(times), "step_max": max(times), "loss": loss}


def _measure(model: torch.nn.Module, batch: dict, tokens: int, device: torch.device, args: Any) -> dict[str, Any]:
    """:func:`_time_steps` from a clean allocator, with tokens/s and the peak memory (or ``oom``)."""
    _reset(device)
    try:
        res = _time_steps(model, batch, device, args.steps, args.warmup)
        res["tokens_per_s"] = tokens / res["sec_per_step"]
    except torch.OutOfMemoryError:
        res = {"oom": True}
    res["peak_gib"] = _peak_gib(device)
    return res


def _shard(model: torch.nn.Module) -> None:
    """FSDP2: one unit per vision block and per decoder layer, then the root (embeddings, merger, norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    for module in be._vision_blocks(model) + be._lm_layers(model):
        fully_shard(module)
    fully_shard(model)


def _tiny(folder: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The tiny random-weight Qwen2.5-VL in ``folder`` with LoRA and the engine (its torch references on the CPU),
    and one padding-free batch of 4 synthetic pages collated by visiontune's collator."""
    import numpy as np
    from PIL import Image

    from visiontune.collator import VisionDataCollator
    from visiontune.kernels import patch_model
    from visiontune.models.fast_vision import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(str(folder), dtype="float32", use_gradient_checkpointing=False,
                                                       use_fused_kernels=False)
    patch_model(model, enabled=True)
    model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=16, random_state=0)
    rng = np.random.RandomState(0)
    rows = [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": Image.fromarray((rng.rand(56, 112, 3) * 255).astype("uint8"))},
                                     {"type": "text", "text": "Transcribe the handwritten digits in this image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": str(rng.randint(10**5))}]}]} for _ in range(4)]
    collator = VisionDataCollator(model, processor, resize=(112, 56), padding_free=True, train_on_responses_only=True)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(rows).items()}
    return model.to(device), batch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--config", default="4,448,512", help="batch per GPU, image px, text tokens (bench_engine's shapes)")
    ap.add_argument("--modes", default="ddp,fsdp2", help="comma-separated: ddp, fsdp2")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lm-ckpt", type=float, default=0.5,
                    help="share of LM layers that recompute in backward (every vision block does)")
    ap.add_argument("--no-single", action="store_true", help="skip the one-GPU reference (no scaling efficiency)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, gloo, 1+1 steps")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"ddp", "fsdp2"}:
        ap.error(f"--modes {args.modes!r}: use ddp and/or fsdp2")
    if "fsdp2" in modes:  # sharding is irreversible: FSDP2 runs last
        modes = [m for m in modes if m != "fsdp2"] + ["fsdp2"]

    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    use_cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.tiny:  # each process its own copy, saved before the process group exists (save_pretrained in a group
        from visiontune.testing import build_tiny_model  # writes from rank 0 only)

        tiny_dir = build_tiny_model("qwen2_5_vl", Path(tempfile.mkdtemp(prefix="vt-bench-distributed-")))
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    out_dir = Path(args.out)
    log_f = None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_f = open(out_dir / "bench_distributed_log.txt", "a")

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)
            log_f.write(msg + "\n")
            log_f.flush()

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    if args.tiny:
        args.steps, args.warmup = 1, 1
        model, batch = _tiny(tiny_dir, device)
        config = "tiny"
    else:
        b, px, text = (int(x) for x in args.config.split(","))
        config = [b, px, text]
        model = be.add_lora(be.build_model(device))
        be._patch(model)
        batch = be.engine_batch(be.make_batch(b, px, text, device), model)
    from visiontune.models.checkpointing import checkpoint_modules

    vis, lm = be._vision_blocks(model), be._lm_layers(model)
    n_lm = round(args.lm_ckpt * len(lm))
    checkpoint_modules(vis + lm[:n_lm], mode="recompute")
    tokens = int(batch["input_ids"].numel())
    log(f"torch {torch.__version__}, {world} process(es) on {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if use_cuda else "")
        + f"; config {config}: {tokens} tokens per GPU per step; checkpointed {len(vis)} vision blocks, "
        f"{n_lm}/{len(lm)} LM layers")
    results: dict[str, Any] = {"world_size": world, "config": config, "tokens_per_gpu_step": tokens,
                               "device": torch.cuda.get_device_name(device) if use_cuda else "cpu",
                               "lm_checkpointed": n_lm, "vision_checkpointed": len(vis), "modes": {}}

    if not args.no_single:
        if rank == 0:
            results["single"] = _measure(model, batch, tokens, device, args)
            log(f"single (rank 0 alone): {results['single']}")
        barrier()
    for mode in modes:
        if world == 1:
            log(f"{mode}: skipped (one process)")
            continue
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model, device_ids=[local] if use_cuda else None)
            res = _measure(wrapped, batch, tokens, device, args)
            del wrapped
        else:
            _reset(device)
            _shard(model)
            res = _measure(model, batch, tokens, device, args)
        per_rank = [None] * world
        dist.all_gather_object(per_rank, res)
        row: dict[str, Any] = {"per_rank": per_rank}
        if all(not r.get("oom") for r in per_rank):
            slowest = max(r["sec_per_step"] for r in per_rank)  # a step ends when the last rank's does
            row.update(sec_per_step=slowest, tokens_per_s_per_gpu=tokens / slowest,
                       tokens_per_s_total=world * tokens / slowest,
                       peak_gib_per_gpu=[r["peak_gib"] for r in per_rank],
                       step_spread=[min(r["step_min"] for r in per_rank), max(r["step_max"] for r in per_rank)])
            single = results.get("single", {}).get("tokens_per_s")
            if single:
                row["scaling_efficiency"] = row["tokens_per_s_per_gpu"] / single
        else:
            row["oom"] = True
        results["modes"][mode] = row
        log(f"{mode}: {({k: v for k, v in row.items() if k != 'per_rank'})}")
        barrier()

    if rank == 0:
        (out_dir / "bench_distributed.json").write_text(json.dumps(results, indent=1))
        hdr = f"{'mode':<8}{'GPUs':>5}{'tok/s/GPU':>11}{'tok/s total':>13}{'efficiency':>12}{'peak GiB/GPU':>14}{'s/step':>9}"
        lines = [hdr, "-" * len(hdr)]
        s = results.get("single")
        if s and not s.get("oom"):
            peak = f"{s['peak_gib']:.1f}" if s["peak_gib"] is not None else "-"
            lines.append(f"{'single':<8}{1:>5}{s['tokens_per_s']:>11.0f}{s['tokens_per_s']:>13.0f}{'1.00':>12}"
                         f"{peak:>14}{s['sec_per_step']:>9.3f}")
        for mode, r in results["modes"].items():
            if r.get("oom"):
                lines.append(f"{mode:<8}{world:>5}{'OOM':>11}")
                continue
            peaks = [p for p in r["peak_gib_per_gpu"] if p is not None]
            eff = f"{r['scaling_efficiency']:.2f}" if "scaling_efficiency" in r else "-"
            lines.append(f"{mode:<8}{world:>5}{r['tokens_per_s_per_gpu']:>11.0f}{r['tokens_per_s_total']:>13.0f}"
                         f"{eff:>12}{(f'{max(peaks):.1f}' if peaks else '-'):>14}{r['sec_per_step']:>9.3f}")
        table = "\n".join(lines)
        (out_dir / "bench_distributed_table.txt").write_text(table + "\n")
        log(table)
    if world > 1:
        dist.destroy_process_group()
    if args.tiny:
        import shutil

        shutil.rmtree(tiny_dir, ignore_errors=True)  # the mkdtemp folder itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
