"""``FastVisionModel``: loading, LoRA and mode switching, call-compatible with Unsloth's vision API.

Switching from Unsloth is a one-line change (``from visiontune import FastVisionModel``). The LoRA target
selection goes through the per-architecture module maps in :mod:`visiontune.models.archs`. What it keeps
beside a model (processor, checkpointing, kernel patch) is one :class:`~visiontune.models.state.VisionState`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch

from visiontune.models.archs import full_precision_modules, get_spec
from visiontune.models.bnb_cpu import correct_cpu_nf4_dequant, keep_cpu_4bit_differentiable
from visiontune.models.checkpointing import checkpoint_fraction
from visiontune.models.merge import attach_save_methods
from visiontune.models.state import base_model, set_padding_side, vision_state

log = logging.getLogger(__name__)


def _resolve_dtype(dtype: Optional[Union[str, torch.dtype]]) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if dtype is not None:
        if isinstance(dtype, str):
            if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
                raise ValueError(f"dtype {dtype!r} is not a torch dtype name; use 'bfloat16', 'float16' or 'float32'")
            return getattr(torch, dtype)
        return dtype
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class FastVisionModel:
    """Namespace of static methods, as in Unsloth (``FastVisionModel.from_pretrained(...)``)."""

    @staticmethod
    def from_pretrained(
        model_name: Union[str, os.PathLike],
        max_seq_length: int = 2048,
        dtype: Optional[Union[str, torch.dtype]] = None,
        load_in_4bit: bool = False,
        use_gradient_checkpointing: Union[bool, str, float] = True,
        full_finetuning: bool = False,
        attn_implementation: Optional[str] = None,
        local_files_only: bool = False,
        use_fused_kernels: bool = True,
        device_map: Optional[Any] = None,
        load_in_fp8: Union[bool, str] = False,
        **kwargs: Any,
    ) -> tuple[torch.nn.Module, Any]:
        """Load a vision-language model and its processor from a hub id or a local directory.

        Returns ``(model, processor)``. ``use_gradient_checkpointing`` is True (every vision block and
        LM layer keeps only its input and recomputes in backward), False, ``"offload"`` / ``"unsloth"``
        (the same, with those inputs in pinned CPU memory; on CPU machines the same as True) or a
        fraction in (0, 1): *selective* checkpointing, where every vision block and that fraction of the
        language-model layers recompute and the other layers keep their activations (faster than True,
        more memory; see ``benchmarks/RESULTS_engine.md``), or ``"mlp"``: no layer is recomputed, but the
        fused MLPs keep only their input and run their gate/up projections again in backward (CUDA engine
        only; elsewhere the same as False). ``"mlp"`` is the fastest setting that saves memory when the
        step is launch-bound (small batches): Qwen2.5-VL-7B at (1, 448 px, 512 tokens) on an H200 fit
        stock HF+PEFT's peak with 17 of 32 vision blocks and no LM layer recomputed instead of 31 and 18.
        ``"auto"``: every layer checkpointed until training starts; then visiontune's ``SFTTrainer`` (the
        train stage's too) measures the first batch's step and keeps the fewest checkpointed layers whose peak
        fits ``SFTConfig.checkpoint_budget`` of the GPU's memory (off a GPU: what autograd saves, against that
        share of the available RAM; :mod:`visiontune.models.auto_checkpoint`). Other trainers (GRPO/DPO) do not
        measure: under them every layer stays checkpointed.
        ``use_fused_kernels`` patches visiontune's Triton kernels in when the model is on CUDA.
        ``load_in_fp8``: ``get_peft_model`` puts the frozen base of every LoRA layer into FP8 e4m3 with per-row
        scales (:mod:`visiontune.kernels.fp8`; sides multiples of 16), so the engine runs the base products on
        FP8 tensor cores (Hopper and newer) while adapters and gradients stay 16-bit; the 16-bit originals wait
        on the CPU for merging and export. ``"row"`` is the same (Unsloth's name); Unsloth's ``"block"`` scaling
        is refused, as are a 4-bit base and full fine-tuning. Off by default: it changes the numerics (see
        ``benchmarks/RESULTS_engine.md`` for the measured loss gap).
        """
        from transformers import AutoModelForImageTextToText

        name = str(model_name)
        _check_model_name(name)
        _check_checkpointing(use_gradient_checkpointing)
        load_in_fp8 = _check_fp8(load_in_fp8, load_in_4bit, full_finetuning)
        load_kwargs = _load_kwargs(_resolve_dtype(dtype), load_in_4bit, attn_implementation, local_files_only,
                                   device_map, kwargs)
        try:
            model = AutoModelForImageTextToText.from_pretrained(name, **load_kwargs)
        except OSError as e:
            raise OSError(
                f"could not load model {name!r}: {e}\nIf you are offline, pass a local directory (or set "
                "local_files_only=True with a filled Hugging Face cache)."
            ) from e
        processor = _load_processor(name, local_files_only)
        _prepare_model(model)
        if load_in_4bit:
            keep_cpu_4bit_differentiable(model)
            correct_cpu_nf4_dequant(model)
        model.max_seq_length = max_seq_length
        state = vision_state(model)
        state.processor = processor
        state.checkpointing = use_gradient_checkpointing
        state.load_in_fp8 = bool(load_in_fp8)
        for p in model.parameters():
            p.requires_grad_(bool(full_finetuning))
        if use_fused_kernels:
            _patch_kernels(model)
        FastVisionModel._set_checkpointing(model, use_gradient_checkpointing)
        return model, processor

    @staticmethod
    def _set_checkpointing(model: torch.nn.Module, mode: Union[bool, str, float]) -> None:
        _apply_checkpointing(model, mode)
        if mode is not False:
            # Off in the text config too: transformers 5's language models read their own use_cache, and a
            # KV cache filled in forward hands a recomputed layer the forward's detached keys and values
            # (no gradient reached k/v projections or the vision tower: tests/models/test_checkpointing.py).
            _set_use_cache(model, False)

    @staticmethod
    def get_peft_model(
        model: torch.nn.Module,
        finetune_vision_layers: bool = True,
        finetune_language_layers: bool = True,
        finetune_attention_modules: bool = True,
        finetune_mlp_modules: bool = True,
        r: int = 16,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        random_state: int = 3407,
        use_rslora: bool = False,
        loftq_config: Optional[Any] = None,
        target_modules: Union[str, list[str], None] = "all-linear",
        modules_to_save: Optional[list[str]] = None,
        use_gradient_checkpointing: Optional[Union[bool, str]] = None,
        **kwargs: Any,
    ) -> torch.nn.Module:
        """Wrap ``model`` with LoRA adapters.

        The four ``finetune_*`` flags choose targets through the architecture's module map (vision tower
        vs language model, attention vs MLP). The projector/merger and lm_head are never targets unless
        named in ``target_modules`` or ``modules_to_save``. An explicit ``target_modules`` list or regex
        (anything but the default ``"all-linear"``) overrides the flags. ``random_state`` seeds the LoRA
        initialisation, so the same seed gives the same adapter.
        """
        from peft import LoraConfig, get_peft_model

        if r <= 0:
            raise ValueError(f"r={r}: LoRA rank must be a positive integer")
        targets = _lora_targets(model, target_modules, finetune_vision_layers, finetune_language_layers,
                                finetune_attention_modules, finetune_mlp_modules)
        if loftq_config is not None:
            _check_loftq(model)
        config = LoraConfig(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias, target_modules=targets,
            use_rslora=use_rslora, modules_to_save=modules_to_save, init_lora_weights=True if loftq_config is None else "loftq",
            loftq_config=loftq_config or {}, task_type=None, **kwargs,
        )
        torch.manual_seed(random_state)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(random_state)
        if use_gradient_checkpointing is not None:
            _check_checkpointing(use_gradient_checkpointing)
        state = vision_state(model)  # the PEFT wrapper shares it
        ckpt = state.checkpointing if use_gradient_checkpointing is None else use_gradient_checkpointing
        max_len = getattr(model, "max_seq_length", None)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as e:
            raise ValueError(f"get_peft_model: {e}. Check target_modules={targets!r} against model.named_modules().") from e
        peft_model.max_seq_length = max_len
        state.checkpointing = ckpt
        FastVisionModel._set_checkpointing(peft_model, ckpt)  # Unsloth passes it here, too
        _patch_lora_layers(model)
        if state.load_in_fp8:
            from visiontune.kernels.fp8 import convert_fp8_base

            state.fp8_layers = convert_fp8_base(peft_model)
        return attach_save_methods(peft_model)  # save_pretrained_merged / save_pretrained_gguf, as in Unsloth

    @staticmethod
    def for_inference(model: torch.nn.Module) -> torch.nn.Module:
        """Eval mode, KV cache on, checkpointing off, left padding (batched ``generate`` needs it)."""
        model.eval()
        _hf_checkpointing_off(base_model(model))
        _set_use_cache(model, True)
        _pad_loaded_processor(model, "left")
        return model

    @staticmethod
    def for_training(model: torch.nn.Module,
                     use_gradient_checkpointing: Optional[Union[bool, str, float]] = None) -> torch.nn.Module:
        """Train mode, KV cache off, checkpointing as configured, right padding. A mode given here becomes the
        model's (as in ``get_peft_model``): later calls keep it, and ``"auto"`` is then planned by the trainer."""
        model.train()
        state = vision_state(model)
        if use_gradient_checkpointing is not None:
            _check_checkpointing(use_gradient_checkpointing)
            state.checkpointing = use_gradient_checkpointing
        mode = state.checkpointing
        base = base_model(model)
        if _checkpoint_plan(mode) is not None:
            _hf_checkpointing_off(base)
        _apply_checkpointing(base, mode)
        _set_use_cache(model, False)
        _pad_loaded_processor(model, "right")
        return model


