"""TEST-ONLY shim: make Accelerate 1.15 run DeepSpeed ZeRO on CPU gloo ranks. Never import it outside tests.

Like ``tests/_fsdp_shim.py``: Accelerate enables DeepSpeed only on accelerator devices, so on the CPU machines this
creates the run's ``Accelerator`` as usual, starts DeepSpeed's communication layer on the existing gloo group and
sets the distributed type to DEEPSPEED on both ``PartialState`` and ``accelerator.state`` with a ``DeepSpeedPlugin``
of the given ZeRO stage. Needs ``DS_BUILD_OPS=0 pip install deepspeed`` and ``DS_ACCELERATOR=cpu``; the first engine
start compiles a communication op (minutes, then cached). Tests using it assert the engine after ``prepare()``.
"""

from __future__ import annotations

import os

DEEPSPEED_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "DS_ACCELERATOR": "cpu"}


def deepspeed_accelerator(cfg, zero_stage: int = 2):
    """``make_accelerator(cfg)``, then switched to DeepSpeed ZeRO-``zero_stage`` (see the module docstring)."""
    from accelerate import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from gen.training import make_accelerator

    os.environ.update(DEEPSPEED_ENV)
    acc = make_accelerator(cfg)
    from deepspeed import comm

    if not comm.is_initialized():
        comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    PartialState().distributed_type = DistributedType.DEEPSPEED
    acc.state.distributed_type = DistributedType.DEEPSPEED
    plugin = DeepSpeedPlugin(zero_stage=zero_stage, gradient_clipping=cfg.max_grad_norm,
                             zero3_save_16bit_model=True)
    plugin.set_mixed_precision(cfg.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    acc.state.deepspeed_plugins = plugin
    return acc
