"""The one typed configuration of visiontune.

Every setting of the pipeline lives here, once: its type, its default and its documentation (the
``help`` metadata of each field). ``params.yaml`` maps onto :class:`PipelineConfig` section by section,
the CLI's ``--set section.key=value`` overrides map onto the same fields, and no other module reads a
default from anywhere else. Unknown keys are errors (a typo in ``params.yaml`` must not be silently
ignored), and so is a value out of its field's range (``ge``/``gt``/``le``/``lt``/``choices`` of :func:`_f`,
checked when the config loads: ``validate.max_failure_ratio=-1`` fails before any stage runs).

Sections are scoped by consumer (as litgpt's TrainArgs / EvalArgs): a stage reads its own section
(``validate``, ``normalize``, ``convert``, ``demo``, ``train`` with its ``lora`` and ``collator``, ``align``,
``eval``, ``register``) plus the shared ones (``data``: where the data lives; ``model``: the base model; ``images``:
how images are sized for the model, in training and inference alike; ``tracking``: MLflow). A stage may
also read the output locations of the stages upstream of it (e.g. ``train.output_dir``). The exact keys
each stage reads are listed once, in :mod:`visiontune.stages`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from visiontune.images import MAX_PIXELS, ImageRule


def _f(default: Any, help: str, *, ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
       lt: Optional[float] = None, choices: Optional[tuple] = None) -> Any:
    """A dataclass field with a default, its documentation and the range of its values (bounds of a number,
    or the values a string may take; None, where the type allows it, is always accepted)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("choices", choices)) if v is not None}
    metadata = {"help": help, "range": bounds} if bounds else {"help": help}
    if isinstance(default, (list, dict, tuple)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata)
    return field(default=default, metadata=metadata)


def range_text(bounds: dict[str, Any]) -> str:
    """A field's range in words, e.g. ``0 <= value <= 1``, ``value > 0``, ``one of 'png', 'jpeg'``."""
    if "choices" in bounds:
        return "one of " + ", ".join(repr(c) for c in bounds["choices"])
    low = f"{bounds['ge']} <= " if "ge" in bounds else f"{bounds['gt']} < " if "gt" in bounds else ""
    high = f" <= {bounds['le']}" if "le" in bounds else f" < {bounds['lt']}" if "lt" in bounds else ""
    if low and not high:  # one-sided: "value >= 1" reads better than "1 <= value"
        return "value " + (f">= {bounds['ge']}" if "ge" in bounds else f"> {bounds['gt']}")
    return f"{low}value{high}"


def _in_range(value: Any, bounds: dict[str, Any]) -> bool:
    if "choices" in bounds:
        return value in bounds["choices"]
    checks = (("ge", lambda b: value >= b), ("gt", lambda b: value > b), ("le", lambda b: value <= b),
              ("lt", lambda b: value < b))
    return all(check(bounds[k]) for k, check in checks if k in bounds)  # NaN fails every comparison


@dataclass
class DataConfig:
    """Where the raw data lives and how its annotation table is read (shared by the data stages)."""

    raw_dir: str = _f("data/raw", "Folder of raw images plus an annotation file; read-only to the pipeline.")
    annotations: str = _f(
        "annotations.jsonl",
        "Annotation file inside raw_dir (JSONL, CSV or Parquet), or a `datasets` dataset saved to disk there.",
    )
    image_column: str = _f("image", "Column holding the image path (relative to raw_dir) or image bytes.")
    text_column: str = _f("text", "Column holding the target text (caption, transcription, answer).")
    question_column: Optional[str] = _f(None, "Optional column holding a per-row question (QA data).")
    extra_images_column: Optional[str] = _f(None, "Optional column holding a list of extra image paths per row.")
    work_dir: str = _f("data", "Folder where the data stages write their outputs (validated/, normalized/, dataset/, metrics/).")
    executor: str = _f(
        "local", "Where validate and normalize do their per-image work: 'local' (one process per core of this "
        "machine; $VISIONTUNE_WORKERS sets how many) or 'dask' (a Dask cluster through Prefect's DaskTaskRunner, "
        "dask_chunk records per task). Outputs are byte-identical either way.", choices=("local", "dask"))
    dask_address: Optional[str] = _f(
        None, "executor 'dask': address of a running Dask scheduler (e.g. tcp://10.0.0.5:8786); its workers must see "
        "raw_dir and work_dir at the same paths (a shared filesystem). null: a temporary LocalCluster on this machine.")
    dask_workers: int = _f(0, "executor 'dask' without an address: worker processes of the temporary LocalCluster "
                              "(one thread each); 0: one per core.", ge=0)
    dask_chunk: int = _f(256, "executor 'dask': annotation records per task in validate (their images are probed "
                              "together), images per task in normalize. Each task costs a few tenths of a second of "
                              "Prefect bookkeeping (measured), so a task should hold seconds of work; smaller chunks "
                              "balance better over many workers.", ge=1)


