"""The peer (Unsloth) on the engine benchmark's model, batches, optimizer and statistic, for its own column.

``bench_engine.py --peer`` saves its random-weight Qwen2.5-VL-7B-shaped model once and runs this script in a
child process per variant: Unsloth patches transformers when imported, so it must not share a process with
the stock and engine columns. The child loads that very checkpoint through Unsloth's ``FastVisionModel``
(16-bit LoRA, or QLoRA with ``--4bit``), adds LoRA r=16 on the same linears (``bench_engine.LORA_TARGETS``),
uses Unsloth's own offloaded gradient checkpointing (its default, ``"unsloth"``), and times the same batches
(``bench_engine.make_batch``) with the same ``AdamW(fused=True)`` and the same statistic
(``bench_engine.train_steps``: the median of the timed steps after warm-up). One JSON line per config on
stdout, prefixed ``PEER_RESULT``; the parent collects them.

Needs unsloth, unsloth_zoo, trl, datasets, dill, multiprocess and bitsandbytes (on the device: carried
wheels, see RESULTS_engine.md). GPU only; never a unit test.

    python benchmarks/bench_peer.py --model-dir /tmp/peer_model --configs 0,1 [--4bit]

``--product`` times the peer's own product path instead, for ``bench_product.py --peer``: its patched TRL
``SFTTrainer`` with its ``UnslothVisionDataCollator`` (images kept at their size: ``resize="max"``) and its
offloaded checkpointing, on ``bench_product.make_rows``' rows, the same ``SFTConfig`` values and the same
statistic (``bench_product._Clock``: CUDA events at the step boundaries, median after warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PREFIX = "PEER_RESULT "


def load_peer(args: argparse.Namespace):
    """The peer's model on ``--model-dir``: Unsloth's FastVisionModel (16-bit or ``--4bit``), LoRA r=16 on
    bench_engine's targets, its offloaded checkpointing, in training mode; ``(model, processor)``."""
    import torch
    from unsloth import FastVisionModel

    import bench_engine as be

    model, processor = FastVisionModel.from_pretrained(
        args.model_dir, load_in_4bit=args.four_bit, dtype=torch.bfloat16, use_gradient_checkpointing="unsloth",
        local_files_only=True)
    model = FastVisionModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=be.LORA_TARGETS,
        use_gradient_checkpointing="unsloth", random_state=0)
    FastVisionModel.for_training(model)
    return model, processor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, help="the checkpoint bench_engine.py saved (save_for_peer)")
    ap.add_argument("--configs", default="0,1,2,3", help="comma-separated indices into bench_engine.CONFIGS")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--4bit", dest="four_bit", action="store_true", help="QLoRA: Unsloth's load_in_4bit")
    ap.add_argument("--product", action="store_true", help="the peer's SFTTrainer + collator (bench_product.py)")
    ap.add_argument("--batch", type=int, default=4, help="--product: rows per step")
    ap.add_argument("--px", type=int, default=448, help="--product: image side")
    ap.add_argument("--text", type=int, default=512, help="--product: answer digits")
    args = ap.parse_args(argv)
    if args.product:
        return product(args)

    import unsloth  # noqa: F401  (first: it patches transformers and peft)

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_engine as be

    t0 = time.time()
    model, _ = load_peer(args)
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    device = torch.device("cuda")
    print(f"peer loaded in {time.time() - t0:.0f}s: unsloth {unsloth.__version__}, 4-bit {args.four_bit}, "
          f"{n_lora} LoRA layers, {sum(p.numel() for p in trainable) / 1e6:.1f}M trainable, weights "
          f"{torch.cuda.memory_allocated() / be.GIB:.1f} GiB", flush=True)
    for idx in [int(i) for i in args.configs.split(",") if i.strip()]:
        cfg = be.CONFIGS[idx]
        batch = be.make_batch(*cfg, device)
        be._reset()
        try:
            res = be.train_steps(model, opt, batch, args.steps, args.warmup)
            res.update(peak_gib=torch.cuda.max_memory_allocated() / be.GIB,
                       reserved_gib=torch.cuda.max_memory_reserved() / be.GIB)
        except torch.OutOfMemoryError:
            res = dict(oom=True)
        opt.zero_grad(set_to_none=True)
        res.update(config=list(cfg), lora_layers=n_lora, four_bit=args.four_bit, unsloth=unsloth.__version__)
        print(PREFIX + json.dumps(res), flush=True)
        del batch
    return 0


def product(args: argparse.Namespace) -> int:
    """The peer's product path: its SFTTrainer, collator and checkpointing on bench_product's rows."""
    import unsloth  # noqa: F401  (first: it patches transformers, peft and trl)
    from unsloth.trainer import UnslothVisionDataCollator

    import statistics

    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_engine as be
    import bench_product as bp

    model, processor = load_peer(args)
    total = args.warmup + args.steps
    rows = bp.make_rows(args.batch * total, args.px, args.text)
    collator = UnslothVisionDataCollator(model, processor, resize="max")
    probe = collator(rows[:args.batch])
    tokens = int(probe["attention_mask"].sum())
    clock = bp._Clock(True)

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock.mark()

        def on_train_end(self, *a, **k):
            clock.mark()

    cfg = SFTConfig(output_dir="/tmp/peer_product", max_steps=total, per_device_train_batch_size=args.batch,
                    learning_rate=1e-5, logging_steps=total, save_strategy="no", report_to="none",
                    optim="adamw_torch_fused", dataloader_num_workers=0, disable_tqdm=True, seed=0,
                    remove_unused_columns=False, dataset_text_field="", dataset_kwargs={"skip_prepare_dataset": True},
                    max_length=4096)
    trainer = SFTTrainer(model=model, tokenizer=processor, data_collator=collator, train_dataset=rows, args=cfg,
                         callbacks=[Steps()])
    be._reset()
    trainer.train()
    step_s = clock.steps()[args.warmup:]
    sec = statistics.median(step_s)
    res = dict(step_s=step_s, sec_per_step=sec, tokens_per_step=tokens, tokens_per_s=tokens / sec,
               peak_gib=torch.cuda.max_memory_allocated() / be.GIB, batch=args.batch, text=args.text,
               unsloth=unsloth.__version__, loss=next((h["loss"] for h in trainer.state.log_history if "loss" in h), None))
    print(PREFIX + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
