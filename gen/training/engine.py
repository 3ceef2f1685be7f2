"""The engine a run uses (DDP, FSDP2 or DeepSpeed ZeRO through ``accelerate launch``) and the engine-aware pieces
the loop needs: the start-up check that the engine asked for is the one running, global-norm clipping of one
model's gradients, and plain (unsharded) copies of trained models for the export.

Engines are chosen the Accelerate way, never in a config file of ours::

    accelerate launch --multi_gpu --num_processes 8 train/m.py ...                         # DDP
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 8 train/m.py ...         # FSDP2
    accelerate launch --config_file configs/accelerate/fsdp2.yaml train/m.py ...           # FSDP2
    accelerate launch --config_file configs/accelerate/zero2.yaml train/m.py ...           # DeepSpeed ZeRO-2

Accelerate 1.15 switches FSDP and DeepSpeed on only on accelerator devices: on a CPU-only machine it silently runs
DDP instead. :func:`check_engine` turns that into an error naming both engines.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

_TRUE = ("1", "true", "yes", "on")
logger = logging.getLogger(__name__)


def make_accelerator(cfg, **kwargs) -> Accelerator:
    """An ``Accelerator`` that uses the GPU when there is one and the CPU otherwise.

    On a CPU-only machine ``cpu=True`` makes ``accelerate launch --multi_gpu --num_processes N`` run N gloo ranks
    (plain ``--cpu --num_processes N`` silently runs one process). ``cfg.report_to`` other than ``"none"`` turns on
    Accelerate's trackers (tensorboard / wandb) with ``<output_dir>/trackers`` as their folder.
    """
    log_with = None if cfg.report_to == "none" else cfg.report_to
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=log_with,
        project_dir=os.path.join(cfg.output_dir, "trackers") if log_with else None,
        **kwargs,
    )


def requested_engine(env=None) -> str:
    """The engine ``accelerate launch`` was asked for: ``"ddp"``, ``"fsdp1"``, ``"fsdp2"`` or ``"deepspeed"``
    (read from the ``ACCELERATE_USE_*`` / ``FSDP_VERSION`` variables its flags and config files set)."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in _TRUE:
        return "deepspeed"
    if env.get("ACCELERATE_USE_FSDP", "false").lower() in _TRUE:
        return "fsdp2" if str(env.get("FSDP_VERSION", "1")) == "2" else "fsdp1"
    return "ddp"


