"""The stage registry: one home per pipeline stage.

Each :class:`Stage` says, once, what a stage is: the function that runs it, the exact settings it reads,
the data it reads and writes, and how its task retries. Everything else derives from this list:

* the CLI's stage subcommands (``visiontune validate`` ...);
* the Prefect tasks (``visiontune.tasks``) and the flow's order of stages (``visiontune.flows.retrain``);
* ``dvc.yaml`` (``visiontune dvc-yaml`` writes it; a test fails when the committed file differs);
* the change detector: :func:`fingerprint` hashes a stage's code, the values of its settings and the
  content of its inputs. The Prefect cache key and the train stage's resume check both use it, and the
  code files it hashes are the ones ``dvc.yaml`` lists as deps, so ``visiontune run`` and ``dvc repro``
  re-run the same stages after the same edit.

A stage's code dependencies are computed from its imports (:func:`code_files`), not listed by hand:
editing the collator, a model module or a kernel re-runs every stage that imports it, directly or not.

Adding a stage is one module (a pure function ``cfg -> dict`` plus whatever it needs) and one entry in
:data:`STAGES`.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]

# Code that every stage imports but that holds no behaviour of a stage: settings are tracked by value
# (the `params` of each stage), so config.py's defaults and docs need not re-run anything.
_NOT_CODE_DEPS = ("visiontune/__init__.py", "visiontune/config.py", "visiontune/stages.py")


@dataclass(frozen=True)
class Out:
    """An output of a stage. ``path`` may use ``${section.key}`` templates (DVC's syntax)."""

    path: str
    kind: str = "outs"  # "outs", "metrics" or "plots"
    cache: bool = True  # False: small files kept in git, not in DVC's cache
    persist: bool = False  # True: DVC must not delete it before re-running (resume, append-only logs)
    plot: Optional[dict] = None  # DVC plot options (x, y) for kind="plots"


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    ``params`` is exactly the settings the stage function reads: its own section, shared sections
    (``data``, ``model``, ``images``, ``tracking``) and upstream output locations. A test runs every
    stage under :func:`record_reads` and compares.
    """

    name: str
    help: str
    entry: str  # "module:function", imported lazily: `visiontune --help` must not import torch
    params: tuple[str, ...]
    deps: tuple[str, ...] = ()  # data inputs (paths with ${...} templates)
    outs: tuple[Out, ...] = ()
    extra_code: tuple[str, ...] = ()  # code loaded without an import statement (e.g. MLflow model code)
    in_pipeline: bool = True  # part of `visiontune run` and dvc.yaml (else a CLI-only helper stage)
    frozen: bool = False  # in dvc.yaml but frozen (`dvc repro` skips it unless forced), never in the flow
    retries: int = 2
    retry_any: bool = False  # True: retry any failure (train resumes from its checkpoint); else transient I/O only
    report: Optional[str] = None  # "module:function(result, cfg)" publishing Prefect artifacts, if any
    dvc_plots: tuple[Out, ...] = ()  # plots DVC must declare at top level (inside a persisted output folder)

    def function(self) -> Callable[[Any], dict]:
        module, func = self.entry.split(":")
        return getattr(importlib.import_module(module), func)

    def module_name(self) -> str:
        return self.entry.split(":")[0]


def _keys(section: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{section}.{n}" for n in names)


_DATA_SOURCE = _keys("data", "raw_dir", "annotations", "image_column", "text_column", "question_column",
                     "extra_images_column", "work_dir")
# Where validate and normalize map their per-image work (this machine, or Dask): read by both, whichever the kind.
_DATA_EXECUTOR = _keys("data", "executor", "dask_address", "dask_workers", "dask_chunk")
_IMAGE_SIZE = _keys("images", "resize", "resize_dimension", "snap_to_patch_size")
_IMAGES = _IMAGE_SIZE + ("images.trim",)  # pretrain reads the size rule only (pipeline/pretrain.py says why)
_LOAD_MODEL = _keys("model", "name_or_path", "max_seq_length", "dtype", "load_in_4bit", "use_fused_kernels")
_TINY_MODEL = _keys("model", "name_or_path", "tiny_architecture", "tiny_size", "tiny_seed")
_RECORDS = "${data.work_dir}/validated/records.jsonl"
_DATASET = "${data.work_dir}/dataset"
_ADAPTER, _RUN = "${train.output_dir}/adapter", "${train.output_dir}/run.json"
_HANDOFF = "${align.output_dir}"  # run.json naming the adapter evaluate and register take (and that adapter if aligned)

STAGES: tuple[Stage, ...] = (
    Stage(
        "demo-data", "write the bundled handwriting demo data under data.raw_dir",
        "visiontune.data.demo:demo_stage", ("data.raw_dir", "demo.samples", "demo.seed", "demo.heldout"), in_pipeline=False),
    Stage(
        "tiny-model", "build the tiny offline random-weight model named by model.name_or_path",
        "visiontune.testing:tiny_model_stage", _TINY_MODEL, in_pipeline=False),
    Stage(
        "pretrain", "pretrain the demo's base VLM on printed text it renders (shipped weights: frozen in DVC)",
        "visiontune.pipeline.pretrain:pretrain_stage",
        _keys("pretrain", "output_dir", "architecture", "size", "seed", "steps", "batch_size", "learning_rate",
              "warmup_steps", "weight_decay", "eval_every", "eval_samples", "instruction", "num_workers", "device",
              "init_from", "start_step")
        + _IMAGE_SIZE + _keys("tracking", "uri", "experiment"),
        outs=(Out("${pretrain.output_dir}", cache=False),), in_pipeline=False, frozen=True),
    Stage(
        "validate", "validate raw data with Great Expectations; quarantine bad records",
        "visiontune.data.validate:validate_stage",
        _DATA_SOURCE + _DATA_EXECUTOR + _keys("validate", "accept_min_px", "accept_max_px", "max_pixels", "max_aspect_ratio",
                             "allowed_modes", "min_text_chars", "max_text_chars", "max_failure_ratio"),
        deps=("${data.raw_dir}",),
        outs=(Out("${data.work_dir}/validated"), Out("${data.work_dir}/metrics/validate.json", "metrics", cache=False)),
        report="visiontune.data.validate:prefect_report"),
    Stage(
        "normalize", "resize valid images into the configured pixel range (content-addressed)",
        "visiontune.data.normalize:normalize_stage",
        ("data.raw_dir", "data.work_dir")  # raw_dir: sources are re-checked to lie inside the data root
        + _DATA_EXECUTOR + _keys("normalize", "min_px", "max_px", "uniform_size", "multiple_of", "image_format"),
        deps=(_RECORDS,),  # records.jsonl carries every source image's sha256: a changed image changes it
        outs=(Out("${data.work_dir}/normalized"), Out("${data.work_dir}/metrics/normalize.json", "metrics", cache=False))),
    Stage(
        "convert", "turn normalized records into a conversation dataset with a stable split",
        "visiontune.data.convert:convert_stage",
        ("data.work_dir",) + _keys("convert", "instruction", "split_ratios", "seed"),
        deps=(_RECORDS, "${data.work_dir}/normalized/manifest.json"),
        outs=(Out(_DATASET), Out("${data.work_dir}/metrics/convert.json", "metrics", cache=False))),
    Stage(
        "train", "LoRA-train the model on the conversation dataset (resumes from checkpoints)",
        "visiontune.pipeline.train:train_stage",
        ("data.work_dir",) + _TINY_MODEL + _LOAD_MODEL[1:] + _keys("model", "use_gradient_checkpointing", "load_in_fp8")
        + _IMAGES
        + _keys("lora", "finetune_vision_layers", "finetune_language_layers", "finetune_attention_modules",
                "finetune_mlp_modules", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
                "modules_to_save")
        + _keys("collator", "train_on_responses_only", "completion_only_loss", "pad_to_multiple_of", "padding_free")
        + _keys("train", "output_dir", "learning_rate", "warmup_steps", "max_steps", "num_train_epochs",
                "per_device_train_batch_size", "gradient_accumulation_steps", "weight_decay", "max_grad_norm",
                "save_steps", "logging_steps", "checkpoint_budget", "seed", "eval_every_steps", "eval_samples",
                "eval_max_new_tokens", "select_best", "num_processes", "distributed")
        + _keys("tracking", "uri", "experiment"),
        deps=(_DATASET,),
        outs=(Out("${train.output_dir}", persist=True),),  # persist: a killed run resumes from its checkpoints
        retries=1, retry_any=True,
        dvc_plots=(Out("${train.output_dir}/loss.json", "plots", plot={"x": "step", "y": "loss"}),)),
    Stage(
        "align", "GRPO/GSPO/Dr. GRPO or DPO on the fine-tuned adapter (align.method; none: hand it on unchanged)",
        "visiontune.pipeline.align:align_stage",
        ("data.work_dir",) + _LOAD_MODEL + _keys("model", "use_gradient_checkpointing") + _IMAGES + ("train.output_dir",)
        + _keys("align", "method", "output_dir", "split", "max_samples", "rewards", "reward_weights",
                "numeric_tolerance", "format_pattern", "loss_type", "importance_sampling_level", "num_generations",
                "max_completion_length", "temperature", "beta", "learning_rate", "max_steps",
                "per_device_train_batch_size", "logging_steps", "save_steps", "seed", "chosen_column",
                "rejected_column", "sample_table_rows")
        + ("tracking.uri",),
        deps=(_DATASET, _ADAPTER, _RUN),
        outs=(Out("${align.output_dir}", persist=True),),  # persist: a killed run resumes from its checkpoints
        retries=1),
    Stage(
        "evaluate", "evaluate base and fine-tuned model on the held-out split",
        "visiontune.pipeline.evaluate:evaluate_stage",
        ("data.work_dir",) + _LOAD_MODEL + _IMAGES + ("align.output_dir",)
        + _keys("eval", "split", "max_samples", "max_new_tokens", "batch_size", "primary_metric", "metrics_file",
                "predictions_file", "grid_file", "grid_samples", "compare_base", "extra_sets")
        + ("tracking.uri",),
        deps=(_DATASET, _HANDOFF),
        outs=(Out("${eval.metrics_file}", "metrics", cache=False),
              Out("${eval.predictions_file}", "plots", cache=False, plot={"x": "index", "y": "cer"}),
              Out("${eval.grid_file}", "plots", cache=False)),
        report="visiontune.pipeline.evaluate:prefect_report"),
    Stage(
        "register", "log the model to MLflow and promote it if it beats the champion",
        "visiontune.pipeline.register:register_stage",
        ("align.output_dir", "model.name_or_path", "model.dtype") + _IMAGES + ("eval.metrics_file",)
        + _keys("register", "model_name", "promotion_margin", "artifact_name", "log_base_model", "input_example",
                "max_new_tokens", "batch_size", "promotions_log", "image_root", "max_pixels")
        + ("tracking.uri",),
        deps=("${eval.metrics_file}", _HANDOFF),
        outs=(Out("${register.promotions_log}", cache=False, persist=True),),
        extra_code=("visiontune/pipeline/pyfunc_model.py",)),
    Stage(
        "export", "export the champion as merged safetensors / GGUF folders (export.formats; [] = off)",
        "visiontune.pipeline.export:export_stage",
        _keys("export", "formats", "version", "output_dir") + ("register.promotions_log", "tracking.uri"),
        deps=("${register.promotions_log}",),  # a new registration may move the champion
        outs=(Out("${export.output_dir}"),),
        extra_code=("visiontune/pipeline/pyfunc_model.py", "visiontune/pipeline/pyfunc.py")),  # loaded by MLflow
    Stage(
        "report", "build the run's HTML report: decision, metrics, curves, gallery, errors, data, lineage",
        "visiontune.pipeline.report:report_stage",
        ("data.work_dir", "align.output_dir", "eval.metrics_file", "register.promotions_log")
        + _keys("report", "output_dir", "gallery_samples") + ("tracking.uri",),
        deps=(f"{_HANDOFF}/run.json", "${eval.metrics_file}", "${register.promotions_log}", "${data.work_dir}/validated/summary.json",
              "${data.work_dir}/normalized/manifest.json", _DATASET),
        outs=(Out("${report.output_dir}/index.html"),),
        extra_code=("visiontune/pipeline/templates/report.html.j2",),
        report="visiontune.pipeline.report:prefect_report"),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def get(name: str) -> Stage:
    """The stage called ``name``; a clear error listing the stages otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(BY_NAME)}") from None


