"""Load a one-step f-distill student for evaluation: an exported pipeline folder, or the student of a training
checkpoint of ``train/fdistill.py`` (to follow a run while it trains, or to compare its kept checkpoints).

    pipe = load_student("checkpoints/digits-fdistill-js")                                # an exported folder
    pipe = load_student("runs/digits-fdistill-js/checkpoints/checkpoint-2000")         # EMA weights of a run
    pipe = load_student("runs/x/checkpoints/checkpoint-600", teacher="checkpoints/digits-teacher")

A training checkpoint (``gen.training.checkpoint``: ``state.json`` plus safetensors shards written by
``torch.distributed.checkpoint``) holds the student as ``student.model.<key>`` and, when the run keeps an EMA
(``ema_decay > 0``), ``student.ema.<key>``. The student is rebuilt the way the objective built it
(:class:`gen.distill.training.FDistillObjective`): the teacher's network (full fine-tuning, ``lora_rank: 0``) or the
teacher with the student's LoRA adapter (``lora_rank > 0``; the adapter is merged into a plain network, as the
export does), from the run's ``config.yaml`` (``<run>/checkpoints/checkpoint-N`` -> ``<run>/config.yaml``). The
tensors are read through ``torch.distributed.checkpoint`` with the Hugging Face safetensors reader, so a sharded
(FSDP2) checkpoint loads on one process as well. The result is the teacher family's one-step pipeline
(:meth:`gen.distill.teachers.Teacher.one_step_pipeline`) with the run's ``generator_timestep`` and
``generator_prediction``: the pipeline the run's export writes, with the checkpoint's weights. Every family of
:mod:`gen.distill.teachers` works (the digits DDIM teacher and the digits interpolant are the tested ones).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

__all__ = ["is_training_checkpoint", "load_student", "student_from_checkpoint"]


def is_training_checkpoint(path) -> bool:
    """Whether ``path`` is a complete training checkpoint folder (it has ``state.json``)."""
    from gen.training.checkpoint import STATE_FILE

    return (Path(path) / STATE_FILE).is_file()


def load_student(path, teacher: str | Path | None = None, ema: bool = True):
    """The one-step pipeline at ``path``: an exported pipeline folder (``model_index.json`` of a ``OneStep*``
    pipeline), or a training checkpoint folder ``<run>/checkpoints/checkpoint-N`` (:func:`student_from_checkpoint`).

    Args:
        path: the folder.
        teacher: checkpoints only: the teacher's pipeline folder (default: the ``teacher`` of the run's config).
        ema: checkpoints only: the EMA weights when the run kept an EMA (else the raw student).

    Raises:
        ValueError: a path that is neither, naming it.
    """
    import pipelines

    path = Path(path)
    index = path / "model_index.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name", "")
        if not name.startswith("OneStep") or not hasattr(pipelines, name):
            raise ValueError(f"{str(path)!r} holds a {name or 'unnamed'} pipeline, not a one-step student "
                             "(OneStepPipeline, OneStepDiTPipeline, OneStepSDXLPipeline, OneStepSD3Pipeline)")
        return getattr(pipelines, name).from_pretrained(path)
    if is_training_checkpoint(path):
        return student_from_checkpoint(path, teacher, ema)
    raise ValueError(f"{str(path)!r} is neither a one-step pipeline folder (model_index.json) nor a complete "
                     "training checkpoint (checkpoint-N with state.json) of train/fdistill.py")


def _run_config(folder: Path) -> dict:
    import yaml

    file = folder.parent.parent / "config.yaml"
    if folder.parent.name != "checkpoints" or not file.is_file():
        raise ValueError(f"{str(folder)!r} is not inside a run folder <run>/checkpoints/checkpoint-N with "
                         "<run>/config.yaml: the generator settings and the teacher are read from there")
    return yaml.safe_load(file.read_text())


def _student_network(info, cfg: dict) -> torch.nn.Module:
    """A network shaped like the run's student: the teacher's network (full fine-tuning), or an AdapterView of the
    student's LoRA adapter over the teacher's (or ``student_init``'s) network."""
    from .lora import AdapterView, inject_adapters

    base = info.net  # loaded for this call only: no copy needed
    rank = int(cfg.get("lora_rank") or 0)
    if rank > 0 and cfg.get("student_init") and not cfg.get("lora_shared_base", True):  # LoRA over student_init
        from .training import load_student_init

        base = load_student_init(cfg["student_init"])
    if rank == 0:
        return base.requires_grad_(False)
    targets = [t.strip() for t in str(cfg.get("lora_targets", "")).split(",") if t.strip()]
    inject_adapters(base, ("student",), rank, cfg.get("lora_alpha"), targets, int(cfg.get("seed", 0)))
    return AdapterView(base, "student")


def student_from_checkpoint(folder, teacher: str | Path | None = None, ema: bool = True):
    """The one-step pipeline of the student in a training checkpoint of ``train/fdistill.py``.

    Args:
        folder: ``<run>/checkpoints/checkpoint-N`` (``state.json`` and safetensors shards; DeepSpeed checkpoints:
            their EMA file only, the raw DeepSpeed weights unpickle and are not read here).
        teacher: the teacher's pipeline folder or hub id (default: ``teacher`` of ``<run>/config.yaml``).
        ema: read the EMA weights (``student.ema.*``) when the run kept an EMA; ``False`` or a run without EMA:
            the raw student (``student.model.*``).

    Returns:
        the teacher family's one-step pipeline (``OneStepPipeline`` for the digits teacher and the interpolant).

    Raises:
        ValueError: naming the folder: not an f-distill checkpoint, a toy run (its students are evaluated from the
            exported ``generator/``), a missing or corrupt shard, tensors that do not fit the teacher.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from gen.training.checkpoint import FORMAT_DCP, FORMAT_DEEPSPEED, CheckpointManager, verify_files

    from .lora import AdapterView, merged_network
    from .teachers import load_teacher
    from .training import TOY_PREFIX

    folder = Path(folder)
    where = f"{str(folder)!r}"
    try:
        state = CheckpointManager.read_state(folder)
    except ValueError as err:
        raise ValueError(f"{where} is not a readable training checkpoint: {err}") from None
    objective = state.get("fingerprint", {}).get("objective")
    if objective != "fdistill" or "student" not in state.get("models", {}):
        raise ValueError(f"{where} is a checkpoint of the {objective!r} objective, not of train/fdistill.py")
    cfg = _run_config(folder)
    teacher = str(teacher or cfg["teacher"])
    if teacher.startswith(TOY_PREFIX):
        raise ValueError(f"{where} is a toy run ({teacher}): evaluate its exported generator/ instead")
    verify_files(folder, state)
    entry = state["models"]["student"]
    use_ema = ema and "ema_num_updates" in entry
    info = load_teacher(teacher)
    net = _student_network(info, cfg)
    own = {k: v for k, v in net.state_dict().items() if not use_ema or v.is_floating_point()}
    if state["format"] == FORMAT_DEEPSPEED:
        if not use_ema:
            raise ValueError(f"{where} is a DeepSpeed checkpoint: its raw weights unpickle on load and are not "
                             "read here; a run with ema_decay > 0 has a plain safetensors EMA file")
        loaded = load_file(str(folder / "student.ema.safetensors"))
    elif state["format"] == FORMAT_DCP:
        prefix = "student.ema." if use_ema else "student.model."
        templates = {prefix + k: torch.empty_like(v, device="cpu", dtype=torch.float32 if use_ema else v.dtype)
                     for k, v in own.items()}
        try:
            with warnings.catch_warnings():  # one process without a process group is the intended use
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(templates, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
        except Exception as err:  # noqa: BLE001 - DCP raises several kinds for a shard that does not fit
            raise ValueError(f"cannot read the student from {where} with the teacher {teacher!r} (a shard is "
                             f"missing or corrupt, or the run had another teacher or LoRA layout): "
                             f"{type(err).__name__}: {str(err)[:300]}") from err
        loaded = {k[len(prefix):]: v for k, v in templates.items()}
    else:
        raise ValueError(f"{where} has the unknown checkpoint format {state['format']!r}")
    missing = sorted(set(own) - set(loaded))
    if missing:
        raise ValueError(f"{where} lacks student tensors of the teacher's network (e.g. {missing[:3]}): another "
                         "teacher or LoRA layout")
    sd = net.state_dict()
    with torch.no_grad():
        for k in own:
            sd[k].copy_(loaded[k].to(sd[k].dtype))
    final = merged_network(net) if isinstance(net, AdapterView) else net
    return info.one_step_pipeline(final.eval(), cfg["generator_timestep"],
                                  cfg.get("generator_prediction", "scheduler"))
