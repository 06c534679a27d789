"""TRL's SFTTrainer for vision-language models, and Unsloth's training idiom on TRL 1.x.

Unsloth's vision notebooks train with ``SFTConfig(max_seq_length=...)``, ``SFTTrainer(tokenizer=...)`` and a
plain Python list as ``train_dataset``. TRL 1.x refuses all three (``max_seq_length`` is now ``max_length``,
``tokenizer`` is now ``processing_class``, and only ``datasets`` datasets are accepted). This module serves
that code two ways:

* :class:`SFTConfig` and :class:`SFTTrainer` subclass TRL's classes. They accept the old names and lists,
  and default to what a vision-language model with :class:`~visiontune.collator.VisionDataCollator` needs
  (the collator gets the rows as they are; precision and 8-bit optimizers fitted to the machine).
* Importing this module lets ``from trl import SFTTrainer, SFTConfig`` take the same calls: a call that
  TRL itself refuses (``trl.SFTConfig(max_seq_length=...)``, ``trl.SFTTrainer(tokenizer=...)`` or with a
  list dataset) is served by this module's subclass, which is an instance of TRL's class. Every call TRL
  accepts runs TRL's own code, unchanged; subclasses of TRL's classes are never redirected.

Before training, this module's trainer also runs the pre-flight token budget (:mod:`visiontune.budget`) that
the pipeline's train stage runs: every training sample measured once by the collator, a one-line summary,
the samples the collator would drop left out, and counts and a histogram logged to the MLflow run active
when training starts. TRL's own trainer (a call TRL accepts) does none of it.

``UnslothVisionDataCollator`` is :class:`~visiontune.collator.VisionDataCollator` under Unsloth's name.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import trl
from transformers import TrainerCallback

from visiontune.collator import VisionDataCollator
from visiontune.models.state import vision_state

log = logging.getLogger(__name__)

__all__ = ["SFTConfig", "SFTTrainer", "UnslothVisionDataCollator", "VisionDataCollator", "as_train_dataset"]

UnslothVisionDataCollator = VisionDataCollator

# The Arrow column that stands in for a list's rows (the rows themselves never go through Arrow).
INDEX_COLUMN = "_vt_index"

# bitsandbytes AdamW variants (transformers' `optim` names) -> (optimizer state bits, paged)
_BNB_ADAMW = {"adamw_8bit": (8, False), "adamw_bnb_8bit": (8, False), "paged_adamw_8bit": (8, True),
              "paged_adamw_32bit": (32, True)}


def as_train_dataset(data: Any, start: int = 0) -> Any:
    """TRL's SFTTrainer rejects plain lists; wrap them (Arrow datasets pass through unchanged).

    A list becomes a ``datasets.Dataset`` with one column, ``_vt_index`` (``start``, ``start + 1``, ...);
    the rows stay Python objects in its ``_vt_rows`` attribute (multi-image rows with PIL images need not
    survive Arrow). The collator looks each row up by its index.
    """
    if isinstance(data, (list, tuple)):
        from datasets import Dataset

        rows = list(data)
        ds = Dataset.from_dict({INDEX_COLUMN: list(range(start, start + len(rows)))})
        ds._vt_rows = rows  # type: ignore[attr-defined]
        return ds
    return data


class _ListRows:
    """A collator in front of another: rows of list datasets, addressed by their index, go in as the rows.

    Examples from an Arrow dataset (no index column) pass through unchanged, so a list ``train_dataset``
    and an Arrow ``eval_dataset`` (or the reverse) share one collator, as the Trainer requires.
    """

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.rows: list[Any] = []

    def index(self, data: Any) -> Any:
        """``data`` as the Trainer can take it: a list becomes an index dataset over this table's rows."""
        if not isinstance(data, (list, tuple)):
            return data
        ds = as_train_dataset(data, start=len(self.rows))
        self.rows.extend(ds._vt_rows)
        return ds

    def __call__(self, examples: list[dict]) -> Any:
        return self.collator([self.rows[e[INDEX_COLUMN]] if INDEX_COLUMN in e else e for e in examples])

    def __getattr__(self, name: str) -> Any:  # `trainer.data_collator.dropped` etc. read the real collator
        if name in ("collator", "rows"):
            raise AttributeError(name)
        return getattr(self.collator, name)


