"""Training on several processes: DDP or FSDP2, one process per GPU (or gloo processes on a CPU-only machine).

Two ways in, one training path:

* ``train.num_processes: N`` (N > 1) and a plain ``visiontune train`` (or the flow's train stage): the stage
  launches N processes itself through torchrun (``--standalone --nproc-per-node N``, this machine), waits for
  them and returns rank 0's result (:func:`launch`).
* Started under a launcher already (``torchrun ... -m visiontune.cli train``, ``accelerate launch``: ``RANK``
  and ``WORLD_SIZE`` set): every process is one rank of that run (:func:`plan` returns ``"rank"``).

Every rank builds the model, measures the token budget, and trains through the same TRL/transformers
``Trainer``; accelerate shards the batches across ranks (a global batch of ``per_device_train_batch_size x
gradient_accumulation_steps x N``, in the order a single process would see it) and averages the
gradients. ``train.distributed`` picks how the ranks hold the model:

* ``ddp``: every rank holds the whole model; gradients of the LoRA weights are all-reduced.
* ``fsdp2``: torch's ``fully_shard`` through accelerate's FSDP plugin (``fsdp_version=2``): every decoder layer,
  vision block and the embedding / final norm + ``lm_head`` are one FSDP unit each; their parameters, the frozen
  base and the trainable LoRA weights alike, are sharded across ranks and all-gathered unit by unit.

Rank 0 alone holds the output folder's locks, opens and closes the MLflow run, logs metrics and artifacts, and
writes the adapter, ``run.json`` and the shared parts of each checkpoint (the Trainer writes per-rank RNG
states beside them); the other ranks wait for its go-ahead (:func:`from_main`) before they start. Every
process dies with the one that started it (:func:`die_with_parent`): a ``kill -9`` of ``visiontune train``
leaves no orphaned rank writing checkpoints, and the next run resumes from the newest complete checkpoint.

The training loss is the mean over the global batch's supervised tokens (``num_items_in_batch``, counted
across ranks and accumulation steps), so N processes with the same global batch follow the same loss curve
and reach the same adapter as one (tests/pipeline/test_distributed.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ENTRY = "visiontune.pipeline.distributed"
MODES = ("ddp", "fsdp2")
RESULT_FILE = "result.json"
PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a multi-process run (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, writes shared files and registers."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current() -> Ranks:
    """This process's rank, world size and local rank, from the launcher's environment (torchrun and
    ``accelerate launch`` set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); rank 0 of 1 without a launcher."""
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def plan(cfg: Any) -> str:
    """How the train stage runs under ``cfg.train.num_processes`` / ``cfg.train.distributed`` here:
    ``"single"`` (one process), ``"launch"`` (start ``num_processes`` ranks through torchrun) or ``"rank"``
    (this process is one rank of a launcher's run)."""
    n, mode = cfg.train.num_processes, cfg.train.distributed
    if mode not in MODES:
        raise ValueError(f"train.distributed={mode!r}: use one of {', '.join(MODES)}")
    ranks = current()
    if ranks.distributed:
        if n not in (1, ranks.world_size):
            raise ValueError(
                f"train.num_processes={n} but this process was started by a launcher with WORLD_SIZE="
                f"{ranks.world_size}: the launcher decides the number of processes. Set train.num_processes to "
                f"{ranks.world_size} (or 1), or run `visiontune train` without a launcher to let it start {n}")
        return "rank"
    return "launch" if n > 1 else "single"


# ------------------------------------------------------------------------------------ launching
def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``).

    torchrun starts its workers in new sessions, so a ``kill -9`` of the process group of ``visiontune
    train`` would otherwise leave them training on (and writing checkpoints) without the lock that their
    dead parent held. Elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _rank_error(run_dir: Path, returncode: int) -> Exception:
    """The error of the rank that failed first (its type kept for the CLI: OSError, ValueError ...)."""
    from visiontune.pipeline.train import OutputDirBusyError

    reports = sorted(run_dir.glob("error-rank*.json"), key=lambda p: p.stat().st_mtime)
    if not reports:
        return RuntimeError(
            f"distributed training failed (torchrun exit code {returncode}) before any rank reported an error: "
            "see the output above (a rank killed by the OS, e.g. out of memory, reports nothing)")
    first = json.loads(reports[0].read_text())
    message = f"rank {first['rank']} of {first['world_size']}: {first['message']}"
    if first["type"] == "OutputDirBusyError":
        return OutputDirBusyError(message)
    if first["kind"] in ("OSError", "ValueError"):  # says what to change; the rank's output above has the rest
        return {"OSError": OSError, "ValueError": ValueError}[first["kind"]](message)
    return RuntimeError(f"{message} ({first['type']}; ends in: {first['traceback_tail']})")