def _check_fp8(load_in_fp8: Union[bool, str], load_in_4bit: bool, full_finetuning: bool) -> bool:
    """``load_in_fp8`` as a bool, or a ValueError saying which combination is not served and what to use."""
    if load_in_fp8 not in (False, True, "row"):
        raise ValueError(f"load_in_fp8={load_in_fp8!r}: visiontune scales FP8 weights per output row only; pass "
                         "True (or 'row'), or False")
    if load_in_fp8 and load_in_4bit:
        raise ValueError("load_in_fp8=True with load_in_4bit=True: the frozen base is either NF4 or FP8; "
                         "choose one")
    if load_in_fp8 and full_finetuning:
        raise ValueError("load_in_fp8=True with full_finetuning=True: only frozen LoRA bases are put into FP8; "
                         "drop one of them")
    return bool(load_in_fp8)


def _check_model_name(name: str) -> None:
    """Fail early, with what to do, when ``name`` looks like a local folder that is not there."""
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and Path(name).parts[0] in {"models", "outputs"}
    if looks_local and not Path(name).expanduser().exists():
        raise FileNotFoundError(
            f"model directory {name!r} does not exist. Pass a hub id (e.g. 'Qwen/Qwen2.5-VL-7B-Instruct') "
            "or a folder saved with save_pretrained; for the offline demo model run `visiontune tiny-model`."
        )


