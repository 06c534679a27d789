"""TRL's ``GRPOTrainer`` and ``DPOTrainer`` for vision-language models, with Unsloth's arguments.

Unsloth's vision GRPO notebooks run ``FastVisionModel`` + ``trl.GRPOConfig``/``GRPOTrainer`` + plain
reward functions. On TRL 1.x / transformers 5 a few of their arguments are gone; these subclasses take
them, and add what a ``FastVisionModel`` needs:

* ``warmup_ratio`` (transformers 4): sets ``warmup_steps`` (a float below 1 is a share of the steps in
  transformers 5); ``max_prompt_length`` (TRL 0.x): accepted and not applied: TRL 1.x no longer
  truncates prompts, since a cut would drop image tokens;
* ``tokenizer=`` (the old name of ``processing_class``), defaulting to the processor
  ``FastVisionModel.from_pretrained`` loaded; ``train_dataset``/``eval_dataset`` may be plain lists of
  rows (images as PIL objects);
* precision fitted to the machine (bf16 on GPUs that support it, fp16 on older ones, fp32 on CPU), a
  bitsandbytes AdamW that cannot run here replaced by ``adamw_torch`` (one warning), and transformers'
  checkpointing off where ``FastVisionModel``'s is installed (as :mod:`visiontune.trainer` does for SFT);
* the fused-kernel engine (:mod:`visiontune.align.engine`) computes every log-probability of the policy
  and the reference; ``use_fused_engine=False`` keeps TRL's own kernel;
* GRPO on Llama 3.2 Vision (Mllama): the cross-attention mask and aspect-ratio inputs TRL does not hand
  the model, for generation, log-probabilities and loss (:mod:`visiontune.align.mllama`; other models
  take TRL's code unchanged). DPO on Mllama is refused at the start, with the reason;
* GRPO's prompt order in each epoch drawn from ``seed + epoch`` (TRL's runs one generator on over the
  epochs), so a run resumed from a checkpoint in a later epoch sees the prompts an uninterrupted run sees.

The loss types are TRL's: ``GRPOConfig(loss_type="grpo" | "dr_grpo" | "dapo" | ...)``, and GSPO is
``importance_sampling_level="sequence"``. Prompts must be conversational (lists of messages with
``{"type": "image"}`` placeholders and an ``images`` column): TRL 1.x refuses prompts rendered with the
chat template beforehand, as Unsloth's notebooks do; leave that ``map`` out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import trl
from trl.trainer.utils import RepeatSampler

from visiontune.align import mllama
from visiontune.align.engine import install_engine
from visiontune.models.state import padding_side, vision_state
from visiontune.trainer import _one_checkpointing, fit_optimizer

log = logging.getLogger(__name__)

__all__ = ["DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer"]


@dataclass
class _VisionArgs:
    """Unsloth's names and the machine-fitted defaults shared by :class:`GRPOConfig` and :class:`DPOConfig`."""

    warmup_ratio: Optional[float] = field(
        default=None, metadata={"help": "transformers 4's warmup share; sets warmup_steps (a float < 1 is a share)."})
    max_prompt_length: Optional[int] = field(
        default=None, metadata={"help": "TRL 0.x's prompt cut; accepted, not applied (it would drop image tokens)."})
    gradient_checkpointing: Optional[bool] = field(
        default=None, metadata={"help": "transformers' checkpointing (None: off); FastVisionModel installs its own."})

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
            self.warmup_steps = self.warmup_ratio
        if self.max_prompt_length is not None:
            log.info("max_prompt_length=%s not applied: TRL 1.x keeps prompts whole (a cut would drop image tokens)",
                     self.max_prompt_length)
        if self.bf16 is None and not self.fp16:
            on_cuda = torch.cuda.is_available() and not self.use_cpu
            self.bf16 = on_cuda and torch.cuda.is_bf16_supported()
            self.fp16 = on_cuda and not self.bf16
        super().__post_init__()  # type: ignore[misc]
        fit_optimizer(self)


@dataclass
class GRPOConfig(_VisionArgs, trl.GRPOConfig):
    """TRL's ``GRPOConfig`` with Unsloth's ``warmup_ratio``/``max_prompt_length`` and machine-fitted defaults."""


@dataclass
class DPOConfig(_VisionArgs, trl.DPOConfig):
    """TRL's ``DPOConfig`` with Unsloth's ``warmup_ratio``/``max_prompt_length`` and machine-fitted defaults."""


def _processor(model: Any, processing_class: Any, tokenizer: Any) -> Any:
    if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
        raise TypeError("got both processing_class= and tokenizer= (its old name) with different objects; pass one")
    chosen = processing_class if processing_class is not None else tokenizer
    if chosen is None and not isinstance(model, str):
        chosen = vision_state(model).processor
    return chosen


def _dataset(data: Any) -> Any:
    """A plain list of rows as a ``datasets.Dataset`` (TRL takes no lists); anything else unchanged."""
    if isinstance(data, (list, tuple)):
        from datasets import Dataset

        return Dataset.from_list(list(data))
    if isinstance(data, dict):
        return {k: _dataset(v) for k, v in data.items()}
    return data


def _engine(trainer: Any, temperature: float, why_not: Optional[str]) -> bool:
    """Put the engine under ``trainer``'s policy (and its separate reference model, if it has one) unless
    ``why_not`` (a reason TRL's kernel must stay)."""
    if why_not:
        log.warning("fused-kernel engine not used: %s; TRL's chunked log-probs serve this run", why_not)
        return False
    policy = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    if trainer.ref_model is not None:
        install_engine(trainer.ref_model, temperature)
    return install_engine(policy, temperature)


