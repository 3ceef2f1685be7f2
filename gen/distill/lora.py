"""The student and the fake score as two peft LoRA adapters over ONE frozen copy of the teacher's weights.

    inject_adapters(teacher, ("student", "fake"), rank=4, targets=("to_q", "to_k", "to_v", "to_out.0"), seed=0)
    student = AdapterView(teacher, "student")   # its parameters (optimizer, EMA, checkpoint): the student's LoRA only
    fake = AdapterView(teacher, "fake")
    frozen = AdapterView(teacher, None)         # the teacher: the base with every adapter disabled; no parameters

A view is a module of its own: its registered submodules are its adapter's ``lora_A`` / ``lora_B`` layers (the same
objects peft put into the base), never the base, so ``parameters()``, ``state_dict()``, DDP/FSDP2 wrapping, the
optimizer, the EMA and the checkpoints all see the adapter alone. Calling a view runs the shared base with its
adapter switched on for that one call: every LoRA layer of the base gets peft's ``_active_adapter`` /
``_disable_adapters`` set and restored afterwards. (peft's own ``set_adapter`` / ``enable_adapters`` also flip the
``requires_grad`` of adapter weights, which would undo the training loop's per-phase freezing: they are not used.)

The base is held by a reference that deep copies share (:class:`_Shared`), so a copy of a view (the loop's meta
blueprint for sharded exports) never copies the base. :func:`merged_network` gives the plain network of the
teacher's architecture with one adapter's weights merged in (the export).
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


class _Shared:
    """A reference to a module that ``copy.deepcopy`` does not follow (every copy points to the same base)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo):
        return self