def pipeline() -> tuple[Stage, ...]:
    """The stages of ``visiontune run`` and ``dvc.yaml``, in order (upstream first)."""
    return tuple(s for s in STAGES if s.in_pipeline)


# ------------------------------------------------------------------------------------ paths, templates
_TEMPLATE = re.compile(r"\$\{([a-z_]+\.[a-z_0-9]+)\}")


def render(template: str, cfg: Any) -> str:
    """``template`` with every ``${section.key}`` replaced by its value in ``cfg``."""
    return _TEMPLATE.sub(lambda m: str(cfg.get(m.group(1))), template)


def template_keys(stage: Stage) -> set[str]:
    """Settings named in the stage's paths (each must be one the stage reads)."""
    paths = list(stage.deps) + [o.path for o in stage.outs + stage.dvc_plots]
    return {k for p in paths for k in _TEMPLATE.findall(p)}


# ------------------------------------------------------------------------------------ code dependencies
def _is_package(name: str) -> bool:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.submodule_search_locations is not None


def _module_file(name: str) -> Optional[Path]:
    """The source file of module ``name`` if it is part of this repository, else None. For a C extension
    (``visiontune/data/_pixels.c``) that is its C source, whether or not this installation compiled it, so
    that the deps do not depend on the machine.

    Parents are checked to be packages first: ``find_spec("pkg.mod.Attr")`` would import ``pkg.mod``
    (and whatever it imports) just to find out that ``Attr`` is not a module.
    """
    if name != "visiontune" and not name.startswith("visiontune."):
        return None
    parts = name.split(".")
    if not all(_is_package(".".join(parts[:i])) for i in range(1, len(parts))):
        return None
    parent = importlib.util.find_spec(".".join(parts[:-1])) if len(parts) > 1 else None
    c_sources = [Path(folder, f"{parts[-1]}.c") for folder in (parent and parent.submodule_search_locations) or []]
    if c_source := next((c for c in c_sources if c.is_file()), None):
        path = c_source.resolve()
    else:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None
        path = Path(spec.origin).resolve()
    try:
        path.relative_to(REPO_ROOT)
    except ValueError:
        return None
    return path


