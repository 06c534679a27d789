"""Merged exports of a LoRA model: Unsloth's ``save_pretrained_merged`` for the models visiontune makes.

Serving engines (vLLM, SGLang, TGI, plain ``transformers``) load a single model folder, not a base model
plus an adapter. :func:`save_pretrained_merged` writes that folder: every LoRA update folded into its
base weight (``W + scale * B @ A``, computed in float32, rsLoRA's scale included), every
``modules_to_save`` module replaced by its trained copy, and the result written by transformers' own
``save_pretrained`` (safetensors shards, ``config.json`` naming the architecture, generation config),
next to the processor (tokenizer, image processor, chat template). The folder loads with
``AutoModelForImageTextToText.from_pretrained(folder)``; no visiontune import is needed.

``save_method`` follows Unsloth: ``"merged_16bit"`` (the model's own float dtype; pass ``dtype`` to cast,
e.g. bfloat16 for a model trained in float32), ``"merged_4bit"`` (merged, then the language model's linear
layers stored as bitsandbytes NF4: for inference only, lossy) and ``"lora"`` (the adapter alone, plus the
processor).

A base model loaded in 4-bit (QLoRA) is refused: adding the LoRA update to NF4 weights would
re-quantize it away. Dequantize first, as Unsloth does: ``dequantize=True`` folds the update into the
dequantized NF4 weights (the weights the adapter was trained against), or reload the base in 16-bit and
apply the adapter to it. 8-bit bases are refused. On CPU, merge before running a 4-bit model: bitsandbytes'
CPU kernels repack its weights on the first forward pass, in a form that no longer dequantizes exactly.

The model is never modified: merged weights are new tensors, placed in a fresh model built on the meta
device (unchanged tensors are shared, not copied).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import types
from pathlib import Path
from typing import Any, Optional, Union

import torch

from visiontune.models.bnb_cpu import dense_4bit
from visiontune.models.state import base_model, vision_state

log = logging.getLogger(__name__)

SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")
# merged_4bit quantizes the language model's linear layers only: lm_head, the projector and the vision
# tower (small next to the language model, and sensitive) stay in 16-bit. transformers matches these
# from the start of a module's name up to a dot, or as a suffix.
_KEEP_FULL_PRECISION = ["lm_head", r".*multi_modal_projector", r".*visual", r".*vision_tower", r".*vision_model"]
# Options of Unsloth's save_pretrained_merged / _gguf that have no effect here (memory tuning, hub upload
# details, llama.cpp build steps): accepted, so that Unsloth calls run unchanged.
_IGNORED_UNSLOTH_OPTIONS = {"push_to_hub", "temporary_location", "maximum_memory_usage", "save_function",
                            "safe_serialization", "save_peft_format", "is_main_process", "tags", "variant",
                            "state_dict", "token", "private", "first_conversion", "max_shard_size"}


class QuantizedMergeError(ValueError):
    """Merging a LoRA update into quantized (bitsandbytes) weights was asked for without dequantizing."""


def quantized_modules(model: Any) -> list[str]:
    """Names of the modules of ``model`` whose weight is stored quantized (bitsandbytes 4-bit or 8-bit)."""
    names = []
    for name, module in base_model(model).named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
            names.append(name)
    return names


def _check_quantized(model: Any, dequantize: bool) -> None:
    quantized = quantized_modules(model)
    if not quantized:
        return
    eight_bit = [n for n in quantized if not hasattr(base_model(model).get_submodule(n).weight, "quant_state")]
    if eight_bit:
        raise QuantizedMergeError(
            f"{len(eight_bit)} module(s) hold 8-bit bitsandbytes weights (e.g. {eight_bit[0]!r}); merging into them is "
            "not supported. Reload the base model in 16-bit, load the adapter onto it (peft.PeftModel.from_pretrained) "
            "and merge that.")
    if not dequantize:
        raise QuantizedMergeError(
            f"the base model is loaded in 4-bit ({len(quantized)} bitsandbytes Linear4bit modules, e.g. {quantized[0]!r}): "
            "merging the LoRA update into 4-bit weights would re-quantize it away. Dequantize first: call again with "
            "dequantize=True (merges into the dequantized NF4 weights the adapter was trained against, as Unsloth "
            "does), or reload the base with load_in_4bit=False, load the adapter onto it "
            "(peft.PeftModel.from_pretrained(model, adapter_dir)) and merge that.")


def _dense(param: torch.Tensor) -> torch.Tensor:
    """A weight as a float tensor: bitsandbytes 4-bit weights dequantized (the caller checked consent)."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is None:
        return param.detach()
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise QuantizedMergeError(
            "bitsandbytes' CPU kernels have repacked this 4-bit model's weights for inference (they do on the first "
            "forward pass on CPU), and the repacked form does not dequantize exactly. Merge before running the "
            "model on CPU, or reload it (base + adapter) and merge right away.")
    return dense_4bit(param)