class _EpochSeededSampler(RepeatSampler):
    """TRL's prompt sampler, its order in epoch ``e`` drawn from ``seed + e`` (the Trainer calls ``set_epoch``
    before each epoch). TRL's draws each epoch from one generator that runs on from the first, so a run
    resumed from a checkpoint in a later epoch (a fresh generator) would see the first epoch's order again
    and end elsewhere than the uninterrupted run. Epoch 0's order is TRL's."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed + epoch)


class GRPOTrainer(trl.GRPOTrainer):
    """TRL's ``GRPOTrainer`` for vision-language models (see the module docstring); TRL's arguments, in its
    order, plus ``tokenizer=`` and ``use_fused_engine``."""

    def __init__(self, model: Any, reward_funcs: Any = None, args: Optional[trl.GRPOConfig] = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None, *more: Any,
                 tokenizer: Any = None, use_fused_engine: bool = True, **kwargs: Any) -> None:
        args = GRPOConfig() if args is None else args
        fit_optimizer(args)
        _one_checkpointing(args, model)
        super().__init__(model, reward_funcs, args, _dataset(train_dataset), _dataset(eval_dataset),
                         _processor(model, processing_class, tokenizer), *more, **kwargs)
        self._mllama = mllama.is_mllama(self.model)
        if self._mllama and mllama.unsupported(self):
            raise ValueError(f"GRPO on Llama 3.2 Vision (Mllama) with {mllama.unsupported(self)} is not supported: "
                             "visiontune hands Mllama its cross-attention inputs for TRL's single-turn generation by "
                             "transformers only (visiontune.align.mllama)")
        why_not = "the entropy bonus needs entropy gradients" if self._entropy_bonus_enabled else None
        self.uses_fused_engine = use_fused_engine and _engine(self, self.temperature, why_not)

    def _get_train_sampler(self, dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(dataset)
        if type(sampler) is RepeatSampler:
            sampler.__class__ = _EpochSeededSampler  # the same object, with set_epoch
        return sampler

    # Mllama only (visiontune.align.mllama): its cross-attention inputs, which TRL does not pass. Any other model
    # goes straight to TRL's methods.
    def _generate_single_turn(self, prompt_ids: Any, images: Any, multimodal_fields: dict, *args: Any,
                              **kwargs: Any) -> Any:
        if self._mllama and "cross_attention_mask" in multimodal_fields:
            multimodal_fields = {**multimodal_fields,
                                 "cross_attention_mask": mllama.generation_mask(self, prompt_ids, multimodal_fields)}
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)

    def _generate_and_score_completions(self, inputs: Any) -> dict:
        output = super()._generate_and_score_completions(inputs)
        if self._mllama and "pixel_values" in output:
            output.update(mllama.aspect_ratio_inputs(self, inputs, output["prompt_ids"].device))
        return output

    def _compute_loss(self, model: Any, inputs: dict) -> Any:
        if self._mllama and "aspect_ratio_ids" in inputs:
            model = mllama.WithImageInputs(model, {k: inputs[k] for k in mllama.KEYS})
        return super()._compute_loss(model, inputs)

    def _get_per_token_logps_and_entropies(self, model: Any, input_ids: Any, attention_mask: Any, logits_to_keep: int,
                                           batch_size: Optional[int] = None, compute_entropy: bool = False,
                                           compute_aux_loss: bool = False, **kwargs: Any) -> tuple:
        if isinstance(model, mllama.WithImageInputs):
            kwargs = {**kwargs, **model.inputs}
            model = model.model
        if self._mllama and "aspect_ratio_ids" in kwargs:
            return mllama.per_token_logps(super()._get_per_token_logps_and_entropies, self, model, input_ids,
                                          attention_mask, logits_to_keep, batch_size, compute_entropy,
                                          compute_aux_loss, kwargs)
        return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, batch_size,
                                                          compute_entropy, compute_aux_loss, **kwargs)

    # TRL re-runs the processor on the prompts for the image inputs with the processor's own padding side and
    # lines its outputs (Qwen's mm_token_type_ids) up with left-padded prompt ids: it must pad left, and a
    # FastVisionModel's processor pads right for training.
    def train(self, *args: Any, **kwargs: Any) -> Any:
        with padding_side(self.processing_class, "left"):
            return super().train(*args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        with padding_side(self.processing_class, "left"):
            return super().evaluate(*args, **kwargs)


class DPOTrainer(trl.DPOTrainer):
    """TRL's ``DPOTrainer`` for vision-language models (see the module docstring); TRL's arguments, in its
    order, plus ``tokenizer=`` and ``use_fused_engine``. Rows: ``{"prompt", "images", "chosen", "rejected"}``
    (:func:`visiontune.align.dpo_rows`, :func:`visiontune.align.sampled_pairs`)."""

    def __init__(self, model: Any, ref_model: Any = None, args: Optional[trl.DPOConfig] = None,
                 data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, *more: Any, tokenizer: Any = None, use_fused_engine: bool = True,
                 **kwargs: Any) -> None:
        mllama.check_dpo(model)
        args = DPOConfig() if args is None else args
        fit_optimizer(args)
        _one_checkpointing(args, model)
        super().__init__(model, ref_model, args, data_collator, _dataset(train_dataset), _dataset(eval_dataset),
                         _processor(model, processing_class, tokenizer), *more, **kwargs)
        why_not = "WPO weighting (use_weighting) needs log_sum_sq_probs" if self.use_weighting else None
        self.uses_fused_engine = use_fused_engine and _engine(self, 1.0, why_not)