def _imports(path: Path, module: str) -> set[str]:
    """Modules imported anywhere in ``path`` (function-level imports too: lazy imports still run).

    ``from pkg import name`` names the submodule ``pkg.name`` when there is one, else ``pkg`` itself
    (``name`` is then an attribute of pkg: for visiontune's lazy top-level API, its ``__init__``).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                names.add(sub if _module_file(sub) is not None else base)
    return names


@lru_cache(maxsize=None)
def _module_closure(module: str) -> tuple[Path, ...]:
    """Files of this repository that importing ``module`` runs, transitively. The settings modules
    (:data:`_NOT_CODE_DEPS`) are not followed, except visiontune's ``__init__`` when an attribute of it
    (the lazy ``FastVisionModel`` ...) is imported."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        rel = path.relative_to(REPO_ROOT).as_posix()
        follow = rel not in _NOT_CODE_DEPS or (rel == "visiontune/__init__.py" and name == "visiontune")
        if follow and path.suffix == ".py":  # (a C source imports nothing of ours)
            todo.extend(_imports(path, name))
    return tuple(sorted(set(seen.values())))


def code_files(stage: Stage) -> list[str]:
    """Repository-relative paths of every file of this repo the stage's code imports, transitively."""
    rels = {p.relative_to(REPO_ROOT).as_posix() for p in _module_closure(stage.module_name())}
    rels.update(stage.extra_code)
    return sorted(r for r in rels if r not in _NOT_CODE_DEPS)


