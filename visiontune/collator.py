"""``VisionDataCollator``: conversations with images -> model-ready batches with correct labels.

Call-compatible with Unsloth's ``UnslothVisionDataCollator``. The batch itself is made by the model's own
processor (so ``input_ids`` and ``pixel_values`` are exactly what the processor makes for the same
conversation); this class adds what the processor does not do:

* images from PIL objects, paths, bytes or Arrow's ``{"bytes", "path"}`` dicts, any number per sample,
  resized (``resize``, ``resize_dimension``) and snapped to the vision patch grid by the same
  :class:`~visiontune.images.ImageRule` that evaluation and serving use;
* labels in which padding, image placeholder tokens and everything that is not an assistant answer are
  ``ignore_index`` (found from the chat template itself, or by ``instruction_part``/``response_part``);
* a token budget: a sample longer than ``max_seq_length`` is cut only after its last image token; if
  the cut would go through image tokens (the classic "image features and image tokens do not match"
  crash) the sample is dropped with a warning, and an error is raised if nothing is left
  (:func:`budget_verdict`; ``visiontune.budget`` applies it to a whole dataset before training);
* batches that mix text-only and image rows, on every architecture: where the processor cannot encode
  one (Mllama), the two kinds are encoded apart and merged by the architecture's rule
  (``ArchSpec.mixed_batch``);
* ``padding_free=True`` (Qwen2/2.5/3-VL, Mistral 3): the batch becomes one packed row with no pad
  tokens, per-sample (M-RoPE) positions and ``cu_seq_lens_*`` for varlen attention. Needs attention that
  honours sample boundaries (the engine's patched attention or flash-attention 2); the collator refuses
  otherwise. Loss and gradients equal the padded batch's (tested).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch

from visiontune.images import ImageRule, load_image
from visiontune.inference import chat_parts, model_resizer
from visiontune.models.archs import REGISTRY, ArchSpec, get_spec
from visiontune.models.archspec import ImageTokens
from visiontune.models.fast_vision import quantized_layers
from visiontune.models.packing import pack_padded_batch
from visiontune.models.state import base_model, padding_side, vision_state

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

# Tokens that stand for image content or image structure in any registered architecture (so a model
# without an ArchSpec still gets the common ones masked); never a training target.
_IMAGE_TOKENS = ImageTokens.union(spec.image_tokens for spec in REGISTRY.values())


class SampleTooLongError(ValueError):
    """Every sample of a batch needed more than ``max_seq_length`` tokens before its last image ended."""


def budget_verdict(length: int, image_end: int, limit: Optional[int]) -> str:
    """The token budget's rule for one sample of ``length`` tokens whose last image token ends at ``image_end``:
    ``"fit"``, ``"truncate"`` (longer than ``limit``: cut after its last image token) or ``"drop"`` (its image
    tokens end past ``limit``: a cut would go through the image). ``limit`` None or 0: everything fits."""
    if not limit or length <= limit:
        return "fit"
    return "drop" if image_end > limit else "truncate"


def _find(seq: list[int], pattern: list[int], start: int = 0) -> int:
    n = len(pattern)
    if n == 0:
        return -1
    first = pattern[0]
    for i in range(start, len(seq) - n + 1):
        if seq[i] == first and seq[i:i + n] == pattern:
            return i
    return -1


# Batch entries that are per image, not per token: never truncated or packed along the sequence.
_IMAGE_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "image_sizes",
               "aspect_ratio_ids", "aspect_ratio_mask")


def _check_padding_free(model: Any, config: Any) -> None:
    """Refuse ``padding_free=True`` unless the architecture can pack (``ArchSpec.padding_free``) and the
    model's attention keeps packed samples apart."""
    model_type = getattr(config, "model_type", None)
    spec = REGISTRY.get(model_type)
    if spec is None or not spec.padding_free:
        supported = ", ".join(t for t, s in REGISTRY.items() if s.padding_free)
        raise ValueError(
            f"padding_free=True is not supported for model_type {model_type!r} (supported: "
            f"{supported}): its image attention needs per-sample masks. Use padding_free=False."
        )
    handle = vision_state(model).kernel_handle
    attn_impl = str(getattr(config, "_attn_implementation", "") or "")
    flash = attn_impl.startswith("flash_attention")
    quantized = quantized_layers(model)
    if quantized and not flash:
        raise ValueError(
            f"padding_free=True with a quantized base ({quantized[0]!r} is a bitsandbytes layer: load_in_4bit): the "
            "engine's packed attention takes full-precision projections only, and transformers' own attention "
            "would let the samples of a packed row attend to each other. Use attn_implementation="
            "'flash_attention_2', load_in_4bit=False, or padding_free=False."
        )
    if not (handle is not None and handle.active) and not flash:
        raise ValueError(
            "padding_free=True needs attention that keeps packed samples apart: visiontune's fused kernels "
            "(on by default with FastVisionModel on CUDA; on the CPU call visiontune.kernels.patch_model(model, "
            f"enabled=True)) or attn_implementation='flash_attention_2'. With {attn_impl or 'this attention'!r} "
            "samples in a packed row would attend to each other; use padding_free=False."
        )