@functools.lru_cache(maxsize=None)
def bnb_adamw_unusable(device_type: str, bits: int, paged: bool) -> Optional[str]:
    """Why bitsandbytes' ``bits``-bit (``paged``) AdamW cannot step on ``device_type``, or None if it can.

    Found by one step on a 4096-element tensor (bitsandbytes keeps 8-bit state from that size on), which
    must move it: what runs depends on the installed build and device (0.50 has CPU kernels; other builds
    and Macs do not).
    """
    try:
        import bitsandbytes as bnb
    except Exception as e:  # not installed, or its native library does not load
        return f"bitsandbytes does not import: {type(e).__name__}: {e}"
    try:
        p = torch.nn.Parameter(torch.zeros(4096, device=device_type))
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW([p], lr=1e-3, optim_bits=bits, is_paged=paged).step()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None if bool(p.detach().ne(0).all()) else "a step left the parameter unchanged"


def fit_optimizer(args: Any) -> None:
    """Replace a bitsandbytes AdamW ``args.optim`` by ``"adamw_torch"`` (one warning) where it cannot run.

    Same update rule; the optimizer state is 32-bit, i.e. about 6 more bytes per trainable parameter.
    """
    from transformers.training_args import OptimizerNames

    name = str(getattr(args.optim, "value", args.optim))
    if name not in _BNB_ADAMW:
        return
    device = args.device.type
    why = bnb_adamw_unusable(device, *_BNB_ADAMW[name])
    if why is None:
        return
    warnings.warn(
        f"optim={name!r} needs bitsandbytes' AdamW on {device}, which does not run here ({why}); training with "
        "optim='adamw_torch' instead (same update rule, 32-bit optimizer state). Install a bitsandbytes build "
        f"for {device} to keep {name!r}, or set optim='adamw_torch' to silence this.", UserWarning, stacklevel=3)
    args.optim = OptimizerNames.ADAMW_TORCH


@dataclass
class SFTConfig(trl.SFTConfig):
    """TRL's ``SFTConfig`` with Unsloth's ``max_seq_length`` and defaults for vision-language models.

    Differences from TRL's defaults (each only where you leave the setting out):

    * ``max_seq_length``: the old name of ``max_length`` (either may be given; both only if equal).
      ``max_length`` defaults to None: the collator's ``max_seq_length`` (the model's, from
      ``FastVisionModel.from_pretrained``) decides truncation.
    * ``remove_unused_columns=False``, ``dataset_text_field=""``,
      ``dataset_kwargs={"skip_prepare_dataset": True}``: the collator gets every row as it is and does
      tokenization, images and labels itself.
    * transformers' activation checkpointing off (``gradient_checkpointing=None``, TRL: True; transformers
      5.2x calls it ``activation_checkpointing``): ``FastVisionModel`` installs its own
      (``use_gradient_checkpointing``), and transformers' on top of it would recompute every layer twice.
    * ``bf16``/``fp16``: bf16 on GPUs that support it, fp16 on older GPUs, neither on CPU (TRL's bf16
      default fails on a CPU-only machine).
    * ``optim``: a bitsandbytes AdamW (``"adamw_8bit"``, ``"paged_adamw_8bit"``, ...) that cannot run on this
      machine becomes ``"adamw_torch"``, with one warning.
    * ``token_budget`` (visiontune's own): the pre-flight token budget of :class:`SFTTrainer`; False skips it.
    * ``checkpoint_budget`` / ``checkpoint_budget_gib`` (visiontune's own): the memory budget of
      ``use_gradient_checkpointing="auto"`` (see :class:`SFTTrainer`).
    """

    max_seq_length: Optional[int] = field(
        default=None, metadata={"help": "Unsloth's / TRL 0.x name of `max_length`; sets it."})
    max_length: Optional[int] = field(
        default=None, metadata={"help": "Longest sequence; None: the collator's max_seq_length decides."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "False: the collator gets whole rows (images, conversations)."})
    dataset_text_field: str = field(default="", metadata={"help": "Unused: the collator renders conversations."})
    dataset_kwargs: Optional[dict[str, Any]] = field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata={"help": "skip_prepare_dataset: the collator tokenizes; TRL does not prepare rows."})
    gradient_checkpointing: Optional[bool] = field(
        default=None, metadata={"help": "transformers' checkpointing (None: off); FastVisionModel installs its own."})
    token_budget: bool = field(
        default=True, metadata={"help": "Before training, measure every training sample's tokens once, print a "
                                        "one-line summary and leave out the samples the collator would drop "
                                        "(visiontune.budget); False: the collator still drops them, batch by batch."})

    checkpoint_budget: float = field(
        default=0.9, metadata={"help": "use_gradient_checkpointing='auto': the share of the GPU's memory (free at "
                                        "train start plus what this process holds) the step's peak may take."})
    checkpoint_budget_gib: Optional[float] = field(
        default=None, metadata={"help": "use_gradient_checkpointing='auto': the step's peak budget in GiB "
                                        "instead of checkpoint_budget's share (e.g. another tool's peak)."})

    def __post_init__(self) -> None:
        if not 0.0 < self.checkpoint_budget <= 1.0:
            raise ValueError(f"SFTConfig(checkpoint_budget={self.checkpoint_budget}): a share of the GPU's memory, "
                             "in (0, 1]; for a budget in GiB set checkpoint_budget_gib")
        if self.checkpoint_budget_gib is not None and self.checkpoint_budget_gib <= 0:
            raise ValueError(f"SFTConfig(checkpoint_budget_gib={self.checkpoint_budget_gib}): must be > 0 (or None)")
        if self.max_seq_length is not None:
            if self.max_length is not None and self.max_length != self.max_seq_length:
                raise ValueError(f"SFTConfig got max_seq_length={self.max_seq_length} and max_length={self.max_length}: "
                                 "they are one setting (max_seq_length is the old name); pass one of them")
            self.max_length = self.max_seq_length
        if self.bf16 is None and not self.fp16:
            on_cuda = torch.cuda.is_available() and not self.use_cpu
            self.bf16 = on_cuda and torch.cuda.is_bf16_supported()
            self.fp16 = on_cuda and not self.bf16
        super().__post_init__()
        self.max_seq_length = self.max_length
        fit_optimizer(self)