def _check_gpus(processes: int) -> None:
    """One process per GPU: NCCL refuses two ranks on one GPU."""
    import torch

    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise ValueError(
            f"{processes} training processes (train.num_processes, or the launcher's) but this machine has "
            f"{torch.cuda.device_count()} CUDA GPU(s): "
            "multi-process training runs one process per GPU. Lower train.num_processes, or make more GPUs "
            "visible (CUDA_VISIBLE_DEVICES)")


def launch(cfg: Any) -> dict[str, Any]:
    """Run the train stage on ``cfg.train.num_processes`` processes started by torchrun on this machine and
    return rank 0's result. The ranks read ``cfg`` from a params file written for them; their output (rank
    0's progress bar) goes to this process's stdout/stderr. An error is re-raised here with the failing
    rank's message."""
    from visiontune.config import to_yaml

    _check_gpus(cfg.train.num_processes)
    run_dir = Path(tempfile.mkdtemp(prefix="visiontune-ranks-"))
    try:
        (run_dir / PARAMS_FILE).write_text(to_yaml(cfg))
        # torchrun's agent runs under this module too (``agent``), so it dies with this process as the ranks die
        # with it (no preexec_fn: the flow starts stages from threads).
        cmd = [sys.executable, "-m", ENTRY, "agent", "--standalone", f"--nproc-per-node={cfg.train.num_processes}",
               "-m", ENTRY, "rank", str(run_dir)]
        # torchrun gives each rank one OpenMP thread unless told otherwise, with a banner saying so: the same, quietly
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, env=env)
        result = run_dir / RESULT_FILE
        if proc.returncode == 0 and result.exists():
            return json.loads(result.read_text())
        raise _rank_error(run_dir, proc.returncode)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    """The processes :func:`launch` starts: ``python -m visiontune.pipeline.distributed agent TORCHRUN_ARGS...``
    (torchrun's agent, dying with its parent) and, started by that agent, ``... rank RUN_DIR``: one rank of the
    train stage on ``RUN_DIR/params.yaml``; rank 0 writes the result, a failing rank its error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    die_with_parent()
    if argv[:1] == ["agent"]:
        from torch.distributed.run import main as torchrun

        torchrun(argv[1:])
        return 0
    if argv[:1] != ["rank"] or len(argv) != 2:
        raise SystemExit(f"usage: python -m {ENTRY} agent TORCHRUN_ARGS... | rank RUN_DIR (got {argv})")
    from visiontune import _quiet

    _quiet.install()
    run_dir = Path(argv[1])
    ranks = current()
    try:
        from visiontune.config import load_params
        from visiontune.pipeline.train import train_stage

        result = train_stage(load_params(run_dir / PARAMS_FILE))
    except BaseException as e:
        kind = "OSError" if isinstance(e, OSError) else "ValueError" if isinstance(e, ValueError) else "other"
        tail = "".join(traceback.format_exception(e)[-3:]).strip().replace("\n", " | ")[-1500:]
        (run_dir / f"error-rank{ranks.rank}.json").write_text(json.dumps(
            {"rank": ranks.rank, "world_size": ranks.world_size, "type": type(e).__name__, "kind": kind,
             "message": " ".join(str(e).split()), "traceback_tail": tail}))
        raise
    if ranks.is_main:
        tmp = run_dir / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(result, default=str))
        tmp.replace(run_dir / RESULT_FILE)
    return 0


# ------------------------------------------------------------------------------------ the process group
def init() -> Ranks:
    """Join the launcher's process group (once): gloo on CPU; on CUDA this rank's GPU (``LOCAL_RANK``) with
    NCCL, and gloo beside it for the small CPU objects rank 0 hands out (:func:`from_main`). accelerate and
    the Trainer use this group as it is."""
    import torch
    import torch.distributed as dist

    ranks = current()
    if ranks.distributed and not dist.is_initialized():
        if torch.cuda.is_available():
            _check_gpus(ranks.local_rank + 1)
            torch.cuda.set_device(ranks.local_rank)
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=torch.device("cuda", ranks.local_rank))
        else:
            dist.init_process_group("gloo")
    return ranks


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def from_main(value: Any = None) -> Any:
    """``value`` as rank 0 has it, on every rank (a no-op in one process): every rank must call it at the same
    point. Doubles as a barrier: the other ranks wait here until rank 0 gets to it."""
    if not _active():
        return value
    import torch
    import torch.distributed as dist

    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def sum_over_ranks(value: int) -> int:
    """The sum of ``value`` over all ranks (itself in one process); every rank must call it."""
    if not _active():
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)  # a CPU tensor: the gloo backend
    return int(t.item())


# ------------------------------------------------------------------------------------ Trainer settings
def trainer_args(cfg: Any) -> dict[str, Any]:
    """``SFTConfig`` settings for ``cfg.train.distributed`` in this process's run (none in one process).

    DDP looks for unused parameters: a text-only batch leaves the vision tower's LoRA weights without a
    gradient. FSDP2 goes through accelerate's FSDP plugin, version 2: ``fully_shard`` on each class in the
    model's ``_no_split_modules`` (decoder layers, vision blocks), the embedding, the final norm + lm_head,
    then the root; parameters resharded after each unit's forward; checkpoints hold the full state dict and
    optimizer state, written by rank 0. Both count the loss's tokens over all ranks (``num_items_in_batch``).
    """
    mode = cfg.train.distributed
    if not current().distributed:
        return {}
    if mode == "ddp":
        return {"ddp_find_unused_parameters": True, "average_tokens_across_devices": True}
    return {"average_tokens_across_devices": True, "fsdp": True,
            "fsdp_config": {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT",
                            "cpu_ram_efficient_loading": False}}


def check_sharding(trainer: Any, cfg: Any) -> None:
    """Fail, saying why, when ``train.distributed: fsdp2`` was asked for and the Trainer did not shard: accelerate
    enables its FSDP plugin for GPU process groups only, and on a CPU group it would silently train with DDP."""
    if current().distributed and cfg.train.distributed == "fsdp2" and not getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(
            "train.distributed=fsdp2: accelerate turned its FSDP plugin down for this process group (it shards on "
            "CUDA GPUs only; these processes run on the CPU), so the model would not be sharded. Use "
            "train.distributed=ddp here, or run on GPUs")


def fsdp_mixed_precision(args: Any) -> Any:
    """With bf16/fp16 training under FSDP2, compute in that precision but reduce-scatter the LoRA gradients in
    fp32 (accelerate's default reduces them in bf16; DDP reduces them in the fp32 of the LoRA weights). Returns
    ``args`` (a TrainingArguments whose FSDP plugin settings are set up)."""
    plugin = getattr(args, "fsdp_plugin_args", None)
    if plugin and (args.bf16 or args.fp16) and plugin.get("mixed_precision_policy") is None:
        import torch

        plugin["mixed_precision_policy"] = {"param_dtype": torch.bfloat16 if args.bf16 else torch.float16,
                                            "reduce_dtype": torch.float32}
    return args


# ------------------------------------------------------------------------------------ the adapter
def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def sharded(model: Any) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    return any(_is_dtensor(p) for p in model.parameters())


def gather_adapter(model: Any) -> Optional[dict[str, Any]]:
    """Under FSDP2, the trainable parameters of ``model`` as whole CPU tensors by parameter name, all-gathered
    (every rank must call this; only the LoRA weights travel, never the frozen base); None for a model whose
    parameters are whole (one process, DDP)."""
    if not sharded(model):
        return None
    return {name: p.full_tensor().detach().to("cpu") for name, p in model.named_parameters() if p.requires_grad}


def write_adapter(model: Any, directory: Path, gathered: Optional[dict[str, Any]], processor: Any = None) -> None:
    """Write the PEFT adapter of ``model`` (``gathered``: its weights from :func:`gather_adapter`, if sharded) and
    ``processor`` into ``directory``: the files a one-process run writes. Call it on rank 0."""
    if gathered is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, state_dict=gathered)
    if processor is not None:
        processor.save_pretrained(directory)


def save_adapter(model: Any, directory: Path, processor: Any = None) -> None:
    """:func:`gather_adapter` on every rank, then :func:`write_adapter` on rank 0: every rank must call it."""
    gathered = gather_adapter(model)
    if current().is_main:
        write_adapter(model, directory, gathered, processor)


def load_adapter_weights(model: Any, weights: dict[str, Any]) -> None:
    """Load PEFT-keyed adapter ``weights`` (an ``adapter_model.safetensors``' content) into ``model``, whose
    parameters may be FSDP2 shards: each rank copies its own shard (no communication)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if not sharded(model):
        set_peft_model_state_dict(model, weights)
        return
    from torch.distributed.tensor import distribute_tensor

    # PEFT's own key mapping (adapter name dropped, modules_to_save unwrapped), applied to the parameters
    # themselves: {saved key: parameter}.
    by_key = get_peft_model_state_dict(model, state_dict=dict(model.named_parameters()))
    missing = sorted(set(by_key) - set(weights))
    if missing:
        raise KeyError(f"adapter weights lack {len(missing)} of the model's adapter tensors, e.g. {missing[0]!r}")
    import torch

    with torch.no_grad():
        for key, param in by_key.items():
            full = weights[key].to(device=param.device, dtype=param.dtype)
            if _is_dtensor(param):
                local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
                param.to_local().copy_(local)
            else:
                param.copy_(full)


if __name__ == "__main__":  # pragma: no cover - started by launch()
    sys.exit(main())