@dataclass
class DemoConfig:
    """The bundled demo data generator (``visiontune demo-data``)."""

    samples: int = _f(3000, "Number of pages the demo data generator writes.", ge=1)
    seed: int = _f(3407, "Seed of the demo data generator (same seed, same bytes: data.dvc's hash holds).", ge=0)
    heldout: int = _f(200, "Held-out pages written under data.raw_dir/heldout: the second half of the digits, in "
                          "layouts the training pages never use (scored by the evaluate stage via eval.extra_sets).", ge=0)


@dataclass
class ValidateConfig:
    """The validate stage: which raw records are accepted (the rest are quarantined with a reason)."""

    accept_min_px: int = _f(8, "Images whose shorter side is below this are rejected (too small to upscale meaningfully).", ge=1)
    accept_max_px: int = _f(20000, "Images whose longer side is above this are rejected.", ge=1)
    max_pixels: int = _f(MAX_PIXELS, "Images with more pixels than this are rejected as decompression bombs (never decoded).", ge=1)
    max_aspect_ratio: float = _f(8.0, "Largest allowed long side / short side.", ge=1)
    allowed_modes: list = _f(["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "1"], "PIL modes accepted (all are converted to RGB).")
    min_text_chars: int = _f(1, "Shortest allowed target text, in characters (after stripping).", ge=0)
    max_text_chars: int = _f(4000, "Longest allowed target text, in characters.", ge=1)
    max_failure_ratio: float = _f(0.2, "The validate stage fails when more than this share of records is quarantined.", ge=0, le=1)


@dataclass
class NormalizeConfig:
    """The normalize stage: every valid image brought into one pixel range, content-addressed."""

    min_px: int = _f(300, "Smallest allowed image side after normalization, in pixels.", ge=1)
    max_px: int = _f(1000, "Largest allowed image side after normalization, in pixels.", ge=1)
    uniform_size: Optional[list] = _f(None, "If set, [width, height]: every image is padded/resized to exactly this size.")
    multiple_of: int = _f(0, "If > 0, image sides are rounded to a multiple of this (e.g. 28 for Qwen2-VL); 0 keeps them.", ge=0)
    image_format: str = _f("png", "Format of normalized images: 'png' (lossless) or 'jpeg' (quality 95; smaller and faster to write).", choices=("png", "jpeg"))


@dataclass
class ConvertConfig:
    """The convert stage: normalized records -> conversations, split into train / validation / test."""

    instruction: str = _f("Transcribe the handwritten digits in this image.", "User instruction placed before the image(s) in each conversation; recorded with the model as the served default prompt.")
    split_ratios: list = _f([0.8, 0.1, 0.1], "Train / validation / test shares; split by a hash of each record, stable when rows are added.")
    seed: int = _f(3407, "Seed of the hash-based split.", ge=0)


@dataclass
class ModelConfig:
    """The base model and how it is loaded (shared by train, evaluate and register)."""

    name_or_path: str = _f(
        "models/tiny-qwen3-vl-demo",
        "Hub id or local directory of the base model. The demo uses a tiny random-weight model built offline "
        "(`visiontune tiny-model`); point this at e.g. Qwen/Qwen2.5-VL-7B-Instruct for real work.",
    )
    tiny_architecture: str = _f("qwen3_vl", "Architecture of the tiny demo model built when name_or_path does not exist yet and starts with models/tiny-.")
    tiny_size: str = _f("demo", "Size preset of that tiny model (visiontune.testing.TINY_SIZES): 'demo' (learns the demo task within its CPU budget) or 'test' (smallest; what the unit tests use).")
    tiny_seed: int = _f(3407, "Seed of that tiny model's random weights.", ge=0)
    max_seq_length: int = _f(1024, "Longest sequence (text + image tokens) a sample may have.", ge=1)
    dtype: Optional[str] = _f(None, "torch dtype name; None picks bfloat16 on GPUs that support it, float32 otherwise.")
    load_in_4bit: bool = _f(False, "Load the frozen base in 4-bit NF4 (bitsandbytes: CUDA, or its slower CPU backend).")
    load_in_fp8: bool = _f(False, "Train stage: put the LoRA layers' frozen bases into FP8 e4m3 (per-row scales) so the "
                           "engine runs them on FP8 tensor cores (Hopper+); faster, numerics change (RESULTS_engine.md).")
    use_gradient_checkpointing: Union[bool, str, float] = _f(
        "auto", "True, False, 'offload' (checkpoint and keep saved inputs on the CPU), 'mlp' (CUDA engine: only the MLPs "
        "recompute their gate/up projections; fastest memory saver at small batches) or a fraction in (0, 1): "
        "selective checkpointing of every vision block and that share of the LM layers (faster than True, more memory), "
        "or 'auto' (the train stage measures its first step and keeps the fewest checkpointed layers that fit "
        "train.checkpoint_budget; the align stage checkpoints every layer).")
    use_fused_kernels: bool = _f(True, "Patch in visiontune's Triton kernels where CUDA is present (ignored on CPU).")


@dataclass
class LoraConfig:
    """LoRA adapter settings of the train stage (names as in Unsloth's get_peft_model)."""

    finetune_vision_layers: bool = _f(True, "Put LoRA on the vision tower's blocks.")
    finetune_language_layers: bool = _f(True, "Put LoRA on the language model's blocks.")
    finetune_attention_modules: bool = _f(True, "Put LoRA on attention projections.")
    finetune_mlp_modules: bool = _f(True, "Put LoRA on MLP projections.")
    r: int = _f(16, "LoRA rank.", ge=1)
    lora_alpha: int = _f(16, "LoRA scaling numerator (scale = lora_alpha / r, or / sqrt(r) with use_rslora).", ge=1)
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.", ge=0, lt=1)
    use_rslora: bool = _f(False, "Rank-stabilized LoRA scaling.")
    target_modules: Optional[Union[str, list]] = _f(None, "Explicit list or regex of module names; overrides the four flags when set.")
    modules_to_save: Optional[list] = _f(None, "Modules trained in full and saved with the adapter, e.g. [lm_head, embed_tokens].")


@dataclass
class CollatorConfig:
    """How the train stage turns conversations into batches (VisionDataCollator arguments; image sizing is `images`)."""

    train_on_responses_only: bool = _f(True, "Compute the loss only on assistant answers, found by the chat template's markers.")
    completion_only_loss: bool = _f(True, "Mask everything that is not an assistant answer (by the template's own structure).")
    pad_to_multiple_of: Optional[int] = _f(None, "Pad each batch's length to a multiple of this.", ge=1)
    padding_free: bool = _f(
        False, "Pack each batch into one row without padding (Qwen2/2.5/3-VL, Mistral 3). Needs the fused-kernel "
        "engine (on by default on CUDA) or flash-attention 2; refused, with the reason, where samples would mix.")


@dataclass
class TrainConfig:
    """The train stage."""

    output_dir: str = _f("outputs/train", "Folder for checkpoints and the final adapter.")
    learning_rate: float = _f(3e-3, "Peak learning rate (linear decay after warmup).", gt=0)
    warmup_steps: int = _f(20, "Linear warmup steps.", ge=0)
    max_steps: int = _f(1200, "Optimizer steps; > 0 overrides num_train_epochs (0 or -1: train num_train_epochs epochs).", ge=-1)
    num_train_epochs: float = _f(1.0, "Epochs, used when max_steps <= 0.", gt=0)
    per_device_train_batch_size: int = _f(16, "Samples per device per micro-batch.", ge=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", ge=1)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.", ge=0)
    save_steps: int = _f(100, "Checkpoint every this many steps (a killed run resumes from the last one).", ge=1)
    logging_steps: int = _f(10, "Log metrics every this many steps.", ge=1)
    checkpoint_budget: float = _f(
        0.9, "With model.use_gradient_checkpointing: auto, the share of the GPU's memory (free at train start plus "
        "what the run already holds; off a GPU, of the available RAM) that the step's measured peak may take.", gt=0, le=1)
    seed: int = _f(3407, "Seed of data order, dropout and LoRA init.", ge=0)
    eval_every_steps: int = _f(
        200, "Every this many steps (and at the end) generate answers for the first eval_samples rows of the validation "
        "split and log val_cer / val_exact_match to MLflow as curves beside the loss (0 = off). Each costs about one "
        "to two training steps on the demo (measured: 1.9% of the training time at every 100 steps), so about 1% "
        "at 200.", ge=0)
    eval_samples: int = _f(32, "Validation rows (the first ones: a fixed subset) evaluated during training.", ge=0)
    eval_max_new_tokens: int = _f(12, "Generation length limit of the evaluation during training.", ge=1)
    select_best: Optional[str] = _f(
        None, "cer or exact_match: save the adapter of the in-training evaluation that was best on this metric "
        "instead of the last one (recorded in the run as best_step / selected_step); null keeps the last.",
        choices=("cer", "exact_match"))
    num_processes: int = _f(
        1, "Training processes on this machine, one per GPU (on a CPU-only machine: CPU processes over gloo). > 1: "
        "`visiontune train` and the flow start them through torchrun; per_device_train_batch_size is per process, so "
        "the global batch is per_device_train_batch_size x gradient_accumulation_steps x num_processes. Started "
        "under a launcher already (torchrun / accelerate launch), the launcher's process count is used (1 or equal "
        "to it). Only rank 0 logs to MLflow and writes the adapter and checkpoints' shared files.", ge=1)
    distributed: str = _f(
        "ddp", "How several processes hold the model: 'ddp' (each a whole copy; LoRA gradients all-reduced) or "
        "'fsdp2' (torch FSDP2 fully_shard through accelerate, CUDA GPUs only: frozen base and LoRA weights sharded "
        "across processes per decoder layer / vision block and gathered unit by unit, so each GPU keeps 1/N of the "
        "weights while training; each process still loads the whole base first). Ignored with one process.",
        choices=("ddp", "fsdp2"))


@dataclass
class AlignConfig:
    """The align stage: GRPO (GSPO, Dr. GRPO) or DPO on the SFT adapter, before evaluate (off by default)."""

    method: str = _f("none", "'none' (off: evaluate and register take the SFT adapter), 'grpo' (TRL's GRPO with the "
                     "rewards below; loss_type and importance_sampling_level pick GRPO, Dr. GRPO, GSPO) or 'dpo'.",
                     choices=("none", "grpo", "dpo"))
    output_dir: str = _f("outputs/align", "Folder of the aligned adapter and of run.json, the record of the model "
                         "evaluate and register take (the SFT one when method is none).")
    split: str = _f("train", "Split whose prompts (and reference answers) are aligned on.")
    max_samples: int = _f(0, "Use at most this many rows of the split (0 = all).", ge=0)
    rewards: list = _f(["cer"], "GRPO rewards (visiontune.rewards), summed: exact_match, cer (1 - CER), numeric "
                       "(first number within numeric_tolerance), format (whole answer matches format_pattern). DPO "
                       "scores sampled answers with the first one when the split has no chosen/rejected columns.")
    reward_weights: Optional[list] = _f(None, "Weight of each reward (null: all 1).")
    numeric_tolerance: float = _f(0.0, "Absolute tolerance of the numeric reward.", ge=0)
    format_pattern: str = _f(r"\d+", "Regular expression the whole answer must match for the format reward.")
    loss_type: str = _f("grpo", "TRL's GRPO loss: grpo (per-sequence mean), dr_grpo (Dr. GRPO: constant "
                        "normalizer), dapo, bnpo, ...", choices=("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"))
    importance_sampling_level: str = _f("token", "'token' (GRPO) or 'sequence' (GSPO: one importance ratio per "
                                        "completion).", choices=("token", "sequence"))
    num_generations: int = _f(8, "GRPO: completions sampled per prompt; DPO without chosen/rejected columns: "
                              "samples per prompt the pair is picked from.", ge=2)
    max_completion_length: int = _f(12, "Longest sampled answer, in tokens.", ge=1)
    temperature: float = _f(1.0, "Sampling temperature of the completions.", gt=0)
    beta: float = _f(0.04, "GRPO: weight of the KL penalty to the SFT model (0 = none, no reference pass). DPO: the "
                     "implicit reward's temperature (TRL's default 0.1).", ge=0)
    learning_rate: float = _f(1e-4, "Peak learning rate (linear decay).", gt=0)
    max_steps: int = _f(50, "Optimizer steps.", ge=1)
    per_device_train_batch_size: int = _f(16, "GRPO: completions per step (a multiple of num_generations); DPO: "
                                          "pairs per step.", ge=1)
    logging_steps: int = _f(5, "Log metrics (reward, KL, completion length ...) every this many steps.", ge=1)
    save_steps: int = _f(10, "Checkpoint every this many steps: a killed align run, re-run with the same settings, "
                         "resumes from the last complete checkpoint (changed settings, code or inputs start over).",
                         ge=1)
    seed: int = _f(3407, "Seed of sampling and data order.", ge=0)
    chosen_column: str = _f("chosen", "DPO: column of the preferred answer text, if the dataset has one.")
    rejected_column: str = _f("rejected", "DPO: column of the dispreferred answer text.")
    sample_table_rows: int = _f(64, "Latest completions (with their rewards) or DPO pairs logged as MLflow's "
                                "align/samples.json table.", ge=1)


@dataclass
class EvalConfig:
    """The evaluate stage: held-out split, base vs fine-tuned."""

    split: str = _f("test", "Which split to evaluate on.")
    max_samples: int = _f(100, "Evaluate at most this many samples (0 = all).", ge=0)
    max_new_tokens: int = _f(12, "Generation length limit.", ge=1)
    batch_size: int = _f(8, "Generation batch size.", ge=1)
    primary_metric: str = _f("cer", "Metric that decides promotion: cer (lower is better), exact_match, chrf or rougeL (recorded in the metrics file, which register reads).")
    metrics_file: str = _f("outputs/eval/metrics.json", "DVC metrics file written by the evaluate stage.")
    predictions_file: str = _f("outputs/eval/predictions.csv", "Per-sample CSV (reference, base and fine-tuned prediction, CER): DVC plots data, also logged to MLflow.")
    grid_file: str = _f("outputs/eval/predictions.png", "PNG grid of sample images with reference and prediction, also logged to MLflow.")
    grid_samples: int = _f(8, "Samples shown in the prediction grid (0 = no grid).", ge=0)
    compare_base: bool = _f(True, "Also evaluate the base model without the adapter (doubles evaluation time; gives the base_* baseline).")
    extra_sets: dict = _f({}, "More held-out sets scored beside the split, {name: annotations.jsonl path} (rows "
                          "{image, text}, images relative to that file's folder), each base vs fine-tuned with the "
                          "split's own instruction; reported, logged as eval_<name>_<metric>; promotion still uses "
                          "the split. The demo scores its layout-shifted handwriting set here.")


@dataclass
class RegisterConfig:
    """The register stage: MLflow model, registry version and champion/challenger promotion."""

    model_name: str = _f("visiontune-demo", "Registered model name.")
    promotion_margin: float = _f(0.0, "The new version becomes champion only if it beats the champion's primary metric by more than this.", ge=0)
    artifact_name: str = _f("model", "Name of the logged MLflow model (log_model(name=...)) inside the training run.")
    log_base_model: bool = _f(True, "Log a local base model directory as a model artifact so the model loads anywhere; False (or a hub id) stores only the id/path.")
    input_example: bool = _f(True, "Log an input example with the model; MLflow then loads the model once to validate it (turn off for large models).")
    max_new_tokens: int = _f(64, "Default generation length of the served model (overridable per request with params={'max_new_tokens': n}).", ge=1)
    batch_size: int = _f(8, "Generation batch size of the served model.", ge=1)
    promotions_log: str = _f("mlflow/promotions.jsonl", "Local JSON-lines log of every promotion decision (also logged to the run as register/decision.json).")
    image_root: Optional[str] = _f(
        None, "The one folder on the serving machine whose image files a request to the served model may name by path "
        "(absolute, or relative to it; '..' and symlinks out of it are refused). null: the served model takes "
        "image bytes (base64) only and reads no file.")
    max_pixels: int = _f(MAX_PIXELS, "Largest image (width x height) the served model decodes; a larger one is refused "
                         "from its header, before decoding (decompression bombs).", ge=1)


@dataclass
class ReportConfig:
    """The report stage: one self-contained HTML page per run (decision, metrics, curves, gallery, errors, data, lineage)."""

    output_dir: str = _f("outputs/report", "Folder of the run report (index.html); `visiontune report --run ID` writes runs/<ID>/index.html there.")
    gallery_samples: int = _f(100, "Evaluation samples shown in the report's gallery, in evaluation order (0 = all).", ge=0)


@dataclass
class ExportConfig:
    """The export stage: the champion (or a given version) as folders serving engines and llama.cpp load."""

    formats: list = _f([], "What to export: any of merged_16bit (safetensors folder for vLLM / SGLang / TGI / transformers), "
                       "merged_4bit (bitsandbytes NF4), lora (the adapter), gguf_f16, gguf_q8_0, gguf_f32 (llama.cpp "
                       "language model + mmproj; Qwen2-VL, Qwen2.5-VL, Gemma 3). [] turns the stage off.")
    version: Optional[str] = _f(None, "Registered model version to export; null exports the current champion.")
    output_dir: str = _f("outputs/export", "Folder of the exported formats and their sha256 manifest.json (also logged to "
                         "the version's MLflow run under export/v<version>).")


@dataclass
class TrackingConfig:
    """MLflow tracking (shared by train, evaluate and register)."""

    uri: Optional[str] = _f(None, "MLflow tracking URI; None uses $MLFLOW_TRACKING_URI or the embedded sqlite:///mlflow/mlflow.db.")
    experiment: str = _f("visiontune", "MLflow experiment name.")


def _section(cls: type) -> Any:
    return field(default_factory=cls, metadata={"help": cls.__doc__})


@dataclass
class PretrainConfig:
    """The demo's base model, pretrained by visiontune on printed text it renders (``visiontune pretrain``).

    The shipped weights under ``output_dir`` are committed; the stage is frozen in dvc.yaml so ``dvc repro``
    never retrains them by accident (``dvc repro -f pretrain`` or ``visiontune pretrain`` does)."""

    output_dir: str = _f("models/visiontune-read-base", "Folder of the pretrained base (weights, processor, log).")
    architecture: str = _f("qwen3_vl", "Architecture of the base (a visiontune tiny-model architecture).")
    size: str = _f("base", "Size preset of the base (visiontune.testing.TINY_SIZES).")
    seed: int = _f(3407, "Seed of the weights' initialization and of the printed-text stream.", ge=0)
    steps: int = _f(13500, "Optimizer steps (full-parameter training; the cosine schedule spans them).", ge=1)
    batch_size: int = _f(96, "Pages per step (the loop is bound by page rendering, so pages/s barely depend on it).", ge=1)
    learning_rate: float = _f(1e-3, "Peak AdamW learning rate (cosine decay to a tenth after warmup).", gt=0)
    warmup_steps: int = _f(300, "Linear warmup steps.", ge=0)
    weight_decay: float = _f(0.01, "AdamW weight decay (not on norms and biases).", ge=0)
    eval_every: int = _f(500, "Greedy exact match / CER on a fixed printed validation set every this many steps.", ge=1)
    eval_samples: int = _f(256, "Pages in that validation set (a seed stream of its own).", ge=1)
    instruction: str = _f("Transcribe the text in this image.", "The user turn every pretraining page comes with.")
    num_workers: int = _f(0, "Data-loader processes rendering pages (0: one per core, at most 16).", ge=0)
    device: str = _f("auto", "'auto' (CUDA if present, else CPU), 'cuda' or 'cpu'.", choices=("auto", "cuda", "cpu"))
    init_from: Optional[str] = _f(None, "Continue an interrupted run: the weights of its `.partial` folder (saved at "
                                        "every evaluation), trained on from start_step with the same page stream and "
                                        "schedule; the optimizer's moments start afresh (recorded).")
    start_step: int = _f(0, "The step init_from's weights reached (0: a fresh run).", ge=0)


@dataclass
class PipelineConfig:
    """All settings of one pipeline run; params.yaml holds exactly these sections."""

    data: DataConfig = _section(DataConfig)
    demo: DemoConfig = _section(DemoConfig)
    pretrain: PretrainConfig = _section(PretrainConfig)
    validate: ValidateConfig = _section(ValidateConfig)
    normalize: NormalizeConfig = _section(NormalizeConfig)
    convert: ConvertConfig = _section(ConvertConfig)
    model: ModelConfig = _section(ModelConfig)
    images: ImageRule = _section(ImageRule)
    lora: LoraConfig = _section(LoraConfig)
    collator: CollatorConfig = _section(CollatorConfig)
    train: TrainConfig = _section(TrainConfig)
    align: AlignConfig = _section(AlignConfig)
    eval: EvalConfig = _section(EvalConfig)
    register: RegisterConfig = _section(RegisterConfig)
    report: ReportConfig = _section(ReportConfig)
    export: ExportConfig = _section(ExportConfig)
    tracking: TrackingConfig = _section(TrackingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every field (what MLflow logs as params)."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def get(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return getattr(getattr(self, section), key)


class ConfigError(ValueError):
    """A params file or override that does not match :class:`PipelineConfig`."""


def _check_type(where: str, value: Any, tp: Any) -> Any:
    """Validate (and lightly coerce: int -> float) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _check_type(where, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if tp is Any:
        return value
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads 5e-4 (no dot) as a string; a float setting takes it as the number it spells.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (list, dict):
        if isinstance(value, tp):
            return value
        if tp is list and isinstance(value, tuple):
            return list(value)
        raise ConfigError(f"{where}: expected a {tp.__name__}, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _section_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def from_dict(raw: dict, source: str = "<dict>") -> PipelineConfig:
    """Build a :class:`PipelineConfig` from nested dicts, rejecting unknown sections and keys."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f.type for f in dataclasses.fields(PipelineConfig)}
    hints = typing.get_type_hints(PipelineConfig)
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; valid sections are {sorted(sections)}")
    built = {}
    for name in sections:
        cls = hints[name]
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping, got {values!r}")
        types_ = _section_types(cls)
        bad = set(values) - set(types_)
        if bad:
            raise ConfigError(
                f"{source}: unknown key(s) {sorted(bad)} in section '{name}'; valid keys are {sorted(types_)} "
                f"(see `visiontune config` for their meaning)"
            )
        kwargs = {k: _check_type(f"{source}: {name}.{k}", v, types_[k]) for k, v in values.items()}
        try:
            built[name] = cls(**kwargs)
        except ValueError as e:  # a section that validates its own values (e.g. images)
            raise ConfigError(f"{source}: section '{name}': {e}") from e
        _check_ranges(source, name, built[name])
    return PipelineConfig(**built)


# Settings that bound each other within a section: (section, lower, upper).
_ORDERED = (("validate", "accept_min_px", "accept_max_px"), ("validate", "min_text_chars", "max_text_chars"),
            ("normalize", "min_px", "max_px"))


def _check_ranges(source: str, name: str, section: Any) -> None:
    """Every field of a built section within its range (:func:`_f`), and the ordered pairs in order."""
    for f in dataclasses.fields(section):
        value, bounds = getattr(section, f.name), f.metadata.get("range")
        if bounds and value is not None and not isinstance(value, bool) and not _in_range(value, bounds):
            raise ConfigError(f"{source}: {name}.{f.name}={value!r} is out of range (allowed: {range_text(bounds)})")
    for sec, low, high in _ORDERED:
        if sec == name and getattr(section, low) > getattr(section, high):
            raise ConfigError(f"{source}: {sec}.{low}={getattr(section, low)!r} is above {sec}.{high}="
                              f"{getattr(section, high)!r}; lower the first or raise the second")


def load_params(path: str | Path = "params.yaml", overrides: Optional[list[str]] = None) -> PipelineConfig:
    """Read ``params.yaml`` (missing keys take the dataclass defaults) and apply ``section.key=value`` overrides.

    Only the default ``params.yaml`` may be absent (then the defaults apply); any other named file must
    exist. Errors name where the bad value came from: the file or the ``--set`` override.
    """
    path = Path(path)
    raw: dict = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e}); fix the file or regenerate it with `visiontune config --write`") from e
    elif str(path) != "params.yaml":
        raise ConfigError(f"{path}: params file not found; pass an existing file or create one with `visiontune config --write {path}`")
    cfg = from_dict(raw, source=str(path))
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.max_steps=20")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if not isinstance(raw.get(section, {}), dict):
            raw[section] = {}
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
        cfg = from_dict(raw, source=f"--set {item}")
    return cfg


def describe() -> str:
    """Every field with its type, default and documentation (``visiontune config``)."""
    lines = []
    hints = typing.get_type_hints(PipelineConfig)
    for sec in dataclasses.fields(PipelineConfig):
        cls = hints[sec.name]
        lines.append(f"{sec.name}:  # {cls.__doc__}")
        types_ = _section_types(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tname = getattr(types_[f.name], "__name__", str(types_[f.name]).replace("typing.", ""))
            if f.metadata.get("range"):
                tname += ", " + range_text(f.metadata["range"])
            lines.append(f"  {f.name}: {default!r}  [{tname}]  {f.metadata.get('help', '')}")
    return "\n".join(lines)


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
