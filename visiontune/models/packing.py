"""Padding-free packing: turn a padded batch into one packed row.

Padding wastes every FLOP spent on pad tokens (the whole model runs on them). Packing concatenates the
valid tokens of all samples into a single row of length T = sum(lengths), with ``position_ids``
restarting at 0 for each sample and ``cu_seqlens`` for varlen attention. Keys follow transformers'
``FlashAttentionKwargs`` names (``cu_seq_lens_q`` ...), so ``model(**packed)`` forwards them to the
attention layers (the engine's patched attention uses them; stock SDPA does not).
"""

from __future__ import annotations

import torch


def pack_padded_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, ignore_index: int = -100) -> dict[str, object]:
    """Pack ``input_ids`` (B, S) with ``attention_mask`` (B, S; left or right padding) into (1, T).

    ``position_ids`` may be (B, S) or have extra leading dims (M-RoPE: (3, B, S)); they are packed the
    same way. Without them, positions restart at 0 per sample. In the packed labels the first token of
    every sample becomes ``ignore_index``: after the causal shift that label would otherwise be the
    target of the previous sample's last token (no unpacked run ever uses it as a target).
    """
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    out: dict[str, object] = {"input_ids": input_ids[mask][None]}
    starts = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    cu = starts.to(torch.int32)
    total = int(starts[-1])
    if position_ids is None:
        pos = torch.arange(total, device=input_ids.device) - starts[:-1].repeat_interleave(lengths)
        out["position_ids"] = pos[None]
    else:
        out["position_ids"] = position_ids[..., mask][..., None, :]
    if labels is not None:
        lab = labels[mask].clone()
        lab[starts[:-1][lengths > 0]] = ignore_index
        out["labels"] = lab[None]
    max_len = int(lengths.max()) if lengths.numel() else 0
    out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    return out


def longest_sequence(cu_seqlens: torch.Tensor) -> int:
    """The longest sequence that cumulative boundaries ``cu_seqlens`` (``[0, l0, l0 + l1, ...]``) describe (a host
    read when they are on a GPU)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def unpack_to_padded(packed: torch.Tensor, attention_mask: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
    """Inverse of the packing for per-token outputs: (1, T, ...) -> (B, S, ...), pads filled with pad_value."""
    mask = attention_mask.bool()
    out = packed.new_full((*mask.shape, *packed.shape[2:]), pad_value)
    out[mask] = packed[0]
    return out