def _fp8_original(base: Any) -> torch.Tensor:
    """An FP8 base's 16-bit original (``load_in_fp8``): the update goes into the weight the model was loaded
    with. Imported here only: a served model's packaged code has no kernels and no FP8 bases."""
    from visiontune.kernels.fp8 import fp8_base_weight, original_weight

    if fp8_base_weight(base) is None:
        raise QuantizedMergeError(f"an FP8 weight ({tuple(base.weight.shape)}) that visiontune did not convert: "
                                  "nothing to merge into; load the base in 16-bit")
    return original_weight(base)


def _active_adapter(model: Any) -> Optional[str]:
    """The one active adapter of a PEFT model (None for a plain model)."""
    active = getattr(model, "active_adapters", None)
    if active is None:
        return None
    names = list(active() if callable(active) else active)
    if len(names) != 1:
        raise ValueError(f"{len(names)} active adapters ({names}); activate exactly one with model.set_adapter(name) "
                         "before merging")
    return names[0]


def _lora_layer_tensors(module: Any, prefix: str, adapter: str) -> dict[str, torch.Tensor]:
    """``weight`` (+ ``bias``) of one LoRA-wrapped layer with its update folded in, in the base weight's dtype."""
    if module.use_dora.get(adapter, False):
        raise ValueError(f"{prefix.rstrip('.')}: DoRA adapters are not merged here; use peft's merge_and_unload()")
    base = module.get_base_layer()
    weight = _fp8_original(base) if base.weight.dtype == torch.float8_e4m3fn else _dense(base.weight)
    dtype = weight.dtype
    if not module.merged and (adapter in module.lora_A or adapter in module.lora_embedding_A):
        weight = weight.float() + module.get_delta_weight(adapter).float()
    out = {f"{prefix}weight": weight.to(dtype)}
    if getattr(base, "bias", None) is not None:
        out[f"{prefix}bias"] = base.bias.detach()
    return out


@torch.no_grad()
def merged_tensors(model: Any, dequantize: bool = False) -> dict[str, torch.Tensor]:
    """The weights of ``model`` (PEFT-wrapped or plain) with every LoRA update merged, under the names of
    the plain transformers model (``model.language_model.layers.0.self_attn.q_proj.weight`` ...).

    Persistent buffers are included; non-persistent ones (rotary tables) are not. 4-bit weights raise
    :class:`QuantizedMergeError` unless ``dequantize`` is True.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    _check_quantized(model, dequantize)
    adapter = _active_adapter(model)
    tensors: dict[str, torch.Tensor] = {}
    skip: Optional[str] = None  # named_modules is pre-order: a handled module's children follow it
    for name, module in base_model(model).named_modules():
        if skip is not None and name.startswith(skip):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLayer) and adapter is not None:
            tensors.update(_lora_layer_tensors(module, prefix, adapter))
            skip = prefix
        elif isinstance(module, ModulesToSaveWrapper) and adapter is not None:
            trained = module.modules_to_save[adapter] if adapter in module.modules_to_save else module.original_module
            tensors.update({prefix + k: v.detach() for k, v in trained.state_dict().items()})
            skip = prefix
        else:
            tensors.update({prefix + k: _dense(p) for k, p in module.named_parameters(recurse=False)})
            tensors.update({prefix + k: b for k, b in module.named_buffers(recurse=False)
                            if k not in module._non_persistent_buffers_set})
    return tensors


def _module_name(root: torch.nn.Module, module: Any) -> Optional[str]:
    return next((name for name, m in root.named_modules() if m is module), None)


def embeddings_differ(base: Any, tensors: dict[str, torch.Tensor]) -> bool:
    """True when the merged output embedding (lm_head) is no longer the input embedding: a tied model whose
    lm_head was trained in full (``modules_to_save``) or carries LoRA must be saved untied."""
    names = [_module_name(base, base.get_input_embeddings()), _module_name(base, base.get_output_embeddings())]
    weights = [tensors.get(f"{n}.weight") for n in names if n is not None]
    return len(weights) == 2 and all(w is not None for w in weights) and not (
        weights[0] is weights[1] or torch.equal(weights[0], weights[1]))


def _export_config(config: Any, untie: bool) -> Any:
    """A copy of the model's config as a served model wants it: no quantization, KV cache on, and untied
    embeddings where the merge made lm_head differ from the input embedding."""
    config = copy.deepcopy(config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        if hasattr(cfg, "use_cache"):
            cfg.use_cache = True
        if untie and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    return config


def merged_model(model: Any, dtype: Optional[torch.dtype] = None, dequantize: bool = False) -> Any:
    """A plain transformers model (no PEFT) holding ``model``'s merged weights, in ``dtype`` (default: the
    model's float dtype). ``model`` is left as it was."""
    base = base_model(model)
    tensors = merged_tensors(model, dequantize=dequantize)
    target = dtype or next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    tensors = {k: t.to(target) if t.is_floating_point() else t for k, t in tensors.items()}
    config = _export_config(base.config, untie=embeddings_differ(base, tensors))
    with torch.device("meta"):
        fresh = type(base)(config)
    fresh.load_state_dict(tensors, strict=True, assign=True)
    for name, module in fresh.named_modules():  # rotary tables and other buffers a checkpoint does not hold
        for key in module._non_persistent_buffers_set:
            module.register_buffer(key, getattr(base.get_submodule(name), key), persistent=False)
    fresh.tie_weights()
    fresh.generation_config = copy.deepcopy(base.generation_config)
    fresh.generation_config.use_cache = True
    return fresh.eval()


