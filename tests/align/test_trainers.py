"""GRPO (token-level GRPO loss; GSPO with the Dr. GRPO loss) trains tiny Qwen2.5-VL, Gemma 3 and Mllama LoRA
models, DPO tiny Qwen2.5-VL and Gemma 3 ones, on conversations with images, through the fused-kernel engine: the
reward rises, the preference accuracy rises. Unsloth's GRPO arguments and a plain-list dataset are taken."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

COLOURS = ["red", "blue", "green", "white"]


def _conversation(i: int, answer: str) -> dict:
    img = Image.new("RGB", (56 + 8 * i, 56), COLOURS[i % len(COLOURS)])
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Read it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}


def _lora(tiny_model_dir, arch):
    from visiontune import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(tiny_model_dir(arch), use_gradient_checkpointing=False)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, finetune_vision_layers=False, random_state=0)
    return model, processor


def _mean(history, key, steps):
    values = [h[key] for h in history if key in h]
    return float(np.mean(values[:steps])), float(np.mean(values[-steps:])), values


@pytest.mark.parametrize("arch,loss", [("qwen2_5_vl", {"loss_type": "grpo"}),
                                       ("gemma3", {"loss_type": "dr_grpo", "importance_sampling_level": "sequence"}),
                                       ("mllama", {"loss_type": "grpo"})])  # its inputs: test_mllama_grpo.py
def test_grpo_raises_the_reward(tiny_model_dir, tmp_path, arch, loss):
    from visiontune import rewards
    from visiontune.align import GRPOConfig, GRPOTrainer, grpo_rows

    model, processor = _lora(tiny_model_dir, arch)
    rows = grpo_rows([_conversation(i, "1") for i in range(4)])
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=16, num_generations=8,
                      max_completion_length=4, learning_rate=3e-2, max_steps=6, logging_steps=1, beta=0.04,
                      report_to="none", save_strategy="no", seed=0, disable_tqdm=True, use_cpu=True,
                      warmup_ratio=0.0, max_prompt_length=512, optim="adamw_8bit", **loss)  # Unsloth's names too
    trainer = GRPOTrainer(model=model, reward_funcs=[rewards.cer], args=args, train_dataset=rows, tokenizer=processor)
    assert trainer.uses_fused_engine
    trainer.train()
    first, last, curve = _mean(trainer.state.log_history, "reward", 2)
    assert last > first + 1.0, curve  # 1 - CER against "1": from long wrong answers towards short ones
    assert all(h["kl"] >= 0 for h in trainer.state.log_history if "kl" in h)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "gemma3"])
def test_dpo_raises_the_preference_accuracy(tiny_model_dir, tmp_path, arch):
    from visiontune.align import DPOConfig, DPOTrainer, dpo_rows

    model, processor = _lora(tiny_model_dir, arch)
    samples = [{**_conversation(i, "x"), "chosen": str(7 * i + 3), "rejected": f"no, {i} words"} for i in range(8)]
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=2e-2, max_steps=6,
                     logging_steps=1, beta=0.1, report_to="none", save_strategy="no", seed=0, disable_tqdm=True,
                     use_cpu=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dpo_rows(samples), processing_class=processor)
    assert trainer.uses_fused_engine and trainer.ref_model is None  # reference: the same weights, adapter off
    trainer.train()
    first, last, curve = _mean(trainer.state.log_history, "rewards/accuracies", 1)
    assert last >= first + 0.5 and last == 1.0, curve
    _, margin, _ = _mean(trainer.state.log_history, "rewards/margins", 1)
    assert margin > 0


def test_grpo_rows_keep_every_image_in_order_and_the_reference():
    from visiontune.align import dpo_rows, grpo_rows

    conv = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (30, 20), "red")},
                                     {"type": "text", "text": "And"},
                                     {"type": "image", "image": Image.new("RGB", (10, 40), "blue")}]},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
        {"role": "user", "content": [{"type": "text", "text": "Sizes?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "30x20, 10x40"}]},
    ]}
    (row,) = grpo_rows([conv])
    assert row["answer"] == "30x20, 10x40" and [im.size for im in row["images"]] == [(30, 20), (10, 40)]
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"]
    assert [p["type"] for p in row["prompt"][0]["content"]] == ["image", "text", "image"]
    with pytest.raises(ValueError, match="sample 0 has no chosen"):
        dpo_rows([conv])


def test_sampled_pairs_choose_the_best_and_reject_the_worst_answer():
    from visiontune import rewards
    from visiontune.align import sampled_pairs

    convs = [_conversation(0, "12"), _conversation(1, "5")]
    rows = sampled_pairs(convs, [["12", "13", "99999"], ["5", "5", "5"]], rewards.cer)
    assert len(rows) == 1  # the second prompt's answers all score alike: no preference to learn
    assert rows[0]["chosen"][0]["content"][0]["text"] == "12"
    assert rows[0]["rejected"][0]["content"][0]["text"] == "99999"