def running_engine(accelerator: Accelerator) -> str:
    """The engine Accelerate actually set up: ``"ddp"`` (also one process), ``"fsdp1"``, ``"fsdp2"``,
    ``"deepspeed"``."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        return "fsdp2" if getattr(accelerator, "is_fsdp2", False) else "fsdp1"
    return "ddp"


def describe_engine(accelerator: Accelerator) -> str:
    """A short label such as ``"fsdp2 (2 processes on cpu)"`` or ``"deepspeed ZeRO-3 (8 processes on cuda)"``."""
    name = running_engine(accelerator)
    if name == "deepspeed":
        name = f"deepspeed ZeRO-{zero_stage(accelerator)}"
    return f"{name} ({accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''} on " \
           f"{accelerator.device.type})"


def zero_stage(accelerator: Accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def check_engine(accelerator: Accelerator, env=None) -> str:
    """Stop when the engine that runs is not the one asked for; returns the running engine's name.

    Raises:
        ValueError: FSDP version 1 was asked for (not supported: it fails several ways on CPU and its sharded
            state is not what our checkpoints read), or Accelerate fell back from FSDP/DeepSpeed to DDP (it does so
            silently on machines without an accelerator); the message names both engines.
    """
    asked, running = requested_engine(env), running_engine(accelerator)
    if asked == "fsdp1" or running == "fsdp1":
        raise ValueError("FSDP version 1 is not supported; launch with --use_fsdp --fsdp_version 2 (or "
                         "--config_file configs/accelerate/fsdp2.yaml)")
    if asked != running:
        why = (" Accelerate enables FSDP and DeepSpeed only on accelerator devices (CUDA, XPU, ...); on a CPU-only "
               "machine it falls back to DDP." if accelerator.device.type == "cpu" else "")
        raise ValueError(f"accelerate launch asked for the {asked} engine but Accelerate set up {running} "
                         f"({accelerator.num_processes} process(es) on {accelerator.device.type}).{why} Launch "
                         f"without --use_fsdp/--use_deepspeed to train with DDP.")
    return running


def check_accelerate_config(path) -> dict:
    """Read an ``accelerate launch --config_file`` YAML and reject keys Accelerate would ignore without a word.

    Accelerate checks the top-level keys but passes ``fsdp_config`` / ``deepspeed_config`` entries on as launch
    arguments, where a misspelt one (``fsdp_versoin: 2``) is silently dropped and the run falls back to defaults.

    Raises:
        ValueError: naming the file, the unknown key and close known ones.
    """
    import difflib
    from pathlib import Path

    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"accelerate config {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    known = {a.dest for a in launch_command_parser()._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        for key in data.get(section) or {}:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=2)
                raise ValueError(f"unknown {section} key {key!r} in {str(path)!r}"
                                 + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    try:
        ClusterConfig.from_yaml_file(str(path))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{str(path)!r} is not a valid accelerate config: {err}") from None
    return data


@contextlib.contextmanager
def fsdp_auto_wrap_for(accelerator: Accelerator, module: torch.nn.Module):
    """Inside the block, ``accelerator.prepare(module)`` under FSDP2 shards ``module`` as one unit when it holds none
    of the layer classes of a transformer auto-wrap policy (``--fsdp_transformer_layer_cls_to_wrap``).

    Accelerate raises for such a model ("Could not find the transformer layer class"); the networks that have none
    are small ones whose parameters are adapters only (f-distill's LoRA views over a shared frozen base), for which
    one unit is the right sharding. Any other engine or policy: nothing changes.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if running_engine(accelerator) != "fsdp2" or plugin is None:
        yield
        return
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy, names = plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap
    present = {type(m).__name__ for m in module.modules()}
    if policy is not transformer_auto_wrap_policy or not names or all(n in present for n in names):
        yield
        return
    logger.info("FSDP2: %s holds none of %s; sharded as one unit", type(module).__name__, ", ".join(names))
    plugin.auto_wrap_policy = None
    try:
        yield
    finally:
        plugin.auto_wrap_policy = policy


# ----------------------------------------------------------------------------------------------------------------
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``parameters`` by their global 2-norm over all ranks; returns the norm before clipping.

    Plain tensors (DDP, one process: gradients are already all-reduced) and FSDP2 ``DTensor`` shards (the norm of
    the local shards is reduced across the mesh) are both handled; parameters on several meshes are combined.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    groups: dict = {}
    for p in params:
        groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    if len(groups) == 1:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    norms = []
    for group in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms))
    for mesh, group in groups.items():
        norm = total if mesh is None else DTensor.from_local(total, mesh)
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return total


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 ``DTensor`` shard (a collective: every rank calls it), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def is_sharded(accelerator: Accelerator) -> bool:
    """True when the prepared models hold only shards of their weights (FSDP2, DeepSpeed ZeRO-3)."""
    engine = running_engine(accelerator)
    return engine == "fsdp2" or (engine == "deepspeed" and zero_stage(accelerator) == 3)


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on the meta device (no memory).

    Taken before ``prepare()`` shards a model, it is the blueprint of the plain module the export fills with the
    gathered full weights (:func:`materialize`)."""
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(
            t, torch.nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def materialize(blueprint: torch.nn.Module, state_dict: dict, live: torch.nn.Module | None = None) -> torch.nn.Module:
    """Fill a :func:`meta_copy` with ``state_dict`` (full tensors) on the CPU. Buffers that are not in the state
    dict (non-persistent ones) are copied from ``live``, the prepared model (engines do not shard buffers)."""
    module = copy.deepcopy(blueprint).to_empty(device="cpu")
    missing, unexpected = module.load_state_dict({k: v.cpu() for k, v in state_dict.items()}, strict=False)
    if unexpected or missing:
        raise ValueError(f"the gathered weights do not fit the model: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}")
    live_buffers = {} if live is None else {k.removeprefix("module."): v for k, v in live.named_buffers()}
    for name, _ in module.named_buffers():
        if name in state_dict:
            continue
        if name not in live_buffers:
            raise ValueError(f"no value for the non-persistent buffer {name!r}")
        owner, _, leaf = name.rpartition(".")
        (module.get_submodule(owner) if owner else module)._buffers[leaf] = live_buffers[name].detach().cpu().clone()
    return module