def _one_of(processing_class: Any, tokenizer: Any) -> Any:
    if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
        raise TypeError("SFTTrainer got both processing_class= and tokenizer= (its old name) with different objects; "
                        "pass one of them")
    return processing_class if processing_class is not None else tokenizer


def _rows_as_they_are(args: Any) -> None:
    """TRL settings under which a collator gets the rows themselves (needed by list datasets and ours)."""
    args.remove_unused_columns = False
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}


def _one_checkpointing(args: Any, model: Any) -> None:
    """Switch transformers' activation checkpointing off where FastVisionModel's is installed (one warning).

    Both at once recompute every layer twice; FastVisionModel's (``use_gradient_checkpointing``) already
    keeps the memory down. A model without visiontune's checkpointing keeps ``args`` as they are.
    """
    names = [n for n in ("activation_checkpointing", "gradient_checkpointing") if hasattr(args, n)]  # new, old name
    if isinstance(model, str) or not any(getattr(args, n) for n in names):
        return
    state = vision_state(model)
    if state.checkpoint_plan is not None:
        log.warning("%s=True ignored: FastVisionModel's checkpointing (use_gradient_checkpointing=%r) is installed, "
                    "and transformers' on top of it would recompute every layer twice", names[0], state.checkpointing)
        for name in names:
            setattr(args, name, False)


def _measurable(collator: Any, data: Any) -> bool:
    """Whether the token budget can measure ``data`` with ``collator``: a VisionDataCollator and a list or a
    ``datasets.Dataset`` of rows (an IterableDataset has no length and is read only as training goes)."""
    sized = isinstance(data, (list, tuple)) or (hasattr(data, "select") and hasattr(data, "__len__"))
    return isinstance(collator, VisionDataCollator) and sized and len(data) > 0


