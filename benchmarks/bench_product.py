"""The product path against the raw loop: what a user's ``SFTTrainer`` step costs beyond the engine's.

Users train through visiontune's ``SFTTrainer`` (the train stage's too) with ``VisionDataCollator`` and real
images, not through ``bench_engine.py``'s raw loop. On one model (a Qwen2.5-VL-7B-shaped random-weight
checkpoint saved with the tiny test tokenizer and the real Qwen2.5-VL processor; ``--shape tiny`` for a CPU
smoke run), LoRA r=16 on every LM and vision-block linear through ``FastVisionModel``, the same synthetic rows
(one ``--px`` x ``--px`` image and an answer of ``--text`` digit tokens each), it times

* ``trainer``: ``SFTTrainer.train()`` (the engine's loss path on a GPU, TRL's bookkeeping, the collator on
  the host each step),
* ``raw_collate``: a plain loop that collates each batch on the host, moves it and steps,
* ``raw_precollated``: the same loop over batches collated and moved to the device beforehand,
* ``raw_collate_model_positions``: ``raw_collate`` with the collator's M-RoPE ``position_ids`` dropped, so the
  model computes them in its forward (what it did before the collator gave them),
* ``raw_collate_model_metadata``: ``raw_collate`` with the collator's vision metadata (``image_cu_seqlens``,
  ``image_window_index``, ...) dropped, so the vision tower computes it from the grid on the GPU,
* ``raw_collate_before``: both dropped (the collator's batch before it gave either),
* ``trainer_full_calls``: ``trainer`` with ``model.train()`` / ``model.zero_grad()`` walking every module at
  every step (what transformers' calls did before ``visiontune.trainer._lean_step_calls``),

with the same ``AdamW(fused=True)`` (``adamw_torch_fused``) and the same statistic (median of the steps after
``--warmup``; CUDA events at the step boundaries, no extra host sync). ``--rounds N`` runs the variant list
N times in one process, in reverse order every other round, so that a variant's place in the run and the host's
drift do not decide a comparison; the figure is then the median over all rounds' timed steps. Reports LM
tokens/s, the peak memory of
each variant and the trainer's share of the raw loop; ``--checkpointing auto --budget-gib X`` measures the
``"auto"`` choice under a budget (e.g. the peer's peak). ``--peer`` first runs the peer's own product path
(Unsloth's SFTTrainer, collator and offloaded checkpointing: ``bench_peer.py --product`` in a child process,
same checkpoint and rows); the ``trainer_auto`` variant then trains through ``use_gradient_checkpointing=
"auto"`` with ``--budget-gib peer``, the peer's measured peak, as its budget. Never a unit test.

    python benchmarks/bench_product.py --batch 4 --text 512 --out $OUT           # GPU
    python benchmarks/bench_product.py --batch 4 --text 512 --peer --budget-gib peer \
        --variants trainer,raw_collate,raw_precollated,trainer_auto --out $OUT   # GPU, with the peer
    python benchmarks/bench_product.py --shape tiny --batch 2 --text 24 --steps 2 --warmup 1   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

GIB = 2**30
SEVEN_B = dict(  # bench_engine.build_model's Qwen2.5-VL-7B dimensions
    text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6),
    vision=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584))


def build_checkpoint(out: Path, shape: str) -> Path:
    """The tiny Qwen2.5-VL (tokenizer, processor, config with its token ids) and, for ``7b``, the same config at
    the 7B's dimensions with random bf16 weights saved over it."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from visiontune.testing import build_tiny_model

    build_tiny_model("qwen2_5_vl", out)
    if shape == "tiny":
        return out
    cfg = AutoConfig.from_pretrained(out)
    for k, v in SEVEN_B["text"].items():
        setattr(cfg.text_config, k, v)
    for k, v in SEVEN_B["vision"].items():
        setattr(cfg.vision_config, k, v)
    cfg.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    if getattr(cfg.text_config, "layer_types", None) is not None:  # one entry per layer: the tiny model's 2
        cfg.text_config.layer_types = ["full_attention"] * cfg.text_config.num_hidden_layers
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def make_rows(n: int, px: int, text: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        img = Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8))
        answer = "".join(str(d) for d in rng.integers(0, 10, text))  # one token per digit
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Read it."}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
    return rows


