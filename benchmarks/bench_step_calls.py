"""Host time of the per-step calls transformers' Trainer makes on the model: ``model.train()`` and
``model.zero_grad()``, as transformers makes them and as visiontune's ``SFTTrainer`` serves them during
``train()`` (``visiontune.trainer._lean_step_calls``), on the Qwen2.5-VL-7B module tree with LoRA r=16 on every LM
and vision-block linear (``bench_product.SEVEN_B``; weights on the meta device, so it runs anywhere: these calls
touch the module tree and the parameters' ``grad`` fields, never the weights). Median of ``--repeats`` rounds of
``--calls`` calls each; CPU, never a unit test.

    python benchmarks/bench_step_calls.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_product import SEVEN_B  # noqa: E402


def build(tmp: Path) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from visiontune.testing import build_tiny_model

    build_tiny_model("qwen2_5_vl", tmp)
    cfg = AutoConfig.from_pretrained(tmp)
    for k, v in SEVEN_B["text"].items():
        setattr(cfg.text_config, k, v)
    for k, v in SEVEN_B["vision"].items():
        setattr(cfg.vision_config, k, v)
    if getattr(cfg.text_config, "layer_types", None) is not None:
        cfg.text_config.layer_types = ["full_attention"] * cfg.text_config.num_hidden_layers
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    targets = (r".*(?:language_model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
               r"|visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:gate|up|down)_proj))")
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets))


def timed(fn, calls: int, repeats: int) -> float:
    """Median over ``repeats`` rounds of the mean seconds per call."""
    rounds = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t) / calls)
    return statistics.median(rounds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    from visiontune.trainer import _lean_step_calls

    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step_calls() -> None:  # what one step asks of the model: train mode, then grads cleared
        for p in trainable:
            p.grad = torch.empty_like(p)
        model.train()
        model.zero_grad()

    res = dict(modules=sum(1 for _ in model.modules()), parameters=sum(1 for _ in model.parameters()),
               trainable=len(trainable), torch=torch.__version__)
    def grads_only() -> None:  # the emulated backward's share of step_calls, subtracted from both
        for p in trainable:
            p.grad = torch.empty_like(p)
        for p in trainable:
            p.grad = None

    res["setting_grads_ms"] = 1e3 * timed(grads_only, args.calls, args.repeats)
    res["transformers_ms"] = 1e3 * timed(step_calls, args.calls, args.repeats) - res["setting_grads_ms"]
    with _lean_step_calls(model):
        res["visiontune_ms"] = 1e3 * timed(step_calls, args.calls, args.repeats) - res["setting_grads_ms"]
    res["saved_ms_per_step"] = res["transformers_ms"] - res["visiontune_ms"]
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