def run_token_budget(collator: VisionDataCollator, data: Any, args: Any) -> tuple[Any, Any]:
    """The pre-flight token budget for a trainer: measure ``data`` once with ``collator`` (a progress bar
    only if that takes over 2 s), print a one-line summary on the main process, and return ``data`` less the
    samples the collator would drop, and the :class:`~visiontune.budget.BudgetReport`.

    SampleTooLongError when no sample fits, before any training step.
    """
    from visiontune.budget import summary_line, token_budget, without_dropped

    main = getattr(args, "should_log", True)
    report = token_budget(collator, data, progress=2.0 if main and not getattr(args, "disable_tqdm", False) else False)
    kept = without_dropped(report, data, "raise max_seq_length (FastVisionModel.from_pretrained or the collator's) "
                                         "or make the images smaller (the collator's resize=)")
    if main:
        print(summary_line(report.summary()), flush=True)
    return kept, report


def _available_ram_bytes() -> float:
    """The host memory available to this process now (Linux ``MemAvailable``; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class _ToMLflowRun(TrainerCallback):
    """Runs ``write(mlflow)`` once per MLflow run active when training starts (one the user started, or the one
    ``report_to="mlflow"`` starts just before), on rank 0; nothing without an active run."""

    def __init__(self, write: Any) -> None:
        self.write = write
        self.logged_runs: set[str] = set()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        mlflow = sys.modules.get("mlflow")  # not imported: no run can be active
        # getattr: without MLflow installed, a project's own mlflow/ tracking folder imports as an empty
        # namespace package (transformers probes for it), which has no active_run
        active = getattr(mlflow, "active_run", None)
        run = active() if active is not None and state.is_world_process_zero else None
        if run is None or run.info.run_id in self.logged_runs:
            return
        self.write(mlflow)
        self.logged_runs.add(run.info.run_id)


class _ChoiceToMLflowRun(_ToMLflowRun):
    """The "auto" checkpoint choice's writer (its own class: transformers warns when a callback class is added
    twice, and the token budget's writer is a :class:`_ToMLflowRun` too)."""


