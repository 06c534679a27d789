"""FP8 frozen weights (``load_in_fp8``) against the bf16 engine: speed at equal memory, and the loss curve.

On the engine benchmark's Qwen2.5-VL-7B-shaped random-weight model (``bench_engine.build_model``, LoRA r=16 on
every LM and vision-block linear), in one process and one run:

* speed: per config, stock HF+PEFT+GC (``--stock``: its peak is the bf16 engine's budget, as in
  ``bench_engine.py``), the bf16 engine (fewest checkpointed layers under that budget) and the engine with
  its LoRA bases in FP8 (``visiontune.kernels.fp8.convert_fp8_base``) under the bf16 engine's *measured*
  peak, so FP8 never uses more memory; the same batches, fused AdamW and statistic (``bench_engine.
  train_steps``: median of CUDA-event step times after warm-up);
* loss curve (``--loss-steps N``): N steps from the same LoRA initialisation with a fresh AdamW each, bf16
  then FP8, on a learnable task (each sample's text is an arithmetic sequence ``base + (s + i d) mod 2000``
  with its own start s and step d, so the next token follows from the context), one new batch per step;
  reports both curves and their gap (mean of the last 10% of steps, and the largest gap of a 10-step mean).

    python benchmarks/bench_fp8.py --configs 3 --stock --loss-steps 200 --loss-config 1 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine as be  # noqa: E402

GIB = 2**30


def learnable_batch(b: int, px: int, text: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``bench_engine.make_batch``'s layout with the text replaced by per-sample arithmetic sequences."""
    batch = be.make_batch(b, px, text, device)
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 2000, (b, 1), generator=gen)
    step = torch.randint(1, 8, (b, 1), generator=gen)
    n = text - 2  # make_batch's text follows <vision_start>, the image tokens and <vision_end> in seq = merged + text
    seq = 1000 + (start + step * torch.arange(n)) % 2000
    ids = batch["input_ids"].clone()
    ids[:, -n:] = seq.to(device)
    labels = batch["labels"].clone()
    labels[:, -n:] = ids[:, -n:]
    batch.update(input_ids=ids, labels=labels)
    return batch


