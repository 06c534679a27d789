"""Llama 3.2 Vision (Mllama) under TRL's GRPO: the image inputs TRL does not hand the model.

Mllama reads an image through cross-attention, not through image tokens in the sequence: besides
``pixel_values`` its forward takes ``aspect_ratio_ids``/``aspect_ratio_mask`` (which tiles of each image are
real) and ``cross_attention_mask`` (batch, tokens, images, tiles: which tokens see which image's tiles). TRL
1.16's ``GRPOTrainer`` is written for models whose image inputs are ``pixel_values`` plus per-image or
per-token fields it knows by name, and misses Mllama's in three places:

* generation: the processor builds ``cross_attention_mask`` over each prompt from its first token, while
  TRL left-pads the prompts, so in a batch of prompts of different lengths the mask is off by each
  prompt's padding (tokens before the image see it, the last ones do not);
* the log-probabilities of the sampled completions (old policy, reference):
  ``_get_per_token_logps_and_entropies`` takes no Mllama inputs and fails on them (``TypeError: ...
  unexpected keyword argument 'cross_attention_mask'``);
* the loss: ``_generate_and_score_completions`` keeps only the inputs it knows for the training pass,
  which would then run without the images at all.

:class:`visiontune.align.GRPOTrainer` mends these for Mllama models only (other models take TRL's code
unchanged, and TRL's own classes are not touched): the mask of each forward is rebuilt from the token ids
the model is actually given, with the processor's own rule (``get_cross_attention_token_mask`` /
``convert_sparse_cross_attention_mask_to_dense``) placed after the left padding, and extended over the
completion the way Mllama's ``generate`` extends it (every new token sees what the prompt's last token
sees); ``aspect_ratio_ids``/``aspect_ratio_mask`` of the batch are computed again from its images by the
processor's image processor (a second preprocessing of the prompt images per generation batch; the
pixels themselves are TRL's). Each row's log-probabilities then equal those of the row alone (tested).

Only the single-turn generation by transformers is covered: vLLM, transformers' continuous batching,
tools, environments and custom rollout functions are refused for Mllama at trainer start.

DPO on Mllama is refused before any work (:func:`check_dpo`): TRL's DPO collator builds the prompt's
``cross_attention_mask`` and joins the chosen/rejected answers to the prompt without extending it, so the
model fails on the first batch (a mask of prompt length against prompt + answer tokens); mending that
collator is not done here.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import numpy as np
import torch

KEYS = ("aspect_ratio_ids", "aspect_ratio_mask")  # the per-sample image inputs the loss pass needs beside pixel_values


def is_mllama(model: Any) -> bool:
    """Whether ``model`` (a PEFT wrapper or the transformers model) is a Llama 3.2 Vision model."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "mllama"


def check_dpo(model: Any) -> None:
    """Refuse DPO on a Mllama ``model`` with the reason (see the module docstring)."""
    if is_mllama(model):
        raise ValueError("DPO on Llama 3.2 Vision (Mllama) is not supported: TRL's DPO collator does not extend "
                         "the prompt's cross_attention_mask over the chosen/rejected answers (the model fails on the "
                         "first batch); use GRPO (align.method: grpo), which visiontune hands Mllama's inputs")


def unsupported(trainer: Any) -> Optional[str]:
    """Why ``trainer`` (a GRPO trainer on a Mllama model) cannot run with these inputs, or None."""
    for attr, what in (("use_vllm", "vLLM generation"),
                       ("use_transformers_continuous_batching", "transformers' continuous batching"),
                       ("tools", "tools"), ("environment_factories", "environments"),
                       ("rollout_func", "a custom rollout_func")):
        if getattr(trainer, attr, None):
            return what
    return None


def prompt_cross_attention_mask(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, aspect_ratio_mask: Any,
                                image_token_id: int, length: Optional[int] = None) -> torch.Tensor:
    """Mllama's ``cross_attention_mask`` (batch, ``length``, images, tiles) for left-padded prompts.

    ``prompt_ids``/``prompt_mask`` (batch, P): the prompts, padded on the left; ``aspect_ratio_mask``
    (batch, images, tiles): the image processor's (a tile of an image is real where it is 1). Each row's
    mask is the processor's rule applied to the row's own tokens and placed after its padding; columns
    past P (``length`` > P: the completion) repeat column P - 1, as Mllama's ``generate`` extends it.
    """
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)

    width = prompt_ids.size(1)
    length = width if length is None else length
    tiles_mask = (aspect_ratio_mask.cpu() if isinstance(aspect_ratio_mask, torch.Tensor)
                  else torch.as_tensor(np.asarray(aspect_ratio_mask)))
    rows = [ids[keep.bool()].tolist() for ids, keep in zip(prompt_ids.cpu(), prompt_mask.cpu())]
    sparse = [get_cross_attention_token_mask(row, image_token_id) for row in rows]
    # a padded image slot has tile 0 set; zip() in the conversion stops at the row's real images
    dense = convert_sparse_cross_attention_mask_to_dense(
        sparse, num_tiles=tiles_mask.sum(-1).tolist(), max_num_tiles=tiles_mask.size(-1),
        length=max(len(r) for r in rows))
    dense = torch.from_numpy(dense)
    out = dense.new_zeros((len(rows), length, dense.size(2), dense.size(3)))
    for b, row in enumerate(rows):
        out[b, width - len(row):width] = dense[b, :len(row)]
    if length > width:
        out[:, width:] = out[:, width - 1:width]
    return out.to(prompt_ids.device)