class _FirstStepTokens(TrainerCallback):
    """Brings ``state.num_input_tokens_seen`` up to date at the end of a run's first step (a resumed run's
    too), where progress callbacks start their tokens/s window; later steps wait for the next log."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.first_step = 1

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.first_step = state.global_step + 1  # a resumed run's state is loaded by now

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.first_step:
            self.trainer._flush_input_tokens()


def _log_budget(report: Any) -> Any:
    """What the token budget logs to an active MLflow run (counts, histogram: visiontune.budget)."""
    def write(_mlflow: Any) -> None:
        from visiontune.budget import log_to_mlflow

        with tempfile.TemporaryDirectory() as tmp:
            log_to_mlflow(report, Path(tmp))
    return write


def _flag_only_train(cls: type) -> bool:
    """Whether ``cls.train`` only sets the training flags (``nn.Module``'s, or transformers' own, which does more
    only when the mode changes)."""
    from transformers import PreTrainedModel

    return cls.train in (torch.nn.Module.train, PreTrainedModel.train)


@contextlib.contextmanager
def _lean_step_calls(model: Any):
    """``model.train()`` and ``model.zero_grad()``, which transformers calls at every step, without a walk over the
    whole module tree each time (4,297 modules in a Qwen2.5-VL-7B with LoRA), for the duration of ``train()``:

    * ``train(mode)`` returns at once when every module already is in ``mode`` and no module's ``train`` does more
      than set the flag (PEFT's DoRA layers clear a cache there: then every call runs in full);
    * ``zero_grad()`` (transformers' call: ``set_to_none``) clears the grads of the parameter list taken when training
      starts; ``zero_grad(False)`` is ``nn.Module``'s own.

    Both are set on the model object and removed afterwards; a model that already has its own is left alone.
    """
    if not isinstance(model, torch.nn.Module) or "train" in vars(model) or "zero_grad" in vars(model):
        yield
        return
    modules = list(model.modules())
    params = list(model.parameters())
    flag_only = all(_flag_only_train(type(m)) for m in modules)
    full_train, full_zero_grad = model.train, model.zero_grad

    def train(mode: bool = True) -> Any:
        if flag_only and all(m.training == mode for m in modules):
            return model
        return full_train(mode)

    def zero_grad(set_to_none: bool = True) -> None:
        if not set_to_none:
            return full_zero_grad(False)
        for p in params:
            p.grad = None

    vars(model).update(train=train, zero_grad=zero_grad)
    try:
        yield
    finally:
        vars(model).pop("train", None)
        vars(model).pop("zero_grad", None)


class SFTTrainer(trl.SFTTrainer):
    """TRL's ``SFTTrainer`` that also takes Unsloth's arguments and plain lists, for vision-language models.

    * ``tokenizer=``: the old name of ``processing_class``; both default to the processor that
      ``FastVisionModel.from_pretrained`` loaded beside the model.
    * ``train_dataset`` / ``eval_dataset`` may be lists (or dicts of lists) of rows such as
      ``{"messages": [...]}``: the collator gets the rows themselves, images and all (no Arrow round trip).
    * ``data_collator`` defaults to :class:`~visiontune.collator.VisionDataCollator` (labels only on answers
      as configured, image tokens never targets), with ``max_length`` as its ``max_seq_length`` if set.
    * The loss on the fused-kernel engine: when the model's kernels are patched (``FastVisionModel`` on a
      GPU; :mod:`visiontune.kernels`), the per-token log-probabilities that TRL asks its fused LM head for
      come from the engine's chunked linear + cross-entropy (:func:`visiontune.align.engine.install_engine`,
      as the GRPO/DPO trainers do), and the step's metrics (entropy, token accuracy, token count) stay on
      the device until the next log: one host sync per logging step instead of three per step. The loss and
      the logged values are TRL's own (``uses_fused_engine`` tells whether this path serves the run).
    * ``include_num_input_tokens_seen``: each batch's token count waits on the device and is added to
      ``state.num_input_tokens_seen`` at the next log or checkpoint (transformers reads it to the host every
      step); the totals logged and saved are the same.
    * ``use_gradient_checkpointing="auto"`` (``FastVisionModel``): when the first ``train()`` starts, the first
      batch's step (forward + backward, no update) is measured under a few checkpointing settings and the
      fewest checkpointed layers whose peak fits ``SFTConfig.checkpoint_budget`` of the GPU's memory (or
      ``checkpoint_budget_gib``) are installed (:mod:`visiontune.models.auto_checkpoint`). Off a GPU the
      measure is the bytes autograd saves, against that share of the available RAM. The probes leave the
      random generators as they found them, so the run trains as it would have with the chosen setting. The
      choice is printed, kept in ``checkpoint_choice`` and logged as tags of the active MLflow run.
    * transformers calls ``model.train()`` and ``model.zero_grad()`` at every step; during a one-process ``train()``
      they skip the walk over every module when nothing would change (``_lean_step_calls``), as a plain loop does.
    * ``floating_point_ops`` (the ``total_flos`` that transformers adds up every step) is transformers' own
      estimate, 6 x input tokens x non-embedding parameters, with the parameter count taken once per model
      instead of by a walk over every module at every step (host time the GPU waits for at small batches).
    * ``args`` defaults to this module's :class:`SFTConfig`. A plain TRL config is taken as it is, except
      that a bitsandbytes AdamW that cannot run here becomes ``"adamw_torch"`` (one warning), that
      ``gradient_checkpointing`` is switched off where FastVisionModel's checkpointing is installed (one
      warning), and that list datasets and the default collator switch TRL's column removal and dataset
      preparation off (they need the rows as they are).
    * The pre-flight token budget (:mod:`visiontune.budget`), once, when the first ``train()`` starts: with a
      VisionDataCollator and a list or ``datasets.Dataset`` ``train_dataset``, every training sample is
      measured as the collator encodes it, a one-line summary is printed, the samples whose image tokens
      end past ``max_seq_length`` are left out of ``train_dataset`` (the ones longer than it are still cut
      after their last image, batch by batch) and the report is kept in ``budget_report``; counts and a
      histogram go to the MLflow run active when training starts. ``SFTConfig(token_budget=False)`` skips it.

    The other arguments are TRL's, in TRL's order.
    """

    def __init__(self, model: Any, args: Optional[trl.SFTConfig] = None, data_collator: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 *more: Any, tokenizer: Any = None, **kwargs: Any) -> None:
        processing_class = _one_of(processing_class, tokenizer)
        if processing_class is None and not isinstance(model, str):
            processing_class = vision_state(model).processor
        args = SFTConfig() if args is None else args
        fit_optimizer(args)
        _one_checkpointing(args, model)
        if data_collator is None and processing_class is not None and not isinstance(model, str):
            data_collator = VisionDataCollator(model, processing_class, max_seq_length=args.max_length)
            _rows_as_they_are(args)
        table = _ListRows(data_collator)
        train_dataset = table.index(train_dataset)
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: table.index(split) for name, split in eval_dataset.items()}
        else:
            eval_dataset = table.index(eval_dataset)
        if table.rows:
            if data_collator is None:
                raise ValueError("a list train_dataset/eval_dataset needs a data_collator that takes the rows "
                                 "(e.g. VisionDataCollator(model, processor)), or a processing_class to build one")
            data_collator = table
            _rows_as_they_are(args)
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, *more, **kwargs)
        self.budget_report: Optional[Any] = None
        self._budget_pending = True
        self.uses_fused_engine = _install_engine_loss(self.model)
        self.checkpoint_choice: Optional[Any] = None
        # Per step: (supervised tokens, entropy sum, top-1 hits, input tokens) on the device, read at the next log.
        self._device_metrics: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
        self._pending_input_tokens: list[Any] = []  # per step (device tensors or ints), for num_input_tokens_seen
        # first in line: callbacks that read the count at the end of a run's first step see it up to date
        self.callback_handler.callbacks.insert(0, _FirstStepTokens(self))

    def _track_num_input_tokens(self, inputs: dict) -> None:
        """transformers' count of the step's input tokens (all, or those under the attention mask), kept on the
        device until :meth:`_flush_input_tokens` instead of read to the host at every step."""
        how = self.args.include_num_input_tokens_seen
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        if how == "no" or not torch.is_tensor(ids) or (how == "non_padding" and "attention_mask" not in inputs):
            return super()._track_num_input_tokens(inputs)
        # all tokens: a host int (copying it to the GPU every step would wait for the GPU's queue)
        self._pending_input_tokens.append(inputs["attention_mask"].sum() if how == "non_padding" else ids.numel())

    def _flush_input_tokens(self) -> None:
        """Add the pending token counts (summed over ranks, as transformers does per step) to the trainer state."""
        pending = self._pending_input_tokens
        if not pending:
            return
        total = torch.tensor(sum(c for c in pending if isinstance(c, int)), dtype=torch.int64, device=self.args.device)
        counts = [c.to(total.device, torch.int64) for c in pending if torch.is_tensor(c)]
        if counts:
            total = total + torch.stack(counts).sum()
        pending.clear()
        self.state.num_input_tokens_seen += int(self.accelerator.gather(total).sum().item())

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """transformers' estimate of a step's FLOPs, the model's non-embedding parameter count cached (it does
        not change while training; keyed on the model object)."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        cached = getattr(self, "_flop_params", None)
        if cached is None or cached[0] is not self.model:
            cached = self._flop_params = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main].numel() * cached[1]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._flush_input_tokens()  # trainer_state.json holds the count a resumed run starts from
        super()._save_checkpoint(model, trial)

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """TRL's SFT loss; on the engine (``uses_fused_engine``) computed as TRL computes it, but with the step's
        metrics kept on the device (see the class docstring). Settings that need TRL's other branches (a custom
        loss function, label smoothing, DFT loss, MoE auxiliary loss, sequence parallelism, returned outputs)
        take TRL's code unchanged."""
        if not self._engine_loss_serves(return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        try:
            outputs = model(**inputs, fused_lm_head=True)
        except ValueError as e:
            if "Image features and image tokens do not match" in str(e) and self.args.max_length is not None:
                raise ValueError(
                    f"max_length={self.args.max_length} cuts image placeholder tokens off some samples while their "
                    "image features remain: raise max_length, or set it to None and let the collator's "
                    "max_seq_length cut after the last image.") from e
            raise
        mask = outputs.label_mask
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(count, device=mask.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        with torch.no_grad():
            if "attention_mask" in inputs:
                seen = inputs["attention_mask"].sum()
            else:  # padding-free: one packed row
                seen = torch.tensor(inputs["position_ids"].size(-1), device=mask.device)
            self._device_metrics[mode].append(torch.stack([
                mask.sum().float(), outputs.entropy.detach().float().sum(), outputs.is_top1.sum().float(),
                seen.to(mask.device).float()]))
        return loss

    def _engine_loss_serves(self, return_outputs: bool) -> bool:
        if not self.uses_fused_engine or return_outputs or self.compute_loss_func is not None:
            return False
        if self.label_smoother is not None or self.args.loss_type != "nll" or self.aux_loss_enabled:
            return False
        pc = getattr(self.accelerator, "parallelism_config", None)
        return not (pc is not None and getattr(pc, "sp_enabled", False))

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """TRL's ``log``, after the pending token counts and the engine path's step metrics are read (one sync)."""
        self._flush_input_tokens()
        self._flush_device_metrics("train" if self.model.training else "eval")
        super().log(logs, start_time)

    def _flush_device_metrics(self, mode: str) -> None:
        pending = self._device_metrics[mode]
        if not pending:
            return
        steps = torch.stack(pending)  # (steps, 4)
        pending.clear()
        world = self.accelerator.num_processes
        if world > 1:  # every rank logs the same steps; per step, the sums over ranks (as TRL's per-step gather)
            steps = self.accelerator.gather(steps).view(world, *steps.shape).sum(0)
        for valid, entropy, top1, seen in steps.tolist():
            self._metrics[mode]["entropy"].append(entropy / valid if valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append(top1 / valid if valid > 0 else 0.0)
            if mode == "train":
                self._total_train_tokens += int(seen) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """TRL's ``train``; the first call runs the pre-flight token budget before it (see the class docstring)."""
        if self._budget_pending:
            self._budget_pending = False
            self._token_budget()
        self._auto_checkpointing()
        # One process only: FSDP2 and DeepSpeed replace the parameters when the model is prepared, after this
        # point, and a parameter list taken here would then miss the ones that get gradients.
        alone = self.args.world_size == 1 and not (getattr(self, "is_fsdp_enabled", False)
                                                   or getattr(self, "is_deepspeed_enabled", False))
        with _lean_step_calls(self.model) if alone else contextlib.nullcontext():
            return super().train(*args, **kwargs)

    def _auto_checkpointing(self) -> None:
        """``use_gradient_checkpointing="auto"``: measure the first batch and install the choice (class docstring)."""
        state = vision_state(self.model)
        if state.checkpointing != "auto" or state.auto_choice is not None:
            return
        world = getattr(self.args, "world_size", 1)
        if world > 1:  # each rank would measure its own batch and could choose differently: keep the floor
            log.warning("use_gradient_checkpointing='auto' under %d processes: every layer stays checkpointed "
                        "(set model.use_gradient_checkpointing explicitly to store more)", world)
            return
        device = next(self.model.parameters()).device
        from visiontune.models.auto_checkpoint import install_choice, plan_checkpointing
        from visiontune.models.fast_vision import _install_checkpointing

        budget_gib = getattr(self.args, "checkpoint_budget_gib", None)
        share = getattr(self.args, "checkpoint_budget", 0.9)
        if budget_gib is not None:
            budget = budget_gib * 2**30
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = share * (free + torch.cuda.memory_allocated(device))
        else:  # off a GPU the probes measure what autograd saves (the weights it saves included) against RAM
            budget = share * _available_ram_bytes()
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        tokens, metrics = self._total_train_tokens, self._device_metrics["train"]
        # The probes must not change the run: its data order and dropout draw from these generators.
        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
               torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        try:
            batch = self._prepare_inputs(next(iter(self.get_train_dataloader())))

            def step() -> None:
                self.compute_loss(self.model, dict(batch)).backward()
                self.model.zero_grad(set_to_none=True)

            _install_checkpointing(self.model, None)  # off: the every-layer start "auto" installed
            self.model.train()
            # AdamW keeps two fp32 moments per trainable parameter, created at the first real step: not in the probes.
            choice = plan_checkpointing(self.model, step, budget, extra_bytes=8.0 * trainable)
        finally:
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
            if rng[3] is not None:
                torch.cuda.set_rng_state_all(rng[3])
        state.checkpoint_handle = install_choice(self.model, choice)
        state.checkpoint_plan = (choice.lm_checkpointed / max(1, choice.lm_layers), choice.mode)
        state.auto_choice = choice
        self._total_train_tokens = tokens  # the probes are not training: no tokens, no metrics
        metrics.clear()
        self._metrics["train"].clear()
        self.checkpoint_choice = choice
        print(choice.summary())
        # tags, not params: a resumed run measures again, and MLflow refuses to change a logged param
        self.add_callback(_ChoiceToMLflowRun(lambda mlflow: mlflow.set_tags(choice.as_params())))

    def _token_budget(self) -> None:
        """Measure ``train_dataset`` (the rows themselves, for a list), leave out what the collator would
        drop, keep the report and log it to MLflow when training starts."""
        data, collator = self.train_dataset, self.data_collator
        inner = collator.collator if isinstance(collator, _ListRows) else collator
        if not getattr(self.args, "token_budget", True) or not _measurable(inner, data):
            return
        indexed = isinstance(collator, _ListRows) and INDEX_COLUMN in (getattr(data, "column_names", None) or ())
        rows = [collator.rows[i] for i in data[INDEX_COLUMN]] if indexed else data
        _, self.budget_report = run_token_budget(inner, rows, self.args)
        if len(self.budget_report.kept) < len(data):
            self.train_dataset = data.select(self.budget_report.kept)
        self.add_callback(_ToMLflowRun(_log_budget(self.budget_report)))


def _install_engine_loss(model: Any) -> bool:
    """Put the engine's chunked log-probs in front of the fused LM head TRL installed, if ``model``'s kernels
    are patched (an active :class:`~visiontune.kernels.patch.PatchHandle`); returns whether it serves."""
    if isinstance(model, str):
        return False
    handle = vision_state(model).kernel_handle
    if handle is None or not getattr(handle, "active", False):
        return False
    from visiontune.align.engine import engine_installed, install_engine

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return install_engine(inner) or engine_installed(model)


def _is_list_dataset(data: Any) -> bool:
    if isinstance(data, dict):
        return any(isinstance(v, (list, tuple)) for v in data.values())
    return isinstance(data, (list, tuple))


def _config_new(cls: type, *args: Any, **kwargs: Any) -> Any:
    """``trl.SFTConfig.__new__``: a call with ``max_seq_length=`` (a TypeError in TRL 1.x) gets our SFTConfig."""
    if cls is _TRL_CONFIG and "max_seq_length" in kwargs:
        log.info("trl.SFTConfig(max_seq_length=...) is served by visiontune.trainer.SFTConfig")
        return object.__new__(SFTConfig)
    return object.__new__(cls)


def _trainer_new(cls: type, *args: Any, **kwargs: Any) -> Any:
    """``trl.SFTTrainer.__new__``: a call TRL 1.x refuses (``tokenizer=``, a list dataset) gets our SFTTrainer."""
    train = args[3] if len(args) > 3 else kwargs.get("train_dataset")
    evals = args[4] if len(args) > 4 else kwargs.get("eval_dataset")
    if cls is _TRL_TRAINER and ("tokenizer" in kwargs or _is_list_dataset(train) or _is_list_dataset(evals)):
        log.info("trl.SFTTrainer(tokenizer=... or a list dataset) is served by visiontune.trainer.SFTTrainer")
        return object.__new__(SFTTrainer)
    return object.__new__(cls)


_TRL_CONFIG, _TRL_TRAINER = trl.SFTConfig, trl.SFTTrainer


def install_trl_compat() -> None:
    """Let ``trl.SFTConfig`` / ``trl.SFTTrainer`` take the calls TRL 1.x refuses (see the module docstring).

    Only ``__new__`` is added: when a call is one TRL refuses, it makes an instance of this module's
    subclass (whose ``__init__`` then runs); otherwise it makes TRL's own instance, whose ``__init__`` is
    TRL's. Runs on import of this module; idempotent.
    """
    _TRL_CONFIG.__new__ = staticmethod(_config_new)  # type: ignore[assignment]
    _TRL_TRAINER.__new__ = staticmethod(_trainer_new)  # type: ignore[assignment]


install_trl_compat()