def loss_curve(model, batches: list[dict], lr: float) -> list[float]:
    """One AdamW step per batch from the model's current LoRA weights; the loss of every step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    losses = []
    for batch in batches:
        out = model(**batch, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
    return [float(x) for x in losses]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="3", help="comma-separated indices into bench_engine.CONFIGS")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--stock", action="store_true", help="measure stock HF+PEFT+GC; its peak is the bf16 budget")
    ap.add_argument("--budget-gib", type=float, default=62.6, help="bf16 engine budget without --stock")
    ap.add_argument("--recompute-mlp", action="store_true")
    ap.add_argument("--loss-steps", type=int, default=0)
    ap.add_argument("--loss-config", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over one step of the bf16 and the FP8 engine (bench_engine.profile_engine)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args(argv)
    be.RECOMPUTE_MLP = args.recompute_mlp
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    from visiontune.kernels.fp8 import convert_fp8_base, restore_fp8_base

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.time()
    model = be.add_lora(be.build_model(device))
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 would make the first steps identical whatever the base's precision
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=1e-3)
    lora0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    log(f"model built in {time.time() - t0:.0f}s, weights {torch.cuda.memory_allocated() / GIB:.1f} GiB")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    result: dict[str, Any] = dict(torch=torch.__version__, device=torch.cuda.get_device_name(),
                                  recompute_mlp=args.recompute_mlp, rows=[])
    configs = [be.CONFIGS[int(i)] for i in args.configs.split(",") if i.strip()]

    def restore_lora() -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in lora0:
                    p.copy_(lora0[n])

    def engine_curve(tag: str) -> list[float]:
        """The loss curve on the patched model from the initial LoRA weights."""
        handle = be._patch(model)
        restore_lora()
        t = time.time()
        curve = loss_curve(model, [be.engine_batch(b, model) for b in curve_batches], args.lr)
        handle.unpatch()
        log(f"{tag} loss curve: {curve[0]:.4f} -> {curve[-1]:.4f} ({time.time() - t:.0f}s)")
        return curve

    def profile(res: dict, batch: dict, tag: str) -> None:
        """One profiled step at the checkpointing that ``res`` chose (``--profile``)."""
        if args.profile and not res.get("oom"):
            restore_lora()
            be.profile_engine(model, opt, batch, out, res["vision_checkpointed"], res["lm_checkpointed"], tag, log,
                              res.get("checkpoint_mode", "recompute"))

    curve_batches = None
    if args.loss_steps:
        cfg = be.CONFIGS[args.loss_config]
        curve_batches = [learnable_batch(*cfg, seed=i, device=device) for i in range(args.loss_steps)]
        bf16_curve = engine_curve("bf16")
        result["loss_curve"] = dict(config=list(cfg), lr=args.lr, bf16=bf16_curve)
    rows = []
    for cfg in configs:
        restore_lora()
        batch = be.make_batch(*cfg, device)
        tokens = batch["input_ids"].numel()
        row: dict[str, Any] = dict(config=list(cfg), tokens_per_step=tokens)
        budget = args.budget_gib
        if args.stock:
            row["stock"] = be.run_stock(model, opt, batch, args.steps, args.warmup)
            budget = row["stock"].get("peak_gib", budget)
            log(f"{cfg} stock: {row['stock']}")
        row["bf16_budget_gib"] = budget
        row["engine_bf16"] = be.run_engine(model, opt, batch, budget, args.steps, args.warmup, log)
        log(f"{cfg} engine bf16: {row['engine_bf16']}")
        profile(row["engine_bf16"], batch, f"bf16_cfg{be.CONFIGS.index(cfg)}")
        rows.append((row, batch))
    t = time.time()
    n = convert_fp8_base(model)
    log(f"{n} LoRA bases converted to FP8 in {time.time() - t:.0f}s; weights now "
        f"{torch.cuda.memory_allocated() / GIB:.1f} GiB")
    result["fp8_layers"] = n
    for row, batch in rows:
        restore_lora()
        fp8_budget = row["engine_bf16"].get("peak_gib", row["bf16_budget_gib"])
        row["fp8_budget_gib"] = fp8_budget
        row["engine_fp8"] = be.run_engine(model, opt, batch, fp8_budget, args.steps, args.warmup, log)
        log(f"{tuple(row['config'])} engine fp8: {row['engine_fp8']}")
        profile(row["engine_fp8"], batch, f"fp8_cfg{be.CONFIGS.index(tuple(row['config']))}")
        for k in ("stock", "engine_bf16", "engine_fp8"):
            r = row.get(k)
            if r and not r.get("oom"):
                r["tokens_per_s"] = row["tokens_per_step"] / r["sec_per_step"]
        if row["engine_bf16"].get("tokens_per_s") and row["engine_fp8"].get("tokens_per_s"):
            row["fp8_vs_bf16"] = row["engine_fp8"]["tokens_per_s"] / row["engine_bf16"]["tokens_per_s"]
        result["rows"].append(row)
    if curve_batches is not None:
        fp8_curve = engine_curve("fp8")
        bf = result["loss_curve"]["bf16"]
        tail = max(1, len(bf) // 10)
        gap_tail = (statistics.mean(fp8_curve[-tail:]) - statistics.mean(bf[-tail:])) / statistics.mean(bf[-tail:])
        win = [abs(statistics.mean(fp8_curve[i:i + 10]) - statistics.mean(bf[i:i + 10])) / statistics.mean(bf[i:i + 10])
               for i in range(0, len(bf) - 9, 10)]
        result["loss_curve"].update(fp8=fp8_curve, rel_gap_last_10pct=gap_tail, max_rel_gap_10_step_mean=max(win))
        log(f"loss gap: last 10% {gap_tail * 100:+.2f}%, largest 10-step-mean gap {max(win) * 100:.2f}%")
    restore_fp8_base(model)
    (out / "bench_fp8.json").write_text(json.dumps(result, indent=1))
    for row in result["rows"]:
        cells = []
        for k in ("stock", "engine_bf16", "engine_fp8"):
            r = row.get(k, {})
            if r.get("tokens_per_s"):
                cells.append(f"{k} {r['tokens_per_s']:.0f} tok/s @ {r['peak_gib']:.1f} GiB "
                             f"(ckpt {r.get('vision_checkpointed', '-')}/{r.get('lm_checkpointed', '-')})")
        log(f"{tuple(row['config'])}: " + "; ".join(cells) + f"; fp8/bf16 {row.get('fp8_vs_bf16', float('nan')):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
