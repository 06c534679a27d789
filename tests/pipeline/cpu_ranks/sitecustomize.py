"""CPU-only switches for the training ranks that tests/pipeline/test_distributed.py starts (not a test module).

The test puts this folder on ``PYTHONPATH`` and lists switches in ``VISIONTUNE_TEST_RANK_SWITCHES``. Python imports
``sitecustomize`` when any process starts, so the ranks that ``visiontune train`` launches through torchrun get the
switches too, and the test runs the user's path unchanged. Only processes with ``RANK`` set (the ranks, not
torchrun's agent) apply them:

* ``engine``: the fused-kernel engine patched in on the CPU (``patch_model(enabled=True)``: its patched forwards
  with their torch references), as ``FastVisionModel`` patches it on CUDA; padding-free packing needs it.
* ``fsdp-on-cpu``: accelerate enables its FSDP plugin for GPU process groups only (a CPU group trains with DDP
  instead, which visiontune refuses for ``train.distributed: fsdp2``); this lifts that one gate, so accelerate's
  FSDP2 path (``fully_shard``, FSDP checkpoints) runs over gloo.
"""

from __future__ import annotations

import os

SWITCHES = "VISIONTUNE_TEST_RANK_SWITCHES"


def engine_on_cpu(set_attribute=setattr) -> None:
    """FastVisionModel patches the engine into every model it loads, on any device (as it does on CUDA)."""
    from visiontune.kernels import patch_model
    from visiontune.models import fast_vision

    set_attribute(fast_vision, "_patch_kernels", lambda model: patch_model(model, enabled=True))


def fsdp_on_cpu() -> None:
    """accelerate's state keeps the FSDP plugin it is given on a CPU process group too."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    real = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        real(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # Every AcceleratorState() re-reads the process group's type (MULTI_CPU): set FSDP again each time.
        plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = init


_wanted = {s for s in os.environ.get(SWITCHES, "").split(",") if s}
if _wanted and "RANK" in os.environ:
    if "engine" in _wanted:
        engine_on_cpu()
    if "fsdp-on-cpu" in _wanted:
        fsdp_on_cpu()
