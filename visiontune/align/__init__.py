"""Alignment after SFT for vision-language models: GRPO (and GSPO, Dr. GRPO) with task rewards, and DPO.

The library side of the ``align`` stage (:mod:`visiontune.pipeline.align`), usable on its own with
Unsloth-style code::

    from visiontune import FastVisionModel
    from visiontune.align import GRPOConfig, GRPOTrainer, grpo_rows
    from visiontune import rewards

    model, processor = FastVisionModel.from_pretrained("Qwen/Qwen2.5-VL-3B-Instruct")
    model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=16)
    trainer = GRPOTrainer(model=model, reward_funcs=[rewards.cer, rewards.format_reward(r"\\d+")],
                          args=GRPOConfig(loss_type="dr_grpo", importance_sampling_level="sequence", beta=0.04),
                          train_dataset=grpo_rows(conversations), processing_class=processor)
    trainer.train()

* :mod:`~visiontune.align.trainers`: TRL's ``GRPOTrainer``/``DPOTrainer`` taking Unsloth's arguments and
  plain lists, with the fused-kernel engine under them;
* :mod:`~visiontune.align.engine`: per-token log-probs of policy and reference from the chunked linear +
  cross-entropy kernel, no full logits, no second copy of the weights;
* :mod:`~visiontune.align.data`: conversations -> GRPO rows, DPO rows from chosen/rejected columns or
  from the model's own samples scored by a reward;
* rewards are plain callables: :mod:`visiontune.rewards`.

Importing this package imports TRL (and torch).
"""

from visiontune.align.data import dpo_rows, grpo_rows, sample_answers, sampled_pairs
from visiontune.align.engine import engine_installed, install_engine
from visiontune.align.trainers import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

__all__ = ["DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer", "dpo_rows", "engine_installed", "grpo_rows",
           "install_engine", "sample_answers", "sampled_pairs"]