# ------------------------------------------------------------------------------------ change detection
def _hash_inputs(paths: list[Path]) -> str:
    from visiontune.data.io import hash_tree

    present = [p for p in paths if p.exists()]
    missing = sorted(str(p) for p in paths if not p.exists())
    return hash_tree(present) + json.dumps(missing)


def fingerprint(stage: Stage | str, cfg: Any, code_root: Path = REPO_ROOT) -> str:
    """Hash of what decides a stage's result: its code (as :func:`code_files` lists it, read under
    ``code_root``), the values of its settings, the content of its inputs and where it writes.

    Equal fingerprints mean a re-run would reproduce the same outputs, so the result can be reused.
    """
    stage = get(stage) if isinstance(stage, str) else stage
    h = hashlib.sha256(stage.name.encode())
    for rel in code_files(stage):
        h.update(rel.encode())
        h.update((code_root / rel).read_bytes())
    h.update(json.dumps({k: cfg.get(k) for k in stage.params}, sort_keys=True, default=str).encode())
    h.update(_hash_inputs([Path(render(d, cfg)) for d in stage.deps]).encode())
    # Where the outputs go, resolved: two checkouts with identical data must not share a cached result,
    # since the cached summary would stand for files that exist only in the other one.
    for out in stage.outs:
        h.update(str(Path(render(out.path, cfg)).resolve()).encode())
    return h.hexdigest()


