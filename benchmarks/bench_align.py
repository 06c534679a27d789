"""GPU check of the align engine: GRPO's training passes on a Qwen2.5-VL-7B-shaped model, engine vs stock.

A GRPO step is generation (untouched by the engine: calls with a KV cache fall through to the stock
forwards) and then the passes timed here on a fixed batch of prompt + completion tokens: the reference's
per-token log-probs (adapter off, no gradient), the policy's (forward + backward of the clipped
token-level GRPO loss with its KL term) and the optimizer step. Model and batch as in
``bench_engine.py`` (random weights, bf16, LoRA r=16 on every linear of the LM layers and vision blocks;
one 448 px image = 256 merged tokens per sample), plus ``--text`` prompt tokens and ``--completion``
completion tokens.

Columns:

* **stock**: transformers + PEFT + TRL 1.16's fused LM head (its own chunked log-prob kernel), transformers'
  gradient checkpointing on (``GRPOConfig``'s default);
* **stock, no ckpt**: the same without checkpointing;
* **full logits**: stock without TRL's head (logits -> log_softmax; what TRL did before 1.x), no checkpointing;
* **engine**: ``visiontune.kernels.patch_model`` + ``visiontune.align.install_engine`` (log-probs from the
  chunked linear + cross-entropy kernel), no checkpointing.

tokens/s counts the LM sequence tokens of the batch (image + prompt + completion) per timed step. Also
checks that the engine's per-token log-probs equal stock's (max abs difference, relative error).

Usage (GPU): ``python benchmarks/bench_align.py --out $OUT``. Never run as a unit test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import GIB, IMAGE_TOKEN, add_lora, build_model, make_batch  # noqa: E402


def grpo_batch(b: int, px: int, text: int, completion: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``bench_engine.make_batch`` with the last ``completion`` tokens as the completion (labels only there)."""
    batch = make_batch(b, px, text + completion, device)
    batch["labels"][:, : batch["labels"].shape[1] - completion] = -100
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch


def log_probs(model, batch, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return model(**batch, fused_lm_head=True).log_probs


def full_logits_log_probs(model, batch, grad: bool) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.set_grad_enabled(grad):
        logits = model(**inputs).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return logp * (labels != -100)


def grpo_step(model, opt, batch, advantages, fn, beta: float = 0.04) -> None:
    """Reference pass (adapter off), policy pass with the token-level GRPO loss + KL, optimizer step."""
    mask = (batch["labels"][:, 1:] != -100).float()
    with model.disable_adapter():
        ref = fn(model, batch, grad=False)
    logp = fn(model, batch, grad=True)
    ratio = torch.exp(logp - logp.detach())
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token = -ratio * advantages[:, None] + beta * kl
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(model, opt, batch, advantages, fn, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        grpo_step(model, opt, batch, advantages, fn)
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        grpo_step(model, opt, batch, advantages, fn)
        _sync()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    tokens = batch["input_ids"].numel()
    peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
    return {"median_s": median, "tok_s": tokens / median, "peak_gib": peak,
            "spread": (times[-1] - times[0]) / median, "tokens": tokens}


def check_equivalence(model, base, batch) -> dict:
    """Per-token log-probs of the engine vs TRL's head on the same weights; leaves the model as it found it."""
    from visiontune.align import install_engine
    from visiontune.kernels import patch_model

    with torch.no_grad():
        stock = log_probs(model, batch, grad=False)
        trl_head = base.forward
        handle = patch_model(model, enabled=True, fused_cross_entropy=False)
        install_engine(base)
        engine = log_probs(model, batch, grad=False)
        base.forward = trl_head
        handle.unpatch()
    diff = (engine - stock).abs()
    return {"max_abs_diff": float(diff.max()), "rel_err": float(diff.norm() / stock.norm()),
            "mean_logp": float(stock.sum() / (stock != 0).sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="completions per step")
    p.add_argument("--px", type=int, default=448)
    p.add_argument("--text", type=int, default=64)
    p.add_argument("--completion", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--device", default="cuda", help="'cpu' only for a smoke run of the script (no memory figures)")
    a = p.parse_args(argv)
    from trl.trainer.utils import add_fused_lm_head

    from visiontune.align import install_engine
    from visiontune.kernels import patch_model

    device = torch.device(a.device)
    model = add_lora(build_model(device))
    base = model.get_base_model()
    add_fused_lm_head(base, outputs=("log_probs", "entropy"))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, fused=True)
    batch = grpo_batch(a.batch, a.px, a.text, a.completion, device)
    advantages = torch.linspace(-1, 1, a.batch, device=device)
    results: dict = {"config": vars(a) | {"out": str(a.out)}, "torch": torch.__version__}

    results["equivalence"] = check_equivalence(model, base, batch)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    results["stock"] = measure(model, opt, batch, advantages, log_probs, a.steps, a.warmup)
    base.gradient_checkpointing_disable()
    results["stock_no_ckpt"] = measure(model, opt, batch, advantages, log_probs, a.steps, a.warmup)
    results["full_logits"] = measure(model, opt, batch, advantages, full_logits_log_probs, a.steps, a.warmup)
    patch_model(model, enabled=True, fused_cross_entropy=False)
    assert install_engine(base)
    results["engine"] = measure(model, opt, batch, advantages, log_probs, a.steps, a.warmup)
    print(json.dumps(results, indent=1))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results_align_h200.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