def check_unsloth_options(method: str, options: dict[str, Any]) -> None:
    """Refuse keyword arguments that neither this method nor Unsloth's version of it takes."""
    unknown = set(options) - _IGNORED_UNSLOTH_OPTIONS
    if unknown:
        raise TypeError(f"{method} got unexpected keyword argument(s) {sorted(unknown)}")
    if options.get("push_to_hub"):
        raise NotImplementedError("push_to_hub is not supported: save locally, then upload the folder with "
                                  "huggingface_hub.HfApi().upload_folder(folder_path=..., repo_id=...)")


def processor_of(model: Any, tokenizer: Any) -> Any:
    """The processor to save beside ``model``: the one given, else the one FastVisionModel loaded with it."""
    processor = tokenizer if tokenizer is not None else vision_state(model).processor
    if processor is None:
        raise ValueError("no processor to save beside the model: pass it, e.g. "
                         "model.save_pretrained_merged(dir, processor), as loaded by FastVisionModel.from_pretrained")
    return processor


def _save_4bit(merged_dir: Path, out: Path, dtype: torch.dtype, model_class: type) -> None:
    """Load a merged 16-bit folder quantized to bitsandbytes NF4 and save it to ``out``."""
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=_KEEP_FULL_PRECISION)
    model_class.from_pretrained(merged_dir, quantization_config=quant, dtype=dtype).save_pretrained(out)


def save_pretrained_merged(model: Any, save_directory: Union[str, Path], tokenizer: Any = None,
                           save_method: str = "merged_16bit", *, dtype: Optional[torch.dtype] = None,
                           dequantize: bool = False, max_shard_size: Union[int, str] = "5GB",
                           **unsloth_options: Any) -> Path:
    """Save ``model`` (a LoRA model) as a folder serving engines load; Unsloth's ``save_pretrained_merged``.

    ``tokenizer`` is the processor (or tokenizer) saved beside it; by default the one
    ``FastVisionModel.from_pretrained`` loaded. ``save_method``: ``"merged_16bit"`` | ``"merged_4bit"`` |
    ``"lora"`` (see the module docstring). Unsloth's memory options (``maximum_memory_usage`` ...) are
    accepted and have no effect. Returns the folder.
    """
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method={save_method!r}: choose one of {', '.join(SAVE_METHODS)}")
    check_unsloth_options("save_pretrained_merged", unsloth_options)
    processor = processor_of(model, tokenizer)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    if save_method == "lora":
        model.save_pretrained(out)
    elif save_method == "merged_16bit":
        merged_model(model, dtype=dtype, dequantize=dequantize).save_pretrained(out, max_shard_size=max_shard_size)
    else:
        fresh = merged_model(model, dtype=dtype, dequantize=dequantize)
        with tempfile.TemporaryDirectory(prefix="visiontune-merge-") as tmp:
            fresh.save_pretrained(tmp)
            _save_4bit(Path(tmp), out, fresh.dtype, type(fresh))
    processor.save_pretrained(out)
    log.info("saved %s model to %s", save_method, out)
    return out


def attach_save_methods(model: Any) -> Any:
    """Bind ``save_pretrained_merged`` and ``save_pretrained_gguf`` to ``model`` (as Unsloth's models have them)."""
    from visiontune.gguf import save_pretrained_gguf

    model.save_pretrained_merged = types.MethodType(save_pretrained_merged, model)
    model.save_pretrained_gguf = types.MethodType(save_pretrained_gguf, model)
    return model
