"""The fused-kernel engine under TRL's GRPO and DPO trainers: per-token log-probs without full logits.

TRL 1.x asks a model for log-probabilities as ``model(..., labels=labels, fused_lm_head=True)``, served
by the forward that ``trl.trainer.utils.add_fused_lm_head`` installs on the model at trainer start (TRL's
own chunked kernel). :func:`install_engine`, called after that, puts visiontune's in front of it: the
backbone's hidden states go through :func:`visiontune.kernels.logprobs.fused_linear_log_probs`, the
chunked linear + cross-entropy of the SFT engine kept per token (``log p = -CE``). Only the positions
with a label are projected, a chunk at a time, so the (batch, sequence, vocabulary) logits never exist.
The policy and the reference are the same module: TRL computes the reference with the adapter
disabled (a fresh adapter) or switched to a frozen copy of the starting adapter (``"ref"``: LoRA weights
only), so no second copy of the base weights is made.

Calls this path cannot serve exactly (a trainable or biased ``lm_head``, logit scaling or soft-capping,
pre-shifted labels, MoE router losses) go to TRL's forward unchanged. Without CUDA the kernels' torch
reference runs (``TRITON_INTERPRET=1`` with ``force_triton`` runs the Triton kernel on the CPU in tests).
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable, Optional

import torch

from visiontune.kernels.logprobs import fused_linear_log_probs
from visiontune.models.state import vision_state

# Config attributes under which architectures scale or cap their logits (what TRL's head reads too).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def _servable(model: Any, shift_labels: Any, kwargs: dict) -> bool:
    """Whether this call can take visiontune's path and return exactly what TRL's would."""
    head = model.get_output_embeddings()
    text_config = model.config.get_text_config()
    return (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and shift_labels is None and not kwargs.get("output_router_logits")
            and not getattr(text_config, "output_router_logits", False)
            and all(getattr(text_config, a, None) is None for a in _LOGIT_TRANSFORMS))


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` (one per True of ``mask``) at their positions, zeros elsewhere (stays differentiable)."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def _engine_forward(model_class: type, trl_forward: Callable, temperature: float) -> Callable:
    @functools.wraps(model_class.forward)  # `generate` validates its kwargs against the model's own signature
    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Optional[torch.Tensor] = None,
                shift_labels: Optional[torch.Tensor] = None, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head or labels is None or not _servable(self, shift_labels, kwargs):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        from trl.trainer.utils import FusedCausalLMOutput

        kwargs["use_cache"] = False
        head = self.get_output_embeddings()
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:].to(head.weight.device)
        mask = targets != -100
        h = hidden.to(head.weight.device, head.weight.dtype)[mask]
        if temperature != 1.0:
            h = h / temperature
        logp, stats = fused_linear_log_probs(h, head.weight, targets[mask], with_stats=True,
                                             chunk_bytes=vision_state(self).loss_chunk_bytes)
        log_probs = _scatter(mask, logp)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count, log_probs=log_probs, entropy=_scatter(mask, stats["entropy"]),
            mean_logits=_scatter(mask, stats["mean_logits"]), is_top1=_scatter(mask, stats["is_top1"]).bool(),
            label_mask=mask)

    forward.visiontune_engine = True  # type: ignore[attr-defined]
    return forward


def install_engine(model: Any, temperature: float = 1.0) -> bool:
    """Serve ``model(..., fused_lm_head=True)`` with visiontune's chunked kernel (see the module docstring).

    ``model`` is the transformers model (``peft_model.get_base_model()``) after TRL's trainer installed its
    fused head; ``temperature`` divides the logits (GRPO samples and scores at its temperature). Returns
    False, changing nothing, if the engine is installed already or TRL's head is not.
    """
    current = model.forward
    if getattr(current, "visiontune_engine", False) or not _is_trl_head(current):
        return False
    model.forward = types.MethodType(_engine_forward(type(model), current, float(temperature)), model)
    return True


def _is_trl_head(forward: Callable) -> bool:
    """Whether ``forward`` is TRL's fused-head forward (it takes ``fused_lm_head``; its signature is the
    model's, copied by functools.wraps, so the code object is what tells)."""
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    return code is not None and "fused_lm_head" in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]


def engine_installed(model: Any) -> bool:
    """Whether :func:`install_engine` serves ``model``'s log-probs (``model`` may be the PEFT wrapper)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(inner.forward, "visiontune_engine", False))