def lora_layers(base: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every peft LoRA layer in ``base``."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in base.named_modules() if isinstance(m, LoraLayer)]


def check_targets(net: nn.Module, targets, who: str) -> None:
    """``ValueError`` when no module of ``net`` is named ``t`` (or ends with ``.t``) for a ``t`` in ``targets``, or
    when a matched module is not a ``Linear`` / ``Conv2d`` (the layers whose LoRA merges into a plain weight here)."""
    hits = [(n, m) for n, m in net.named_modules() for t in targets if n == t or n.endswith("." + t)]
    if not hits:
        raise ValueError(f"lora_targets {list(targets)} match no module of the {who} ({type(net).__name__})")
    bad = sorted({type(m).__name__ for _, m in hits if not isinstance(m, SUPPORTED_LAYERS)})
    if bad:
        raise ValueError(f"lora_targets {list(targets)} match {', '.join(bad)} modules of the {who}; LoRA targets "
                         "must be Linear or Conv2d layers")


def inject_adapters(base: nn.Module, names, rank: int, alpha: float | None, targets, seed: int) -> None:
    """Add one peft LoRA adapter per name to the frozen ``base`` (in place), each initialised from its own seed
    (``seed + index``: A Gaussian, B zero, so every adapter starts as the base), and make only the adapters train.

    Raises:
        ValueError: a target that matches no module, or a module that is not Linear / Conv2d.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = [t for t in targets if t]
    check_targets(base, targets, "teacher")
    base.requires_grad_(False)
    for i, name in enumerate(names):
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights="gaussian")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            torch.manual_seed(seed + i)
            inject_adapter_in_model(config, base, adapter_name=name)
    for _, layer in lora_layers(base):
        for adapter in names:
            layer.lora_A[adapter].requires_grad_(True)
            layer.lora_B[adapter].requires_grad_(True)


@contextlib.contextmanager
def switched(base: nn.Module, adapter: str | None, layers=None):
    """Run ``base`` with only ``adapter`` active (None: every adapter off, the plain base) inside the block."""
    layers = lora_layers(base) if layers is None else layers
    saved = [(layer._active_adapter, layer._disable_adapters) for _, layer in layers]
    for _, layer in layers:
        if adapter is None:
            layer._disable_adapters = True
        else:
            layer._active_adapter = [adapter]
            layer._disable_adapters = False
    try:
        yield
    finally:
        for (_, layer), (active, disabled) in zip(layers, saved):
            layer._active_adapter, layer._disable_adapters = active, disabled


def _key(name: str) -> str:
    return name.replace(".", "-")


class AdapterView(nn.Module):
    """One LoRA adapter of a shared base network as a module of its own (see the module docstring).

    Args:
        base: the network holding the adapters (from :func:`inject_adapters`); a view never copies or moves it.
        adapter: the adapter this view trains and switches on; None: the base with every adapter off (no
            parameters; the frozen teacher).
    """

    def __init__(self, base: nn.Module, adapter: str | None):
        super().__init__()
        self._base = _Shared(base)
        self.adapter = adapter
        layers = lora_layers(base)
        self._layers = _Shared(layers)  # not a child list: the views would otherwise register the base layers
        self.lora = nn.ModuleDict()
        if adapter is not None:
            if not layers or any(adapter not in layer.lora_A for _, layer in layers):
                raise ValueError(f"the base network has no LoRA adapter {adapter!r}")
            for name, layer in layers:
                self.lora[_key(name)] = nn.ModuleDict({"lora_A": layer.lora_A[adapter],
                                                       "lora_B": layer.lora_B[adapter]})

    @property
    def base_network(self) -> nn.Module:
        """The shared base (followed by :func:`gen.sampling.adapters.unwrap_network`)."""
        return self._base.module

    @property
    def config(self):
        return self.base_network.config

    def forward(self, *args, **kwargs):
        with switched(self.base_network, self.adapter, self._layers.module):
            return self.base_network(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}, base={type(self.base_network).__name__}"


def plain_copy(base: nn.Module) -> nn.Module:
    """A deep copy of ``base`` without any LoRA: every LoRA layer replaced by a copy of its base layer (the
    adapters' weights are not copied). Keys and architecture are those of the network before injection."""
    memo = {id(layer): copy.deepcopy(layer.get_base_layer()) for _, layer in lora_layers(base)}
    out = copy.deepcopy(base, memo)
    if "peft_config" in out.__dict__:
        del out.__dict__["peft_config"]
    return out


def lora_delta(base_layer: nn.Module, weight_a: torch.Tensor, weight_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight update ``scaling * B A`` of one LoRA layer (peft's merge), in float32.

    Linear: ``B [out, r] @ A [r, in]``. Conv2d: A is a conv ``in -> r`` with the base kernel, B a 1x1 conv ``r -> out``;
    the merged kernel is ``conv2d(A^T, B)^T`` (a 1x1 base kernel reduces to the matrix product).
    """
    a, b = weight_a.detach().float(), weight_b.detach().float()
    if isinstance(base_layer, nn.Linear):
        return (b @ a) * scaling
    if isinstance(base_layer, nn.Conv2d):
        if base_layer.groups != 1:
            raise ValueError(f"cannot merge LoRA into a grouped convolution (groups={base_layer.groups})")
        if tuple(base_layer.weight.shape[2:]) == (1, 1):
            return (b[:, :, 0, 0] @ a[:, :, 0, 0])[:, :, None, None] * scaling
        return F.conv2d(a.transpose(0, 1), b).transpose(0, 1) * scaling
    raise ValueError(f"cannot merge LoRA into a {type(base_layer).__name__}; supported: Linear, Conv2d")


@torch.no_grad()
def merged_network(view: AdapterView) -> nn.Module:
    """The plain network of the base's architecture with ``view``'s adapter weights merged into the base weights.

    The adapter weights are read from the view's own registered layers (after the export loaded the EMA into them;
    under FSDP2 those of the gathered copy), the base weights and LoRA scalings from the shared base.
    """
    base = view.base_network
    out = plain_copy(base)
    if view.adapter is None:
        return out
    modules = dict(out.named_modules())
    for name, layer in lora_layers(base):
        mine = view.lora[_key(name)]
        target = modules[name]
        delta = lora_delta(target, mine["lora_A"].weight, mine["lora_B"].weight, layer.scaling[view.adapter])
        target.weight.add_(delta.to(target.weight.dtype))
    return out