def _rope_index(model: Any) -> Optional[Callable]:
    """The model's M-RoPE position function (``get_rope_index`` of the Qwen-VL family), or None."""
    base = base_model(model)
    return getattr(getattr(base, "model", base), "get_rope_index", None)


def _mrope_positions(model: Any, batch: dict[str, Any], mask: torch.Tensor) -> Optional[torch.Tensor]:
    """The model's own M-RoPE positions (3, B, S) for a padded batch, or None for 1-D RoPE models."""
    fn = _rope_index(model)
    if fn is None:
        return None
    available = dict(batch, attention_mask=mask)
    params = inspect.signature(fn).parameters
    kwargs = {k: available.get(k) for k in params if k not in ("self", "kwargs")}
    with torch.no_grad():
        positions, _ = fn(**kwargs)
    return positions


def _base_config(model: Any) -> Any:
    """The transformers config of ``model``, under a PEFT wrapper if there is one (or ``model`` itself when
    it is a config)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model().config
    return getattr(model, "config", model)


class VisionDataCollator:
    """Collate conversation samples into a batch for a vision-language model (Unsloth-compatible)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        max_seq_length: Optional[int] = None,
        formatting_func: Optional[Callable[[dict], dict]] = None,
        resize: Union[str, int, tuple, list, None] = ImageRule.resize,
        ignore_index: int = -100,
        train_on_responses_only: bool = False,
        instruction_part: Optional[str] = None,
        response_part: Optional[str] = None,
        force_match: bool = True,
        num_proc: Optional[int] = None,
        completion_only_loss: bool = True,
        pad_to_multiple_of: Optional[int] = None,
        resize_dimension: Union[int, str] = ImageRule.resize_dimension,
        snap_to_patch_size: bool = ImageRule.snap_to_patch_size,
        trim: bool = ImageRule.trim,
        image_root: Optional[Union[str, Path]] = None,
        padding_free: bool = False,
    ):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.config = base_cfg = _base_config(model)
        self.spec: Optional[ArchSpec]
        try:
            self.spec = get_spec(base_cfg)
        except ValueError:
            self.spec = None
        self.max_seq_length = max_seq_length if max_seq_length is not None else getattr(model, "max_seq_length", None)
        self.formatting_func = formatting_func
        self.rule = ImageRule(resize, resize_dimension, snap_to_patch_size, trim)  # validated here, before any batch
        self.ignore_index = ignore_index
        self.train_on_responses_only = train_on_responses_only or bool(instruction_part or response_part)
        self.force_match = force_match
        self.num_proc = num_proc
        self.completion_only_loss = completion_only_loss
        self.pad_to_multiple_of = pad_to_multiple_of
        self.image_root = Path(image_root) if image_root else None
        self.padding_free = padding_free
        # M-RoPE models (the Qwen-VL family): the collator hands the model its 3-D positions, computed here on the
        # CPU batch. Left to the model, they are computed in every forward from the batch on the GPU, reading
        # values to the host one by one: ~12 GPU->host syncs per sample, each draining the GPU's queue. The
        # vision tower's metadata comes with the batch for the same reason (_with_vision_metadata).
        self._model = model if (padding_free or _rope_index(model) is not None) else None
        if padding_free:
            _check_padding_free(model, base_cfg)
        self.resizer = model_resizer(self.rule, base_cfg, processor)
        self.image_token_ids = self._image_token_ids()
        self.pad_token_id = self.tokenizer.pad_token_id
        self.dropped = 0  # samples dropped because their image tokens did not fit
        self.truncated = 0
        self._set_markers(instruction_part, response_part)

    def _set_markers(self, instruction_part: Optional[str], response_part: Optional[str]) -> None:
        """Instruction/response markers and their token ids (``train_on_responses_only``); missing ones are
        read off the chat template."""
        if not self.train_on_responses_only:
            self.instruction_part = self.response_part = None
            return
        if not (instruction_part and response_part):
            auto_instr, auto_resp = self.detect_parts()
            instruction_part = instruction_part or auto_instr
            response_part = response_part or auto_resp
        self.instruction_part, self.response_part = instruction_part, response_part
        self._instr_ids = self._marker_ids(instruction_part)
        self._resp_ids = self._marker_ids(response_part)

    # ---------------------------------------------------------------------------------------- helpers
    def _image_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for holder in (self.processor, self.tokenizer):
            for attr in _IMAGE_TOKENS.attrs:
                tok = getattr(holder, attr, None)
                if isinstance(tok, str):
                    tid = self.tokenizer.convert_tokens_to_ids(tok)
                    if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                        ids.add(tid)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in _IMAGE_TOKENS.strings if t in vocab)
        for attr in _IMAGE_TOKENS.config_ids:
            v = getattr(self.config, attr, None)
            if isinstance(v, int):
                ids.add(v)
        return ids

    def _marker_ids(self, marker: str) -> list[int]:
        ids = self.tokenizer(marker, add_special_tokens=False)["input_ids"]
        if not self.force_match and marker.endswith("\n") and len(ids) > 1:
            # Tokenizers may merge the marker's trailing newline into the next word; match without it.
            ids = self.tokenizer(marker.rstrip("\n"), add_special_tokens=False)["input_ids"]
        return ids

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def detect_parts(self) -> tuple[str, str]:
        """Instruction and response markers read off the chat template (e.g. Qwen's
        ``"<|im_start|>user\\n"`` and ``"<|im_start|>assistant\\n"``)."""
        s1, s2, a1 = "\x00vtA\x00", "\x00vtB\x00", "\x00vtC\x00"

        def text(t: str) -> list[dict]:
            return [{"type": "text", "text": t}]

        u1 = [{"role": "user", "content": text(s1)}]
        with_prompt = self._render(u1, add_generation_prompt=True)
        without = self._render(u1)
        if not with_prompt.startswith(without):
            raise ValueError("cannot detect response_part: the chat template is not prefix-consistent; pass response_part")
        response = with_prompt[len(without):]
        if not response.strip():
            # Templates like Mistral's close the user turn with the marker ("...[/INST]") and add no
            # generation prompt: the response marker is what follows the user's text.
            response = without[without.index(s1) + len(s1):]
        conv = u1 + [{"role": "assistant", "content": text(a1)}]
        first = self._render(conv)
        second = self._render(conv + [{"role": "user", "content": text(s2)}])
        instruction = second[len(first):second.index(s2)] if second.startswith(first) else ""
        if not response.strip() or not instruction.strip():
            raise ValueError(
                f"could not detect instruction/response markers from the chat template (got {instruction!r}, "
                f"{response!r}); pass instruction_part= and response_part= explicitly"
            )
        return instruction, response

    def _answer_strings(self, messages: list[dict]) -> list[str]:
        """Each assistant turn's rendered text (answer + end-of-turn tokens), in order."""
        answers = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:k], add_generation_prompt=True)
            through = self._render(messages[: k + 1])
            if not through.startswith(prompt):
                raise ValueError(
                    "completion_only_loss: the chat template renders turns inconsistently (a conversation prefix "
                    "is not a prefix of the full text); use train_on_responses_only=True with instruction_part/"
                    "response_part instead"
                )
            answers.append(through[len(prompt):])
        return answers

    def _load_images(self, values: list[Any]) -> list[Image.Image]:
        def one(v: Any) -> Image.Image:
            return self.resizer(load_image(v, self.image_root))

        if self.num_proc and self.num_proc > 1 and len(values) > 1:
            with ThreadPoolExecutor(self.num_proc) as pool:
                return list(pool.map(one, values))
        return [one(v) for v in values]

    # ----------------------------------------------------------------------------------------- labels
    def _labels(self, ids: list[int], attention: list[int], messages: list[dict]) -> list[int]:
        ignore = self.ignore_index
        labels = [t if a else ignore for t, a in zip(ids, attention)]
        if self.train_on_responses_only:
            keep = [False] * len(ids)
            pos = 0
            while True:
                r = _find(ids, self._resp_ids, pos)
                if r < 0:
                    break
                start = r + len(self._resp_ids)
                nxt = _find(ids, self._instr_ids, start)
                end = nxt if nxt >= 0 else len(ids)
                for i in range(start, end):
                    keep[i] = True
                pos = end
            labels = [l if k else ignore for l, k in zip(labels, keep)]
        elif self.completion_only_loss:
            keep = [False] * len(ids)
            pos = 0
            for answer in self._answer_strings(messages):
                a_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
                at = _find(ids, a_ids, pos)
                if at < 0 and len(a_ids) > 1:  # first token merged with the prompt's last character
                    at = _find(ids, a_ids[1:], pos)
                    a_ids = a_ids[1:]
                if at < 0:
                    # The answer was cut by truncation (or never tokenised the same): train on what remains
                    # after the generation prompt's position, if any.
                    break
                for i in range(at, at + len(a_ids)):
                    keep[i] = True
                pos = at + len(a_ids)
            labels = [l if k else ignore for l, k in zip(labels, keep)]
        return [ignore if t in self.image_token_ids else l for t, l in zip(ids, labels)]

    # ---------------------------------------------------------------------------------------- collate
    def _encode(self, texts: list[str], images: list[list[Image.Image]]) -> Any:
        """The processor's batch for ``texts`` and their ``images`` (one list per sample, empty for text-only
        rows); see :meth:`_encode_mixed` for architectures whose processor cannot mix the two."""
        fill = self.spec.mixed_batch if self.spec is not None else None
        if fill is not None and any(images) and not all(images):
            return self._encode_mixed(texts, images, fill)
        return self._process(texts, images)

    def _encode_mixed(self, texts: list[str], images: list[list[Image.Image]], fill: Callable) -> dict[str, Any]:
        """A batch mixing text-only and image rows, for processors that cannot encode one
        (``ArchSpec.mixed_batch``): the image rows and the text rows are encoded apart, their ``input_ids`` and
        ``attention_mask`` rows put back in sample order and padded (right) to the longer part, as the
        processor pads; the architecture's ``fill`` gives the text rows its "no image" image inputs."""
        rows = [i for i, imgs in enumerate(images) if imgs]
        parts = [(rows, self._process([texts[i] for i in rows], [images[i] for i in rows]))]
        text_rows = [i for i, imgs in enumerate(images) if not imgs]
        parts.append((text_rows, self._process([texts[i] for i in text_rows], [])))
        length = max(part["input_ids"].shape[1] for _, part in parts)
        batch: dict[str, Any] = {}
        for key, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0)):
            full = torch.full((len(texts), length), pad, dtype=parts[0][1][key].dtype)
            for idx, part in parts:
                full[idx, : part[key].shape[1]] = part[key]
            batch[key] = full
        batch.update(fill(parts[0][1], rows, len(texts), length))
        return batch

    def _process(self, texts: list[str], images: list[list[Image.Image]]) -> Any:
        kwargs: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True)
        if any(images):
            kwargs["images"] = images  # nested: one list per sample
        if self.pad_to_multiple_of:
            kwargs["pad_to_multiple_of"] = self.pad_to_multiple_of
        with padding_side(self.tokenizer, "right"):
            return self.processor(**kwargs)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("VisionDataCollator got an empty batch")
        convs, texts, images = self._prepare(examples)
        batch = self._encode(texts, images)
        if self.max_seq_length:
            batch, convs = self._fit(batch, convs, texts, images)
        ids_rows = batch["input_ids"].tolist()
        att_rows = batch["attention_mask"].tolist()
        labels = [self._labels(ids, att, conv) for ids, att, conv in zip(ids_rows, att_rows, convs)]
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        if self.padding_free:
            return self._pack(dict(batch))
        batch = dict(batch)
        if self._model is not None:
            batch["position_ids"] = _mrope_positions(self._model, batch, batch["attention_mask"])
        return self._with_vision_metadata(batch)

    def _with_vision_metadata(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The vision tower's per-batch metadata (``image_cu_seqlens``, ...), computed here on the CPU batch
        where the architecture says how (:attr:`~visiontune.models.archspec.ArchSpec.vision_metadata`): the
        tower then reads nothing back from the GPU to plan its attention."""
        grid = batch.get("image_grid_thw")
        if grid is not None and self._model is not None and self.spec is not None and self.spec.vision_metadata:
            batch.update(self.spec.vision_metadata(self._model, grid))
        return batch

    def _prepare(self, examples: list[dict]) -> tuple[list[list[dict]], list[str], list[list[Image.Image]]]:
        """Per sample: its conversation (images replaced by placeholders), rendered text and loaded images."""
        convs, texts, images = [], [], []
        for ex in examples:
            if self.formatting_func is not None:
                ex = self.formatting_func(ex)
            messages = ex["messages"] if isinstance(ex, dict) and "messages" in ex else ex
            if not isinstance(messages, list):
                raise ValueError(
                    f"expected a sample with a 'messages' list (conversation format), got keys "
                    f"{list(ex) if isinstance(ex, dict) else type(ex).__name__}; convert with "
                    "visiontune.data.to_conversation or pass formatting_func"
                )
            clean, values = chat_parts(messages)
            convs.append(clean)
            texts.append(self._render(clean))
            images.append(self._load_images(values))
        return convs, texts, images

    # ----------------------------------------------------------------------------------- token budget
    def _fit(self, batch: Any, convs: list[list[dict]], texts: list[str],
             images: list[list[Image.Image]]) -> tuple[Any, list[list[dict]]]:
        """Fit the batch into ``max_seq_length``: drop the samples whose image tokens end past it (the rest
        are encoded again without them), then cut the sequence axis. Returns (batch, conversations kept)."""
        limit = self.max_seq_length
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        if max(lengths) <= limit:
            return batch, convs
        keep_rows = self._rows_that_fit(batch["input_ids"].tolist(), lengths, limit)
        if len(keep_rows) < len(convs):
            convs = [convs[i] for i in keep_rows]
            batch = self._encode([texts[i] for i in keep_rows], [images[i] for i in keep_rows])
        seq_len = batch["input_ids"].shape[1]
        if seq_len > limit:
            new_len = limit
            if self.pad_to_multiple_of:
                new_len = limit // self.pad_to_multiple_of * self.pad_to_multiple_of or limit
            for key, value in list(batch.items()):
                if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == seq_len \
                        and key not in _IMAGE_KEYS:
                    batch[key] = value[:, :new_len]
        return batch, convs

    def _image_end(self, ids: list[int]) -> int:
        """Tokens up to and including the last image token of one sample's ids (0 when it has no image)."""
        return max((j + 1 for j, t in enumerate(ids) if t in self.image_token_ids), default=0)

    def measure(self, examples: list[dict]) -> list[tuple[int, int]]:
        """Per sample: (its tokens, tokens up to the end of its last image), encoded as this collator encodes
        it (images loaded and resized by its rule, image tokens expanded by the processor). What the token
        budget (:func:`budget_verdict`) judges; ``visiontune.budget`` measures a whole dataset with it."""
        _, texts, images = self._prepare(examples)
        batch = self._encode(texts, images)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        return [(n, self._image_end(ids[:n])) for ids, n in zip(batch["input_ids"].tolist(), lengths)]

    def _rows_that_fit(self, ids_rows: list[list[int]], lengths: list[int], limit: int) -> list[int]:
        """Indexes of the samples whose last image token lies within ``limit``; the others are dropped with a
        warning. Updates the ``dropped`` and ``truncated`` counters; SampleTooLongError when none is left."""
        keep_rows = []
        for i, ids in enumerate(ids_rows):
            image_end = self._image_end(ids[: lengths[i]])
            verdict = budget_verdict(lengths[i], image_end, limit)
            if verdict == "drop":
                self.dropped += 1
                warnings.warn(
                    f"VisionDataCollator: dropped a sample needing {lengths[i]} tokens whose image tokens end "
                    f"at position {image_end} > max_seq_length={limit}; truncating would cut through the "
                    "image. Raise max_seq_length or use smaller images (resize='min').",
                    stacklevel=4,  # the caller of __call__ (__call__ -> _fit -> here)
                )
            else:
                keep_rows.append(i)
                self.truncated += verdict == "truncate"
        if not keep_rows:
            raise SampleTooLongError(
                f"every sample in the batch needs more than max_seq_length={limit} tokens before its last "
                f"image token ends (lengths {lengths}); raise max_seq_length or resize images smaller"
            )
        return keep_rows

    def _pack(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Padded batch -> one packed row (``padding_free=True``): no pad token costs a FLOP.

        Positions restart per sample; for M-RoPE models they are the model's own 3-D (t, h, w) positions,
        computed on the padded batch before packing, so every sample sees exactly the positions it would
        see alone. ``cu_seq_lens_*`` tell the attention where each sample ends.
        """
        mask = batch.pop("attention_mask")
        positions = _mrope_positions(self._model, batch, mask)
        packed = pack_padded_batch(batch.pop("input_ids"), mask, batch.pop("labels"), positions, self.ignore_index)
        keep = mask.bool()
        for key, value in batch.items():  # per-token extras (mm_token_type_ids, token_type_ids) are packed too
            if key not in _IMAGE_KEYS and isinstance(value, torch.Tensor) and value.shape[:2] == keep.shape:
                packed[key] = value[keep][None]
            else:
                packed[key] = value
        # A KV cache (use_cache on, e.g. in eval mode) sends the engine's attention back to transformers' code,
        # where the samples of the packed row would attend to each other.
        packed["use_cache"] = False
        return self._with_vision_metadata(packed)