class _Clock:
    """Step boundaries: CUDA events on a GPU (no host sync), the wall clock elsewhere."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.marks = cuda, []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def steps(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _reset(cuda: bool) -> None:
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(cuda: bool) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if cuda else None


def run_trainer(model, rows, args, cuda: bool, out_dir: Path) -> dict[str, Any]:
    from transformers import TrainerCallback

    from visiontune import SFTConfig, SFTTrainer

    clock = _Clock(cuda)

    total = args.warmup + args.steps
    host = _HostProfile(args.cprofile, Path(args.out) / f"cprofile_{out_dir.name}.txt")

    class Steps(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            _reset(cuda)  # the peak of the training steps, not of "auto"'s probes before them

        def on_step_begin(self, args_: Any, state: Any, *a: Any, **k: Any) -> None:
            clock.mark()
            if state.global_step == total:  # the extra step after the timed ones (--cprofile)
                host.start()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            clock.mark()
            host.stop()

    cfg = SFTConfig(output_dir=str(out_dir), max_steps=total + host.extra, per_device_train_batch_size=args.batch,
                    learning_rate=1e-5, logging_steps=total, save_strategy="no", report_to="none",
                    optim="adamw_torch_fused" if cuda else "adamw_torch", dataloader_num_workers=0,
                    disable_tqdm=True, seed=0, **({"checkpoint_budget_gib": args.budget_gib} if args.budget_gib else {}))
    trainer = SFTTrainer(model, cfg, train_dataset=rows, callbacks=[Steps()])
    _reset(cuda)
    trainer.train()
    # on_step_begin of step i+1 closes step i; train end closes the last one
    step_s = clock.steps()[args.warmup:total]
    choice = trainer.checkpoint_choice
    return dict(step_s=step_s, sec_per_step=statistics.median(step_s), peak_gib=_peak(cuda),
                uses_fused_engine=trainer.uses_fused_engine, loss=trainer.state.log_history[-2].get("loss"),
                checkpoint_choice=choice.as_params() if choice is not None else None)


def run_raw(model, collator, rows, args, cuda: bool, precollated: bool, name: str = "raw_collate") -> dict[str, Any]:
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=cuda)
    batches = [rows[i:i + args.batch] for i in range(0, args.batch * (args.warmup + args.steps), args.batch)]
    batches = [b if len(b) == args.batch else rows[:args.batch] for b in batches]
    host = _HostProfile(args.cprofile and not precollated, Path(args.out) / f"cprofile_{name}.txt")
    batches += batches[-1:] * host.extra  # one more step, profiled, after the timed ones

    def to_device(b: dict) -> dict:
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}

    ready = [to_device(collator(b)) for b in batches] if precollated else None
    clock = _Clock(cuda)
    model.train()
    _reset(cuda)
    total = args.warmup + args.steps
    for i, rb in enumerate(batches):
        clock.mark()
        if i == total:
            host.start()
        batch = ready[i] if precollated else to_device(collator(rb))
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    clock.mark()
    host.stop()
    step_s = clock.steps()[args.warmup:total]
    return dict(step_s=step_s, sec_per_step=statistics.median(step_s), peak_gib=_peak(cuda), loss=float(loss.detach()))


class _HostProfile:
    """``--cprofile``: cProfile over one extra step after the timed ones (where the host's time goes), and the
    GPU->host syncs of that step by the line that made them; written to ``path``. Inactive: ``extra`` is 0."""

    def __init__(self, on: bool, path: Path) -> None:
        self.on, self.path, self.extra = on, path, int(on)
        self.prof = self.caught = self._warn = None

    def start(self) -> None:
        import cProfile
        import warnings

        if not self.on or self.prof is not None:
            return
        self._warn = warnings.catch_warnings(record=True)
        self.caught = self._warn.__enter__()
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        self.t0 = time.perf_counter()
        self.prof = cProfile.Profile()
        self.prof.enable()

    def stop(self) -> None:
        import io
        import pstats
        from collections import Counter

        if self.prof is None:
            return
        self.prof.disable()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("default")
        wall = time.perf_counter() - self.t0
        self._warn.__exit__(None, None, None)
        syncs = Counter(f"{w.filename}:{w.lineno}" for w in self.caught if "synchroniz" in str(w.message))
        buf = io.StringIO()
        buf.write(f"one step after the timed ones, {wall * 1e3:.0f} ms with the profiler on; "
                  f"{sum(syncs.values())} GPU->host syncs:\n")
        buf.writelines(f"  {k} x{v}\n" for k, v in syncs.most_common(20))
        stats = pstats.Stats(self.prof, stream=buf)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(buf.getvalue())
        print(f"cprofile: {self.path.name}: {wall * 1e3:.0f} ms, {sum(syncs.values())} syncs", flush=True)
        self.prof = None


def run_peer(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``bench_peer.py --product`` on the same checkpoint and rows, in a child process (Unsloth patches
    transformers and TRL on import); its ``PEER_RESULT`` line, or ``{"error": ...}`` with its output's tail."""
    import subprocess

    here = Path(__file__).resolve().parent
    cmd = [sys.executable, str(here / "bench_peer.py"), "--product", "--model-dir", str(path),
           "--batch", str(args.batch), "--px", str(args.px), "--text", str(args.text),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("PEER_RESULT "):
            res = json.loads(line[len("PEER_RESULT "):])
            print("peer", json.dumps({k: res[k] for k in ("tokens_per_s", "peak_gib", "sec_per_step")}), flush=True)
            return res
    tail = (proc.stdout + proc.stderr)[-3000:]
    print("peer failed:\n" + tail, flush=True)
    return {"error": tail}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("7b", "tiny"), default="7b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--px", type=int, default=448)
    ap.add_argument("--text", type=int, default=512, help="answer digits (one token each)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--checkpointing", default="False", help="FastVisionModel use_gradient_checkpointing")
    ap.add_argument("--budget-gib", default=None, help="checkpoint_budget_gib for 'auto' (GiB, or 'peer')")
    ap.add_argument("--peer", action="store_true", help="time the peer's product path first (child process)")
    ap.add_argument("--variants", default="trainer,raw_collate,raw_precollated",
                    help="of trainer, raw_collate, raw_precollated, trainer_auto (SFTTrainer under 'auto')")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the variant list this many times, reversed every other round (interleaved A/B)")
    ap.add_argument("--cprofile", action="store_true",
                    help="cProfile one extra step of trainer and raw_collate after the timed ones (host time, syncs)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args(argv)
    ckpt: Any = {"False": False, "True": True}.get(args.checkpointing, args.checkpointing)
    if isinstance(ckpt, str):
        try:
            ckpt = float(ckpt)
        except ValueError:
            pass
    cuda = torch.cuda.is_available() and args.shape == "7b"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from visiontune import FastVisionModel, VisionDataCollator

    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp) / "model", args.shape)
        peer = run_peer(path, args) if args.peer else None
        if args.budget_gib == "peer":
            if peer is None or "peak_gib" not in peer:
                raise SystemExit("--budget-gib peer needs --peer and a peer result")
            args.budget_gib = peer["peak_gib"]
        elif args.budget_gib is not None:
            args.budget_gib = float(args.budget_gib)
        model, processor = FastVisionModel.from_pretrained(
            str(path), dtype="bfloat16" if cuda else "float32", use_gradient_checkpointing=ckpt, local_files_only=True)
        model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=16)
        rows = make_rows(args.batch * (args.warmup + args.steps), args.px, args.text)
        collator = VisionDataCollator(model, processor)
        probe = collator(rows[:args.batch])
        tokens = int(probe["attention_mask"].sum()) if "attention_mask" in probe else probe["input_ids"].numel()
        result: dict[str, Any] = dict(shape=args.shape, batch=args.batch, px=args.px, text=args.text,
                                      checkpointing=args.checkpointing, budget_gib=args.budget_gib,
                                      tokens_per_step=tokens, torch=torch.__version__,
                                      device=torch.cuda.get_device_name() if cuda else "cpu")
        if peer is not None:
            result["peer"] = peer
        metadata = {k for k in probe if k.startswith("image_") and k != "image_grid_thw"}
        result["collator_vision_metadata"] = sorted(metadata)
        dropped = {"raw_collate_model_positions": {"position_ids"}, "raw_collate_model_metadata": metadata,
                   "raw_collate_before": metadata | {"position_ids"}}

        def run_variant(v: str) -> dict[str, Any]:
            if v in ("trainer", "trainer_full_calls"):
                import contextlib

                import visiontune.trainer as vt_trainer

                lean = vt_trainer._lean_step_calls
                if v == "trainer_full_calls":
                    vt_trainer._lean_step_calls = lambda m: contextlib.nullcontext()
                try:
                    return run_trainer(model, rows, args, cuda, Path(tmp) / v)
                finally:
                    vt_trainer._lean_step_calls = lean
            if v == "trainer_auto":
                FastVisionModel.for_training(model, use_gradient_checkpointing="auto")
                r = run_trainer(model, rows, args, cuda, Path(tmp) / "trainer_auto")
                FastVisionModel.for_training(model, use_gradient_checkpointing=ckpt)
                return r
            if v in dropped:  # as raw_collate, with what the collator gives dropped: the model computes it
                def without(b: list[dict], drop: set = dropped[v]) -> dict:
                    return {k: x for k, x in collator(b).items() if k not in drop}

                return run_raw(model, without, rows, args, cuda, precollated=False, name=v)
            return run_raw(model, collator, rows, args, cuda, precollated=v == "raw_precollated", name=v)

        variants = args.variants.split(",")
        for i in range(args.rounds):
            for v in (variants if i % 2 == 0 else variants[::-1]):
                r = run_variant(v)
                r["tokens_per_s"] = tokens / r["sec_per_step"]
                print(v, f"round {i + 1}/{args.rounds}",
                      json.dumps({k: r[k] for k in ("tokens_per_s", "peak_gib", "sec_per_step")}), flush=True)
                if v not in result:
                    result[v] = dict(r, round_sec_per_step=[r["sec_per_step"]])
                    continue
                agg = result[v]  # every round's timed steps pooled; the largest peak
                agg["step_s"] = agg["step_s"] + r["step_s"]
                agg["round_sec_per_step"].append(r["sec_per_step"])
                agg["sec_per_step"] = statistics.median(agg["step_s"])
                agg["tokens_per_s"] = tokens / agg["sec_per_step"]
                if r.get("peak_gib") is not None:
                    agg["peak_gib"] = max(agg["peak_gib"], r["peak_gib"])
        if args.rounds > 1:
            for v in variants:
                print(v, f"all {args.rounds} rounds",
                      json.dumps({k: result[v][k] for k in ("tokens_per_s", "peak_gib", "sec_per_step",
                                                            "round_sec_per_step")}), flush=True)
    if "trainer" in result and "raw_collate" in result:
        result["trainer_vs_raw_collate"] = result["trainer"]["tokens_per_s"] / result["raw_collate"]["tokens_per_s"]
    if "trainer" in result and "raw_precollated" in result:
        result["trainer_vs_raw_precollated"] = (result["trainer"]["tokens_per_s"]
                                                / result["raw_precollated"]["tokens_per_s"])
    for v in dropped:  # the collator's extras: with them (raw_collate) over without
        if v in result and "raw_collate" in result:
            result[f"raw_collate_vs_{v}"] = result["raw_collate"]["tokens_per_s"] / result[v]["tokens_per_s"]
    if "trainer" in result and "trainer_full_calls" in result:
        result["trainer_vs_trainer_full_calls"] = (result["trainer"]["tokens_per_s"]
                                                   / result["trainer_full_calls"]["tokens_per_s"])
    for v in ("trainer", "trainer_auto"):
        if v in result and peer is not None and "tokens_per_s" in peer:
            result[f"{v}_vs_peer"] = result[v]["tokens_per_s"] / peer["tokens_per_s"]
    (out / f"bench_product_b{args.batch}_t{args.text}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