def outputs_signature(stage: Stage | str, cfg: Any) -> str:
    """Hash of the stage's outputs as they are on disk now: every file's relative name, size and mtime (not its
    content: cheap on large trees, and the stages rewrite a file only when its bytes change). Lock files, which
    a stage holds in its output folder while it runs, do not count. Tells whether the outputs are still those a
    cached run wrote (:mod:`visiontune.tasks.stages`)."""
    stage = get(stage) if isinstance(stage, str) else stage
    h = hashlib.sha256()
    for out in stage.outs:
        base = Path(render(out.path, cfg))
        files = [base] if base.is_file() else sorted(q for q in base.rglob("*") if q.is_file()) if base.is_dir() else []
        h.update(f"{out.path}:{'present' if base.exists() else 'missing'}\n".encode())
        for f in files:
            if f.name.endswith(".lock"):
                continue
            st = f.stat()
            h.update(f"{f.relative_to(base) if f != base else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ reads of settings
class _SectionView:
    """Read-only view of one config section that records which keys are read."""

    def __init__(self, name: str, section: Any, log: set):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_log", log)

    def __getattr__(self, key: str) -> Any:
        value = getattr(self._section, key)
        self._log.add(f"{self._name}.{key}")
        return value

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("config sections are read-only inside a stage")


class RecordingConfig:
    """A :class:`visiontune.config.PipelineConfig` that records every ``section.key`` read through it.

    The registry's tests run each stage through this and compare ``accessed`` with ``Stage.params``.
    """

    def __init__(self, cfg: Any):
        self._cfg = cfg
        self.accessed: set[str] = set()

    def __getattr__(self, section: str) -> Any:
        value = getattr(self._cfg, section)
        if hasattr(value, "__dataclass_fields__"):
            return _SectionView(section, value, self.accessed)
        return value

    def get(self, dotted: str) -> Any:
        """Unrecorded lookup: the registry's own reads (e.g. :func:`fingerprint` over ``Stage.params``)
        are not reads by the stage's code, and recording them would make the check trivially pass."""
        return self._cfg.get(dotted)


# ------------------------------------------------------------------------------------ dvc.yaml
def _dvc_out(out: Out) -> Any:
    opts: dict[str, Any] = {}
    if not out.cache:
        opts["cache"] = False
    if out.persist:
        opts["persist"] = True
    if out.plot:
        opts.update(out.plot)
    return {out.path: opts} if opts else out.path


def dvc_stage(stage: Stage) -> dict[str, Any]:
    """The ``dvc.yaml`` entry of a stage."""
    entry: dict[str, Any] = {"cmd": f"visiontune {stage.name}",
                             "deps": list(stage.deps) + code_files(stage), "params": list(stage.params)}
    for kind in ("outs", "metrics", "plots"):
        outs = [_dvc_out(o) for o in stage.outs if o.kind == kind]
        if outs:
            entry[kind] = outs
    if stage.frozen:
        entry["frozen"] = True
    return entry


DVC_HEADER = """\
# Generated from the stage registry (visiontune/stages.py) by `visiontune dvc-yaml`: do not edit by hand.
# tests/test_stages.py fails when this file and the registry differ.
#
# Each stage's deps are its data inputs plus every repository file its code imports (computed from the
# imports), and its params are exactly the settings it reads, so `dvc repro` re-runs a stage exactly when
# `visiontune run` (Prefect, cache keys from the same registry) would. Paths use DVC's templating over
# params.yaml, so moving data.work_dir or train.output_dir there moves the pipeline too.
"""


def dvc_yaml() -> str:
    """The full text of ``dvc.yaml`` for the pipeline stages."""
    import yaml

    doc: dict[str, Any] = {"stages": {s.name: dvc_stage(s) for s in STAGES if s.in_pipeline or s.frozen}}
    plots = [_dvc_out(o) for s in pipeline() for o in s.dvc_plots]
    if plots:
        # Declared at top level: a stage-level plot inside the train stage's persisted output folder would
        # overlap that output ("output paths ... overlap"), which DVC refuses.
        doc["plots"] = plots
    return DVC_HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)


def write_dvc_yaml(path: Path = REPO_ROOT / "dvc.yaml") -> Path:
    """Write :func:`dvc_yaml` to ``path``."""
    path.write_text(dvc_yaml())
    return path


def summary_line(name: str, result: Any, limit: int = 8) -> str:
    """A one-line outcome of a stage's result dict (its scalar entries), for logs and the CLI."""
    if not isinstance(result, dict):
        return str(result)
    items = [(k, v) for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None]
    shown = ", ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in items[:limit])
    return shown + (", ..." if len(items) > limit else "")