def generation_mask(trainer: Any, prompt_ids: list, multimodal_fields: dict) -> torch.Tensor:
    """The ``cross_attention_mask`` for TRL's generation of ``prompt_ids`` (token lists it left-pads as
    ``trl.trainer.utils.pad`` does, to ``trainer.pad_to_multiple_of``)."""
    from trl.trainer.utils import pad

    rows = [torch.tensor(ids) for ids in prompt_ids]
    ids = pad(rows, padding_value=0, padding_side="left", pad_to_multiple_of=trainer.pad_to_multiple_of)
    keep = pad([torch.ones_like(r) for r in rows], padding_value=0, padding_side="left",
               pad_to_multiple_of=trainer.pad_to_multiple_of)
    return prompt_cross_attention_mask(ids, keep, multimodal_fields["aspect_ratio_mask"],
                                       trainer.processing_class.image_token_id)


def aspect_ratio_inputs(trainer: Any, inputs: list[dict], device: Any) -> dict[str, torch.Tensor]:
    """``aspect_ratio_ids``/``aspect_ratio_mask`` of the rows ``inputs`` (their ``images``, as TRL reads them)."""
    images = [row.get("images") or ([row["image"]] if row.get("image") is not None else []) for row in inputs]
    out = trainer.processing_class.image_processor(images=images, return_tensors="pt")
    return {k: out[k].to(device) for k in KEYS}


class WithImageInputs:
    """``model`` and the Mllama inputs of the batch TRL's loss pass scores: handed through ``_compute_loss``
    to :meth:`GRPOTrainer._get_per_token_logps_and_entropies`, which unwraps it (never called itself)."""

    def __init__(self, model: Any, inputs: dict[str, torch.Tensor]) -> None:
        self.model, self.inputs = model, inputs


def per_token_logps(trl_method: Any, trainer: Any, model: Any, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, logits_to_keep: int, batch_size: Optional[int],
                    compute_entropy: bool, compute_aux_loss: bool, kwargs: dict) -> tuple:
    """TRL's ``_get_per_token_logps_and_entropies`` (``trl_method``, bound) for a Mllama batch, a chunk of
    ``batch_size`` rows at a time, each chunk's model call given its rows' ``cross_attention_mask`` (rebuilt
    from ``input_ids``: TRL's from the processor is dropped) and aspect-ratio inputs."""
    kwargs = dict(kwargs)
    kwargs.pop("cross_attention_mask", None)
    ratio_ids, ratio_mask = kwargs.pop("aspect_ratio_ids"), kwargs.pop("aspect_ratio_mask")
    pixel_values, num_images = kwargs.pop("pixel_values", None), kwargs.pop("num_images", None)
    prompt_len = input_ids.size(1) - logits_to_keep
    cross = prompt_cross_attention_mask(input_ids[:, :prompt_len], attention_mask[:, :prompt_len], ratio_mask.cpu(),
                                        trainer.processing_class.image_token_id, length=input_ids.size(1))
    step = batch_size or input_ids.size(0)
    logps, entropies, aux = [], [], []
    for start in range(0, input_ids.size(0), step):
        rows = slice(start, min(start + step, input_ids.size(0)))
        call = functools.partial(model, cross_attention_mask=cross[rows], aspect_ratio_ids=ratio_ids[rows],
                                 aspect_ratio_mask=ratio_mask[rows])
        lp, ent, aux_loss = trl_method(
            call, input_ids[rows], attention_mask[rows], logits_to_keep, None, compute_entropy, compute_aux_loss,
            pixel_values=None if pixel_values is None else pixel_values[rows],
            num_images=None if num_images is None else num_images[rows], **kwargs)
        logps.append(lp)
        entropies.append(ent)
        aux.append(aux_loss)
    return (torch.cat(logps), torch.cat(entropies) if compute_entropy else None,
            torch.stack(aux).mean() if compute_aux_loss else None)