def _load_kwargs(torch_dtype: torch.dtype, load_in_4bit: bool, attn_implementation: Optional[str],
                 local_files_only: bool, device_map: Optional[Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``AutoModelForImageTextToText.from_pretrained`` for ``from_pretrained``'s settings."""
    load_kwargs: dict[str, Any] = dict(dtype=torch_dtype, local_files_only=local_files_only, **extra)
    if attn_implementation:
        load_kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        load_kwargs["quantization_config"] = _four_bit_config(torch_dtype)
    if device_map is None and torch.cuda.is_available():
        device_map = {"": torch.cuda.current_device()}
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    return load_kwargs


def _four_bit_config(torch_dtype: torch.dtype) -> Any:
    """bitsandbytes NF4 quantization (``load_in_4bit=True``) of every linear layer but the vision-to-text
    projector and ``lm_head`` (:func:`~visiontune.models.archs.full_precision_modules`). On a CUDA GPU, or on the CPU through bitsandbytes' CPU backend (0.50 tested:
    loading, LoRA training steps and generation, tests/models/test_four_bit.py; slow, for small models)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"load_in_4bit=True needs bitsandbytes, which does not import here ({e}): pip install "
            "'bitsandbytes>=0.50' (it has CUDA and CPU backends), or set load_in_4bit=False "
            "(model.load_in_4bit: false in params.yaml)."
        ) from e
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype,
        llm_int8_skip_modules=full_precision_modules(),
    )


def quantized_layers(model: torch.nn.Module) -> list[str]:
    """Names of the bitsandbytes-quantized linear layers of ``model`` (``load_in_4bit``; 8-bit too): the
    engine's fused LoRA paths take plain ``nn.Linear`` and NF4 ``Linear4bit`` bases only, and LoftQ wants none."""
    return [n for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]


def _check_loftq(model: torch.nn.Module) -> None:
    """LoftQ quantizes the full-precision base weights itself while it initialises the adapters (PEFT's
    ``loftq_init``, which runs on CUDA or XPU only): refuse a base already in 4-bit (PEFT would treat the
    packed 4-bit bytes as weights) and a machine without either device, each with what to do."""
    quantized = quantized_layers(model)
    if quantized:
        raise ValueError(
            f"loftq_config: the base model is already quantized ({len(quantized)} bitsandbytes layers, e.g. "
            f"{quantized[0]!r}); LoftQ quantizes the base itself. Load it with load_in_4bit=False and pass "
            "loftq_config to get_peft_model.")
    xpu = getattr(torch, "xpu", None)
    if not torch.cuda.is_available() and not (xpu is not None and xpu.is_available()):
        raise RuntimeError(
            "loftq_config: PEFT's LoftQ initialisation runs on a CUDA (or XPU) device and none is visible; "
            "initialise on a GPU machine and save the adapter, or use loftq_config=None here.")


def _prepare_model(model: torch.nn.Module) -> None:
    """The architecture's own preparation of a loaded model (``ArchSpec.prepare_model``), if it has one."""
    try:
        spec = get_spec(model)
    except ValueError:  # an unregistered architecture loads as transformers made it
        return
    if spec.prepare_model is not None:
        spec.prepare_model(model)


def _load_processor(name: str, local_files_only: bool) -> Any:
    """The model's processor, with a pad token (the EOS token when it has none) and right padding for training."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(name, local_files_only=local_files_only)
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_padding_side(processor, "right")
    return processor


def _lora_targets(model: torch.nn.Module, target_modules: Union[str, list[str], None], vision: bool, language: bool,
                  attention: bool, mlp: bool) -> Union[str, list[str]]:
    """LoRA targets: the architecture's module map filtered by the ``finetune_*`` flags, unless
    ``target_modules`` names them explicitly (a list, or a regex that must compile)."""
    if target_modules in (None, "all-linear"):
        spec = get_spec(model)  # clear error for unsupported architectures
        return spec.pattern(vision, language, attention, mlp)
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules regex {target_modules!r} does not compile: {e}") from e
    return target_modules


def _pad_loaded_processor(model: torch.nn.Module, side: str) -> None:
    """Pad on ``side`` with the processor ``from_pretrained`` loaded beside ``model`` (if it was)."""
    processor = vision_state(model).processor
    if processor is not None:
        set_padding_side(processor, side)


def _is_fraction(mode: Any) -> bool:
    return isinstance(mode, float) and not isinstance(mode, bool)


def _check_checkpointing(mode: Any) -> None:
    if isinstance(mode, bool) or (isinstance(mode, str) and mode in ("offload", "unsloth", "mlp", "auto")):
        return  # (not `mode in (True, False, ...)`: 0.0 == False and 1.0 == True in Python)
    if _is_fraction(mode) and 0.0 < mode < 1.0:
        return
    raise ValueError(
        f"use_gradient_checkpointing={mode!r}: expected True, False, 'offload', 'mlp', 'auto' or a fraction strictly "
        "between 0 and 1 (selective checkpointing: that share of the language-model layers recompute, e.g. 0.5)"
    )


def _checkpoint_plan(mode: Any) -> Optional[tuple[float, str]]:
    """``use_gradient_checkpointing`` -> (share of LM layers checkpointed, ``checkpointing`` module's mode).
    ``"auto"`` starts as True does (every layer), until the trainer measures and installs its choice."""
    if mode is False or mode == "mlp":
        return None
    if _is_fraction(mode):
        return float(mode), "recompute"
    if isinstance(mode, str) and mode in ("offload", "unsloth"):
        return 1.0, "recompute_offload"
    return 1.0, "recompute"


def _install_checkpointing(model: torch.nn.Module, plan: Optional[tuple[float, str]]) -> None:
    """Install (or with ``plan=None`` remove) visiontune's checkpointing on the transformers model.

    Every vision block is checkpointed (per byte freed about 3x cheaper to recompute than an LM layer,
    measured in the engine benchmark) and the first ``ceil(fraction * n)`` language-model layers, through
    :mod:`visiontune.models.checkpointing`'s light recompute (faster than transformers' non-reentrant
    checkpoint: benchmarks/RESULTS_engine.md). Idempotent: the same plan is kept, another one replaces it.
    """
    state = vision_state(model)
    if state.checkpoint_handle is not None:
        if plan is not None and state.checkpoint_plan == plan:
            return
        state.checkpoint_handle.remove()
        state.checkpoint_handle = state.checkpoint_plan = None
    if plan is None:
        return
    state.checkpoint_handle = checkpoint_fraction(base_model(model), lm_fraction=plan[0], vision_fraction=1.0,
                                                  mode=plan[1])
    state.checkpoint_plan = plan


def _apply_checkpointing(model: torch.nn.Module, mode: Any) -> None:
    """Put ``use_gradient_checkpointing=mode`` in force: the layer wrappers, and for ``"mlp"`` the kernel
    patch's fused MLPs recomputing gate/up (a patched model's handle reads ``recompute_mlp`` per call).
    ``"auto"`` keeps the choice the trainer measured, once made (:mod:`visiontune.models.auto_checkpoint`)."""
    state = vision_state(model)
    if mode == "auto" and state.auto_choice is not None:
        return
    if state.auto_choice is not None:  # another mode replaces the measured choice
        state.auto_choice = None
        _install_checkpointing(model, None)
    _install_checkpointing(model, _checkpoint_plan(mode))
    handle = vision_state(model).kernel_handle
    if handle is not None and handle.active:
        handle.recompute_mlp = mode == "mlp"


def _hf_checkpointing_off(model: torch.nn.Module) -> None:
    """Switch off transformers' own activation checkpointing if a user or another library enabled it.

    visiontune installs its own (``_install_checkpointing``); with transformers' on top every layer would
    be recomputed twice. transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*.
    """
    new = hasattr(model, "activation_checkpointing_enable")
    if getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False):
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()


def _set_use_cache(model: torch.nn.Module, value: bool) -> None:
    cfg = base_model(model).config
    cfg.use_cache = value
    text_cfg = getattr(cfg, "text_config", None)
    if text_cfg is not None:
        text_cfg.use_cache = value
    gen = getattr(base_model(model), "generation_config", None)
    if gen is not None:
        gen.use_cache = value


def _patch_lora_layers(model: torch.nn.Module) -> None:
    """On a patched model, the engine's NF4 LoRA forward for the LoRA layers PEFT just put over 4-bit bases
    (``kernels.patch.patch_lora_layers``; a no-op when the model is not patched, e.g. on the CPU)."""
    handle = vision_state(model).kernel_handle
    if handle is None or not handle.active:  # not patched: do not import the engine for nothing
        return
    try:
        from visiontune.kernels.patch import patch_lora_layers
    except ImportError:  # engine not built in this install
        return
    patch_lora_layers(model)


def _patch_kernels(model: torch.nn.Module) -> None:
    """Patch visiontune's fused kernels in (a no-op on CPU); an active patch's handle is in the model's state."""
    try:
        from visiontune.kernels import patch_model
    except ImportError:  # engine not built in this install (a served model ships only the visiontune/ folder)
        return
    with contextlib.suppress(NotImplementedError):
        patch_model(model)
