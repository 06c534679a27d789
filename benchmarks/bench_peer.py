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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, help="the checkpoint bench_engine.py saved (save_for_peer)")
    ap.add_argument("--configs", default="0,1,2,3", help="comma-separated indices into bench_engine.CONFIGS")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--4bit", dest="four_bit", action="store_true", help="QLoRA: Unsloth's load_in_4bit")
    args = ap.parse_args(argv)

    import unsloth  # noqa: F401  (first: it patches transformers and peft)
    from unsloth import FastVisionModel

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_engine as be

    t0 = time.time()
    model, _ = FastVisionModel.from_pretrained(
        args.model_dir, load_in_4bit=args.four_bit, dtype=torch.bfloat16, use_gradient_checkpointing="unsloth",
        local_files_only=True)
    model = FastVisionModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=be.LORA_TARGETS,
        use_gradient_checkpointing="unsloth", random_state=0)
    FastVisionModel.for_training(model)
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


if __name__ == "__main__":
    sys.exit(main())
