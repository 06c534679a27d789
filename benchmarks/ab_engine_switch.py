"""Interleaved A/B timing of one engine switch at one benchmark config, for launch-bound configs on a
noisy host.

On the (1, 448, 512) config the step is launch-bound, and back-to-back runs of ``bench_engine.py`` on the
same H200 measured 1.60x-2.26x for unchanged code: the host's speed drifts between runs. This script puts
stock HF+PEFT and the engine with the switch off and on in one process and alternates short rounds of
each, so drift hits all three alike; it reports the median step time per variant and the ratios.

    python benchmarks/ab_engine_switch.py --switch direct_flash [--config 0] [--rounds 6] [--steps 5] [--sync-debug]

Switches: ``direct_flash`` (``kernels.attention.DIRECT_FLASH_OPS``: aten flash ops from a plain
autograd.Function vs ``torch.nn.attention.varlen.varlen_attn``); ``vision_metadata`` (the packed batch with the
vision tower's metadata computed on the CPU, as ``VisionDataCollator`` gives it, vs without: the tower computes
it from the grid on the GPU). ``--sync-debug`` also counts the GPU->host syncs of one step of each variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine as be  # noqa: E402

from visiontune.kernels import attention as attn_mod  # noqa: E402

# A module flag the rounds set off and on, or None for a batch switch ("off": the packed batch without the
# vision metadata that engine_batch computes on the CPU).
SWITCHES = {"direct_flash": (attn_mod, "DIRECT_FLASH_OPS"), "vision_metadata": None}


def _set(switch, on: bool) -> None:
    if switch is not None:
        setattr(*switch, on)


def _count_syncs(model, opt, batch) -> int:
    """GPU->host syncs in one training step (``torch.cuda.set_sync_debug_mode``)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            be.train_steps(model, opt, batch, 1, 0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switch", choices=sorted(SWITCHES), default="direct_flash")
    ap.add_argument("--config", type=int, default=0, help="index into bench_engine.CONFIGS")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round and variant")
    ap.add_argument("--ckpt", default="31,18", help="vision,LM layers checkpointed (bench_engine's choice at config 0 without --recompute-mlp)")
    ap.add_argument("--recompute-mlp", action="store_true", help="patch with recompute_mlp=True (bench_engine's flag)")
    ap.add_argument("--sync-debug", action="store_true", help="count one step's GPU->host syncs per variant")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    switch = SWITCHES[a.switch]
    be.RECOMPUTE_MLP = a.recompute_mlp
    dev = torch.device("cuda")
    model = be.add_lora(be.build_model(dev))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    b, px, text = be.CONFIGS[a.config]
    batch = be.make_batch(b, px, text, dev)
    nv, nl = (int(x) for x in a.ckpt.split(","))
    times: dict[str, list[float]] = {"stock": [], "off": [], "on": []}
    inner = model.base_model.model
    for r in range(a.rounds):
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        times["stock"].append(be.train_steps(model, opt, batch, a.steps, 1)["sec_per_step"])
        inner.gradient_checkpointing_disable()
        opt.zero_grad(set_to_none=True)
        with be._engine_step(model, opt, batch, nv, nl) as packed:
            # a batch switch: "off" is the same packed batch without the CPU-made metadata
            meta = {k for k in packed if k.startswith("image_") and k != "image_grid_thw"}
            batches = {"on": packed, "off": {k: v for k, v in packed.items() if switch is not None or k not in meta}}
            if r == 0 and a.sync_debug:
                syncs = {}
                for variant in ("off", "on"):
                    _set(switch, variant == "on")
                    syncs[variant] = _count_syncs(model, opt, batches[variant])
                print(f"syncs per step: {syncs}", flush=True)
            for variant in (("off", "on") if r % 2 == 0 else ("on", "off")):
                _set(switch, variant == "on")
                times[variant].append(be.train_steps(model, opt, batches[variant], a.steps, 1)["sec_per_step"])
        opt.zero_grad(set_to_none=True)
        print(f"round {r}: " + "  ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    _set(switch, True)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"switch": a.switch, "config": list(be.CONFIGS[a.config]), "device": torch.cuda.get_device_name(),
           "median_sec_per_step": med, "speedup_off": med["stock"] / med["off"], "speedup_on": med["stock"] / med["on"],
           "rounds": times, **({"syncs_per_step": syncs} if a.sync_debug else {})}
    print(f"median s/step: stock {med['stock']:.3f}  {a.switch}=off {med['off']:.3f} ({res['speedup_off']:.2f}x)  "
          f"{a.switch}=on {med['on']:.3f} ({res['speedup_on']:.2f}x)")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"ab_{a.switch}_config{a.config}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
