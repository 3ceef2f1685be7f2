"""TEST-ONLY shim: make Accelerate 1.15 run FSDP2 on CPU gloo ranks. Never import it outside tests.

Accelerate enables FSDP only on accelerator devices; on a CPU-only machine ``--use_fsdp`` silently runs DDP (our
``gen.training.check_engine`` stops such a run). To test the FSDP2 code path on the CI machines anyway, this shim
creates the run's ``Accelerator`` as usual and then sets the distributed type to FSDP on BOTH the process-wide
``PartialState`` and ``accelerator.state`` (patching only one is undone inside ``prepare()``, and clipping then
returns per-rank norms), and installs a ``FullyShardedDataParallelPlugin`` built from the ``FSDP_*`` variables that
``accelerate launch --use_fsdp --fsdp_version 2 --fsdp_state_dict_type SHARDED_STATE_DICT`` would set
(:data:`FSDP2_ENV`). Tests using it assert the engine after ``prepare()`` (the models must be ``FSDPModule``s).
Measured on torch 2.13 / accelerate 1.15: FSDP2 losses equal DDP's to ~3e-8 with it.

Usage (inside a ``debug_launcher`` worker)::

    os.environ.update(FSDP2_ENV)
    train("diffusion", argv, make_accelerator_fn=fsdp2_accelerator)
"""

from __future__ import annotations

FSDP2_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "ResnetBlock2D",  # the UNets' blocks are FSDP units of their own, as on GPUs
    "FSDP_RESHARD_AFTER_FORWARD": "true",
}


def fsdp2_accelerator(cfg):
    """``make_accelerator(cfg)``, then switched to FSDP2 (see the module docstring)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from gen.training import make_accelerator

    acc = make_accelerator(cfg)
    PartialState().distributed_type = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    return acc
